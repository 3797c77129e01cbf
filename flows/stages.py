"""One Prefect flow per stage; each maps a thin task over the stage's partitions.

The work itself lives in `tasks/<stage>/` (plain Python); these wrappers add Prefect's retries,
logging and a keyed table artifact per stage (shown on the dashboard's Artifacts page). Every stage
flow takes `partitions` (default: all), so several workers can split one stage between them.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import time
from contextlib import contextmanager

from prefect import flow, get_run_logger, tags, task, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from tasks.captions.stage import run_captions
from tasks.common.config import PipelineConfig, load_config
from tasks.common.contract import PROGRESS_HOOK, MissingInputError
from tasks.common.resources import stage_resources
from tasks.filter.stage import run_filter_partition
from tasks.pack.shards import run_pack_partition, write_index
from tasks.render.stage import run_render_partition
from tasks.text.stage import run_finetune, run_text_partition


def _retry_unless_missing_input(task, task_run, state) -> bool:
    """Retry transient failures, not a stage started before its input stage finished."""
    try:
        state.result()
    except MissingInputError:
        return False
    except Exception:
        return True
    return True


def _config(preset: str, overrides: list[str] | None) -> PipelineConfig:
    return load_config(preset, overrides or [])


def _partitions(cfg: PipelineConfig, partitions: list[int] | None) -> list[int]:
    ids = list(range(cfg.captions.num_partitions)) if partitions is None else sorted(set(partitions))
    bad = [i for i in ids if not 0 <= i < cfg.captions.num_partitions]
    if bad:
        raise ValueError(f"partitions {bad} out of range 0..{cfg.captions.num_partitions - 1}")
    return ids


@contextmanager
def dashboard_progress(stage: str, partition_id: int, min_interval_s: float = 2.0):
    """A progress artifact on the task run, updated (at most every `min_interval_s`) as work is checkpointed."""
    artifact_id = create_progress_artifact(0.0, description=f"{stage} part-{partition_id:05d}")
    last = {"t": 0.0, "pct": 0.0}

    def hook(fraction: float) -> None:
        pct = round(100 * fraction, 1)
        now = time.monotonic()
        if pct > last["pct"] and (pct >= 100 or now - last["t"] >= min_interval_s):
            update_progress_artifact(artifact_id, pct)
            last.update(t=now, pct=pct)

    token = PROGRESS_HOOK.set(hook)
    try:
        yield
    finally:
        PROGRESS_HOOK.reset(token)
    if last["pct"] < 100:  # finished (or skipped as already done)
        update_progress_artifact(artifact_id, 100.0)


@contextmanager
def declared(cfg: PipelineConfig, stage: str):
    """Task runs created inside carry the stage's resource tags (`editforge-gpu` when it holds a GPU)."""
    with tags(*stage_resources(cfg)[stage].tags(stage)):
        yield


def publish(cfg: PipelineConfig, stage: str, manifests: list[dict]) -> None:
    """A keyed table artifact for the dashboard: one row per partition with counts and rejections."""
    rows = [
        {"partition": m["partition_id"], "skipped": m.get("skipped", False),
         **{f"n_{k}": v for k, v in m.get("counts", {}).items()},
         **{f"rejected_{k}": v for k, v in m.get("rejected", {}).items()},
         # the stage's own figures (render: samples_per_s, unet_calls_per_kept_pair, batch_samples, ...)
         **{k: v for k, v in m.items() if k not in ("partition_id", "wall_time_s")
            and isinstance(v, int | float) and not isinstance(v, bool)},
         **{f"median_{k}": round(q["q50"], 4) for k, q in m.get("quantiles", {}).items()},
         "wall_time_s": m.get("wall_time_s")}
        for m in manifests
    ]
    key = f"editforge-{cfg.name}-{stage}".lower().replace("_", "-").replace(".", "-")
    res = stage_resources(cfg).get(stage)
    needs = f" (per partition: {res.cpus} CPU, {res.gpus} GPU, batch {res.batch})" if res else ""
    create_table_artifact(rows, key=key, description=f"EditForge `{cfg.name}` — {stage} stage, per partition{needs}")


@task(name="captions", retries=1)
def captions_task(cfg: PipelineConfig) -> list[dict]:
    return run_captions(cfg, get_run_logger())


@task(name="finetune-lm", retries=1)
def finetune_task(cfg: PipelineConfig) -> dict:
    return run_finetune(cfg, logger=get_run_logger())


@task(name="text-partition", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_missing_input)
def text_task(cfg: PipelineConfig, partition_id: int) -> dict:
    with dashboard_progress("text", partition_id):
        return run_text_partition(cfg, partition_id, get_run_logger())


@task(name="render-partition", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_missing_input)
def render_task(cfg: PipelineConfig, partition_id: int) -> dict:
    with dashboard_progress("render", partition_id):
        return run_render_partition(cfg, partition_id, logger=get_run_logger())


@task(name="filter-partition", retries=1, retry_condition_fn=_retry_unless_missing_input)
def filter_task(cfg: PipelineConfig, partition_id: int) -> dict:
    return run_filter_partition(cfg, partition_id, get_run_logger())


@task(name="pack-partition", retries=1, retry_condition_fn=_retry_unless_missing_input)
def pack_task(cfg: PipelineConfig, partition_id: int) -> dict:
    return run_pack_partition(cfg, partition_id, get_run_logger())


@flow(name="editforge-captions")
def captions_flow(preset: str = "demo", overrides: list[str] | None = None) -> list[dict]:
    cfg = _config(preset, overrides)
    with declared(cfg, "captions"):
        manifests = captions_task(cfg)
    publish(cfg, "captions", manifests)
    return manifests


@flow(name="editforge-text")
def text_flow(preset: str = "demo", overrides: list[str] | None = None, partitions: list[int] | None = None):
    cfg = _config(preset, overrides)
    with declared(cfg, "finetune"):
        finetune = finetune_task(cfg)
    publish(cfg, "finetune", [finetune])
    with declared(cfg, "text"):  # one partition at a time: the worker's GPU (or API quota) is shared
        manifests = [text_task(cfg, pid) for pid in _partitions(cfg, partitions)]
    publish(cfg, "text", manifests)
    return manifests


@flow(name="editforge-render")
def render_flow(preset: str = "demo", overrides: list[str] | None = None, partitions: list[int] | None = None):
    cfg = _config(preset, overrides)
    with declared(cfg, "render"):  # one partition at a time on the worker's GPU; workers split partitions
        manifests = [render_task(cfg, pid) for pid in _partitions(cfg, partitions)]
    publish(cfg, "render", manifests)
    return manifests


@flow(name="editforge-filter")
def filter_flow(preset: str = "demo", overrides: list[str] | None = None, partitions: list[int] | None = None):
    cfg = _config(preset, overrides)
    with declared(cfg, "filter"):
        manifests = filter_task.map(unmapped(cfg), _partitions(cfg, partitions)).result()
    publish(cfg, "filter", manifests)
    return manifests


@flow(name="editforge-pack")
def pack_flow(preset: str = "demo", overrides: list[str] | None = None, partitions: list[int] | None = None):
    cfg = _config(preset, overrides)
    with declared(cfg, "pack"):
        manifests = pack_task.map(unmapped(cfg), _partitions(cfg, partitions)).result()
    publish(cfg, "pack", manifests)
    if partitions is None:
        write_index(cfg, manifests)
    return manifests
