"""A stage as one record: what it runs, what it reads, what its hash covers, what a partition needs.

Every stage of EditForge — the generation chain and the training flow — is one :class:`Stage`,
declared next to its code (``tasks/<package>/spec.py``) and listed once in :mod:`tasks.registry`.
The flows, the CLI, the deployments, the report, the dashboard and the contract read the records;
adding a stage is one record.

- ``entry``: ``"module:function"``, called as ``run(cfg, partition_id, *, logger=None, <test seams>)``
  and returning the partition's manifest (the stage contract, :mod:`tasks.common.contract`);
- ``reads``: the upstream stages; their hashes are part of this stage's, and their partitions must
  be finished under those hashes before this one starts; ``reads_when`` adds the ones a config switches
  on (the filter reads the judge stage only when the VLM judge is on): :meth:`Stage.upstreams`;
- ``hashes``: the config sections (dotted keys) the stage's output depends on — operational fields
  left out (:func:`tasks.common.config.operational`) — or a function of the config giving them;
- ``resources``: what one partition holds (CPUs, GPUs, batch), as NeMo Curator's stages declare;
- ``partitions``: ``all`` (every partition of the captions ledger: ``captions.num_partitions`` in its
  first generation, more as it grows) or ``one`` (``part-00000``);
- ``prepare`` / ``finalize``: ``"module:function"`` run once before / after the partitions
  (the captions plan; the shard index);
- ``headline``: the dashboard table's first columns after partition, status, in, out (the figures a
  reader looks for; every other figure of the manifest follows them, :mod:`flows.dashboard`).

Strings, not functions, name the code so that reading the registry imports no torch.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

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

    def tags(self, stage: str) -> list[str]:
        """Prefect task-run tags: the stage, and the GPU tag when a GPU is held."""
        return ["editforge", f"editforge-{stage}", *([GPU_TAG] if self.gpus else [])]

    def as_dict(self) -> dict:
        return asdict(self)


def gpus_for(device: str) -> int:
    """``auto`` asks for a GPU (it runs on the CPU only when none is visible); ``cpu`` does not."""
    return 0 if device == "cpu" else 1


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str
    summary: str
    reads: tuple[str, ...]
    hashes: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]
    outputs: tuple[str, ...]
    resources: Callable[[PipelineConfig], Resources]
    partitions: Literal["all", "one"] = "all"
    in_chain: bool = True
    hash_extra: Callable[[PipelineConfig], dict[str, Any]] | None = None
    reads_when: Callable[[PipelineConfig], tuple[str, ...]] | None = None
    prepare: str | None = None
    finalize: str | None = None
    retries: int = 1
    one_at_a_time: bool = False
    progress: bool = False
    headline: tuple[str, ...] = ()

    def partition_ids(self, cfg: PipelineConfig) -> list[int]:
        if self.partitions == "one":
            return [0]
        from tasks.captions.generations import partition_count  # the ledger decides (lazy: no cycle)

        return list(range(partition_count(cfg)))

    def upstreams(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The stages this one reads under ``cfg``: ``reads`` and those ``reads_when`` switches on."""
        return self.reads + (self.reads_when(cfg) if self.reads_when else ())

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


def config_hash(stage: Stage, cfg: PipelineConfig, upstream: Mapping[str, str],
                extra: Mapping[str, Any] | None = None) -> str:
    """The one hash recipe: the stage's sections (operational fields left out), its extra inputs
    (seed triplets, templates, the shards it trains on) and the hashes of the stages it reads."""
    picked: dict[str, Any] = {key: config_value(cfg, key) for key in stage.sections(cfg)}
    if stage.hash_extra is not None:
        picked |= stage.hash_extra(cfg)
    picked |= dict(extra or {})
    picked["upstream"] = dict(sorted(upstream.items()))
    blob = json.dumps({"stage": stage.name, **picked}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
