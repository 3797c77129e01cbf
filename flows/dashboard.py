"""What a run shows on the Prefect dashboard while it runs, read from disk so it is right however the
work is split (one flow run, workers splitting a stage, the fan-out's many child runs):

- **stage tables** (`editforge-<name>-<stage>-<hash8>`): one row per finished partition, republished
  each time a partition finishes from the manifests on disk — rows appear while the stage runs, and
  every flow run that worked on the stage adds to the same table. Columns for reading first
  (partition, status, in, out, the stage's ``headline``: for render the pass rate, kept pairs, UNet
  calls per kept pair, samples/s, per-criterion pass rates and medians), every other figure after;
- **run-wide progress** (`editforge-<name>-progress-<hash8>`: a progress artifact, the share of the
  chain's partitions done; `editforge-<name>-status-<hash8>`: a markdown table per stage of partitions
  done / total, kept pairs so far and the ETA from the rate of its last finished partitions);
- **a partition's live figures**: its task run's progress artifact, whose description carries the
  running figures as it checkpoints (render: samples, pass rate, pairs kept so far, samples/s);
- **events**: ``editforge.partition.completed`` / ``.failed`` / ``.low-pass-rate`` (a render
  partition below ``run.alert_min_pass_rate``) with stage, partition, counts, pass rate and wall time
  in the payload, and ``editforge.run.completed``; `infra/automations/` acts on them.

Publishing never fails a partition: a dashboard error is logged and the work goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PROGRESS_HOOK

log = logging.getLogger("editforge")
ETA_WINDOW = 20  # the ETA's rate: the last this many finished partitions of the stage
FIRST = ("partition", "status", "in", "out")
LAST = ("rejected", "wall_time_s")
_CACHE: dict[str, dict] = {}  # _SUCCESS.json URL -> manifest (a finished partition's does not change)


# -- reading -----------------------------------------------------------------------------------------

def finished(cfg: PipelineConfig, stage: str, config_hash: str | None = None) -> list[dict]:
    """The manifests of ``stage``'s partitions finished under this config, by partition id (one listing,
    then only the markers not read before)."""
    expected = config_hash or registry.stage_hash(cfg, stage)
    folder = layout.stage_dir(cfg.output_root, stage, expected)
    found = []
    for url in storage.list_files(folder, f"part-*/{layout.SUCCESS}"):
        if url not in _CACHE:
            try:
                manifest = storage.read_json(url)
            except (OSError, ValueError):
                continue  # written as we list, or damaged: the contract reports it when the stage runs
            if not isinstance(manifest, dict) or manifest.get("config_hash") != expected:
                continue
            _CACHE[url] = manifest
        found.append(_CACHE[url])
    return sorted(found, key=lambda m: m["partition_id"])


def pass_rate(stage: str, manifest: dict) -> float | None:
    """Render: passed / samples drawn; another stage: out / in."""
    if "pass_rate" in manifest:
        return manifest["pass_rate"]
    counts = manifest.get("counts", {})
    return round(counts["out"] / counts["in"], 4) if counts.get("in") else None


# -- the stage table ---------------------------------------------------------------------------------

def flat_row(stage: str, manifest: dict, skipped: bool | None = None) -> dict[str, Any]:
    """Every figure of one partition's manifest as one flat row (`n_<count>`, `rejected_<reason>`,
    the stage's own figures, `median_<metric>`)."""
    counts = manifest.get("counts", {})
    rejected = manifest.get("rejected", {})
    nested = {k: v for section in ("finetune", "train") if isinstance(manifest.get(section), dict)
              for k, v in manifest[section].items()}
    figures = {k: v for k, v in {**nested, **manifest}.items()
               if k not in ("partition_id", "wall_time_s", "finished_at")
               and isinstance(v, int | float) and not isinstance(v, bool)}
    row = {
        "partition": manifest["partition_id"],
        "status": "skipped" if (skipped if skipped is not None else manifest.get("skipped")) else "done",
        "in": counts.get("in", counts.get("finetune_examples")),
        "out": counts.get("out"),
        "out_rate": pass_rate("text", {"counts": counts}) if stage != "render" else None,
        **{f"n_{k}": v for k, v in counts.items()},
        **{f"rejected_{k}": v for k, v in rejected.items()},
        **figures,
        **{f"median_{k}": round(q["q50"], 4) for k, q in manifest.get("quantiles", {}).items()},
        # each rung of the judge ladder: passed / reached (render: CLIP, DINOv2, SSIM; filter: + the VLM judge)
        **{f"pass_rate_{k[7:-3]}": round(counts[f"ladder_{k[7:-3]}_passed"] / v, 4)
           for k, v in counts.items() if k.startswith("ladder_") and k.endswith("_in") and v},
        "rejected": ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])) or "-",
        "wall_time_s": manifest.get("wall_time_s"),
    }
    return row


