"""Measured CLIP-filter pass rates on the synthetic world, by edit kind (triplet difficulty).

    python bench/world_pass_rates.py                      # render 8 world triplets of each kind x 8 samples
    python bench/world_pass_rates.py --from-run           # summarise the `world` run's render partitions
    python bench/world_pass_rates.py --per-kind 4 --samples 4 --set render.steps=10   # a quicker look
    python bench/world_pass_rates.py --branches 1 --world-seed 7 --early-at 0.5   # held-out seed; early margin
    python bench/world_pass_rates.py --per-kind 8 --samples 4 --world-seed 7 --p-sweep 0.1,0.3,0.5,0.7,0.9

Rendering goes through the render stage's own engine (`tasks.world_eval.evaluate.render_triplets`: `Renderer`,
Prompt-to-Prompt sharing, the stage's seeds and CLIP scoring) with the preset's `render.*` settings, on
triplets drawn by the world generator (`tasks.world.edits`), balanced over the five edit kinds. For each
triplet the same seeds are also rendered with `render.attention=none` (two independent generations from
the same noise), so what shared attention buys is measured too (`sharing` in the JSON: CLIP image-image
similarity, SSIM and pixel RMSE of each pair in both arms, a paired sign test per metric, all of it by
quarter of p with the filter's pass rate in both arms, and kept pairs per 1,000 UNet calls). The
world's own drawn pairs are scored as well: the ground truth, what a perfect renderer would get.

Writes `bench/results/world_pass_rates.json` (tables by kind, quantiles of every metric for ip2p, none
and the ground truth) and `bench/results/world_samples.parquet` (one row per sample, samples.parquet's
columns plus `kind`, `attention` and `arm`): `bench/render_throughput.py --measured-pass-rates` reads that
file or a real run's `samples.parquet`.

p-branching (`--branches K`, 4 by default; 1 skips it): the same triplets are rendered a third time as
`--branch-seeds` seeds (default: as many as the independent arm has samples) of K branches each
(`render.p_branches`), rows with `arm=branches_K`. The JSON's `p_branching` compares the arms: kept pairs (top_k, at most one per seed as
the stage keeps them, and without that limit), kept pairs per 1,000 UNet calls, triplets with a kept
pair, diversity (distinct seeds per kept pair; the mean pairwise 1 - cosine of a triplet's kept after
images under the world CLIP), the correlation of two branches' pass outcomes within a seed against two
samples of different seeds, and the pass rate against p. `render_throughput.py --measured-pass-rates`
replays the measured seed trees for the branching policies.

`--p-sweep P,P,...` (the paired p-curve; renders nothing else): every sample (triplet, seed, CFG scale) is
rendered from the same noise at each listed p with sharing (`render.p_range` pinned to (p, p)) and once
with `attention=none`. Per arm: the mean CLIP metrics, SSIM and pixel RMSE against the input image, each
filter check's pass rate and the filter's, kept pairs per 1,000 UNet calls; per p the paired differences
against `none` and against the previous p (sign tests; McNemar's exact test for the checks), each sample's
slope over p, and all of it by edit kind (`p_sweep` in the JSON, rows in `world_p_sweep_samples.parquet`).

`--early-at F` also scores the ip2p arm's x0 prediction after F of the steps (the render stage's dry run)
and calibrates `render.early_reject.margin` on it as `editforge calibrate-early` does: the
`early_rejection` entry and `world_calibrate_early.json` beside `--out` (`render_throughput.py
--er-calibration` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDITFORGE_CACHE", str(ROOT / ".cache" / "editforge"))

import numpy as np
import pandas as pd

from tasks.common.config import load_config
from tasks.common.selection import thresholds
from tasks.world_eval.evaluate import (
    balanced_triplets,
    by_kind,
    equal_error_threshold,
    ground_truth_metrics,
    negative_metrics,
    quantiles,
    render_triplets,
    sign_test,
    with_kinds,
)

EVAL_SEED = 3  # world seed of the evaluation triplets (the models train on seed 0)


def _table(df: pd.DataFrame) -> list[dict]:
    return [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        for row in df.to_dict("records")
    ]


def from_run(cfg) -> pd.DataFrame:
    from tasks.common import storage
    from tasks.common.contract import finished
    from tasks.common.layout import SAMPLES_FILE, partition_dir, partition_file
    from tasks.registry import partition_ids, stage_hash

    h = stage_hash(cfg, "render")
    frames = [
        storage.read_parquet(partition_file(cfg.output_root, "render", h, i, SAMPLES_FILE))
        for i in partition_ids(cfg, "render")
        if finished(partition_dir(cfg.output_root, "render", h, i), h)
    ]
    if not frames:
        raise SystemExit(
            f"no finished render partition under {cfg.output_root} (render hash {h}); "
            f"run `editforge run --preset {cfg.name}` first"
        )
    return pd.concat(frames, ignore_index=True)


def _kept_diversity(df: pd.DataFrame, embeddings, selection, per_seed: int | None) -> dict:
    """Kept pairs under ``selection`` (top_k per triplet, at most ``per_seed`` per seed), and how diverse they
    are: distinct seeds per kept pair, and the mean pairwise 1 - cosine of the kept after images' CLIP
    embeddings within a triplet (triplets with two or more kept)."""
    import torch

    from tasks.common.selection import per_seed_eligible, select_top_k

    kept = select_top_k(df, selection, per_seed_eligible(df, selection, per_seed)).to_numpy(dtype=bool)
    spreads = []
    for _cid, rows in df[kept].groupby("caption_id"):
        if len(rows) > 1:
            e = torch.nn.functional.normalize(
                embeddings[torch.from_numpy(rows.index.to_numpy(copy=True))], dim=-1
            )
            sims = e @ e.T
            n = len(rows)
            spreads.append(float((1 - sims)[~torch.eye(n, dtype=torch.bool)].mean()))
    calls = int(df["unet_steps"].sum())
    n_kept = int(kept.sum())
    return {
        "samples": len(df),
        "unet_calls": calls,
        "unet_images": int(df["unet_images"].sum()),
        "kept": n_kept,
        "kept_per_1000_unet_calls": round(1000 * n_kept / calls, 3) if calls else None,
        "kept_per_1000_unet_image_calls": round(4000 * n_kept / int(df["unet_images"].sum()), 3)
        if calls
        else None,
        "triplets_with_kept": int(df[kept]["caption_id"].nunique()),
        "triplets": int(df["caption_id"].nunique()),
        "distinct_seeds_per_kept_pair": round(df[kept].groupby(["caption_id", "seed"]).ngroups / n_kept, 4)
        if n_kept
        else None,
        "kept_after_image_spread": round(float(np.mean(spreads)), 4) if spreads else None,
        "triplets_with_2_kept": len(spreads),
    }


def _seed_correlation(df: pd.DataFrame, passed: np.ndarray) -> dict:
    """Correlation (phi) of the pass outcomes of two samples of one triplet: branches of one seed vs samples of
    different seeds — the seed's own share of a branch's chance to pass, which p-branching's cost depends on."""
    same, other = [], []
    df = df.assign(_passed=passed.astype(float))
    for _cid, rows in df.groupby("caption_id"):
        values, seeds = rows["_passed"].to_numpy(), rows["seed"].to_numpy()
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                (same if seeds[a] == seeds[b] else other).append((values[a], values[b]))

    def phi(pairs):
        if not pairs:
            return None
        x = np.array(pairs)
        x = np.concatenate([x, x[:, ::-1]])  # symmetric: both orders
        if x[:, 0].std() == 0:
            return None
        return round(float(np.corrcoef(x[:, 0], x[:, 1])[0, 1]), 4)

    return {
        "same_seed_branches": phi(same),
        "different_seeds_same_triplet": phi(other),
        "pairs_same_seed": len(same),
        "pairs_different_seeds": len(other),
    }


