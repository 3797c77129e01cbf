"""The filter against people: precision, recall, ROC and agreement of each rung, and thresholds that reach
a target precision (pure statistics on labelled samples; numpy and pandas).

People's labels become one truth per pair (:func:`people_truth`): ``good`` is a good edit, ``wrong`` and
``broken`` are not, ``unsure`` is left out; several reviewers: the majority (a tie is left out). Every
estimate is weighted by the pair's weight in the review sample (pairs in its stratum / pairs drawn,
:mod:`tasks.filter.review`), so it is the estimate for every stored pair of the partitions read. Its interval
is Wilson's score interval on an effective sample size: ``(sum w)^2 / sum w^2`` (Kish; the plain count when
every weight is 1), lowered for clustering when ``groups`` is given — the samples of one triplet share its
captions and instruction, so their labels go together: the ratio estimator's variance over the groups
(triplets) gives ``n_eff = p (1 - p) / var``, kept between the number of groups and Kish's size.

- precision of a rule: the share of the pairs it passes that people call good; recall: the share of the
  good pairs it passes; ``kappa``: Cohen's kappa between the rule's pass/fail and people's good/not;
- :func:`roc`: the ROC curve of one score (and its area);
- :func:`search`: over a grid of the three CLIP thresholds (the other rungs as set), the thresholds with
  the highest recall whose precision reaches ``target`` at the lower end of its interval, among those that
  pass at least ``min_passing`` labelled pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd

from tasks.common.selection import THRESHOLD_FIELD, passes
from tasks.filter.labels import LABELS, NEGATIVE, POSITIVE

CLIP_FIELDS = ("clip_image_threshold", "clip_caption_threshold", "clip_direction_threshold")
# the score each CLIP threshold compares (the caption threshold: the lower of the two caption scores)
CLIP_SCORES = {"clip_image_threshold": "clip_sim_image", "clip_caption_threshold": "clip_caption_min",
               "clip_direction_threshold": "clip_sim_dir"}
RULE_NAMES = {"clip_image_threshold": "image-image", "clip_caption_threshold": "caption (both images)",
              "clip_direction_threshold": "direction"}


def z_of(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (``n`` may be an effective, non-integer size); (nan, nan)
    for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    z = z_of(confidence)
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_n(total: float, total_sq: float, hits_by_group: np.ndarray, totals_by_group: np.ndarray,
                p: float) -> float:
    """The effective size of a weighted share ``p`` (see the module doc): Kish's, lowered by the spread of
    the groups' residuals ``hits - p * totals``; the groups' count when they all agree (p 0 or 1)."""
    kish = total * total / total_sq
    groups = int((totals_by_group > 0).sum())
    if groups <= 1:
        return min(kish, 1.0)
    var = groups / (groups - 1) * float(((hits_by_group - p * totals_by_group) ** 2).sum()) / (total * total)
    if var <= 0 or p <= 0 or p >= 1:
        return min(kish, groups)
    return float(min(kish, max(min(groups, kish), p * (1 - p) / var)))


def _share(mask: np.ndarray, hit: np.ndarray, w: np.ndarray, confidence: float,
           groups: np.ndarray | None = None) -> dict:
    """The weighted share of ``hit`` among ``mask``, its Wilson interval and the labelled count."""
    wm = w[mask]
    total = float(wm.sum())
    if total <= 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    value = float(wm[hit[mask]].sum()) / total
    if groups is None:
        n_eff = total * total / float((wm * wm).sum())
    else:
        codes = groups[mask]
        size = int(codes.max()) + 1
        n_eff = effective_n(total, float((wm * wm).sum()), np.bincount(codes, wm * hit[mask], size),
                            np.bincount(codes, wm, size), value)
    low, high = wilson(value * n_eff, n_eff, confidence)
    return {"value": value, "low": low, "high": high, "n": int(mask.sum())}


def kappa(rule: np.ndarray, truth: np.ndarray, w: np.ndarray | None = None) -> float | None:
    """Cohen's kappa of two binary ratings (weighted); None when it is undefined (one rating constant)."""
    w = np.ones(len(rule)) if w is None else np.asarray(w, dtype=float)
    if not len(rule) or w.sum() <= 0:
        return None
    total = w.sum()
    observed = w[rule == truth].sum() / total
    a, b = w[rule].sum() / total, w[truth].sum() / total
    expected = a * b + (1 - a) * (1 - b)
    if expected >= 1:
        return None
    return float((observed - expected) / (1 - expected))


