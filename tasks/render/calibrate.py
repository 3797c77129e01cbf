"""Calibrate the early-rejection margin on samples rendered with ``render.early_reject.dry_run``.

A dry run records every sample's early metrics and drops nothing; for each candidate margin the render
stage's own drop rule (:func:`tasks.render.early.early_keep`) is replayed and compared with the final
outcome: ``recall`` (failing samples dropped), ``false_drop`` (passing ones lost), ``unet_fraction`` and
``cost_per_pass``. :func:`recommend` picks the cheapest margin whose ``false_drop`` stays within a budget.

What is and is not counted: docs/render.md ("In the code").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from tasks.captions.generations import partition_ids
from tasks.common import storage
from tasks.common.config import PipelineConfig, Selection
from tasks.common.contract import finished
from tasks.common.errors import PermanentError
from tasks.common.layout import SAMPLES_FILE, partition_dir, partition_file
from tasks.common.selection import METRICS, passes
from tasks.common.stage import stage_hash
from tasks.render.early import early_keep, early_step_count
from tasks.render.spec import STAGE as RENDER

DEFAULT_MARGINS = tuple(round(-0.05 + 0.025 * i, 6) for i in range(15))  # -0.05, -0.025, ..., 0.30

TABLE_COLUMNS = [
    "margin",
    "scored",
    "passing",
    "failing",
    "dropped",
    "dropped_failing",
    "dropped_passing",
    "recall",
    "false_drop",
    "unet_calls",
    "unet_fraction",
    "unet_calls_per_pass",
    "cost_per_pass",
]

DRY_RUN_HINT = (
    "render a few partitions with early scoring and no dropping, e.g. `editforge stage render "
    "--partitions 0-1 --set render.early_reject.at=0.5 --set render.early_reject.dry_run=true`, "
    "then calibrate with the same --preset and --set options"
)


class CalibrationError(PermanentError, ValueError):
    """The config or the rendered partitions cannot be used to calibrate the margin."""


def scored_mask(samples: pd.DataFrame, used: Sequence[str] = METRICS) -> pd.Series:
    """Rows with the ``used`` early metrics and all final metrics (not dropped, scored early)."""
    if not len(samples):
        return pd.Series(False, index=samples.index)
    early = samples[[f"early_{m}" for m in used]].notna().all(axis=1)
    final = samples[list(METRICS)].notna().all(axis=1)
    return early & final


def early_drops(
    samples: pd.DataFrame, selection: Selection, used: Sequence[str], margin: float
) -> np.ndarray:
    """Bool per row: the render stage's early rejection at ``margin`` would drop the sample."""
    metrics = {m: torch.tensor(samples[f"early_{m}"].to_numpy(dtype=float)) for m in used}
    return ~early_keep(metrics, selection, margin, used).numpy()


