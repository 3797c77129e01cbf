"""One Prefect flow per stage, all made from the stage registry (`tasks/registry.py`).

Each stage flow runs the stage's `prepare` (if any), runs one task per partition over the
partitions asked for (default: all) — one after another for stages that share the worker's GPU or
API quota, otherwise at most :func:`parallel_partitions` at once on a thread pool sized from the
stage's resources (`run.max_parallel_partitions` overrides it; docs/captions.md) — and runs the
stage's `finalize` (if any) when it covered every partition. Several workers can split one stage
between them by `partitions`. The work itself is the stage's `run(cfg, partition_id)`; these
wrappers add Prefect's retries (never for an error a retry cannot fix), resource tags, and the
dashboard (flows/dashboard.py): each partition's live progress, its event and its row in the stage
table as it finishes, the run-wide progress.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import os
import time
from contextlib import nullcontext

from prefect import flow, get_run_logger, tags, task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

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


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity: a container's or `taskset`'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def parallel_partitions(cfg: PipelineConfig, stage: Stage, count: int) -> int:
    """How many of ``count`` partitions of ``stage`` run at once in this process.

    1 for a stage that holds the worker's GPU or API quota (``one_at_a_time``, or a GPU in its
    resources); else ``run.max_parallel_partitions`` when set, or as many as the CPUs hold
    (available CPUs // the CPUs one partition takes, ``Resources.cpus``). Never more than ``count``.
    """
    resources = stage.resources(cfg)
    if stage.one_at_a_time or resources.gpus:
        return 1
    wanted = cfg.run.max_parallel_partitions or cpus_available() // max(1, resources.cpus)
    return max(1, min(wanted, count))


def _run_partition(cfg: PipelineConfig, stage: str, partition_id: int) -> dict:
    run = registry.entry(stage)
    t0 = time.monotonic()
    try:
        with dashboard.live_partition(stage, partition_id) if registry.get(stage).progress else nullcontext():
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
        workers = parallel_partitions(cfg, stage, len(ids))
        if workers == 1:
            manifests = [partition_task(cfg, name, pid) for pid in ids]
        else:  # a pool of `workers` threads: the partitions queue, memory is that of `workers` partitions
            get_run_logger().info("%s: %d partitions, %d at a time", name, len(ids), workers)
            with ThreadPoolTaskRunner(max_workers=workers) as runner:
                futures = [runner.submit(partition_task, {"cfg": cfg, "stage": name, "partition_id": pid})
                           for pid in ids]
                wait(futures)
                manifests = [f.result() for f in futures]
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
