"""The review sample in Label Studio's import format, and Label Studio's annotations back as labels.

    editforge review --preset world --export label-studio --out review-tasks.json
    editforge review --preset world --import-label-studio export.json --reviewer alice

Label Studio (chosen over FiftyOne: its import is a JSON list of tasks and an XML labeling config, no
library needed here; FiftyOne's would need its own package and database) gets one task per pair of the
review queue: the two images, the instruction, the captions, every score, and the pair's identity
(partition, sample key, ``pair_sha256``, stratum, weight). Images are referenced where they are: an
object store's ``s3://``/``gs://`` URL (Label Studio reads it through a cloud storage connection), or a
local file as ``/data/local-files/?d=<path under the run>`` (Label Studio's local files, with
``LOCAL_FILES_DOCUMENT_ROOT`` set to the run's folder; docs/review.md). The labeling config's choices
are the page's four labels with the same hotkeys. Importing reads Label Studio's JSON export: each
task's latest annotation goes through :func:`tasks.filter.labels.check_label` like a label from the page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tasks.common import storage

CHOICES = ("good", "wrong", "broken", "unsure")
CONFIG = """<View>
  <Header value="$instruction"/>
  <Text name="captions" value="$captions"/>
  <View style="display: flex; gap: 1em">
    <Image name="before" value="$before" zoom="true"/>
    <Image name="after" value="$after" zoom="true"/>
  </View>
  <Choices name="label" toName="after" choice="single" showInline="true" required="true">
    <Choice value="good" alias="good" hotkey="1" hint="good edit"/>
    <Choice value="wrong" alias="wrong" hotkey="2" hint="wrong edit"/>
    <Choice value="broken" alias="broken" hotkey="3" hint="broken image"/>
    <Choice value="unsure" alias="unsure" hotkey="4" hint="unsure"/>
  </Choices>
  <Text name="scores" value="$scores_text"/>
</View>
"""


def image_reference(url: str, output_root: str) -> str:
    """How Label Studio finds an image: an object-store URL as is, a local file under the run's folder."""
    if "://" in url and not url.startswith("file://"):
        return url
    root = Path(storage.filesystem(output_root)[1]).resolve()
    path = Path(storage.filesystem(url)[1]).resolve()
    return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix())


def tasks(state) -> list[dict[str, Any]]:
    """One Label Studio task per pair of the review queue (``state``: :class:`flows.review.ReviewState`)."""
    out = []
    for item in state.items:
        pid, key = item["partition"], item["sample_key"]
        scores = item["scores"]
        out.append({"data": {
            "before": image_reference(state.images[(pid, key, "input")], state.cfg.output_root),
            "after": image_reference(state.images[(pid, key, "edited")], state.cfg.output_root),
            "instruction": item["edit"], "captions": f"{item['input']}  →  {item['output']}",
            "scores_text": ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f"; {item['status']}",
            "scores": scores, "status": item["status"], "partition": pid, "sample_key": key,
            "caption_id": item["caption_id"], "pair_sha256": item["pair_sha256"], "render_hash": state.render_hash,
            "stratum": item["stratum"], "weight": item["weight"]}})
    return out


def write_label_studio(state, out: Path) -> dict[str, Path]:
    """Write the tasks (``out``) and the labeling config (``out`` with ``.xml``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks(state), indent=1) + "\n", encoding="utf-8")
    config = out.with_suffix(".xml")
    config.write_text(CONFIG, encoding="utf-8")
    return {"tasks": out, "config": config}


class LabelStudioFileError(ValueError):
    """A Label Studio export that does not hold this review's tasks."""


def import_label_studio(state, export: Path, reviewer: str) -> int:
    """Store the latest annotation of every task in a Label Studio JSON export as ``reviewer``'s labels."""
    from tasks.filter.labels import LabelError, check_label

    try:
        exported = json.loads(Path(export).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LabelStudioFileError(f"{export}: not a readable Label Studio JSON export ({err})") from None
    if not isinstance(exported, list):
        raise LabelStudioFileError(f"{export}: a Label Studio JSON export is a list of tasks")
    rows = []
    session = f"labelstudio-{Path(export).stem[:40]}".replace("_", "-").replace(".", "-")
    for n, task in enumerate(exported):
        data = task.get("data", {}) if isinstance(task, dict) else {}
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")] \
            if isinstance(task, dict) else []
        if not annotations:
            continue
        chosen = [r["value"]["choices"][0] for r in annotations[-1].get("result", [])
                  if r.get("from_name") == "label" and r.get("value", {}).get("choices")]
        if not chosen:
            continue
        if data.get("render_hash") != state.render_hash:
            raise LabelStudioFileError(f"{export}: task {n} is of render {data.get('render_hash')!r}, this review is of "
                               f"render {state.render_hash} (export the tasks again)")
        payload = {"partition": data.get("partition"), "sample_key": data.get("sample_key"), "label": chosen[0],
                   "reviewer": reviewer, "session": session, "pair_sha256": data.get("pair_sha256")}
        try:
            rows.append(check_label(payload, state.known))
        except LabelError as err:
            raise LabelStudioFileError(f"{export}: task {n}: {err}") from None
    if rows:
        state.store.append(rows)
    return len(rows)
