"""Captions stage: one global plan (read, filter, dedup, sample) written as N partition outputs.

Sampling and dedup are global across every input file, so the plan is computed once; each partition
then writes its own `captions.parquet` and `_SUCCESS.json` under the stage contract. Rejections found
while reading are written to `captions/_source_stats.json`.
"""

from __future__ import annotations

import logging

from tasks.captions.laion import read_captions, resolve_sources, sample_captions, split_partitions
from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun, Stats, execute_partition, partition_dir, read_success

STAGE = "captions"


def source_stats_url(output_root: str) -> str:
    return storage.url_join(output_root, STAGE, "_source_stats.json")


def run_captions(cfg: PipelineConfig, logger: logging.Logger | None = None) -> list[dict]:
    """Write `captions/part-*/captions.parquet` for every partition; skip when all are done."""
    logger = logger or logging.getLogger("editforge")
    c = cfg.captions
    config_hash = cfg.stage_hash(STAGE)
    done = [read_success(partition_dir(cfg.output_root, STAGE, i)) for i in range(c.num_partitions)]
    parts = None
    if not all(d and d.get("config_hash") == config_hash for d in done):
        stats = Stats()
        sources = resolve_sources(c.source)
        logger.info("captions: reading %d source file(s)", len(sources))
        with stats.timer("read"):
            table = read_captions(sources, c, stats)
        sample = sample_captions(table, c.num_captions, c.seed)
        stats.add("sampled", len(sample))
        if len(sample) < c.num_captions:
            logger.warning("captions: asked for %d captions, only %d usable rows", c.num_captions, len(sample))
        storage.write_json_atomic(source_stats_url(cfg.output_root), {"sources": sources, **stats.summary()})
        parts = split_partitions(sample, c.num_partitions)

    manifests = []
    for pid in range(c.num_partitions):
        def work(run: PartitionRun, pid=pid) -> None:
            df = parts[pid]
            storage.write_parquet_atomic(run.output("captions.parquet"), df)
            run.stats.add("out", len(df))
            run.stats.observe("aesthetic_score", df["aesthetic_score"].to_numpy())

        manifests.append(execute_partition(STAGE, pid, cfg.output_root, config_hash, work, logger))
    return manifests