def group_codes(groups) -> np.ndarray | None:
    """Integer codes of group labels (e.g. caption ids), or None."""
    return None if groups is None else pd.factorize(np.asarray(groups))[0]


def evaluate(rule: np.ndarray, truth: np.ndarray, w: np.ndarray, confidence: float = 0.95, groups=None) -> dict:
    """Precision, recall (with intervals; clustered by ``groups`` when given), kappa and counts of one
    pass/fail rule against people's truth."""
    rule, truth, w = np.asarray(rule, bool), np.asarray(truth, bool), np.asarray(w, float)
    codes = group_codes(groups)
    precision = _share(rule, truth, w, confidence, codes)
    recall = _share(truth, rule, w, confidence, codes)
    return {"precision": precision["value"], "precision_low": precision["low"], "precision_high": precision["high"],
            "recall": recall["value"], "recall_low": recall["low"], "recall_high": recall["high"],
            "passing": int(rule.sum()), "good": int(truth.sum()), "labelled": len(rule),
            "pass_share": float(w[rule].sum() / w.sum()) if w.sum() > 0 else None, "kappa": kappa(rule, truth, w)}


def people_truth(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per labelled pair (``partition``, ``sample_key``, ``pair_sha256``): ``good`` (bool), the
    reviewers who decided it, its ``weight``; unsure-only pairs and ties are left out. ``labels``: each
    reviewer's newest label per pair (:func:`tasks.filter.labels.latest`)."""
    decided = labels[labels["label"].isin((POSITIVE, *NEGATIVE))]
    if not len(decided):
        return pd.DataFrame(columns=["partition", "sample_key", "pair_sha256", "good", "reviewers", "weight"])
    votes = decided.assign(vote=(decided["label"] == POSITIVE).astype(float))
    keys = ["partition", "sample_key", "pair_sha256"]
    grouped = votes.groupby(keys, sort=True).agg(share=("vote", "mean"), reviewers=("reviewer", "nunique"),
                                                  weight=("weight", "last")).reset_index()
    grouped = grouped[grouped["share"] != 0.5]
    return grouped.assign(good=grouped["share"] > 0.5).drop(columns="share").reset_index(drop=True)


def label_counts(labels: pd.DataFrame) -> dict[str, int]:
    return {name: int((labels["label"] == name).sum()) for name in LABELS}


def reviewer_agreement(labels: pd.DataFrame, min_shared: int = 5) -> list[dict]:
    """Cohen's kappa between each two reviewers on the pairs both decided (good vs wrong/broken)."""
    decided = labels[labels["label"].isin((POSITIVE, *NEGATIVE))]
    table = decided.assign(good=decided["label"] == POSITIVE).pivot_table(
        index=["partition", "sample_key"], columns="reviewer", values="good", aggfunc="last")
    out = []
    names = sorted(table.columns)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = table[[a, b]].dropna()
            if len(both) >= min_shared:
                x, y = both[a].astype(bool).to_numpy(), both[b].astype(bool).to_numpy()
                out.append({"reviewers": [a, b], "shared": len(both), "agree": float((x == y).mean()),
                            "kappa": kappa(x, y)})
    return out


def with_scores(samples: pd.DataFrame) -> pd.DataFrame:
    """``samples`` with ``clip_caption_min`` (the score the caption threshold compares)."""
    return samples.assign(clip_caption_min=np.fmin(samples["clip_sim_0"].to_numpy(float),
                                                    samples["clip_sim_1"].to_numpy(float)))


def clip_rules(samples: pd.DataFrame, selection) -> dict[str, np.ndarray]:
    """Each CLIP check alone and the three together, under ``selection``'s thresholds."""
    df = with_scores(samples)
    rules = {}
    for field in CLIP_FIELDS:
        score = df[CLIP_SCORES[field]].to_numpy(float)
        rules[RULE_NAMES[field]] = np.nan_to_num(score, nan=-np.inf) >= getattr(selection, field)
    rules["CLIP (all three)"] = passes(samples, selection, ("clip",)).to_numpy(bool)
    return rules


def rung_rules(samples: pd.DataFrame, selection, rungs: Sequence[str]) -> dict[str, np.ndarray]:
    """Each rung after CLIP alone (a pair it never scored fails it), and the whole ladder."""
    rules = {f"{rung} rung": passes(samples, selection, (rung,)).to_numpy(bool) for rung in rungs if rung != "clip"}
    rules["ladder (every rung on)"] = passes(samples, selection, rungs).to_numpy(bool)
    return rules


def roc(score: np.ndarray, truth: np.ndarray, w: np.ndarray, confidence: float = 0.95) -> dict:
    """The weighted ROC of ``score`` (higher: more likely good): false and true positive rates at every
    distinct score taken as a threshold (>=), and the area under the curve with Hanley and McNeil's
    interval (None without both classes)."""
    score, truth, w = np.asarray(score, float), np.asarray(truth, bool), np.asarray(w, float)
    keep = ~np.isnan(score)
    score, truth, w = score[keep], truth[keep], w[keep]
    pos, neg = w[truth].sum(), w[~truth].sum()
    if pos <= 0 or neg <= 0:
        return {"thresholds": [], "fpr": [], "tpr": [], "auc": None, "auc_low": None, "auc_high": None}
    order = np.argsort(-score, kind="stable")
    s, t, ww = score[order], truth[order], w[order]
    tp, fp = np.cumsum(ww * t), np.cumsum(ww * ~t)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each distinct score
    tpr, fpr = np.r_[0.0, tp[last] / pos], np.r_[0.0, fp[last] / neg]
    auc = float(np.trapezoid(tpr, fpr))
    n_pos, n_neg = pos * pos / float((w[truth] ** 2).sum()), neg * neg / float((w[~truth] ** 2).sum())
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)  # Hanley & McNeil (1982), on Kish's sizes
    se = math.sqrt(max(0.0, auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc))
                   / (n_pos * n_neg))
    z = z_of(confidence)
    return {"thresholds": s[last].tolist(), "fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc,
            "auc_low": max(0.0, auc - z * se), "auc_high": min(1.0, auc + z * se)}


