"""Filter stage: re-select the kept pairs from `samples.parquet` with new thresholds or top-k, no re-rendering.

The selection is ``filter`` over ``render.keep`` (:meth:`PipelineConfig.selection`), over every rung of the
judge ladder (CLIP and render's DINOv2/SSIM columns, the judge stage's ``judgments.parquet`` with
``judges.vlm.enabled``). It works within the images render stored (``render.save_images``): a pair the
selection wants whose images were not written is counted as ``image_not_stored``, never replaced.

In full: docs/judge.md ("In the code").
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun
from tasks.common.layout import JUDGMENTS_FILE, KEPT_FILE, SAMPLES_FILE
from tasks.common.selection import (
    DINO,
    SSIM,
    VLM_SCORE,
    failure_reason,
    funnel,
    passes,
    per_seed_eligible,
    select_top_k,
)
from tasks.common.stage import execute
from tasks.filter.spec import STAGE as FILTER

STAGE = "filter"
log = logging.getLogger("editforge")


def with_judgments(run: PartitionRun, samples: pd.DataFrame) -> pd.DataFrame:
    """``samples`` with the VLM judge's columns joined by sample key (NaN: not judged)."""
    judgments = storage.read_parquet(run.input_path("judge", JUDGMENTS_FILE))
    judgments = judgments.drop(columns=[c for c in ("caption_id",) if c in judgments])
    return samples.merge(judgments, on="sample_key", how="left", validate="one_to_one")


def run(cfg: PipelineConfig, partition_id: int, *, logger: logging.Logger | None = None) -> dict:
    """Re-select one partition's kept pairs from its render samples (see module doc)."""
    selection = cfg.selection()
    rungs = cfg.judges.rungs()
    logger = logger or log

    def work(run: PartitionRun) -> None:
        samples = storage.read_parquet(run.input_path("render", SAMPLES_FILE))
        if "vlm" in rungs:
            samples = with_judgments(run, samples)
        run.stats.add("in", len(samples))
        samples["passed"] = passes(samples, selection, rungs).to_numpy() if len(samples) else []
        eligible = per_seed_eligible(samples, selection, cfg.render.keep_per_seed, rungs)
        wanted = select_top_k(samples, selection, eligible, rungs=rungs)
        stored = samples["image_stored"].astype(bool)
        samples["kept"] = (wanted & stored).to_numpy()
        kept = samples[samples["kept"]].reset_index(drop=True)
        storage.write_parquet_atomic(run.output(KEPT_FILE), kept)
        run.stats.add("out", len(kept))
        run.stats.add("triplets_in", samples["caption_id"].nunique())
        run.stats.add("triplets_kept", kept["caption_id"].nunique())
        for reason, n in failure_reason(samples, selection, rungs).dropna().value_counts().items():
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
                partition_id,
                missing,
                cfg.render.save_images,
            )
        if len(rungs) > 1 and len(samples):
            for step in funnel(samples, selection, rungs):
                run.stats.add(f"ladder_{step['rung']}_in", step["in"])
                run.stats.add(f"ladder_{step['rung']}_passed", step["passed"])
        run.stats.observe(
            f"kept_{selection.rank_by}",
            kept[selection.rank_by].to_numpy(dtype=float) if selection.rank_by in kept else np.zeros(0),
        )
        for col in (DINO, SSIM, VLM_SCORE):
            if col in kept and col != selection.rank_by and kept[col].notna().any():
                run.stats.observe(f"kept_{col}", kept[col].to_numpy(dtype=float))
        if "vlm" in rungs:
            record_vlm_cost(run, samples, len(kept))
        if cfg.filter.note:
            run.figures["note"] = cfg.filter.note

    return execute(cfg, FILTER, partition_id, work, logger)


def funnel_line(counts: dict[str, int]) -> str | None:
    """The judge ladder's funnel from (summed) filter counts: each rung's samples in, passed, pass rate."""
    from tasks.common.selection import RUNGS

    steps = [
        (r, counts[f"ladder_{r}_in"], counts[f"ladder_{r}_passed"])
        for r in RUNGS
        if f"ladder_{r}_in" in counts
    ]
    if len(steps) < 2:
        return None
    parts = [
        f"{rung} {n_in} -> {n_out} ({n_out / n_in:.0%})" if n_in else f"{rung} 0"
        for rung, n_in, n_out in steps
    ]
    return "judge ladder (filter): " + ", ".join(parts)


def record_vlm_cost(run: PartitionRun, samples: pd.DataFrame, kept: int) -> None:
    """The VLM judge's tokens and money spent on this partition's samples, and per kept pair."""
    from tasks.judge.cost import spent

    totals = spent(samples)
    run.stats.add("vlm_judged", totals["judged"])
    run.stats.add("vlm_prompt_tokens", totals["prompt_tokens"])
    run.stats.add("vlm_completion_tokens", totals["completion_tokens"])
    run.figures["vlm_cost_usd"] = totals["cost_usd"]
    if kept:
        run.figures["vlm_tokens_per_kept_pair"] = round(
            (totals["prompt_tokens"] + totals["completion_tokens"]) / kept, 1
        )
        if totals["cost_usd"] is not None:
            run.figures["vlm_cost_per_kept_pair_usd"] = round(totals["cost_usd"] / kept, 10)
