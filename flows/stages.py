"""One Prefect flow per stage, all made from the stage registry (`tasks/registry.py`).

Each stage flow runs the stage's `prepare` (if any), runs the partitions asked for (default: all)
in blocks of `run.block_size` (a fan-out child's partitions are one block), one task run per block
— inside it, one partition after another for stages that share the worker's GPU or API quota,
otherwise at most :func:`parallel_partitions` at once on a thread pool sized from the stage's
resources (`run.max_parallel_partitions` overrides it; docs/captions.md) — and runs the stage's
`finalize` (if any) when it covered every partition. The work itself is the stage's
`run(cfg, partition_id)`; the block's task run adds Prefect's retries (never for an error a retry
cannot fix; a retry goes on from the partitions not yet finished) and resource tags, and the
dashboard (flows/dashboard.py) each partition's progress artifact, its event and its row in the stage
table as it finishes. One task run per block, not per partition: Prefect stores three state events
of ~13 KB per task run (docs/monitoring.md, "The Prefect database").
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import contextvars
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from prefect import flow, get_run_logger, tags, task
from prefect.context import FlowRunContext

from flows import dashboard
from tasks import registry
from tasks.common.errors import InputError
from tasks.common.config import PipelineConfig, load_config
from tasks.common.errors import is_permanent
from tasks.common.layout import partition_name
from tasks.common.stage import Stage


def retry_unless_permanent(task, task_run, state) -> bool:
    """Retry transient failures only: not a missing or stale input, a bad setting or a refused key."""
    try:
        state.result()
    except Exception as err:
        return not is_permanent(err)
    return True


def partition_ids(cfg: PipelineConfig, stage: Stage, partitions: list[int] | None) -> list[int]:
    every = registry.partition_ids(cfg, stage.name)
    ids = every if partitions is None else sorted(set(partitions))
    bad = [i for i in ids if i not in every]
    if bad:
        raise InputError(f"{stage.name}: partitions {bad} out of range {every[0]}..{every[-1]}")
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
        with (
            dashboard.live_partition(stage, partition_id, cfg=cfg)
            if registry.get(stage).progress
            else nullcontext()
        ):
            manifest = run(cfg, partition_id, logger=get_run_logger())
    except Exception as err:
        dashboard.partition_failed(cfg, stage, partition_id, err, time.monotonic() - t0)
        get_run_logger().error(
            "%s %s failed: %s: %s", stage, partition_name(partition_id), type(err).__name__, err
        )
        err.add_note(f"(in {stage} {partition_name(partition_id)})")
        raise
    dashboard.partition_completed(cfg, stage, manifest)  # its event, its row in the stage table, the progress
    return manifest


# a block's partitions finished by an earlier try of its task run
_FINISHED: dict[tuple, dict[int, dict]] = {}


def _block_key(stage: str, ids: list[int]) -> tuple:
    context = FlowRunContext.get()
    return (context.flow_run.id if context and context.flow_run else None, stage, tuple(ids))


def _run_block(cfg: PipelineConfig, stage: str, partition_ids: list[int], workers: int = 1) -> list[dict]:
    """The partitions of one block, ``workers`` at a time; their manifests in order. A try after a failure
    goes on from the partitions not yet finished; the first error (a permanent one first) is raised once
    every partition started has ended."""
    finished = _FINISHED.setdefault(_block_key(stage, partition_ids), {})
    todo = [pid for pid in partition_ids if pid not in finished]
    errors: list[BaseException] = []
    if workers == 1:
        for pid in todo:
            finished[pid] = _run_partition(cfg, stage, pid)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{stage}-partition") as pool:
            futures = {  # each in a copy of this context: the task run's logger, the progress hook
                pid: pool.submit(contextvars.copy_context().run, _run_partition, cfg, stage, pid)
                for pid in todo
            }
            for pid, future in futures.items():
                try:
                    finished[pid] = future.result()
                except Exception as err:
                    errors.append(err)
    if errors:
        raise next((e for e in errors if is_permanent(e)), errors[0])
    return [finished[pid] for pid in partition_ids]


def _block_name(parameters: dict) -> str:
    ids, name = parameters["partition_ids"], f"{parameters['stage']}-partitions"
    return f"{name}[{ids[0]}-{ids[-1]}]" if ids else name


def _prepare(cfg: PipelineConfig, stage: str) -> None:
    registry.prepare(cfg, stage, get_run_logger())


def _finalize(cfg: PipelineConfig, stage: str, manifests: list[dict]) -> None:
    registry.finalize(cfg, stage, manifests, get_run_logger())


def _tasks(stage: Stage) -> tuple:
    retry = {"retries": stage.retries, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_permanent}
    return (
        task(name=f"{stage.name}-prepare", **retry)(_prepare),
        task(name=f"{stage.name}-partitions", task_run_name=_block_name, **retry)(_run_block),
        task(name=f"{stage.name}-finalize", retries=1)(_finalize),
    )


TASKS = {name: _tasks(stage) for name, stage in registry.STAGES.items()}


def run_stage(
    name: str, preset: str, overrides: list[str] | None, partitions: list[int] | None
) -> list[dict]:
    """One stage over some (default: all) partitions, inside a flow run; returns the manifests."""
    cfg = load_config(preset, overrides or [])
    stage = registry.get(name)
    prepare_task, partition_task, finalize_task = TASKS[name]
    with tags(*stage.resources(cfg).tags()):  # `editforge-gpu` on the task runs that hold a GPU
        if stage.prepare and not (cfg.run.mode == "fan-out" and partitions is not None):
            prepare_task(cfg, name)  # (a fan-out child's parent prepared the stage before submitting it)
        ids = partition_ids(
            cfg, stage, partitions
        )  # after prepare: a new captions generation adds partitions
        workers = parallel_partitions(cfg, stage, len(ids))
        if workers > 1:
            get_run_logger().info("%s: %d partitions, %d at a time", name, len(ids), workers)
        size = max(cfg.run.block_size, workers)  # a fan-out child's partitions are one block
        manifests = []
        for start in range(0, len(ids), size):  # one task run per block: its retries, tags and progress
            block = ids[start : start + size]
            try:
                manifests += partition_task(cfg, name, block, workers)
            finally:
                _FINISHED.pop(_block_key(name, block), None)
        dashboard.refresh(cfg, name, manifests)
        if stage.finalize and ids == registry.partition_ids(cfg, stage.name):
            finalize_task(cfg, name, manifests)
    return manifests


def stage_flow(name: str):
    """The Prefect flow `editforge-<name>` of a registry stage."""

    def run(
        preset: str = "demo", overrides: list[str] | None = None, partitions: list[int] | None = None
    ) -> list[dict]:
        return run_stage(name, preset, overrides, partitions)

    run.__doc__ = f"The {name} stage: {registry.get(name).summary}."
    return flow(name=f"editforge-{name}")(run)


FLOWS = {s.name: stage_flow(s.name) for s in registry.chain()}
# `captions_flow`, ..., `pack_flow`: the deployments' entrypoints (`flows/stages.py:render_flow`, infra/prefect.yaml)
globals().update({f"{name}_flow": f for name, f in FLOWS.items()})