def table(stage: str, manifests: Iterable[dict], skipped: dict[int, bool] | None = None) -> list[dict]:
    """The stage table: one row per partition, every row with the same columns, for reading first."""
    rows = [flat_row(stage, m, (skipped or {}).get(m["partition_id"])) for m in manifests]
    if not rows:
        return []
    headline = registry.get(stage).headline
    present = {k for r in rows for k in r}
    order = [*FIRST, *(h for h in headline if h in present and h not in FIRST)]
    order += [*(k for k in sorted(present) if k not in order and k not in LAST), *LAST]
    return [{k: r.get(k) for k in order} for r in rows]


def publish_stage(cfg: PipelineConfig, stage: str, this_run: list[dict] | None = None) -> None:
    """(Re)publish the stage's table from disk; ``this_run``: the manifests of this flow run (their
    skipped flags)."""
    from prefect.artifacts import create_table_artifact

    config_hash = registry.stage_hash(cfg, stage)
    skipped = {m["partition_id"]: bool(m.get("skipped")) for m in this_run or []}
    rows = table(stage, finished(cfg, stage, config_hash), skipped)
    res = registry.get(stage).resources(cfg)
    total = len(registry.get(stage).partition_ids(cfg))
    create_table_artifact(rows, key=layout.artifact_key(cfg.name, stage, config_hash),
                          description=f"EditForge `{cfg.name}` — {stage}: {len(rows)} of {total} partitions "
                                      f"finished (per partition: {res.cpus} CPU, {res.gpus} GPU, batch {res.batch})")


# -- run-wide progress -------------------------------------------------------------------------------

def eta_s(manifests: list[dict], remaining: int, now: float | None = None) -> float | None:
    """Seconds left at the rate of the last ``ETA_WINDOW`` finished partitions: k partitions over the span
    from the first one's start to now (so it counts parallel workers and slows when they stop)."""
    timed = sorted((m for m in manifests if m.get("finished_at")), key=lambda m: m["finished_at"])[-ETA_WINDOW:]
    if not remaining:
        return 0.0
    if not timed:
        return None
    now = now if now is not None else time.time()
    start = min(m["finished_at"] - (m.get("wall_time_s") or 0.0) for m in timed)
    span = max(now, timed[-1]["finished_at"]) - start
    return round(remaining * span / len(timed), 1) if span > 0 else None


def kept_pairs(stage: str, manifests: list[dict]) -> int | None:
    """Pairs kept so far by a stage that keeps pairs (render, filter, pack), else None."""
    if stage not in ("render", "filter", "pack"):
        return None
    return sum(m.get("counts", {}).get("out", 0) for m in manifests)


