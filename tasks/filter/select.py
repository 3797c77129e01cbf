"""Thresholds and top-k selection over per-sample CLIP metrics (a DataFrame of samples.parquet rows)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.common.config import Selection


def passes(df: pd.DataFrame, cfg: Selection) -> pd.Series:
    """The paper's filter: image-image >= t_img, each image vs its caption >= t_cap, direction >= t_dir."""
    return (
        (df["clip_sim_image"] >= cfg.clip_image_threshold)
        & (df["clip_sim_0"] >= cfg.clip_caption_threshold)
        & (df["clip_sim_1"] >= cfg.clip_caption_threshold)
        & (df["clip_sim_dir"] >= cfg.clip_direction_threshold)
    )


def failure_reason(df: pd.DataFrame, cfg: Selection) -> pd.Series:
    """The first threshold each sample fails (None for passing samples), for counted rejections."""
    reason = pd.Series([None] * len(df), index=df.index, dtype=object)
    checks = [
        ("clip_direction", df["clip_sim_dir"] < cfg.clip_direction_threshold),
        ("clip_caption", (df["clip_sim_0"] < cfg.clip_caption_threshold) | (df["clip_sim_1"] < cfg.clip_caption_threshold)),
        ("clip_image", df["clip_sim_image"] < cfg.clip_image_threshold),
    ]
    for name, failed in reversed(checks):
        reason[failed.to_numpy()] = name
    if "early_rejected" in df:  # dropped mid-denoising by render's early rejection: final metrics are NaN
        reason[df["early_rejected"].fillna(False).astype(bool).to_numpy()] = "early_rejected"
    return reason


def select_top_k(df: pd.DataFrame, cfg: Selection, eligible: pd.Series | None = None) -> pd.Series:
    """Boolean `kept`: per caption_id, the top-k passing samples by directional similarity.

    Ties are broken by seed so the choice is deterministic. `eligible` further restricts the
    candidates (e.g. to samples whose images were stored by render).
    """
    ok = passes(df, cfg)
    if eligible is not None:
        ok &= eligible
    kept = pd.Series(False, index=df.index)
    if not ok.any():
        return kept
    cand = df[ok].sort_values(["caption_id", "clip_sim_dir", "seed"], ascending=[True, False, True])
    top = cand.groupby("caption_id", sort=False).head(cfg.top_k).index
    kept[top] = True
    return kept


def triplets_with_keep(df: pd.DataFrame, kept: pd.Series) -> int:
    return int(df.loc[kept.to_numpy(), "caption_id"].nunique()) if len(df) else 0


def pass_rate(df: pd.DataFrame, cfg: Selection) -> float:
    return float(np.mean(passes(df, cfg))) if len(df) else 0.0
