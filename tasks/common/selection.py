"""The selection, owned once: the four CLIP metric columns, their thresholds, the pass rule and top-k.

Render (which samples passed, adaptive stopping, early rejection, which are kept), filter (the
re-selection), calibrate and pack all read this module; it needs pandas only, no torch.

- ``clip_sim_0`` / ``clip_sim_1``: each image vs its caption, >= ``clip_caption_threshold``;
- ``clip_sim_image``: image vs image, >= ``clip_image_threshold``;
- ``clip_sim_dir``: the directional similarity, >= ``clip_direction_threshold``; top-k by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
# metric column -> the field of a selection (`render.keep`, `filter.*`) holding its threshold
THRESHOLD_FIELD = {
    "clip_sim_0": "clip_caption_threshold",
    "clip_sim_1": "clip_caption_threshold",
    "clip_sim_dir": "clip_direction_threshold",
    "clip_sim_image": "clip_image_threshold",
}
# counted rejection reasons, first failing check wins, with the metrics each one checks
REASONS = (("clip_direction", ("clip_sim_dir",)), ("clip_caption", ("clip_sim_0", "clip_sim_1")),
           ("clip_image", ("clip_sim_image",)))
RANK_BY = "clip_sim_dir"
EARLY_REJECTED = "early_rejected"


def thresholds(selection: Any) -> dict[str, float]:
    """Each metric column's threshold under ``selection`` (a ``Selection``)."""
    return {metric: getattr(selection, name) for metric, name in THRESHOLD_FIELD.items()}


def passes(df: pd.DataFrame | Mapping[str, Any], selection: Any) -> pd.Series:
    """The paper's filter: every metric at or above its threshold."""
    limits = thresholds(selection)
    ok = None
    for metric in METRICS:
        check = df[metric] >= limits[metric]
        ok = check if ok is None else ok & check
    return ok


def failure_reason(df: pd.DataFrame, selection: Any) -> pd.Series:
    """The first threshold each sample fails (None for passing samples), for counted rejections."""
    limits = thresholds(selection)
    reason = pd.Series([None] * len(df), index=df.index, dtype=object)
    for name, metrics in reversed(REASONS):
        failed = np.zeros(len(df), dtype=bool)
        for metric in metrics:
            failed |= (df[metric] < limits[metric]).to_numpy()
        reason[failed] = name
    if EARLY_REJECTED in df:  # dropped mid-denoising by render's early rejection: final metrics are NaN
        reason[df[EARLY_REJECTED].fillna(False).astype(bool).to_numpy()] = EARLY_REJECTED
    return reason


def per_seed_eligible(df: pd.DataFrame, selection: Any, per_seed: int | None) -> pd.Series | None:
    """With p-branching (several samples per seed): the rows that may be kept — per (caption_id, seed) the
    ``per_seed`` passing samples best by directional similarity (ties: the earlier row), and every
    failing row (it is not a candidate anyway); None (no restriction) when ``per_seed`` is None.

    A seed's branches share the before image and most of the after trajectory, so one per seed keeps
    the kept pairs as diverse as independent samples are. With one sample per seed it changes nothing.
    """
    if per_seed is None or not len(df):
        return None
    ok = passes(df, selection)
    eligible = pd.Series(True, index=df.index)
    if not ok.any():
        return eligible
    ranked = df[ok].sort_values(["caption_id", "seed", RANK_BY], ascending=[True, True, False], kind="stable")
    best = ranked.groupby(["caption_id", "seed"], sort=False).head(per_seed).index
    eligible[ok] = False
    eligible[best] = True
    return eligible


def select_top_k(df: pd.DataFrame, selection: Any, eligible: pd.Series | None = None) -> pd.Series:
    """Boolean `kept`: per caption_id, the top-k passing samples by directional similarity.

    Ties are broken by seed so the choice is deterministic. `eligible` further restricts the
    candidates (e.g. to samples whose images were stored by render).
    """
    ok = passes(df, selection)
    if eligible is not None:
        ok &= eligible
    kept = pd.Series(False, index=df.index)
    if not ok.any():
        return kept
    cand = df[ok].sort_values(["caption_id", RANK_BY, "seed"], ascending=[True, False, True])
    top = cand.groupby("caption_id", sort=False).head(selection.top_k).index
    kept[top] = True
    return kept