def run_progress(cfg: PipelineConfig, now: float | None = None) -> list[dict]:
    """Per chain stage: partitions done / total, percent, kept pairs so far, ETA (seconds)."""
    rows = []
    for stage in registry.chain():
        done = finished(cfg, stage.name)
        total = len(stage.partition_ids(cfg))
        rows.append({"stage": stage.name, "done": len(done), "total": total,
                     "percent": round(100 * len(done) / total, 1) if total else 100.0,
                     "kept_pairs": kept_pairs(stage.name, done),
                     "eta_s": eta_s(done, max(0, total - len(done)), now)})
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_markdown(cfg: PipelineConfig, rows: list[dict]) -> str:
    lines = [f"# EditForge `{cfg.name}`: progress", "",
             "| stage | partitions | done | kept pairs so far | ETA |", "|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["kept_pairs"] is None else f"{r['kept_pairs']:,}"
        lines.append(f"| {r['stage']} | {r['done']} of {r['total']} | {r['percent']:.0f}% | {kept} | "
                     f"{_duration(r['eta_s'])} |")
    lines += ["", f"Read from `{cfg.output_root}` at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; ETA: the rate of "
              f"each stage's last {ETA_WINDOW} finished partitions."]
    return "\n".join(lines)


def publish_progress(cfg: PipelineConfig) -> list[dict]:
    """The run-wide progress artifacts (a progress bar over the chain's partitions, the per-stage table)."""
    from prefect.artifacts import create_markdown_artifact, create_progress_artifact

    rows = run_progress(cfg)
    done, total = sum(r["done"] for r in rows), sum(r["total"] for r in rows)
    pack_hash = registry.stage_hash(cfg, "pack")
    summary = "; ".join(f"{r['stage']} {r['done']}/{r['total']}" for r in rows)
    create_progress_artifact(round(100 * done / total, 1) if total else 100.0,
                             key=layout.artifact_key(cfg.name, "progress", pack_hash),
                             description=f"EditForge `{cfg.name}`: {summary}")
    create_markdown_artifact(progress_markdown(cfg, rows), key=layout.artifact_key(cfg.name, "status", pack_hash),
                             description=f"EditForge `{cfg.name}` progress per stage")
    return rows


# -- a partition's live figures ------------------------------------------------------------------------

def describe(stage: str, partition_id: int, figures: dict | None) -> str:
    """One line of running figures for the partition's progress artifact."""
    head = f"{stage} {layout.partition_name(partition_id)}"
    if not figures:
        return head
    if "samples" in figures:  # render
        rate = figures.get("pass_rate")
        parts = [f"{figures['triplets_done']}/{figures['triplets']} triplets", f"{figures['samples']} samples",
                 f"pass rate {rate:.1%}" if rate is not None else "", f"{figures['kept_so_far']} pairs kept so far",
                 f"{figures['unet_calls_per_kept_pair']} UNet calls/kept pair" if figures.get("unet_calls_per_kept_pair") else "",
                 f"{figures['samples_per_s']} samples/s" if figures.get("samples_per_s") else ""]
    else:
        parts = [f"{figures.get('done')}/{figures.get('expected')} done",
                 f"{figures['ok']} ok" if "ok" in figures else "",
                 f"{figures['per_s']} /s" if figures.get("per_s") else ""]
    return f"{head}: " + ", ".join(p for p in parts if p)


@contextmanager
def live_partition(stage: str, partition_id: int, min_interval_s: float = 2.0) -> Iterator[None]:
    """A progress artifact on the task run, updated (at most every `min_interval_s`) as the partition
    checkpoints, its description the running figures."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(0.0, description=describe(stage, partition_id, None))
    t0 = time.monotonic()
    last = {"t": 0.0, "pct": 0.0}

    def hook(fraction: float, figures: dict | None = None) -> None:
        pct = round(100 * fraction, 1)
        now = time.monotonic()
        if pct > last["pct"] and (pct >= 100 or now - last["t"] >= min_interval_s):
            if figures and "done" in figures and now > t0:
                figures = {**figures, "per_s": round(figures["done"] / (now - t0), 2)}
            try:
                update_progress_artifact(artifact_id, pct, description=describe(stage, partition_id, figures))
            except Exception as err:  # the dashboard never stops the work
                log.warning("dashboard: the progress of %s part-%05d was not updated (%s)", stage, partition_id, err)
            last.update(t=now, pct=pct)

    token = PROGRESS_HOOK.set(hook)
    try:
        yield
    finally:
        PROGRESS_HOOK.reset(token)
    if last["pct"] < 100:  # finished (or skipped as already done)
        update_progress_artifact(artifact_id, 100.0)


# -- events ------------------------------------------------------------------------------------------

def _resource(cfg: PipelineConfig, stage: str, partition_id: int | None = None) -> dict[str, str]:
    rid = f"editforge.{cfg.name}.{stage}" + ("" if partition_id is None else f".{layout.partition_name(partition_id)}")
    labels = {"prefect.resource.id": rid, "prefect.resource.name": rid.removeprefix("editforge."),
              "editforge.run": cfg.name, "editforge.stage": stage}
    if partition_id is not None:
        labels["editforge.partition"] = str(partition_id)
    return labels


def _emit(event: str, resource: dict[str, str], payload: dict) -> None:
    from prefect.events import emit_event

    try:
        emit_event(event, resource=resource, payload=payload)
    except Exception as err:  # the dashboard never stops the work
        log.warning("dashboard: event %s not sent (%s)", event, err)


def partition_completed(cfg: PipelineConfig, stage: str, manifest: dict) -> None:
    """The events of a finished partition (not of one skipped as already done), then the tables."""
    pid = manifest["partition_id"]
    if not manifest.get("skipped"):
        rate = pass_rate(stage, manifest)
        payload = {"stage": stage, "partition": pid, "config_hash": manifest.get("config_hash"),
                   "counts": manifest.get("counts", {}), "rejected": manifest.get("rejected", {}),
                   "pass_rate": rate, "wall_time_s": manifest.get("wall_time_s"), "path": manifest.get("path")}
        _emit("editforge.partition.completed", _resource(cfg, stage, pid), payload)
        floor = cfg.run.alert_min_pass_rate
        if stage == "render" and floor is not None and rate is not None and rate < floor:
            _emit("editforge.partition.low-pass-rate", _resource(cfg, stage, pid), {**payload, "threshold": floor})
        refresh(cfg, stage)


def partition_failed(cfg: PipelineConfig, stage: str, partition_id: int, err: BaseException, wall_time_s: float) -> None:
    message = str(err).splitlines()[0][:500] if str(err) else ""
    _emit("editforge.partition.failed", _resource(cfg, stage, partition_id),
          {"stage": stage, "partition": partition_id, "error": type(err).__name__, "message": message,
           "wall_time_s": round(wall_time_s, 3), "config_hash": registry.stage_hash(cfg, stage)})


def run_completed(cfg: PipelineConfig, stages: dict[str, dict]) -> None:
    _emit("editforge.run.completed", _resource(cfg, "run"),
          {"name": cfg.name, "output_root": cfg.output_root, "pack_hash": registry.stage_hash(cfg, "pack"),
           "stages": stages})


def refresh(cfg: PipelineConfig, stage: str, this_run: list[dict] | None = None) -> None:
    """Republish the stage table and the run-wide progress (errors logged, never raised)."""
    try:
        publish_stage(cfg, stage, this_run)
        publish_progress(cfg)
    except Exception as err:
        log.warning("dashboard: %s tables not published (%s)", stage, err)


def read_events(client, run_name: str, prefix: str = "editforge.") -> list[dict]:
    """EditForge's events of run ``run_name`` on the server of ``client`` (a sync Prefect client), oldest
    first, every page (the API's filter, for scripts and tests; the UI's Event Feed shows the same)."""
    body = {"filter": {"event": {"prefix": [prefix]},
                       "resource": {"id_prefix": [f"editforge.{run_name}."]}}, "limit": 50}
    page = client.request("POST", "/events/filter", json=body).json()
    events = list(page["events"])
    while page.get("next_page"):
        page = client._client.get(page["next_page"]).json()
        events += page["events"]
    return sorted(events, key=lambda e: e["occurred"])
