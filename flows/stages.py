"""One Prefect flow per stage, all made from the stage registry (`tasks/registry.py`).

Each stage flow runs the stage's `prepare` (if any), maps one task per partition over the
partitions asked for (default: all) — one after another for stages that share the worker's GPU or
API quota, concurrently otherwise — publishes a keyed table artifact (one row per partition) and
runs the stage's `finalize` (if any) when it covered every partition. Several workers can split one
stage between them by `partitions`. The work itself is the stage's `run(cfg, partition_id)`; these
wrappers add Prefect's retries (never for an error a retry cannot fix), resource tags, progress
artifacts and the dashboard table.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import time
from contextlib import contextmanager

from prefect import flow, get_run_logger, tags, task, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from tasks import registry
from tasks.common.config import PipelineConfig, load_config
from tasks.common.contract import PROGRESS_HOOK
from tasks.common.errors import is_permanent
from tasks.common.layout import artifact_key, partition_name
from tasks.common.stage import Stage


def retry_unless_permanent(task, task_run, state) -> bool:
    """Retry transient failures only: not a missing or stale input, a bad setting or a refused key."""
    try:
        state.result()
    except Exception as err:
        return not is_permanent(err)
    return True


def partition_ids(cfg: PipelineConfig, stage: Stage, partitions: list[int] | None) -> list[int]:
    every = stage.partition_ids(cfg)
    ids = every if partitions is None else sorted(set(partitions))
    bad = [i for i in ids if i not in every]
    if bad:
        raise ValueError(f"{stage.name}: partitions {bad} out of range {every[0]}..{every[-1]}")
    return ids


@contextmanager
def dashboard_progress(stage: str, partition_id: int, min_interval_s: float = 2.0):
    """A progress artifact on the task run, updated (at most every `min_interval_s`) as work is checkpointed."""
    artifact_id = create_progress_artifact(0.0, description=f"{stage} {partition_name(partition_id)}")
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
    res = registry.get(stage).resources(cfg)
    needs = f" (per partition: {res.cpus} CPU, {res.gpus} GPU, batch {res.batch})"
    create_table_artifact(rows, key=artifact_key(cfg.name, stage, registry.stage_hash(cfg, stage)),
                          description=f"EditForge `{cfg.name}` — {stage} stage, per partition{needs}")


def _run_partition(cfg: PipelineConfig, stage: str, partition_id: int) -> dict:
    run = registry.entry(stage)
    if registry.get(stage).progress:
        with dashboard_progress(stage, partition_id):
            return run(cfg, partition_id, logger=get_run_logger())
    return run(cfg, partition_id, logger=get_run_logger())


def _prepare(cfg: PipelineConfig, stage: str) -> None:
    registry.prepare(cfg, stage, get_run_logger())


def _finalize(cfg: PipelineConfig, stage: str, manifests: list[dict]) -> None:
    registry.finalize(cfg, stage, manifests, get_run_logger())


def _tasks(stage: Stage) -> tuple:
    retry = {"retries": stage.retries, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_permanent}
    return (task(name=f"{stage.name}-prepare", **retry)(_prepare),
            task(name=f"{stage.name}-partition", **retry)(_run_partition),
            task(name=f"{stage.name}-finalize", retries=1)(_finalize))


TASKS = {name: _tasks(stage) for name, stage in registry.STAGES.items()}


def run_stage(name: str, preset: str, overrides: list[str] | None, partitions: list[int] | None) -> list[dict]:
    """One stage over some (default: all) partitions, inside a flow run; returns the manifests."""
    cfg = load_config(preset, overrides or [])
    stage = registry.get(name)
    prepare_task, partition_task, finalize_task = TASKS[name]
    with tags(*stage.resources(cfg).tags(name)):  # `editforge-gpu` on the task runs that hold a GPU
        if stage.prepare:
            prepare_task(cfg, name)
        ids = partition_ids(cfg, stage, partitions)  # after prepare: a new captions generation adds partitions
        if stage.one_at_a_time:
            manifests = [partition_task(cfg, name, pid) for pid in ids]
        else:
            manifests = partition_task.map(unmapped(cfg), unmapped(name), ids).result()
        publish(cfg, name, manifests)
        if stage.finalize and ids == stage.partition_ids(cfg):
            finalize_task(cfg, name, manifests)
    return manifests


def stage_flow(name: str):
    """The Prefect flow `editforge-<name>` of a registry stage."""

    def run(preset: str = "demo", overrides: list[str] | None = None, partitions: list[int] | None = None) -> list[dict]:
        return run_stage(name, preset, overrides, partitions)

    run.__doc__ = f"The {name} stage: {registry.get(name).summary}."
    return flow(name=f"editforge-{name}")(run)


FLOWS = {s.name: stage_flow(s.name) for s in registry.chain()}
# `captions_flow`, ..., `pack_flow`: the deployments' entrypoints (`flows/stages.py:render_flow`, infra/prefect.yaml)
globals().update({f"{name}_flow": f for name, f in FLOWS.items()})
