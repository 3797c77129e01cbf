"""The selection, owned once: the judge ladder's score columns, thresholds, pass rule, rejection reasons, top-k.

Render, the judge stage, filter, calibrate and pack all read this module; it needs pandas only, no torch.
The ladder is CLIP → DINOv2 → SSIM → VLM, each rung seeing only what passed the rungs below it; a higher
rung's score is NaN for a sample a lower one failed, and a re-selection that lets such a sample through
counts it as ``<rung>_not_scored`` (``vlm_not_judged``), never passed. Top-k: per triplet, by ``rank_by``,
ties broken by seed.

Each rung's columns, thresholds and rejection reasons: docs/judge.md ("In the code").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.errors import InputError

METRICS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
# metric column -> the field of a selection (`render.keep`, `filter.*`) holding its threshold
THRESHOLD_FIELD = {
    "clip_sim_0": "clip_caption_threshold",
    "clip_sim_1": "clip_caption_threshold",
    "clip_sim_dir": "clip_direction_threshold",
    "clip_sim_image": "clip_image_threshold",
}
# counted rejection reasons, first failing check wins, with the metrics each one checks
REASONS = (
    ("clip_direction", ("clip_sim_dir",)),
    ("clip_caption", ("clip_sim_0", "clip_sim_1")),
    ("clip_image", ("clip_sim_image",)),
)
RANK_BY = "clip_sim_dir"  # the paper's top-k order (the default of `rank_by`)
EARLY_REJECTED = "early_rejected"

# the rungs after CLIP, in ladder order; the image rungs run inside render, the VLM rung is its own stage
RUNGS = ("clip", "dino", "ssim", "vlm")
IMAGE_RUNGS = ("dino", "ssim")
DINO = "dino_similarity"
SSIM = "ssim"
VLM_SCORE = "vlm_score"
VLM_STATUS = "vlm_status"  # ok | unparseable | refused (NaN: not judged)
VLM_CRITERIA = ("vlm_instruction", "vlm_preservation", "vlm_quality")
VLM_COLUMNS = (VLM_SCORE, *VLM_CRITERIA)
RENDER_RANK_CHOICES = ("clip_sim_dir", "clip_sim_image", DINO, SSIM)
RANK_CHOICES = (*RENDER_RANK_CHOICES, *VLM_COLUMNS)
# the selection fields each rung reads (for hashing only what applies)
RUNG_FIELDS = {
    "clip": ("clip_image_threshold", "clip_caption_threshold", "clip_direction_threshold"),
    "dino": ("dino_threshold",),
    "ssim": ("ssim_min", "ssim_max"),
    "vlm": ("vlm_threshold",),
}
NOT_SCORED = {"dino": "dino_not_scored", "ssim": "ssim_not_scored", "vlm": "vlm_not_judged"}


def thresholds(selection: Any) -> dict[str, float]:
    """Each CLIP metric column's threshold under ``selection`` (a ``Selection``)."""
    return {metric: getattr(selection, name) for metric, name in THRESHOLD_FIELD.items()}


def selection_fields(selection: Any, rungs: Sequence[str]) -> dict[str, Any]:
    """The fields of ``selection`` that the ``rungs`` in use read, plus top-k and its order (for hashes:
    a threshold of a rung that is off changes nothing)."""
    names = [f for rung in rungs for f in RUNG_FIELDS[rung]] + ["top_k", "rank_by"]
    return {name: getattr(selection, name) for name in names}


