"""The paper's evaluation of the editing model (InstructPix2Pix, Fig. 8 / 10): `{output_root}/eval/<hash>/`.

On held-out samples (the run's ``val`` shards by default) the model edits every input once per image
guidance scale at text guidance 7.5, and the filter's own CLIP scorer scores each edit (image similarity
against directional similarity: the paper's plot). Writes ``metrics.json``, ``eval.parquet``, ``eval.png``
and ``examples.png``; the folder's hash covers the model, the held-out shards, CLIP and the settings.

The metrics, the files and the hash in full: docs/training.md ("In the code"); usage: docs/running.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common import layout, storage
from tasks.common.config import SIZE_MULTIPLE, PipelineConfig
from tasks.common.errors import PermanentError

DEFAULT_IMAGE_GUIDANCE = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)  # the paper's sweep (Fig. 8 / 10)
DEFAULT_TEXT_GUIDANCE = 7.5
DEFAULT_LIMIT = 100
EXAMPLE_ROWS = 4
SPLITS = ("val", "train")

log = logging.getLogger("editforge")


class EvalInputError(PermanentError, ValueError):
    """The held-out set or a setting cannot be evaluated (the message says why and what to do)."""


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation computes (all of it is in the folder's hash)."""

    image_guidance: tuple[float, ...] = DEFAULT_IMAGE_GUIDANCE
    text_guidance: float = DEFAULT_TEXT_GUIDANCE
    steps: int = 50
    seed: int = 0
    resolution: int = 256
    limit: int = DEFAULT_LIMIT
    split: str = "val"

    def __post_init__(self) -> None:
        values = tuple(float(g) for g in self.image_guidance)
        object.__setattr__(self, "image_guidance", values)
        problems = []
        if not values:
            problems.append("no image guidance scale given")
        if len(set(values)) != len(values):
            problems.append(f"image guidance scales {list(values)} repeat a value")
        if any(g < 1 for g in values):  # the pipeline would silently skip guidance (tasks.train.infer)
            problems.append(f"image guidance scales {list(values)}: each must be >= 1")
        if self.text_guidance <= 1:
            problems.append(f"text guidance {self.text_guidance}: must be > 1 (the paper: 7.5)")
        if self.steps < 1:
            problems.append(f"steps {self.steps}: must be >= 1")
        if self.resolution < SIZE_MULTIPLE or self.resolution % SIZE_MULTIPLE:
            problems.append(f"resolution {self.resolution}: a multiple of {SIZE_MULTIPLE}")
        if self.limit < 1:
            problems.append(f"limit {self.limit}: must be >= 1")
        if self.split not in SPLITS:
            problems.append(f"split {self.split!r}: one of {', '.join(SPLITS)}")
        if problems:
            raise EvalInputError("evaluate: " + "; ".join(problems))


def parse_guidance_list(text: str) -> tuple[float, ...]:
    """'1.0,1.5,2' -> (1.0, 1.5, 2.0); EvalInputError naming the bad entry."""
    values = []
    for part in str(text).split(","):
        try:
            values.append(float(part.strip()))
        except ValueError:
            raise EvalInputError(
                f"--image-guidance {text!r}: {part.strip()!r} is not a number (expected e.g. 1.0,1.2,1.4)"
            ) from None
    return tuple(values)


