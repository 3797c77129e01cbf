"""One Prefect flow per stage, all made from the stage registry (`tasks/registry.py`).

Each stage flow runs the stage's `prepare` (if any), maps one task per partition over the
partitions asked for (default: all) — one after another for stages that share the worker's GPU or
API quota, concurrently otherwise — and runs the stage's `finalize` (if any) when it covered every
partition. Several workers can split one stage between them by `partitions`. The work itself is the
stage's `run(cfg, partition_id)`; these wrappers add Prefect's retries (never for an error a retry
cannot fix), resource tags, and the dashboard (flows/dashboard.py): each partition's live progress,
its event and its row in the stage table as it finishes, the run-wide progress.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import time
from contextlib import nullcontext

from prefect import flow, get_run_logger, tags, task, unmapped

from flows import dashboard
from tasks import registry
from tasks.common.config import PipelineConfig, load_config
from tasks.common.errors import is_permanent
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


def _run_partition(cfg: PipelineConfig, stage: str, partition_id: int) -> dict:
    run = registry.entry(stage)
    t0 = time.monotonic()
    try:
        with dashboard.live_partition(stage, partition_id, cfg=cfg) if registry.get(stage).progress else nullcontext():
            manifest = run(cfg, partition_id, logger=get_run_logger())
    except Exception as err:
        dashboard.partition_failed(cfg, stage, partition_id, err, time.monotonic() - t0)
        raise
    dashboard.partition_completed(cfg, stage, manifest)  # its event, its row in the stage table, the progress
    return manifest


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
        dashboard.refresh(cfg, name, manifests)
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
