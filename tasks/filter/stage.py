"""Filter stage: re-select the kept pairs from `samples.parquet` with new thresholds or top-k, no re-rendering.

The selection is ``filter`` over ``render.keep`` (:meth:`PipelineConfig.selection`): left unset, the filter
keeps what render kept. Render wrote the images ``render.save_images`` asked for — by default only the
kept pairs' (the reference), ``passed`` for every passing sample, ``all`` for every rendered one — so
re-selection works within those: stricter thresholds and a smaller top-k always do; a larger top-k needs
``passed``, looser thresholds ``all``. A pair the selection wants whose images were not written is not
replaced by the next best: it is counted as ``image_not_stored`` (and logged with the setting to change),
so the output is always exactly "the selection, minus what render did not keep". With p-branching
(several samples per seed) at most ``render.keep_per_seed`` of a seed's passing samples are candidates, as
in render.
"""

from __future__ import annotations

import logging

from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun
from tasks.common.layout import KEPT_FILE, SAMPLES_FILE
from tasks.common.selection import RANK_BY, failure_reason, passes, per_seed_eligible, select_top_k
from tasks.registry import execute

STAGE = "filter"
log = logging.getLogger("editforge")


def run(cfg: PipelineConfig, partition_id: int, *, logger: logging.Logger | None = None) -> dict:
    """Re-select one partition's kept pairs from its render samples (see module doc)."""
    selection = cfg.selection()
    logger = logger or log

    def work(run: PartitionRun) -> None:
        samples = storage.read_parquet(run.input_path("render", SAMPLES_FILE))
        run.stats.add("in", len(samples))
        samples["passed"] = passes(samples, selection).to_numpy() if len(samples) else []
        wanted = select_top_k(samples, selection, per_seed_eligible(samples, selection, cfg.render.keep_per_seed))
        stored = samples["image_stored"].astype(bool)
        samples["kept"] = (wanted & stored).to_numpy()
        kept = samples[samples["kept"]].reset_index(drop=True)
        storage.write_parquet_atomic(run.output(KEPT_FILE), kept)
        run.stats.add("out", len(kept))
        run.stats.add("triplets_in", samples["caption_id"].nunique())
        run.stats.add("triplets_kept", kept["caption_id"].nunique())
        for reason, n in failure_reason(samples, selection).dropna().value_counts().items():
            run.stats.reject(reason, n)
        not_top_k = int((samples["passed"] & ~wanted).sum())
        if not_top_k:
            run.stats.reject("not_in_top_k", not_top_k)
        missing = int((wanted & ~stored).sum())
        if missing:
            run.stats.reject("image_not_stored", missing)
            logger.warning(
                "filter part-%05d: %d selected pairs have no images (render.save_images=%s stored only those "
                "render kept under render.keep); to re-select beyond them re-render with "
                "render.save_images=passed (larger top_k) or all (looser thresholds)",
                partition_id, missing, cfg.render.save_images)
        run.stats.observe(f"kept_{RANK_BY}", kept[RANK_BY].to_numpy(dtype=float))
        if cfg.filter.note:
            run.extra["note"] = cfg.filter.note

    return execute(cfg, STAGE, partition_id, work, logger)
