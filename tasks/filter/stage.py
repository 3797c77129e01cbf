"""Filter stage: re-select kept pairs from `samples.parquet` with the configured thresholds and top-k.

No re-rendering: render stored the images of every sample that passed its (render-time) thresholds,
so top-k and stricter thresholds can be changed here freely. Loosening the thresholds below the
render-time ones changes the render stage's config hash and re-renders.
"""

from __future__ import annotations

import logging

from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun, execute_partition
from tasks.filter.select import failure_reason, passes, select_top_k

STAGE = "filter"


def run_filter_partition(cfg: PipelineConfig, partition_id: int, logger: logging.Logger | None = None) -> dict:
    f = cfg.filter

    def work(run: PartitionRun) -> None:
        samples = storage.read_parquet(run.input_path("render", "samples.parquet", cfg.stage_hash("render")))
        run.stats.add("in", len(samples))
        samples["passed"] = passes(samples, f).to_numpy() if len(samples) else []
        samples["kept"] = select_top_k(samples, f, samples["image_stored"].astype(bool)).to_numpy()
        kept = samples[samples["kept"].astype(bool)].reset_index(drop=True)
        storage.write_parquet_atomic(run.output("kept.parquet"), kept)
        run.stats.add("out", len(kept))
        run.stats.add("triplets_in", samples["caption_id"].nunique())
        run.stats.add("triplets_kept", kept["caption_id"].nunique())
        for reason, n in failure_reason(samples, f).dropna().value_counts().items():
            run.stats.reject(reason, n)
        not_top_k = int((samples["passed"] & ~samples["kept"].astype(bool)).sum())
        if not_top_k:
            run.stats.reject("not_in_top_k", not_top_k)
        run.stats.observe("kept_clip_sim_dir", kept["clip_sim_dir"].to_numpy(dtype=float))
        if f.note:
            run.extra["note"] = f.note

    return execute_partition(STAGE, partition_id, cfg.output_root, cfg.stage_hash(STAGE), work, logger)
