"""Captions stage: one global plan (read, filter, dedup, sample), then one output per partition.

Sampling and dedup are global across every input file, so :func:`prepare` computes the plan once
and writes it as ``captions/_plan/<config hash>.parquet`` (with ``captions/_source_stats.json``, the
rejections found while reading); :func:`run` writes one partition's ``captions.parquet`` from it
under the stage contract. A partition run without a plan builds it first (the plan is a pure
function of the config and the sources, so two workers doing so write the same bytes).
"""

from __future__ import annotations

import logging

from tasks.captions.laion import read_captions, resolve_sources, sample_captions, split_partitions
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun, Stats
from tasks.registry import execute, stage_hash, unfinished

STAGE = "captions"
log = logging.getLogger("editforge")


def prepare(cfg: PipelineConfig, logger: logging.Logger | None = None) -> str | None:
    """Write the plan unless every partition is already done or the plan exists; return its URL."""
    logger = logger or log
    if not unfinished(cfg, STAGE):
        return None
    url = layout.captions_plan_url(cfg.output_root, stage_hash(cfg, STAGE))
    if storage.exists(url):
        return url
    c = cfg.captions
    stats = Stats()
    sources = resolve_sources(c.source)
    logger.info("captions: reading %d source file(s)", len(sources))
    with stats.timer("read"):
        table = read_captions(sources, c, stats)
    sample = sample_captions(table, c.num_captions, c.seed)
    stats.add("sampled", len(sample))
    if len(sample) < c.num_captions:
        logger.warning("captions: asked for %d captions, only %d usable rows", c.num_captions, len(sample))
    storage.write_json_atomic(layout.source_stats_url(cfg.output_root), {"sources": sources, **stats.summary()})
    storage.write_parquet_atomic(url, sample)
    return url


def run(cfg: PipelineConfig, partition_id: int, *, logger: logging.Logger | None = None) -> dict:
    """Write `captions/part-XXXXX/captions.parquet` from the plan (built first when missing)."""

    def work(run: PartitionRun) -> None:
        url = layout.captions_plan_url(cfg.output_root, run.config_hash)
        if not storage.exists(url):
            prepare(cfg, logger)
        df = split_partitions(storage.read_parquet(url), cfg.captions.num_partitions)[partition_id]
        storage.write_parquet_atomic(run.output(layout.CAPTIONS_FILE), df)
        run.stats.add("out", len(df))
        run.stats.observe("aesthetic_score", df["aesthetic_score"].to_numpy())

    return execute(cfg, STAGE, partition_id, work, logger)
