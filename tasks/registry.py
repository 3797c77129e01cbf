"""The stage registry: every stage of EditForge, in DAG order, and what is derived from the records.

    captions ─┐
    finetune ─┴► text ─► render ─► judge ─► filter ─► pack ─► (train: its own flow)
                                 └──────────────┘ (filter reads judge only with judges.vlm.enabled)

Flows (:mod:`flows.stages`, :mod:`flows.generate`), the CLI, the report and the contract conformance
test read this module; a new stage is one record in its package's ``spec.py`` and one name below.
Nothing here imports torch: entries are named by strings and loaded when a partition runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from tasks.captions.generations import partition_ids as ledger_partition_ids
from tasks.captions.spec import STAGE as CAPTIONS
from tasks.common import layout
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionWork
from tasks.common.errors import PermanentError
from tasks.common.stage import Resources, Stage, load
from tasks.common.stage import execute as execute_stage
from tasks.common.stage import manifests as stage_manifests
from tasks.common.stage import stage_hash as record_hash
from tasks.filter.spec import STAGE as FILTER
from tasks.finetune.spec import FINETUNE
from tasks.judge.spec import STAGE as JUDGE
from tasks.pack import index as pack_index
from tasks.pack.spec import STAGE as PACK
from tasks.render.spec import STAGE as RENDER
from tasks.text.spec import TEXT
from tasks.train.spec import STAGE as TRAIN

STAGES: dict[str, Stage] = {s.name: s for s in (CAPTIONS, FINETUNE, TEXT, RENDER, JUDGE, FILTER, PACK, TRAIN)}


class UnknownStageError(PermanentError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStageError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}") from None


def chain() -> list[Stage]:
    """The stages of the generation DAG (`editforge run`), in order."""
    return [s for s in STAGES.values() if s.in_chain]


def stage_hash(
    cfg: PipelineConfig,
    name: str,
    *,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The config hash of ``name`` (one recipe, :func:`tasks.common.stage.stage_hash`): its sections
    and the hashes of the stages it reads, recursively (``upstream`` overrides them)."""
    return record_hash(cfg, get(name), upstream=upstream, extra=extra)


def stage_resources(cfg: PipelineConfig) -> dict[str, Resources]:
    """What one partition of every stage needs under ``cfg``."""
    return {name: s.resources(cfg) for name, s in STAGES.items()}


def execute(
    cfg: PipelineConfig,
    name: str,
    partition_id: int,
    work: PartitionWork,
    logger: logging.Logger | None = None,
    *,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    check_upstream: bool = True,
) -> dict[str, Any]:
    """:func:`tasks.common.stage.execute` for the stage named ``name``."""
    return execute_stage(
        cfg,
        get(name),
        partition_id,
        work,
        logger,
        upstream=upstream,
        extra=extra,
        check_upstream=check_upstream,
    )


def entry(name: str) -> Callable[..., dict[str, Any]]:
    """The stage's ``run(cfg, partition_id, *, logger=None, ...)``."""
    return load(get(name).entry)


def prepare(cfg: PipelineConfig, name: str, logger: logging.Logger | None = None) -> None:
    stage = get(name)
    if stage.prepare:
        load(stage.prepare)(cfg, logger=logger)


def finalize(
    cfg: PipelineConfig, name: str, manifests: list[dict[str, Any]], logger: logging.Logger | None = None
) -> Any:
    stage = get(name)
    return load(stage.finalize)(cfg, manifests, logger=logger) if stage.finalize else None


def unfinished(cfg: PipelineConfig, name: str, partition_ids: list[int] | None = None) -> list[int]:
    """The partitions of ``name`` not finished under this config's hash."""
    found = manifests(cfg, name, partition_ids)
    return [pid for pid, done in found.items() if done is None]


def partition_ids(cfg: PipelineConfig, name: str) -> list[int]:
    """The partitions of ``name`` under ``cfg``: ``part-00000`` (``partitions="one"``) or every partition of
    the captions ledger (:func:`tasks.captions.generations.partition_ids`)."""
    return _partition_ids(cfg, name)


def _partition_ids(cfg: PipelineConfig, name: str) -> list[int]:
    return ledger_partition_ids(cfg, get(name))


def partition_url(
    cfg: PipelineConfig, name: str, partition_id: int = 0, *, config_hash: str | None = None
) -> str:
    """The folder of one partition of ``name``, in the stage's version for this config (or ``config_hash``)."""
    return layout.partition_dir(cfg.output_root, name, config_hash or stage_hash(cfg, name), partition_id)


def manifests(
    cfg: PipelineConfig, name: str, partition_ids: list[int] | None = None, config_hash: str | None = None
) -> dict[int, dict[str, Any] | None]:
    """Partition id -> its `_SUCCESS.json` under this config's hash (None when not finished)."""
    ids = _partition_ids(cfg, name) if partition_ids is None else partition_ids
    return stage_manifests(cfg, get(name), ids, config_hash)


def index_url(cfg: PipelineConfig) -> str:
    """This config's shard index (the pack stage's version): :func:`tasks.pack.index.index_url`."""
    return pack_index.index_url(cfg)