def folder_fingerprint(folder: str | Path) -> list[list[Any]]:
    """[relative path, size, mtime_ns] of every file of a model folder: a rewritten file changes it."""
    root = Path(folder)
    return [
        [p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def model_identity(model_dir: str, train_hash: str | None) -> dict[str, Any]:
    """What the hash knows of the model: the training flow's hash for the config's own model (it covers
    the weights), else the folder's absolute path and fingerprint."""
    if train_hash:
        return {"train_hash": train_hash}
    return {"folder": str(Path(model_dir).resolve()), "files": folder_fingerprint(model_dir)}


def clip_identity(cfg: PipelineConfig) -> dict[str, Any]:
    return {"clip": cfg.models.clip, "clip_path": cfg.models.clip_path, "resize": cfg.render.clip_resize}


def heldout_shards(
    cfg: PipelineConfig, index_url: str | None, split: str, args: str = "--preset <preset>"
) -> dict[str, Any]:
    """The held-out set: {index (URL), own, split, shards (resolved URLs), entries (as stored: hashed),
    index_hash, samples}; EvalInputError when the index is missing or the split is empty."""
    from tasks.pack.index import index_url as own_index_url
    from tasks.pack.index import resolve

    own = index_url is None
    url = index_url or own_index_url(cfg)
    if not storage.exists(url):
        hint = (
            f"run `editforge run {args}` (and `editforge train {args}`) first, or pass --index"
            if own
            else "pass the index.json of existing shards"
        )
        raise EvalInputError(f"no held-out set: no shard index at {url}; {hint}")
    stored = storage.read_json(url)
    entries = list(stored.get("splits", {}).get(split, {}).get("shards", []))
    if not entries:
        other = "train" if split == "val" else "val"
        raise EvalInputError(
            f"no held-out set: {url} has no {split!r} shards (pack.val_fraction="
            f"{cfg.pack.val_fraction}); pass --split {other} to evaluate on the {other} split"
            + (" (pairs the model was trained on, not held out)" if other == "train" else "")
        )
    resolved = resolve(stored, url)
    return {
        "index": url,
        "own": own,
        "split": split,
        "shards": resolved["splits"][split]["shards"],
        "entries": entries,
        "index_hash": stored.get("config_hash"),
        "samples": int(stored["splits"][split].get("samples", 0)),
    }


def eval_hash(
    model: dict[str, Any], heldout: dict[str, Any], clip: dict[str, Any], settings: EvalSettings
) -> str:
    """The folder name: 16 hex of the sha256 of what the evaluation computes (the project's hash shape)."""
    shards = {
        "entries": heldout["entries"],
        "index_hash": heldout["index_hash"],
        "split": heldout["split"],
        **({} if heldout["own"] else {"index": heldout["index"]}),
    }
    blob = json.dumps(
        {"stage": layout.EVAL, "model": model, "heldout": shards, "clip": clip, "settings": asdict(settings)},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class HeldOutExample:
    key: str
    image: Any  # PIL image at the evaluation resolution (shorter side, centre crop)
    instruction: str
    input_caption: str
    output_caption: str
    seed: int = 0


def read_heldout(urls: Sequence[str], limit: int, resolution: int, seed: int = 0) -> list[HeldOutExample]:
    """The first `limit` samples of `urls` in shard order, with the captions of their `json`."""
    from tasks.train.data import center_pair, decode, raw_samples

    out: list[HeldOutExample] = []
    for raw in raw_samples(list(urls)):
        example = decode(raw)
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except ValueError:
            meta = {}
        captions = meta.get("input"), meta.get("output")
        if not all(isinstance(c, str) and c.strip() for c in captions):
            raise EvalInputError(
                f"sample {example.key!r} in {raw.get('__url__')} has no input and output captions "
                "in its json (the pack stage writes them as `input`, `output`): the directional "
                "similarity needs both"
            )
        view = center_pair(example, resolution)
        out.append(
            HeldOutExample(
                example.key,
                view.original,
                example.instruction,
                captions[0].strip(),
                captions[1].strip(),
                seed + len(out),
            )
        )
        if len(out) >= limit:
            break
    if not out:
        raise EvalInputError(f"no samples in the held-out shards {list(urls)[:3]}")
    return out


def to_unit_tensor(images: Sequence[Any]):
    """PIL RGB images -> float tensor (N, 3, H, W) in [0, 1], the CLIP scorer's input."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(255.0)


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    examples: list[list[Any]] = field(default_factory=list)  # per example row: input, then one edit per s_I
    edit_s: float = 0.0


def run_evaluation(
    pipe,
    scorer,
    examples: list[HeldOutExample],
    settings: EvalSettings,
    batch_size: int = 8,
    on_progress: Callable[[float], None] | None = None,
) -> EvalResult:
    """Edit every example at every image guidance scale and score the edits with `scorer` (a ClipScorer),
    `batch_size` examples at a time (only the example sheet's images are kept)."""
    from tasks.train.infer import edit_images

    rows: list[dict[str, Any]] = []
    sheet = [[e.image] for e in examples[:EXAMPLE_ROWS]]
    started, total, done = time.perf_counter(), len(examples) * len(settings.image_guidance), 0
    for g in settings.image_guidance:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            edited = edit_images(
                pipe,
                [e.image for e in chunk],
                [e.instruction for e in chunk],
                [e.seed for e in chunk],
                guidance_scale=settings.text_guidance,
                image_guidance_scale=g,
                steps=settings.steps,
            )
            metrics = scorer.score_pairs(
                to_unit_tensor([e.image for e in chunk]),
                to_unit_tensor(edited),
                [e.input_caption for e in chunk],
                [e.output_caption for e in chunk],
            )
            for i, (e, img) in enumerate(zip(chunk, edited, strict=True)):
                rows.append(
                    {
                        "key": e.key,
                        "sample": start + i,
                        "seed": e.seed,
                        "image_guidance": g,
                        "text_guidance": settings.text_guidance,
                        "steps": settings.steps,
                        "instruction": e.instruction,
                        "input_caption": e.input_caption,
                        "output_caption": e.output_caption,
                        **{k: float(v[i]) for k, v in metrics.items()},
                    }
                )
                if start + i < len(sheet):
                    sheet[start + i].append(img)
            done += len(chunk)
            if on_progress:
                on_progress(done / total)
    return EvalResult(rows, summarise(rows, settings), sheet, time.perf_counter() - started)


def summarise(rows: list[dict[str, Any]], settings: EvalSettings) -> list[dict[str, Any]]:
    """One row per image guidance scale (in the order given): the means over the samples, and n."""
    out = []
    for g in settings.image_guidance:
        mine = [r for r in rows if r["image_guidance"] == g]
        n = len(mine)
        out.append(
            {
                "image_guidance": g,
                "text_guidance": settings.text_guidance,
                **{
                    f"{k}": sum(r[k] for r in mine) / n
                    for k in ("clip_sim_image", "clip_sim_dir", "clip_sim_1")
                },
                "n": n,
            }
        )
    return out


def scale_label(value: float) -> str:
    """1.0 -> '1.0', 1.25 -> '1.25' (a guidance scale as the paper labels its points)."""
    return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"


def plot_png(summary: list[dict[str, Any]], title: str) -> bytes:
    """The paper's plot: mean directional similarity (x) against mean image similarity (y), one labelled
    point per image guidance scale, joined in the order of the sweep (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [r["clip_sim_dir"] for r in summary], [r["clip_sim_image"] for r in summary]
    text_guidance = summary[0]["text_guidance"] if summary else DEFAULT_TEXT_GUIDANCE
    ax.plot(xs, ys, "-o", color="tab:blue", label=f"text guidance {text_guidance:g}")
    for r, x, y in zip(summary, xs, ys, strict=True):
        ax.annotate(
            scale_label(r["image_guidance"]), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.ticklabel_format(useOffset=False, style="plain")  # the figures themselves on the axes, no offset
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel("CLIP text-image direction similarity")
    ax.set_ylabel("CLIP image similarity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, title="labels: image guidance", title_fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def examples_png(sheet: list[list[Any]]) -> bytes | None:
    """Input | edit at each image guidance scale, one row per example."""
    from PIL import Image

    if not sheet:
        return None
    w, h = sheet[0][0].size
    grid = Image.new("RGB", (w * len(sheet[0]), h * len(sheet)), "white")
    for r, row in enumerate(sheet):
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((w, h)), (c * w, r * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(folder: str, record: dict[str, Any], result: EvalResult, title: str) -> dict[str, str]:
    """eval.parquet, eval.png, examples.png, then metrics.json (last: a folder with it is complete)."""
    import pandas as pd

    files = {
        "samples": storage.url_join(folder, layout.EVAL_SAMPLES),
        "plot": storage.url_join(folder, layout.EVAL_PLOT),
        "metrics": storage.url_join(folder, layout.EVAL_METRICS),
    }
    storage.write_parquet_atomic(files["samples"], pd.DataFrame(result.rows))
    storage.write_bytes_atomic(files["plot"], plot_png(result.summary, title))
    sheet = examples_png(result.examples)
    if sheet:
        files["examples"] = storage.url_join(folder, layout.EVAL_EXAMPLES)
        storage.write_bytes_atomic(files["examples"], sheet)
    storage.write_json_atomic(files["metrics"], {**record, "metrics": result.summary})
    return files


def quiet_loading() -> None:
    """No weight-loading progress bars from diffusers / transformers (one line per image or scale instead)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def command_args(preset: str, overrides: Sequence[str] | None) -> str:
    """`--preset P --set K=V ...`: the options to repeat in a suggested command."""
    import shlex

    return " ".join(
        [f"--preset {shlex.quote(preset)}", *(f"--set {shlex.quote(o)}" for o in overrides or [])]
    )


def resolve_model(
    cfg: PipelineConfig, model: str | None, index_url: str | None = None, args: str = "--preset <preset>"
) -> tuple[str, str | None]:
    """(model folder, train hash or None): `model` when given (checked: an InstructPix2Pix pipeline), else the
    model the training flow finished for this config (on `index_url`, default the run's index)."""
    from tasks.train.model import check_editing_model
    from tasks.train.stage import trained_model

    if model:
        check_editing_model(model)
        return model, None
    folder, train_hash = trained_model(cfg, index_url, args)
    if "://" in folder and not folder.startswith("file://"):
        raise EvalInputError(
            f"the trained model is at {folder}, not on a local disk: copy the folder here and "
            "pass --model PATH"
        )
    check_editing_model(folder)
    return folder, train_hash


def plan_evaluation(
    cfg: PipelineConfig,
    settings: EvalSettings,
    model: str | None = None,
    index_url: str | None = None,
    args: str = "--preset <preset>",
) -> dict[str, Any]:
    """Everything checked and resolved before any model is loaded: the model, the held-out shards, the
    hash and the output folder (a JSON-able dict)."""
    model_dir, train_hash = resolve_model(cfg, model, index_url, args)
    heldout = heldout_shards(cfg, index_url, settings.split, args)
    identity, clip = model_identity(model_dir, train_hash), clip_identity(cfg)
    digest = eval_hash(identity, heldout, clip, settings)
    return {
        "eval_hash": digest,
        "dir": layout.eval_dir(cfg.output_root, digest),
        "model_dir": model_dir,
        "model": identity,
        "heldout": heldout,
        "clip": clip,
        "settings": asdict(settings),
    }


def evaluate(
    cfg: PipelineConfig,
    plan: dict[str, Any],
    device: str | None = None,
    batch_size: int = 8,
    logger: logging.Logger | None = None,
) -> dict[str, Any]:
    """Run a planned evaluation (:func:`plan_evaluation`) and write its folder; return the small record."""
    from tasks.common.devices import torch_device
    from tasks.common.models import load_clip
    from tasks.scoring.clip import ClipScorer
    from tasks.train.model import load_pipeline

    logger = logger or log
    settings = EvalSettings(
        **{**plan["settings"], "image_guidance": tuple(plan["settings"]["image_guidance"])}
    )
    where = torch_device(device or cfg.train.device, "--device" if device else "train.device")
    examples = read_heldout(plan["heldout"]["shards"], settings.limit, settings.resolution, settings.seed)
    quiet_loading()
    pipe = load_pipeline(plan["model_dir"], device=where)
    scorer = ClipScorer(
        load_clip(cfg.models.clip, cfg.models.clip_path), where, resize=cfg.render.clip_resize
    )
    logger.info(
        "evaluate: %d %s samples x %d image guidance scales, text %g, %d steps, %dpx on %s",
        len(examples),
        settings.split,
        len(settings.image_guidance),
        settings.text_guidance,
        settings.steps,
        settings.resolution,
        where,
    )
    last = [time.monotonic()]

    def progress(fraction: float) -> None:  # a log line at most every 10 s
        if time.monotonic() - last[0] >= 10 and fraction < 1:
            logger.info("evaluate: %.0f%% of the edits done", 100 * fraction)
            last[0] = time.monotonic()

    result = run_evaluation(pipe, scorer, examples, settings, batch_size, progress)
    record = {
        "name": cfg.name,
        "eval_hash": plan["eval_hash"],
        "model_dir": plan["model_dir"],
        "model": plan["model"],
        "clip": plan["clip"],
        "settings": plan["settings"],
        "heldout": {k: plan["heldout"][k] for k in ("index", "split", "index_hash", "entries")}
        | {"evaluated": len(examples)},
    }
    title = (
        f"EditForge {cfg.name}: {len(examples)} {settings.split} samples, {settings.steps} steps, "
        f"text guidance {settings.text_guidance:g}"
    )
    files = write_outputs(plan["dir"], record, result, title)
    return {
        "eval_hash": plan["eval_hash"],
        "dir": plan["dir"],
        "files": files,
        "metrics": result.summary,
        "samples": len(examples),
        "edit_s": round(result.edit_s, 2),
        "model_dir": plan["model_dir"],
        "settings": plan["settings"],
    }