def calibration_table(
    samples: pd.DataFrame,
    selection: Selection,
    used: Sequence[str],
    margins: Sequence[float],
    after_steps: int,
    steps: int,
    rungs: Sequence[str] = ("clip",),
) -> pd.DataFrame:
    """One row per margin (see the module docstring and :data:`TABLE_COLUMNS`).

    ``samples`` holds ``early_clip_sim_*`` and ``clip_sim_*`` columns; rows without both (for the
    ``used`` metrics) are left out. Final pass is :func:`tasks.common.selection.passes` under
    ``selection`` and the ladder's ``rungs`` render applies (CLIP, and DINOv2 / SSIM when on: a sample that
    would fail them is no loss when dropped early). Shares with an empty denominator are NaN; ``cost_per_pass`` is inf when every
    passing sample would be dropped.
    """
    if not 1 <= after_steps < steps:
        raise CalibrationError(f"after_steps must be in [1, steps), got {after_steps} of {steps}")
    used = tuple(used)
    if not used:
        raise CalibrationError("no early-rejection metrics given")
    scored = samples[scored_mask(samples, used)] if len(samples) else samples
    passing = (
        passes(scored, selection, rungs).to_numpy(dtype=bool) if len(scored) else np.zeros(0, dtype=bool)
    )
    n, n_pass = len(scored), int(passing.sum())
    n_fail = n - n_pass
    full_calls = n * steps
    rows = []
    for margin in margins:
        drop = early_drops(scored, selection, used, float(margin)) if n else np.zeros(0, dtype=bool)
        dropped_pass = int((drop & passing).sum())
        dropped_fail = int((drop & ~passing).sum())
        calls = (n - int(drop.sum())) * steps + int(drop.sum()) * after_steps
        kept_pass = n_pass - dropped_pass
        rows.append(
            {
                "margin": float(margin),
                "scored": n,
                "passing": n_pass,
                "failing": n_fail,
                "dropped": int(drop.sum()),
                "dropped_failing": dropped_fail,
                "dropped_passing": dropped_pass,
                "recall": dropped_fail / n_fail if n_fail else np.nan,
                "false_drop": dropped_pass / n_pass if n_pass else np.nan,
                "unet_calls": calls,
                "unet_fraction": calls / full_calls if full_calls else np.nan,
                "unet_calls_per_pass": calls / kept_pass if kept_pass else (np.inf if n_pass else np.nan),
                "cost_per_pass": (
                    (calls / kept_pass) / (full_calls / n_pass)
                    if kept_pass
                    else (np.inf if n_pass else np.nan)
                ),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def recommend(table: pd.DataFrame, max_false_drop: float) -> float | None:
    """The margin with the lowest ``cost_per_pass`` among those with ``false_drop <= max_false_drop``.

    Ties go to the lower false_drop, then the larger (safer) margin. None when no margin qualifies
    (also when no scored sample passed, so false_drop is unknown). A result with ``cost_per_pass >= 1``
    means early rejection does not pay off on these samples.
    """
    ok = table[(table["false_drop"] <= max_false_drop) & table["cost_per_pass"].notna()]
    if not len(ok):
        return None
    best = ok.sort_values(["cost_per_pass", "false_drop", "margin"], ascending=[True, True, False]).iloc[0]
    return float(best["margin"])


@dataclass(frozen=True)
class CalibrationSamples:
    """Rows usable for calibration from a config's finished render partitions."""

    samples: pd.DataFrame  # rows with both early and final metrics
    partitions: list[int]  # partitions read (finished under the config's render hash)
    skipped: list[int] = field(default_factory=list)  # asked for, but not finished under this hash
    early_rejected: int = 0  # rows left out: dropped by a real early rejection (no final metrics)
    unscored: int = 0  # other rows left out (no early metrics)


def calibration_settings(cfg: PipelineConfig) -> tuple[int, int]:
    """(after_steps, steps) of the config's early rejection; CalibrationError when it has none."""
    r = cfg.render
    if r.early_reject.at is None:
        raise CalibrationError(
            "render.early_reject.at is not set: the margin applies to early rejection, "
            f"and there is nothing to calibrate without it; {DRY_RUN_HINT}"
        )
    after = early_step_count(r.early_reject.at, r.steps)
    if after is None:
        raise CalibrationError(f"render.steps={r.steps} leaves no intermediate step to score early at")
    return after, r.steps


def load_calibration_samples(
    cfg: PipelineConfig, partitions: Sequence[int] | None = None
) -> CalibrationSamples:
    """``samples.parquet`` of the render partitions finished under this config's render hash.

    ``partitions``: the partition ids to read (default: all of the config's). Raises
    CalibrationError when early rejection is off, when no partition is finished under this config,
    or when no row has both early and final metrics.
    """
    calibration_settings(cfg)
    expected = stage_hash(cfg, RENDER)
    ids = list(partitions) if partitions is not None else partition_ids(cfg, RENDER)
    frames, read, skipped = [], [], []
    for i in ids:
        if not finished(partition_dir(cfg.output_root, "render", expected, i), expected):
            skipped.append(i)
            continue
        frames.append(
            storage.read_parquet(partition_file(cfg.output_root, "render", expected, i, SAMPLES_FILE))
        )
        read.append(i)
    if not read:
        raise CalibrationError(
            f"no render partition of {ids} under {cfg.output_root} is finished under this config (render hash "
            f"{expected}); the hash covers every render.* setting, so pass the same --set options the partitions "
            f"were rendered with (render.early_reject.dry_run=true included), or {DRY_RUN_HINT}"
        )
    frames = [f for f in frames if len(f)]
    samples = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    used = cfg.render.early_reject.metrics
    if len(samples) and not {f"early_{m}" for m in used} <= set(samples.columns):
        raise CalibrationError(f"samples.parquet of partitions {read} has no early metrics; {DRY_RUN_HINT}")
    mask = scored_mask(samples, used)
    early_rejected = int((~mask & samples["early_rejected"].astype(bool)).sum()) if len(samples) else 0
    if not mask.any():
        raise CalibrationError(
            f"none of the {len(samples)} samples of render partitions {read} has both early and final metrics "
            f"({early_rejected} were dropped by early rejection, so their final metrics are unknown); {DRY_RUN_HINT}"
        )
    return CalibrationSamples(
        samples=samples[mask].reset_index(drop=True),
        partitions=read,
        skipped=skipped,
        early_rejected=early_rejected,
        unscored=int((~mask).sum()) - early_rejected,
    )


def calibrate(
    cfg: PipelineConfig, margins: Sequence[float] = DEFAULT_MARGINS, partitions: Sequence[int] | None = None
) -> tuple[pd.DataFrame, CalibrationSamples]:
    """Load a config's dry-run samples and tabulate ``margins`` with its selection and metrics."""
    after, steps = calibration_settings(cfg)
    data = load_calibration_samples(cfg, partitions)
    table = calibration_table(
        data.samples,
        cfg.render.keep,
        cfg.render.early_reject.metrics,
        margins,
        after,
        steps,
        ("clip", *cfg.judges.image_rungs()),
    )
    return table, data
