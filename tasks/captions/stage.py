"""Captions stage: the ledger of captions taken (read, filter, dedup, sample), then one output per partition.

Sampling and dedup are global across every input file, so :func:`prepare` extends the ledger once
(:mod:`tasks.captions.generations`: a first generation, or one more when the sources grew or
``captions.num_captions`` rose) and :func:`run` writes one partition's ``captions.parquet`` from it
under the stage contract. A partition run that finds no ledger extends it first (under a lease: two
workers never add the same generation).
"""

from __future__ import annotations

import logging

from tasks.captions.generations import extend, partition_captions
from tasks.captions.spec import STAGE as CAPTIONS
from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun
from tasks.common.layout import CAPTIONS_FILE
from tasks.common.stage import execute

STAGE = "captions"
log = logging.getLogger("editforge")


def prepare(cfg: PipelineConfig, logger: logging.Logger | None = None) -> int | None:
    """Extend the ledger when the sources grew or ``num_captions`` rose; return the new generation's number."""
    gen = extend(cfg, logger)
    return gen.number if gen else None


def run(cfg: PipelineConfig, partition_id: int, *, logger: logging.Logger | None = None) -> dict:
    """Write `captions/<hash>/part-XXXXX/captions.parquet` from the ledger."""

    def work(run: PartitionRun) -> None:
        df = partition_captions(cfg, partition_id, run.config_hash)
        storage.write_parquet_atomic(run.output(CAPTIONS_FILE), df)
        run.stats.add("out", len(df))
        run.stats.observe("aesthetic_score", df["aesthetic_score"].to_numpy())

    return execute(cfg, CAPTIONS, partition_id, work, logger)