def _column(df: pd.DataFrame | Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name in df:
        return np.asarray(df[name], dtype=float)
    return np.full(n, np.nan)


def _rung_checks(
    df: pd.DataFrame | Mapping[str, Any], selection: Any, rung: str, n: int
) -> list[tuple[str, np.ndarray]]:
    """(reason, failed) per check of ``rung`` in the order its reasons win; NaN never fails here."""
    if rung == "clip":
        limits = thresholds(selection)
        checks = []
        for name, metrics in REASONS:
            failed = np.zeros(n, dtype=bool)
            for metric in metrics:
                failed |= _column(df, metric, n) < limits[metric]
            checks.append((name, failed))
        return checks
    if rung == "dino":
        return [("dino_similarity", _column(df, DINO, n) < selection.dino_threshold)]
    if rung == "ssim":
        value = _column(df, SSIM, n)
        return [("ssim_low", value < selection.ssim_min), ("ssim_high", value > selection.ssim_max)]
    if rung == "vlm":
        status = (
            np.asarray(df[VLM_STATUS], dtype=object) if VLM_STATUS in df else np.full(n, None, dtype=object)
        )
        return [
            ("vlm_unparseable", status == "unparseable"),
            ("vlm_refused", status == "refused"),
            ("vlm_score", _column(df, VLM_SCORE, n) < selection.vlm_threshold),
        ]
    raise InputError(f"unknown rung {rung!r}; expected one of {RUNGS}")


def _unscored(df: pd.DataFrame | Mapping[str, Any], rung: str, n: int) -> np.ndarray:
    """Samples that reached ``rung`` without its score (never computed, never judged)."""
    if rung == "clip":
        return np.zeros(n, dtype=bool)
    if rung == "vlm":
        status = (
            np.asarray(df[VLM_STATUS], dtype=object) if VLM_STATUS in df else np.full(n, None, dtype=object)
        )
        return pd.isna(status)
    return np.isnan(_column(df, DINO if rung == "dino" else SSIM, n))


def _length(df: pd.DataFrame | Mapping[str, Any]) -> int:
    return len(df) if isinstance(df, pd.DataFrame) else len(np.atleast_1d(df[METRICS[0]]))


def ladder_reasons(
    df: pd.DataFrame | Mapping[str, Any], selection: Any, rungs: Sequence[str] = ("clip",)
) -> np.ndarray:
    """Per sample, the first rung check it fails (None: passes every rung in ``rungs``), in ladder order."""
    n = _length(df)
    reason = np.full(n, None, dtype=object)
    open_ = np.ones(n, dtype=bool)
    for rung in (r for r in RUNGS if r in rungs):
        if rung != "clip":
            missing = open_ & _unscored(df, rung, n)
            reason[missing] = NOT_SCORED[rung]
            open_ &= ~missing
        for name, failed in _rung_checks(df, selection, rung, n):
            hit = open_ & failed
            reason[hit] = name
            open_ &= ~hit
    if (
        rungs and "clip" in rungs
    ):  # a CLIP metric left NaN (not scored) fails too, as a comparison with NaN does
        clip_nan = np.zeros(n, dtype=bool)
        for metric in METRICS:
            clip_nan |= np.isnan(_column(df, metric, n))
        reason[open_ & clip_nan] = REASONS[0][0]
    return reason


def passes(
    df: pd.DataFrame | Mapping[str, Any], selection: Any, rungs: Sequence[str] = ("clip",)
) -> pd.Series:
    """Every rung in ``rungs`` passed (CLIP alone by default: the paper's filter)."""
    ok = pd.isna(pd.Series(ladder_reasons(df, selection, rungs), dtype=object))
    if isinstance(df, pd.DataFrame):
        ok.index = df.index
    return ok


def failure_reason(df: pd.DataFrame, selection: Any, rungs: Sequence[str] = ("clip",)) -> pd.Series:
    """The first check each sample fails (None for passing samples), for counted rejections."""
    reason = pd.Series(ladder_reasons(df, selection, rungs), index=df.index, dtype=object)
    if EARLY_REJECTED in df:  # dropped mid-denoising by render's early rejection: final metrics are NaN
        reason[df[EARLY_REJECTED].fillna(False).astype(bool).to_numpy()] = EARLY_REJECTED
    return reason


def per_seed_eligible(
    df: pd.DataFrame, selection: Any, per_seed: int | None, rungs: Sequence[str] = ("clip",)
) -> pd.Series | None:
    """With p-branching (several samples per seed): the rows that may be kept — per (caption_id, seed) the
    ``per_seed`` samples passing ``rungs`` best by ``selection.rank_by`` (ties: the earlier row), and every
    failing row (it is not a candidate anyway); None (no restriction) when ``per_seed`` is None. Pass it
    as :func:`select_top_k`'s ``eligible``.

    A seed's branches share the before image and most of the after trajectory, so one per seed keeps
    the kept pairs as diverse as independent samples are. With one sample per seed it changes nothing.
    """
    if per_seed is None or not len(df):
        return None
    ok = passes(df, selection, rungs)
    eligible = pd.Series(True, index=df.index)
    if not ok.any():
        return eligible
    rank = getattr(selection, "rank_by", RANK_BY)
    ranked = df[ok].sort_values(["caption_id", "seed", rank], ascending=[True, True, False], kind="stable")
    best = ranked.groupby(["caption_id", "seed"], sort=False).head(per_seed).index
    eligible[ok] = False
    eligible[best] = True
    return eligible


def funnel(df: pd.DataFrame, selection: Any, rungs: Sequence[str]) -> list[dict[str, int | str]]:
    """Per rung in ladder order: how many samples reached it and how many passed it (early-rejected
    samples reach none)."""
    n = len(df)
    alive = (
        ~df[EARLY_REJECTED].fillna(False).astype(bool).to_numpy()
        if EARLY_REJECTED in df
        else np.ones(n, bool)
    )
    steps = []
    for i, rung in enumerate(r for r in RUNGS if r in rungs):
        upto = [r for r in RUNGS if r in rungs][: i + 1]
        passed = alive & pd.isna(pd.Series(ladder_reasons(df, selection, upto), dtype=object)).to_numpy()
        steps.append({"rung": rung, "in": int(alive.sum()), "passed": int(passed.sum())})
        alive = passed
    return steps


def select_top_k(
    df: pd.DataFrame, selection: Any, eligible: pd.Series | None = None, rungs: Sequence[str] = ("clip",)
) -> pd.Series:
    """Boolean `kept`: per caption_id, the top-k samples passing ``rungs``, by ``selection.rank_by``.

    Ties are broken by seed so the choice is deterministic. `eligible` further restricts the
    candidates (e.g. to samples whose images were stored by render).
    """
    ok = passes(df, selection, rungs)
    if eligible is not None:
        ok &= eligible
    kept = pd.Series(False, index=df.index)
    if not ok.any():
        return kept
    rank = getattr(selection, "rank_by", RANK_BY)
    cand = df[ok].sort_values(["caption_id", rank, "seed"], ascending=[True, False, True])
    top = cand.groupby("caption_id", sort=False).head(selection.top_k).index
    kept[top] = True
    return kept