def rate_at(curve: dict, threshold: float) -> tuple[float, float] | None:
    """(fpr, tpr) of a ROC curve at ``threshold`` (pairs scoring >= it pass)."""
    if not curve["thresholds"]:
        return None
    above = [i for i, t in enumerate(curve["thresholds"]) if t >= threshold]
    i = above[-1] + 1 if above else 0
    return curve["fpr"][i], curve["tpr"][i]


def candidates(values: np.ndarray, extra: Sequence[float], points: int) -> np.ndarray:
    """Threshold candidates: ``points`` quantiles of the observed ``values`` and ``extra``, rounded to 0.001."""
    values = values[~np.isnan(values)]
    grid = np.quantile(values, np.linspace(0, 1, points)) if len(values) else np.zeros(0)
    return np.unique(np.round(np.r_[grid, list(extra), -1.0], 3))


def search(samples: pd.DataFrame, truth: np.ndarray, w: np.ndarray, selection, rungs: Sequence[str], target: float,
           confidence: float = 0.95, min_passing: int = 10, points: int = 25,
           extra: dict[str, Sequence[float]] | None = None, groups=None, chunk: int = 64) -> dict:
    """The CLIP thresholds (image-image, caption, direction) with the highest weighted recall among those
    whose precision's lower Wilson bound (clustered by ``groups``) reaches ``target`` and that pass at least
    ``min_passing`` labelled pairs, the other rungs of ``rungs`` as ``selection`` sets them; ties: the higher
    precision, then the looser thresholds. Every combination of ``points`` quantiles per score is tried,
    ``chunk`` groups at a time (memory: grid^3 x chunk). Returns ``found`` (or None), the grid's size and
    the best lower bound on it."""
    df = with_scores(samples)
    truth, w = np.asarray(truth, bool), np.asarray(w, float)
    grids = {f: candidates(df[CLIP_SCORES[f]].to_numpy(float), (getattr(selection, f), *(extra or {}).get(f, ())),
                           points) for f in CLIP_FIELDS}
    others = [r for r in rungs if r != "clip"]
    base = passes(samples, selection, others).to_numpy(bool) if others else np.ones(len(df), bool)
    masks = [(np.nan_to_num(df[CLIP_SCORES[f]].to_numpy(float), nan=-np.inf)[None, :] >= grids[f][:, None])
             .astype(np.float64) for f in CLIP_FIELDS]
    codes = group_codes(groups) if groups is not None else np.arange(len(df))
    wb = w * base
    shape = tuple(len(grids[f]) for f in CLIP_FIELDS)
    sums = {k: np.zeros(shape) for k in ("n", "w", "w2", "g", "nn", "gn", "gg", "groups")}
    order = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1, len(order)]
    for first in range(0, len(starts) - 1, chunk):
        last = min(first + chunk, len(starts) - 1)
        rows = order[starts[first]: starts[last]]
        local = np.searchsorted(starts[first: last + 1], np.arange(starts[first], starts[last]), side="right") - 1
        member = np.zeros((len(rows), last - first))
        member[np.arange(len(rows)), local] = 1.0
        part = [m[:, rows] for m in masks]
        n_g, g_g, count, w2 = (np.einsum("ai,bi,ci,ik->abck", *part, member * weights[rows, None], optimize=True)
                               for weights in (wb, wb * truth, base.astype(float), wb * w))
        sums["n"] += count.sum(-1)
        sums["w"] += n_g.sum(-1)
        sums["w2"] += w2.sum(-1)
        sums["g"] += g_g.sum(-1)
        sums["nn"] += (n_g * n_g).sum(-1)
        sums["gn"] += (g_g * n_g).sum(-1)
        sums["gg"] += (g_g * g_g).sum(-1)
        sums["groups"] += (n_g > 0).sum(-1)
    good_all = float((w * truth).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        total, k = sums["w"], sums["groups"]
        precision = np.where(total > 0, sums["g"] / total, np.nan)
        p = np.nan_to_num(precision)
        kish = np.where(sums["w2"] > 0, total ** 2 / sums["w2"], 0.0)
        var = k / np.maximum(k - 1, 1) * (sums["gg"] - 2 * p * sums["gn"] + p * p * sums["nn"]) / total ** 2
        clustered = np.where((var > 0) & (p > 0) & (p < 1), p * (1 - p) / var, np.minimum(kish, k))
        n_eff = np.minimum(kish, np.maximum(np.minimum(k, kish), clustered))
        recall = sums["g"] / good_all if good_all > 0 else np.zeros(shape)
        z = z_of(confidence)
        n = np.maximum(n_eff, 1e-12)
        low = (p + z * z / (2 * n) - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    enough = sums["n"] >= min_passing
    ok = enough & (low >= target) & (total > 0)
    result = {"grid": {f: grids[f].tolist() for f in CLIP_FIELDS}, "combinations": int(precision.size),
              "best_precision_low": float(np.nanmax(np.where(enough, low, np.nan))) if enough.any() else None,
              "found": None}
    if not ok.any():
        return result
    # rank: recall, then precision, then the loosest thresholds (smallest sum of grid indices)
    idx = np.indices(shape)
    rank = np.lexsort(((idx[0] + idx[1] + idx[2])[ok], -p[ok], -recall[ok]))
    best = tuple(axis[ok][rank[0]] for axis in idx)
    chosen = {f: float(grids[f][best[i]]) for i, f in enumerate(CLIP_FIELDS)}
    result["found"] = {"thresholds": chosen, "precision": float(precision[best]), "precision_low": float(low[best]),
                       "recall": float(recall[best]), "passing": int(sums["n"][best])}
    return result


def metric_columns(rungs: Sequence[str]) -> list[str]:
    """The score columns whose ROC is drawn: the three CLIP scores, and DINOv2 / VLM when on."""
    cols = ["clip_sim_dir", "clip_sim_image", "clip_caption_min"]
    if "dino" in rungs:
        cols.append("dino_similarity")
    if "vlm" in rungs:
        cols.append("vlm_score")
    return cols


def metric_threshold(selection, column: str) -> float | None:
    """The threshold ``selection`` sets on a score column (None: no single one, e.g. SSIM's band)."""
    if column == "clip_caption_min":
        return selection.clip_caption_threshold
    if column in THRESHOLD_FIELD:
        return getattr(selection, THRESHOLD_FIELD[column])
    return {"dino_similarity": getattr(selection, "dino_threshold", None),
            "vlm_score": getattr(selection, "vlm_threshold", None)}.get(column)