def _pass_rate_by_p(df: pd.DataFrame, passed: np.ndarray, bins: int = 4) -> list[dict]:
    lo, hi = float(df["p2p_p"].min()), float(df["p2p_p"].max())
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, df["p2p_p"].to_numpy(), side="right") - 1, 0, bins - 1)
    return [
        {
            "p_from": round(float(edges[i]), 3),
            "p_to": round(float(edges[i + 1]), 3),
            "samples": int((which == i).sum()),
            "pass_rate": round(float(passed[which == i].mean()), 4) if (which == i).any() else None,
        }
        for i in range(bins)
    ]


def branching_arm(
    cfg, renderer, triplets, seeds: int, branches: int, independent: pd.DataFrame, independent_images: list
) -> tuple[pd.DataFrame, dict]:
    """The same triplets rendered with p-branching (``seeds`` seeds x ``branches``) against the independent arm
    (one sample per seed): kept pairs per 1,000 UNet calls, triplets with a pair, diversity."""
    import torch

    from tasks.common.selection import passes

    images: list = []
    branched = render_triplets(
        cfg, triplets, seeds * branches, branches=branches, renderer=renderer, images=images
    )
    selection = cfg.render.keep
    with torch.inference_mode():
        emb_b = renderer.scorer.embed_images(torch.stack([a for _, a in images]))
        emb_i = renderer.scorer.embed_images(torch.stack([a for _, a in independent_images]))
    passed_b = passes(branched, selection).to_numpy(dtype=bool)
    passed_i = passes(independent, selection).to_numpy(dtype=bool)
    n_independent = int(independent.groupby("caption_id").size().iloc[0])
    # the same number of samples as the independent arm: each triplet's first n_independent / K seeds
    first = branched[branched.groupby("caption_id").cumcount() < n_independent]
    arms = {
        "independent": _kept_diversity(independent, emb_i, selection, None),
        f"branches_{branches}_keep_per_seed_1_same_samples": _kept_diversity(first, emb_b, selection, 1),
        f"branches_{branches}_keep_per_seed_1": _kept_diversity(branched, emb_b, selection, 1),
        f"branches_{branches}_keep_all": _kept_diversity(branched, emb_b, selection, None),
    }
    base = arms["independent"]
    for arm in arms.values():
        if base["kept_per_1000_unet_calls"]:
            arm["kept_per_1000_unet_calls_vs_independent"] = round(
                arm["kept_per_1000_unet_calls"] / base["kept_per_1000_unet_calls"], 4
            )
    summary = {
        "branches": branches,
        "seeds_per_triplet": seeds,
        "samples_per_triplet": seeds * branches,
        "independent_samples_per_triplet": n_independent,
        "note": "kept pairs are capped at render.keep.top_k per triplet, so kept per 1,000 UNet calls compares "
        "arms only at the same samples per triplet (independent vs *_same_samples); the full arm's "
        "seeds are what render_throughput.py --measured-pass-rates replays for the branching policies",
        "pass_rate": {
            "independent": round(float(passed_i.mean()), 4),
            "branched": round(float(passed_b.mean()), 4),
        },
        "pass_outcome_correlation": _seed_correlation(branched, passed_b),
        "pass_rate_by_p": {
            "independent": _pass_rate_by_p(independent, passed_i),
            "branched": _pass_rate_by_p(branched, passed_b),
        },
        "arms": arms,
    }
    return branched, summary


