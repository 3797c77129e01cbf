"""A stage as one record: what it runs, what it reads, what its hash covers, what a partition needs.

Every stage of EditForge — the generation chain and the training flow — is one :class:`Stage`,
declared next to its code (``tasks/<package>/spec.py``) and listed once in :mod:`tasks.registry`.
The flows, the CLI, the deployments, the report, the dashboard and the contract read the records;
adding a stage is one record.

- ``entry``: ``"module:function"``, called as ``run(cfg, partition_id, *, logger=None, <test seams>)``
  and returning the partition's manifest (the stage contract, :mod:`tasks.common.contract`);
- ``reads``: the upstream stages' records (a spec imports its upstreams' specs: the DAG's edges); their
  hashes are part of this stage's, and their partitions must be finished under those hashes before this
  one starts; ``reads_when`` adds the ones a config switches on (the filter reads the judge stage only
  when the VLM judge is on): :meth:`Stage.upstream_stages`;
- ``hashes``: the config sections (dotted keys) the stage's output depends on — operational fields
  left out (:func:`tasks.common.config.operational`) — or a function of the config giving them;
- ``resources``: what one partition holds (CPUs, GPUs, batch), as NeMo Curator's stages declare;
- ``partitions``: ``all`` (every partition of the captions ledger: ``captions.num_partitions`` in its
  first generation, more as it grows; :func:`tasks.registry.partition_ids` asks it) or ``one`` (``part-00000``);
- ``prepare`` / ``finalize``: ``"module:function"`` run once before / after the partitions
  (the captions plan; the shard index);
- ``dashboard``: what the dashboard shows of the stage (:class:`Dashboard`): its table's leading figures,
  its speed figures, which figure is its pass rate, its live one-line description. The dashboard
  (:mod:`flows.dashboard`) asks the record and names no stage; the figures themselves are the
  ``figures`` section of each partition's manifest (:func:`tasks.common.contract.figures`).

Strings, not functions, name the code so that reading the registry imports no torch. :func:`stage_hash`
and :func:`execute` work from a record, so a stage's code runs itself without the registry above it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from tasks.common.contract import PartitionWork, execute_partition, finished
from tasks.common.layout import partition_dir

if TYPE_CHECKING:
    from tasks.common.config import PipelineConfig

GPU_TAG = "editforge-gpu"


@dataclass(frozen=True)
class Resources:
    """One partition task's needs: ``gpus`` is 0 or 1 (a partition never spans GPUs), except training's (its
    processes per node, `train.processes`)."""

    cpus: int
    gpus: int
    batch: str
    note: str = ""

    def tags(self) -> list[str]:
        """Prefect task-run tags: the GPU tag when a GPU is held, else none. Every tag is a related
        resource of each of the task run's state events (a row and index entries apiece in Prefect's
        database); the stage is in the task run's name (``render-partitions[16-23]``) and its flow's."""
        return [GPU_TAG] if self.gpus else []

    def as_dict(self) -> dict:
        return asdict(self)


def gpus_for(device: str) -> int:
    """``auto`` asks for a GPU (it runs on the CPU only when none is visible); ``cpu`` does not."""
    return 0 if device == "cpu" else 1


@dataclass(frozen=True)
class Throughput:
    """The status's throughput line, from the stage that declares it: its kept pairs per hour, ``calls`` (a
    table column: work done) per second, and ``live`` (a running figure) summed over partitions in flight."""

    calls: str
    calls_label: str
    live: str
    live_label: str


@dataclass(frozen=True)
class Dashboard:
    """What the dashboard (:mod:`flows.dashboard`) shows of a stage; every field names figures of its
    table rows (`n_<count>`, the manifest's figures) or of its running figures (``report_progress``).

    - ``headline``: the table's first figures after partition, status, in, out; ``speed``: the speed
      figures after them (before the wall time);
    - ``pass_rate``: the figure that is one partition's pass rate (render's: passed / samples drawn); None:
      its out / in (the `out_rate` column); a stage with its own is watched by the low-pass-rate alert;
    - ``run_pass_rate``: the (passed, drawn) columns summed over finished partitions for the status's pass
      rate, described by ``pass_rate_label``; None: the status shows none;
    - ``keeps_pairs``: the stage's `out` counts kept pairs; ``throughput``: :class:`Throughput`;
    - ``live``: the parts of the live one-line description from the running figures (None: the checkpoint's
      done / expected, ok, per s); ``in_flight``: the running figures in the status's in-flight table
      (done, pass rate, kept, per s).
    """

    headline: tuple[str, ...] = ()
    speed: tuple[str, ...] = ()
    pass_rate: str | None = None
    run_pass_rate: tuple[str, str] | None = None
    pass_rate_label: str = "out / in"
    keeps_pairs: bool = False
    throughput: Throughput | None = None
    live: Callable[[dict[str, Any]], list[str]] | None = None
    in_flight: tuple[str, str, str, str] = ("done", "pass_rate", "ok", "per_s")


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str
    summary: str
    reads: tuple[Stage, ...]
    hashes: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]
    outputs: tuple[str, ...]
    resources: Callable[[PipelineConfig], Resources]
    partitions: Literal["all", "one"] = "all"
    in_chain: bool = True
    hash_extra: Callable[[PipelineConfig], dict[str, Any]] | None = None
    reads_when: Callable[[PipelineConfig], tuple[Stage, ...]] | None = None
    prepare: str | None = None
    finalize: str | None = None
    retries: int = 1
    one_at_a_time: bool = False
    progress: bool = False
    dashboard: Dashboard = Dashboard()

    def upstream_stages(self, cfg: PipelineConfig) -> tuple[Stage, ...]:
        """The stages this one reads under ``cfg``: ``reads`` and those ``reads_when`` switches on."""
        return self.reads + (self.reads_when(cfg) if self.reads_when else ())

    def upstreams(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The names of :meth:`upstream_stages`."""
        return tuple(s.name for s in self.upstream_stages(cfg))

    def sections(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return self.hashes(cfg) if callable(self.hashes) else self.hashes

    def upstream_partition(self, upstream: Stage, partition_id: int) -> int:
        """The partition of ``upstream`` that partition ``partition_id`` of this stage reads."""
        return 0 if upstream.partitions == "one" else partition_id


def load(target: str) -> Callable[..., Any]:
    """The function named by ``"module:function"``."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_value(cfg: PipelineConfig, key: str) -> Any:
    """A dotted key's value as hashed: a section without its operational fields, a field as JSON."""
    from tasks.common.config import Section

    head, _, field = key.rpartition(".")
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    if isinstance(node, Section):
        return node.output_fields()
    parent = cfg
    for part in filter(None, head.split(".")):
        parent = getattr(parent, part)
    return parent.model_dump(mode="json", include={field})[field]


def config_hash(
    stage: Stage, cfg: PipelineConfig, upstream: Mapping[str, str], extra: Mapping[str, Any] | None = None
) -> str:
    """The one hash recipe: the stage's sections (operational fields left out), its extra inputs
    (seed triplets, templates, the shards it trains on) and the hashes of the stages it reads."""
    picked: dict[str, Any] = {key: config_value(cfg, key) for key in stage.sections(cfg)}
    if stage.hash_extra is not None:
        picked |= stage.hash_extra(cfg)
    picked |= dict(extra or {})
    picked["upstream"] = dict(sorted(upstream.items()))
    blob = json.dumps({"stage": stage.name, **picked}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_hash(
    cfg: PipelineConfig,
    stage: Stage,
    *,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The config hash of ``stage`` (:func:`config_hash`): its sections and the hashes of the stages it
    reads, recursively (``upstream`` overrides them)."""
    if upstream is None:
        upstream = {u.name: stage_hash(cfg, u) for u in stage.upstream_stages(cfg)}
    return config_hash(stage, cfg, upstream, extra)


def execute(
    cfg: PipelineConfig,
    stage: Stage,
    partition_id: int,
    work: PartitionWork,
    logger: logging.Logger | None = None,
    *,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    check_upstream: bool = True,
) -> dict[str, Any]:
    """Run ``work`` for one partition of ``stage`` under the stage contract, with the stage's hash and the
    upstream partitions it must find finished (under their hashes) before it starts
    (``check_upstream=False``: the stage checked its inputs itself)."""
    records = {u.name: u for u in stage.upstream_stages(cfg)}
    upstream = dict(upstream) if upstream is not None else {n: stage_hash(cfg, u) for n, u in records.items()}
    inputs = {
        u: (stage.upstream_partition(records[u], partition_id), h)
        for u, h in upstream.items()
        if check_upstream
    }
    return execute_partition(
        stage.name,
        partition_id,
        cfg.output_root,
        stage_hash(cfg, stage, upstream=upstream, extra=extra),
        work,
        logger,
        inputs=inputs,
        verify=cfg.verify,
    )


def manifests(
    cfg: PipelineConfig, stage: Stage, partition_ids: list[int], config_hash: str | None = None
) -> dict[int, dict[str, Any] | None]:
    """Partition id -> its `_SUCCESS.json` when finished under this config's hash of ``stage`` (or
    ``config_hash``), else None (:func:`tasks.common.contract.finished`)."""
    expected = config_hash or stage_hash(cfg, stage)
    return {
        pid: finished(partition_dir(cfg.output_root, stage.name, expected, pid), expected)
        for pid in partition_ids
    }