def early_calibration(cfg, samples: pd.DataFrame, at: float, out: Path) -> dict:
    """The early-rejection margin calibrated on the ip2p arm's dry-run early metrics, as `editforge
    calibrate-early` does on a run (its table and recommendation, the render stage's drop rule), written
    as world_calibrate_early.json beside ``out``."""
    from tasks.render.calibrate import DEFAULT_MARGINS, calibration_table, recommend
    from tasks.render.early import early_step_count

    used = tuple(cfg.render.early_reject.metrics)
    after, steps = early_step_count(at, cfg.render.steps), cfg.render.steps
    margins = sorted({*DEFAULT_MARGINS, *(round(0.05 * i, 6) for i in range(13))})
    table = calibration_table(samples, cfg.render.keep, used, margins, after, steps)
    best = recommend(table, 0.05)
    report = {
        "config": cfg.name,
        "source": "bench/world_pass_rates.py --early-at (world triplets, ip2p arm)",
        "early_reject_at": at,
        "after_steps": after,
        "steps": steps,
        "metrics": list(used),
        "max_false_drop": 0.05,
        "recommended_margin": best,
        "table": [
            {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
            for row in table.to_dict(orient="records")
        ],
    }
    path = out.with_name("world_calibrate_early.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    if best is not None:
        row = table[table["margin"] == best].iloc[0]
        print(
            f"early rejection at {at:g} of {steps} steps: margin {best:g} catches {row['recall']:.1%} of the "
            f"failing samples, loses {row['false_drop']:.1%} of the passing ones, UNet calls per passing pair "
            f"x{row['cost_per_pass']:.3f} -> {path}"
        )
    else:
        print(f"early rejection at {at:g}: no margin loses at most 5% of the passing samples -> {path}")
    return report


def sharing_arms(
    cfg, renderer, shared: pd.DataFrame, shared_images: list, none: pd.DataFrame, none_images: list
) -> dict:
    """What sharing buys, from the ip2p and none arms (same seeds): how much closer the pair is (CLIP
    image-image, SSIM, pixel RMSE) with a sign test each, overall and by quarter of p; the filter's pass
    rate by quarter of p in both arms; kept pairs per 1,000 UNet calls of both arms (top_k per triplet)."""
    import torch

    from tasks.world_eval.evaluate import sharing_summary, sharing_table, sign_test

    pairs = sharing_table(renderer, shared, shared_images, none, none_images)
    summary = sharing_summary(pairs, tuple(cfg.render.p_range))
    with torch.inference_mode():
        emb = {
            arm: renderer.scorer.embed_images(torch.stack([a for _, a in images]))
            for arm, images in (("ip2p", shared_images), ("none", none_images))
        }
    summary["kept"] = {
        "ip2p": _kept_diversity(shared, emb["ip2p"], cfg.render.keep, None),
        "none": _kept_diversity(none, emb["none"], cfg.render.keep, None),
    }
    shared_only = int((pairs["passed_shared"] & ~pairs["passed_none"]).sum())
    none_only = int((pairs["passed_none"] & ~pairs["passed_shared"]).sum())
    summary["pass_rate"] = {
        "ip2p": round(float(pairs["passed_shared"].mean()), 4),
        "none": round(float(pairs["passed_none"].mean()), 4),
        "ip2p_only": shared_only,
        "none_only": none_only,
        "sign_test_p": sign_test(np.array([1.0] * shared_only + [-1.0] * none_only)),
    }
    m = summary["metrics"]
    print(
        f"sharing vs none, {len(pairs)} pairs from the same noise: "
        + "; ".join(
            f"{k} {v['none']:.3f} -> {v['shared']:.3f} ({v['share_closer']:.0%} closer, sign test p={v['sign_test_p']:.2g})"
            for k, v in m.items()
        )
    )
    print(
        "  by quarter of p: "
        + "; ".join(
            f"[{q['p_from']:.1f},{q['p_to']:.1f}) clip gain {q['clip_sim_image_mean_gain']:+.3f}, pass "
            f"{q['pass_rate_none']:.0%} -> {q['pass_rate_shared']:.0%}"
            for q in summary["by_p_quarter"]
            if q["pairs"]
        )
    )
    r = summary["pass_rate"]
    print(
        f"  filter pass rate none {r['none']:.1%} -> ip2p {r['ip2p']:.1%} (passes only with sharing "
        f"{r['ip2p_only']}, only without {r['none_only']}, sign test p={r['sign_test_p']:.2g})"
    )
    k = summary["kept"]
    print(
        f"  kept per 1000 UNet calls: none {k['none']['kept_per_1000_unet_calls']}, ip2p {k['ip2p']['kept_per_1000_unet_calls']}; "
        f"triplets with a kept pair: none {k['none']['triplets_with_kept']}, ip2p {k['ip2p']['triplets_with_kept']}"
    )
    return summary


# --------------------------------------------------------------------------- the paired p-sweep

SWEEP_METRICS = ("clip_sim_image", "clip_sim_dir", "clip_sim_0", "clip_sim_1", "ssim", "rmse")
SWEEP_CHECKS = ("image", "caption_0", "caption_1", "direction", "filter")


def _grid(text: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:STOP:STEP, e.g. 0.5:0.86:0.025") from None
    if step <= 0 or stop <= start:
        raise argparse.ArgumentTypeError(f"{text!r}: STOP must exceed START and STEP be positive")
    return start, stop, step


def parse_ps(text: str) -> list[float]:
    """``0.1,0.3,0.5`` -> [0.1, 0.3, 0.5]: distinct values in [0, 1], increasing."""
    try:
        ps = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ps = []
    if not ps or any(not 0 <= p <= 1 for p in ps) or sorted(set(ps)) != ps:
        raise ValueError(f"--p-sweep {text!r}: give distinct increasing p values in [0, 1], e.g. 0.1,0.5,0.9")
    return ps


def render_p_sweep(cfg, renderer, triplets, samples: int, ps: list[float]) -> pd.DataFrame:
    """Every sample (triplet, seed, CFG scale) rendered with the same noise once per p in ``ps`` with the
    config's attention sharing (``render.p_range`` pinned to (p, p): the seed's noise and CFG draw do not
    change) and once with ``attention=none``. One row per sample and arm (``arm``: ``none`` or ``p=<p>``):
    the render rows plus SSIM and pixel RMSE of the after image against the before image and each filter
    check's outcome (``check_*``). Raises if two arms did not start from the same noise."""
    from tasks.world_eval.evaluate import pair_closeness

    if cfg.render.attention == "none":
        raise ValueError("--p-sweep needs render.attention to share (ip2p), not none")
    limits = thresholds(cfg.render.keep)
    frames, first_before = [], None
    for p in [None, *ps]:
        images: list = []
        if p is None:
            rows = render_triplets(cfg, triplets, samples, attention="none", renderer=renderer, images=images)
        else:
            pinned = cfg.model_copy(update={"render": cfg.render.model_copy(update={"p_range": (p, p)})})
            rows = render_triplets(pinned, triplets, samples, renderer=renderer, images=images)
        before, after = _stack_pairs(images)
        close = pair_closeness(renderer, before, after)
        if first_before is None:
            first_before, reference = before, rows
        elif (
            list(rows["seed"]) != list(reference["seed"])
            or not np.allclose(rows["cfg_scale"], reference["cfg_scale"])
            or (before - first_before).abs().max() > 1e-3
        ):
            raise AssertionError(
                f"arm p={p} did not start from the none arm's noise (its before images differ)"
            )
        rows = rows.assign(
            arm="none" if p is None else f"p={p:g}",
            p=np.nan if p is None else p,
            attention="none" if p is None else cfg.render.attention,
            ssim=close["ssim"],
            rmse=close["rmse"],
            check_image=rows["clip_sim_image"] >= limits["clip_sim_image"],
            check_caption_0=rows["clip_sim_0"] >= limits["clip_sim_0"],
            check_caption_1=rows["clip_sim_1"] >= limits["clip_sim_1"],
            check_direction=rows["clip_sim_dir"] >= limits["clip_sim_dir"],
            check_filter=rows["passed"].astype(bool),
        )
        frames.append(rows)
        print(
            f"  p-sweep arm {rows['arm'].iloc[0]}: {len(rows)} samples, pass rate {rows['passed'].mean():.1%}"
        )
    return pd.concat(frames, ignore_index=True)


def _stack_pairs(images: list):
    import torch

    return torch.stack([b for b, _ in images]), torch.stack([a for _, a in images])


def _arm_stats(rows: pd.DataFrame, selection) -> dict:
    from tasks.common.selection import select_top_k

    kept = select_top_k(rows.reset_index(drop=True), selection).to_numpy(dtype=bool)
    calls = int(rows["unet_steps"].sum())
    return {
        "samples": len(rows),
        **{f"mean_{m}": round(float(rows[m].mean()), 4) for m in SWEEP_METRICS},
        **{f"pass_{c}": round(float(rows[f"check_{c}"].mean()), 4) for c in SWEEP_CHECKS},
        "kept": int(kept.sum()),
        "unet_calls": calls,
        "kept_per_1000_unet_calls": round(1000 * float(kept.sum()) / calls, 3) if calls else None,
        "triplets_with_kept": int(rows[kept]["caption_id"].nunique()),
        "triplets": int(rows["caption_id"].nunique()),
    }


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """``a`` against ``b``, the same samples in the same order: per metric the mean difference a - b, the
    share of samples where a is higher and a sign test; per check the pass-rate difference, the samples
    passing in one arm only and a sign test over them (McNemar's exact test)."""
    out: dict = {}
    for m in SWEEP_METRICS:
        d = a[m].to_numpy(dtype=float) - b[m].to_numpy(dtype=float)
        d = d[np.isfinite(d)]
        out[m] = {
            "mean_diff": round(float(d.mean()), 4),
            "share_higher": round(float((d > 0).mean()), 4),
            "sign_test_p": sign_test(d),
        }
    for c in SWEEP_CHECKS:
        x, y = a[f"check_{c}"].to_numpy(dtype=bool), b[f"check_{c}"].to_numpy(dtype=bool)
        only_a, only_b = int((x & ~y).sum()), int((y & ~x).sum())
        out[f"pass_{c}"] = {
            "diff": round(float(x.mean() - y.mean()), 4),
            "only_this": only_a,
            "only_other": only_b,
            "sign_test_p": sign_test(np.array([1.0] * only_a + [-1.0] * only_b)),
        }
    return out


def _trend(arms: list[pd.DataFrame], ps: list[float]) -> dict:
    """Per sample, the least-squares slope of each metric (and of each check's pass) over the swept p values;
    the mean slope (per unit of p), the share of samples whose slope is negative and a sign test."""
    x = np.asarray(ps, dtype=float) - np.mean(ps)
    out = {}
    for col in [*SWEEP_METRICS, *(f"check_{c}" for c in SWEEP_CHECKS)]:
        y = np.stack([a[col].to_numpy(dtype=float) for a in arms], axis=1)
        slope = (y - y.mean(axis=1, keepdims=True)) @ x / float(x @ x)
        slope = slope[np.isfinite(slope)]
        out[col.removeprefix("check_")] = {
            "mean_slope": round(float(slope.mean()), 4),
            "share_falling": round(float((slope < 0).mean()), 4),
            "share_rising": round(float((slope > 0).mean()), 4),
            "sign_test_p": sign_test(slope),
        }
    return out


def p_sweep_summary(rows: pd.DataFrame, selection) -> dict:
    """From :func:`render_p_sweep`'s rows: each arm's means, check pass rates and kept pairs; every p's paired
    differences against ``none`` and against the previous p; the within-sample trend over p; the same by
    edit kind."""

    def summary(df: pd.DataFrame) -> dict:
        df = df.sort_values(["arm", "caption_id", "seed"], kind="stable")
        none = df[df["arm"] == "none"].reset_index(drop=True)
        ps = sorted(df["p"].dropna().unique())
        arms = [df[df["p"] == p].reset_index(drop=True) for p in ps]
        for a in arms:
            assert list(a["caption_id"]) == list(none["caption_id"]) and list(a["seed"]) == list(none["seed"])
        out = {
            "arms": [{"arm": "none", "p": None, **_arm_stats(none, selection)}]
            + [{"arm": f"p={p:g}", "p": float(p), **_arm_stats(a, selection)} for p, a in zip(ps, arms)],
            "vs_none": [{"p": float(p), **_paired(a, none)} for p, a in zip(ps, arms)],
            "vs_previous_p": [
                {"p": float(ps[i]), "previous_p": float(ps[i - 1]), **_paired(arms[i], arms[i - 1])}
                for i in range(1, len(ps))
            ],
        }
        if len(ps) > 1:
            out["trend"] = _trend(arms, ps)
        return out

    result = {
        "ps": sorted(float(p) for p in rows["p"].dropna().unique()),
        "samples_per_arm": int((rows["arm"] == "none").sum()),
        "triplets": int(rows["caption_id"].nunique()),
        **summary(rows),
        "by_kind": {kind: summary(group) for kind, group in with_kinds(rows).groupby("kind", sort=False)},
    }
    return result


def print_p_sweep(sweep: dict) -> None:
    cols = ["arm", "pass_filter", "pass_image", "pass_caption_0", "pass_caption_1", "pass_direction"]
    cols += [f"mean_{m}" for m in SWEEP_METRICS] + ["kept_per_1000_unet_calls"]
    table = pd.DataFrame(sweep["arms"])[cols]
    table.columns = [c.removeprefix("mean_").removeprefix("pass_") for c in cols[:1]] + [
        c.replace("pass_", "ok_").removeprefix("mean_") for c in cols[1:]
    ]
    print(f"p-sweep, {sweep['samples_per_arm']} samples per arm ({sweep['triplets']} triplets), same noise:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for name in ("vs_none", "vs_previous_p"):
        for e in sweep[name]:
            ref = "none" if name == "vs_none" else f"p={e['previous_p']:g}"
            print(
                f"  p={e['p']:g} vs {ref}: "
                + ", ".join(
                    f"{m} {e[m]['mean_diff']:+.3f} (sign p={e[m]['sign_test_p']:.2g})"
                    for m in ("clip_sim_dir", "clip_sim_image", "ssim")
                )
                + f", pass {e['pass_filter']['diff']:+.1%} ({e['pass_filter']['only_this']}/"
                f"{e['pass_filter']['only_other']}, p={e['pass_filter']['sign_test_p']:.2g})"
            )
    print("  by kind, clip_sim_dir / direction check / filter pass per arm (none, then each p):")
    for kind, k in sweep["by_kind"].items():
        print(
            f"    {kind:<11} "
            + "  ".join(
                f"{a['mean_clip_sim_dir']:.3f}/{a['pass_direction']:.0%}/{a['pass_filter']:.0%}"
                for a in k["arms"]
            )
        )


def fall_over_thresholds(rows: pd.DataFrame, selection, image: np.ndarray, direction: np.ndarray) -> dict:
    """Whether any thresholds make the p-curve fall (the paper's "no edit" at large p): for every (image-image,
    direction) pair on the grid, the caption check at the preset's threshold, the filter's pass rate at each
    swept p; the p where it peaks and how far it falls from there to the largest p, with a McNemar sign test
    between those two arms (the same samples). Reports the grid point with the largest fall, overall and by
    edit kind."""
    limits = thresholds(selection)

    def grid(df: pd.DataFrame) -> dict:
        arms = [
            g.sort_values(["caption_id", "seed"], kind="stable")
            for _, g in df.dropna(subset=["p"]).groupby("p")
        ]
        ps = [float(a["p"].iloc[0]) for a in arms]
        caption_ok = [
            ((a["clip_sim_0"] >= limits["clip_sim_0"]) & (a["clip_sim_1"] >= limits["clip_sim_1"])).to_numpy()
            for a in arms
        ]
        points = []
        for ti in image:
            for td in direction:
                passed = [
                    ok & (a["clip_sim_image"].to_numpy() >= ti) & (a["clip_sim_dir"].to_numpy() >= td)
                    for a, ok in zip(arms, caption_ok)
                ]
                rates = np.array([x.mean() for x in passed])
                peak = int(rates.argmax())
                x, y = passed[peak], passed[-1]
                only_peak, only_last = int((x & ~y).sum()), int((y & ~x).sum())
                points.append(
                    {
                        "clip_sim_image": round(float(ti), 4),
                        "clip_sim_dir": round(float(td), 4),
                        "pass_by_p": [round(float(r), 4) for r in rates],
                        "peak_p": ps[peak],
                        "fall": round(float(rates[peak] - rates[-1]), 4),
                        "only_at_peak": only_peak,
                        "only_at_largest_p": only_last,
                        "sign_test_p": sign_test(np.array([1.0] * only_peak + [-1.0] * only_last)),
                    }
                )
        return {
            "ps": ps,
            "grid_points": len(points),
            "falling_share": round(float(np.mean([q["fall"] > 0 for q in points])), 4),
            "falls_below_p_0_05": sum(q["fall"] > 0 and q["sign_test_p"] < 0.05 for q in points),
            "largest_fall": max(points, key=lambda q: (q["fall"], -q["sign_test_p"])),
        }

    return {
        "caption_threshold": limits["clip_sim_0"],
        **grid(rows),
        "by_kind": {kind: grid(group) for kind, group in with_kinds(rows).groupby("kind", sort=False)},
    }


def print_table(title: str, table: pd.DataFrame) -> None:
    cols = [
        "kind",
        "triplets",
        "samples",
        "pass_rate",
        "triplets_with_a_pass",
        "pass_clip_sim_image",
        "pass_clip_sim_dir",
        "pass_clip_sim_0",
        "pass_clip_sim_1",
        "median_clip_sim_image",
        "median_clip_sim_dir",
    ]
    print(title)
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="world")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--per-kind", type=int, default=8, help="world triplets of each edit kind")
    parser.add_argument("--samples", type=int, default=8, help="samples per triplet (seeds)")
    parser.add_argument(
        "--world-seed",
        type=int,
        default=EVAL_SEED,
        help=f"world seed of the evaluation triplets (default {EVAL_SEED}; the models train on seed 0)",
    )
    parser.add_argument("--no-none", action="store_true", help="skip the render.attention=none comparison")
    parser.add_argument(
        "--branches",
        type=int,
        default=4,
        help="also render the triplets with p-branching, K branches per seed; 1: skip",
    )
    parser.add_argument(
        "--branch-seeds",
        type=int,
        default=0,
        help="seeds per triplet of the p-branching arm (default: --samples, as many seeds as the "
        "independent arm; its measured seeds are what render_throughput replays)",
    )
    parser.add_argument(
        "--early-at",
        type=float,
        default=None,
        help="also score the ip2p arm's x0 prediction after this fraction of the steps (the render stage's "
        "early-rejection dry run) and calibrate render.early_reject.margin on it: world_calibrate_early.json "
        "beside --out, in the shape of `editforge calibrate-early --json` (render_throughput --er-calibration)",
    )
    parser.add_argument(
        "--early-from",
        nargs="+",
        default=None,
        metavar="PARQUET",
        help="calibrate the early-rejection margin on the ip2p rows of earlier --early-at runs' "
        "world_samples.parquet files together, at the preset's thresholds; renders nothing",
    )
    parser.add_argument(
        "--from-run", action="store_true", help="summarise the preset's finished render partitions"
    )
    parser.add_argument(
        "--p-sweep-from",
        nargs="+",
        default=None,
        metavar="PARQUET",
        help="summarise earlier --p-sweep runs' world_p_sweep_samples.parquet files together (the same p "
        "values; checks as recorded at their thresholds); renders nothing",
    )
    parser.add_argument(
        "--p-sweep",
        default=None,
        metavar="P,P,...",
        help="the paired p-curve: render every sample (triplet, seed, CFG) with the same noise at each listed "
        "p with sharing, and once with attention=none; per p the metrics, each filter check's pass rate, kept "
        "pairs per 1,000 UNet calls, paired tests against none and the previous p, by edit kind "
        "(`p_sweep` in the JSON, rows in world_p_sweep_samples.parquet beside --out)",
    )
    parser.add_argument(
        "--threshold-grid",
        nargs=2,
        type=_grid,
        default=None,
        metavar="START:STOP:STEP",
        help="with --p-sweep or --p-sweep-from: the image-image and the direction thresholds to try (e.g. "
        "0.5:0.86:0.025 0.1:0.6:0.025); for each pair the pass rate over p and its fall from the peak to the "
        "largest p, with a paired test (`p_sweep.threshold_grid` in the JSON)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_pass_rates.json"))
    parser.add_argument(
        "--samples-out",
        default=None,
        help="the per-sample parquet (default: world_samples.parquet beside --out)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long size for the test suite (figures mean little)"
    )
    args = parser.parse_args(argv)
    try:
        ps = parse_ps(args.p_sweep) if args.p_sweep is not None else None
    except ValueError as err:
        parser.error(str(err))
    if args.threshold_grid and not (ps or args.p_sweep_from):
        parser.error("--threshold-grid reads a p-sweep: add --p-sweep P,P,... or --p-sweep-from PARQUET")
    if args.smoke and ps:
        args.per_kind, args.samples = 1, 2
        args.overrides = [*args.overrides, "render.steps=4"]
    elif args.smoke:
        args.per_kind, args.samples, args.branches = 1, 4, 2
        args.early_at = 0.5 if args.early_at is None else args.early_at
        args.overrides = [*args.overrides, "render.steps=4"]
    cfg = load_config(args.preset, args.overrides)
    if ps and cfg.render.attention == "none":
        parser.error("--p-sweep compares sharing with attention=none: set render.attention=ip2p")
    selection = cfg.render.keep
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {
        "command": " ".join(["world_pass_rates.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": cfg.name,
        "thresholds": selection.model_dump(),
        "render": {k: getattr(cfg.render, k) for k in ("steps", "height", "width", "scheduler", "attention")}
        | {"cfg_range": list(cfg.render.cfg_range), "p_range": list(cfg.render.p_range)},
    }
    if args.early_from:
        rows = pd.concat([pd.read_parquet(f) for f in args.early_from], ignore_index=True)
        rows = rows[(rows["attention"] != "none") & (rows["arm"] == "independent")]
        at = result["early_rejection_at"] = args.early_at if args.early_at is not None else 0.5
        result |= {"source": args.early_from, "early_rejection": early_calibration(cfg, rows, at, out)}
    elif ps or args.p_sweep_from:
        if args.p_sweep_from:
            rows = pd.concat([pd.read_parquet(f) for f in args.p_sweep_from], ignore_index=True)
            result |= {"source": args.p_sweep_from}
        else:
            from tasks.render.renderer import Renderer

            triplets = balanced_triplets(args.world_seed, args.per_kind)
            rows = render_p_sweep(cfg, Renderer(cfg), triplets, args.samples, ps)
            result |= {
                "source": "world triplets, paired p-sweep",
                "world_seed": args.world_seed,
                "per_kind": args.per_kind,
                "samples_per_triplet": args.samples,
            }
            samples_out = (
                Path(args.samples_out) if args.samples_out else out.with_name("world_p_sweep_samples.parquet")
            )
            rows.to_parquet(samples_out, index=False)
        sweep = result["p_sweep"] = p_sweep_summary(rows, selection)
        print_p_sweep(sweep)
        if args.threshold_grid:
            image, direction = (np.arange(*spec) for spec in args.threshold_grid)
            grid = sweep["threshold_grid"] = fall_over_thresholds(rows, selection, image, direction)
            b = grid["largest_fall"]
            print(
                f"threshold grid, {grid['grid_points']} (image-image, direction) pairs: the largest fall from the "
                f"peak to p={grid['ps'][-1]:g} is {b['fall']:.1%} at {b['clip_sim_image']:.3f} / "
                f"{b['clip_sim_dir']:.3f} (peak p={b['peak_p']:g}, {b['only_at_peak']} vs "
                f"{b['only_at_largest_p']} samples, sign test p={b['sign_test_p']:.2g}); "
                f"{grid['falls_below_p_0_05']} points fall at p < 0.05; by kind, points falling at p < 0.05 "
                "(largest fall): "
                + ", ".join(
                    f"{k} {g['falls_below_p_0_05']} ({g['largest_fall']['fall']:.1%})"
                    for k, g in grid["by_kind"].items()
                )
            )
        arms = sweep["arms"]
        print(
            "p-sweep pass rate: "
            + ", ".join(f"{a['arm']} {a['pass_filter']:.1%}" for a in arms)
            + "; clip_sim_dir: "
            + ", ".join(f"{a['arm']} {a['mean_clip_sim_dir']:.3f}" for a in arms)
        )
    elif args.from_run:
        samples = from_run(cfg)
        table = by_kind(samples, selection)
        print_table(f"{cfg.name} run, {len(samples)} samples (edit kind from the captions):", table)
        result |= {"source": "run", "by_kind": _table(table), "quantiles": quantiles(samples)}
    else:
        triplets = balanced_triplets(args.world_seed, args.per_kind)
        ip2p_images: list = []
        from tasks.render.renderer import Renderer

        renderer = Renderer(cfg)  # one model load for every arm
        samples = render_triplets(
            cfg, triplets, args.samples, renderer=renderer, images=ip2p_images, early_at=args.early_at
        ).assign(attention=cfg.render.attention, arm="independent")
        if args.early_at is not None:
            result["early_rejection"] = early_calibration(cfg, samples, args.early_at, out)
        table = by_kind(samples, selection)
        print_table(f"{cfg.render.attention}: {len(triplets)} world triplets x {args.samples} samples", table)
        result |= {
            "source": "world triplets",
            "world_seed": args.world_seed,
            "per_kind": args.per_kind,
            "samples_per_triplet": args.samples,
            "by_kind": _table(table),
            "quantiles": {"ip2p": quantiles(samples)},
        }
        frames = [samples]
        if not args.no_none and cfg.render.attention != "none":
            none_images: list = []
            none = render_triplets(
                cfg, triplets, args.samples, attention="none", renderer=renderer, images=none_images
            ).assign(attention="none", arm="independent")
            none_table = by_kind(none, selection)
            print_table("none (independent generations from the same noise):", none_table)
            result["by_kind_attention_none"] = _table(none_table)
            result["quantiles"]["none"] = quantiles(none)
            result["sharing"] = sharing_arms(cfg, renderer, samples, ip2p_images, none, none_images)
            result["ip2p_minus_none_clip_sim_image"] = result["sharing"]["metrics"]["clip_sim_image"]
            frames.append(none)
        if args.branches > 1:
            seeds = args.branch_seeds or args.samples
            branched, summary = branching_arm(
                cfg, renderer, triplets, seeds, args.branches, samples, ip2p_images
            )
            frames.append(branched.assign(attention=cfg.render.attention, arm=f"branches_{args.branches}"))
            result["p_branching"] = summary
            arms = summary["arms"]
            print(
                f"p-branching K={args.branches} ({seeds} seeds x {args.branches} vs {args.samples} "
                "seeds x 1 per triplet): "
                + "; ".join(
                    f"{name}: {a['kept']} kept, {a['kept_per_1000_unet_calls']} per 1000 UNet calls, "
                    f"{a['triplets_with_kept']}/{a['triplets']} triplets, spread {a['kept_after_image_spread']}"
                    for name, a in arms.items()
                )
                + f"; pass correlation same seed {summary['pass_outcome_correlation']['same_seed_branches']} vs "
                f"other seeds {summary['pass_outcome_correlation']['different_seeds_same_triplet']}"
            )
        truth = ground_truth_metrics(cfg, balanced_triplets(args.world_seed, max(args.per_kind, 32)))
        negative = negative_metrics(cfg, balanced_triplets(args.world_seed, max(args.per_kind, 32)))
        result["quantiles"]["ground_truth"] = quantiles(truth)
        result["quantiles"]["negatives"] = quantiles(negative)
        result["ground_truth_by_kind"] = {k: quantiles(g) for k, g in truth.groupby("kind")}
        result["equal_error_thresholds"] = {}
        for metric, against in (
            ("clip_sim_image", "clip_sim_image"),
            ("clip_sim_image_relayout", "clip_sim_image_relayout"),
            ("clip_sim_0", "clip_sim_0"),
            ("clip_sim_dir", "clip_sim_dir"),
        ):
            value, error = equal_error_threshold(
                truth[metric if metric in truth else "clip_sim_image"].to_numpy(),
                negative[against].to_numpy(),
            )
            result["equal_error_thresholds"][metric] = {
                "threshold": round(value, 4),
                "error": round(error, 4),
            }
        # the caption check on the renderer's own images (as the paper's 0.2 sits between SD images' cosine with
        # their own caption and with another one under ViT-L/14): rendered images vs the drawn negatives
        rendered = [samples["clip_sim_0"], samples["clip_sim_1"]]
        if "sharing" in result:
            rendered.append(none["clip_sim_1"])
        value, error = equal_error_threshold(
            pd.concat(rendered).dropna().to_numpy(),
            np.concatenate([negative["clip_sim_0"].to_numpy(), negative["clip_sim_1"].to_numpy()]),
        )
        result["equal_error_thresholds"]["clip_sim_0_rendered"] = {
            "threshold": round(value, 4),
            "error": round(error, 4),
        }
        print(
            "ground truth vs negatives, equal-error thresholds: "
            + ", ".join(
                f"{m} {v['threshold']:.3f} (error {v['error']:.1%})"
                for m, v in result["equal_error_thresholds"].items()
            )
        )
        samples_out = Path(args.samples_out) if args.samples_out else out.with_name("world_samples.parquet")
        pd.concat(frames, ignore_index=True).to_parquet(samples_out, index=False)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"world_pass_rates: {result['wall_s']} s -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
