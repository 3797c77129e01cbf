"""Render world triplets with the render stage's own engine and measure what the filter makes of them.

:func:`render_triplets` renders ``samples`` pairs per (input, output) caption pair through
:class:`tasks.render.renderer.Renderer` — the batching, attention sharing, seeds and CLIP scoring of the
render stage, with the config's ``render.*`` settings — and returns one row per sample in the columns of
``samples.parquet`` (``caption_id``, ``seed``, ``p2p_p``, ``cfg_scale``, the four CLIP metrics, ``passed``,
``input``, ``edit``, ``output``) plus ``kind``, the edit kind (:func:`tasks.world.grammar.edit_kind`).
:func:`by_kind` turns such rows — or a real run's ``samples.parquet`` — into pass rates per edit kind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from tasks.common.config import PipelineConfig, Selection
from tasks.common.selection import METRICS, passes, thresholds
from tasks.world.edits import EDIT_KINDS, WorldTriplet, sample_triplet
from tasks.world.grammar import edit_kind


def triplet_id(input_caption: str, output_caption: str) -> str:
    return hashlib.sha1(f"{input_caption}\n{output_caption}".encode()).hexdigest()[:16]


def balanced_triplets(seed: int, per_kind: int, start: int = 0) -> list[WorldTriplet]:
    """``per_kind`` world triplets of every edit kind (kind by kind), from world seed ``seed``."""
    return [sample_triplet(seed, start + i, kind) for kind in EDIT_KINDS for i in range(per_kind)]


def render_triplets(
    cfg: PipelineConfig,
    triplets: Sequence,
    samples: int,
    *,
    attention: str | None = None,
    batch: int | None = None,
    renderer=None,
    images: list | None = None,
    branches: int = 1,
    early_at: float | None = None,
) -> pd.DataFrame:
    """Render and score ``samples`` pairs of each triplet (objects with ``input``, ``edit``, ``output``);
    ``images``, a list, receives each sample's (before, after) tensors in row order. ``early_at``: also score
    the x0 prediction after that fraction of the steps as the render stage's early-rejection dry run does
    (``early_clip_sim_*`` columns, nothing dropped), to calibrate the margin on.

    ``branches`` K > 1: p-branching as the render stage does it (``render.p_branches``): ``samples / K``
    seeds, each rendered as one tree of K stratified p values (columns ``branch``; ``unet_steps`` and
    ``unet_images`` hold each sample's exact share of the compute, as in ``samples.parquet``)."""
    from tasks.render.early import early_step_count
    from tasks.render.pairs import PairRequest
    from tasks.render.renderer import Renderer, settings_from
    from tasks.render.seeds import sample_seeds

    renderer = renderer or Renderer(cfg)
    settings = settings_from(cfg)
    if attention is not None:
        settings = replace(settings, attention=attention)
    if branches < 1 or samples % branches:
        raise ValueError(f"{samples} samples per triplet do not split into seeds of {branches} branches")
    requests = []
    for t in triplets:
        cid = triplet_id(t.input, t.output)
        requests += [
            PairRequest(cid, t.input, t.output, s, b, branches)
            for s in sample_seeds(cid, samples // branches, cfg.render.base_seed)
            for b in range(branches)
        ]
    size = batch or (cfg.render.batch_samples if cfg.render.batch_samples != "auto" else 8)
    size = max(branches, size - size % branches)  # whole seeds per batch, as the stage's cohorts
    rows = []
    info = {triplet_id(t.input, t.output): t for t in triplets}
    early_after = early_step_count(early_at, settings.steps)
    for i in range(0, len(requests), size):
        chunk = requests[i : i + size]
        scored = renderer.render_scored(
            chunk, settings, cfg.render.keep, early_after=early_after, early_margin=0.0, early_drop=False
        )
        early = scored.pairs.early_metrics
        if images is not None:
            images += list(zip(scored.pairs.before, scored.pairs.after))
        for j, (r, p) in enumerate(zip(chunk, scored.pairs.params)):
            t = info[r.key]
            rows.append(
                {
                    "caption_id": r.key,
                    "seed": r.seed,
                    "branch": r.branch,
                    "p2p_p": p.p2p_p,
                    "cfg_scale": p.cfg_scale,
                    "unet_steps": scored.pairs.unet_steps[j],
                    "unet_images": scored.pairs.unet_images[j],
                    **{m: float(scored.metrics[m][j]) for m in METRICS},
                    "input": t.input,
                    "edit": t.edit,
                    "output": t.output,
                    "kind": getattr(t, "kind", None) or edit_kind(t.input, t.output),
                    **({f"early_{m}": float(early[m][j]) for m in METRICS} if early else {}),
                }
            )
    df = pd.DataFrame(rows)
    df["passed"] = passes(df, cfg.render.keep).to_numpy() if len(df) else []
    return df


def with_kinds(samples: pd.DataFrame) -> pd.DataFrame:
    """``samples`` with a ``kind`` column (from the captions when absent)."""
    if "kind" in samples:
        return samples
    kinds = {(a, b): edit_kind(a, b) for a, b in set(zip(samples["input"], samples["output"]))}
    return samples.assign(kind=[kinds[(a, b)] for a, b in zip(samples["input"], samples["output"])])


def by_kind(samples: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """Per edit kind (and ``all``): triplets, samples, pass rate of all four criteria and of each, the share of
    triplets with at least one passing sample, and the metrics' medians. Early-rejected rows (NaN metrics)
    count as drawn and not passed."""
    samples = with_kinds(samples)
    limits = thresholds(selection)
    passed = passes(samples, selection).to_numpy(dtype=bool)
    samples = samples.assign(_passed=passed)
    rows = []
    for kind, group in [*samples.groupby("kind", sort=True), ("all", samples)]:
        per_triplet = group.groupby("caption_id")["_passed"].mean()
        row = {
            "kind": kind,
            "triplets": int(group["caption_id"].nunique()),
            "samples": len(group),
            "pass_rate": float(group["_passed"].mean()),
            "triplets_with_a_pass": float((per_triplet > 0).mean()),
            "per_triplet_pass_rate_q25": float(per_triplet.quantile(0.25)),
            "per_triplet_pass_rate_q75": float(per_triplet.quantile(0.75)),
        }
        for m in METRICS:
            row[f"pass_{m}"] = float((group[m] >= limits[m]).mean())
            row[f"median_{m}"] = float(np.nanmedian(group[m])) if group[m].notna().any() else float("nan")
        rows.append(row)
    order = {k: i for i, k in enumerate((*EDIT_KINDS, "other", "none", "unparseable", "all"))}
    return (
        pd.DataFrame(rows)
        .sort_values("kind", key=lambda s: s.map(lambda k: order.get(k, 50)))
        .reset_index(drop=True)
    )


def per_triplet_pass_rates(samples: pd.DataFrame, selection: Selection | None = None) -> pd.Series:
    """passed / drawn per ``caption_id`` (``passed`` as recorded, or re-decided under ``selection``)."""
    passed = passes(samples, selection) if selection is not None else samples["passed"].astype(bool)
    return passed.groupby(samples["caption_id"]).mean()


def ground_truth_metrics(cfg: PipelineConfig, triplets: Sequence[WorldTriplet]) -> pd.DataFrame:
    """The four CLIP metrics of the world's own drawn (before, after) pairs: what a perfect renderer would
    score under the config's CLIP, the reference to read rendered scores against."""
    import torch

    from tasks.common.models import load_clip
    from tasks.scoring.clip import ClipScorer
    from tasks.world.scene import image_array

    scorer = ClipScorer(
        load_clip(cfg.models.clip, cfg.models.clip_path), "cpu", resize=cfg.render.clip_resize
    )
    size = cfg.render.height
    before = (
        torch.from_numpy(np.stack([image_array(t.before, size) for t in triplets])).permute(0, 3, 1, 2)
        / 255.0
    )
    after = (
        torch.from_numpy(np.stack([image_array(t.after, size) for t in triplets])).permute(0, 3, 1, 2) / 255.0
    )
    metrics = scorer.score_pairs(
        before.float(), after.float(), [t.input for t in triplets], [t.output for t in triplets]
    )
    return pd.DataFrame(
        {
            "kind": [t.kind for t in triplets],
            "input": [t.input for t in triplets],
            "output": [t.output for t in triplets],
            **{m: metrics[m].numpy() for m in METRICS},
        }
    )


def quantiles(df: pd.DataFrame, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict:
    """{metric: {"q10": ..., ...}} over the rows with the metric (NaN left out)."""
    return {
        m: {f"q{round(q * 100)}": round(float(df[m].quantile(q)), 4) for q in qs} for m in METRICS if m in df
    }


def negative_metrics(cfg: PipelineConfig, triplets: Sequence[WorldTriplet], seed: int = 0) -> pd.DataFrame:
    """What each metric gives when the pair is wrong, on drawn images (the negatives to set thresholds against):
    ``clip_sim_image`` of two unrelated scenes (the after image drifted to another picture), ``clip_sim_0`` /
    ``clip_sim_1`` of an image and another triplet's caption, ``clip_sim_dir`` of the right pair under a wrong
    edit of the same input (:func:`tasks.world.edits.wrong_edit`); and ``clip_sim_image_relayout``, the before
    image against its after scene with the shapes moved (:func:`tasks.world.scene.relayout`: the right edit,
    another picture: the pair the paper's image-image threshold is there to reject)."""
    import torch

    from tasks.common.models import load_clip
    from tasks.scoring.clip import ClipScorer
    from tasks.scoring.metrics import clip_metrics
    from tasks.world.edits import wrong_edit
    from tasks.world.scene import image_array, relayout, rng_for

    scorer = ClipScorer(
        load_clip(cfg.models.clip, cfg.models.clip_path), "cpu", resize=cfg.render.clip_resize
    )
    size = cfg.render.height

    def images(scenes):
        return (
            torch.from_numpy(np.stack([image_array(s, size) for s in scenes])).permute(0, 3, 1, 2).float()
            / 255.0
        )

    n = len(triplets)
    shift = np.random.default_rng(seed).permutation(n)
    shift = np.where(shift == np.arange(n), (shift + 1) % n, shift)  # never a triplet with itself
    with torch.inference_mode():
        i0, i1 = (
            scorer.embed_images(images([t.before for t in triplets])),
            scorer.embed_images(images([t.after for t in triplets])),
        )
        t0, t1 = (
            scorer.embed_texts([t.input for t in triplets]),
            scorer.embed_texts([t.output for t in triplets]),
        )
        wrong = scorer.embed_texts([wrong_edit(t, seed).output for t in triplets])
        unrelated = clip_metrics(i0, i1[shift], t0, t1[shift])
        mismatched = clip_metrics(i0, i1, t0[shift], t1[shift])
        wrong_dir = clip_metrics(i0, i1, t0, wrong)["clip_sim_dir"]
        moved = scorer.embed_images(
            images([relayout(t.after, rng_for(seed, i, 7)) for i, t in enumerate(triplets)])
        )
        relayouted = torch.nn.functional.cosine_similarity(i0, moved)
    return pd.DataFrame(
        {
            "kind": [t.kind for t in triplets],
            "clip_sim_image": unrelated["clip_sim_image"].numpy(),
            "clip_sim_0": mismatched["clip_sim_0"].numpy(),
            "clip_sim_1": mismatched["clip_sim_1"].numpy(),
            "clip_sim_dir": wrong_dir.numpy(),
            "clip_sim_image_relayout": relayouted.float().numpy(),
        }
    )


def equal_error_threshold(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """(threshold, error): the value where the share of ``positive`` below it equals the share of ``negative``
    at or above it (the two error rates cross), searched over the observed values."""
    values = np.unique(np.concatenate([positive, negative]))
    best = (float("nan"), 2.0)
    for v in values:
        miss, accept = float((positive < v).mean()), float((negative >= v).mean())
        if max(miss, accept) < best[1]:
            best = (float(v), max(miss, accept))
    return best


# --------------------------------------------------------------------------- what Prompt-to-Prompt sharing buys

SHARING_METRICS = ("clip_sim_image", "ssim", "rmse")  # rmse: lower is closer; the other two: higher


def pair_closeness(renderer, before, after) -> dict[str, np.ndarray]:
    """How close each after image is to its before image: the world CLIP's image-image cosine, SSIM (the
    judge's, :func:`tasks.scoring.image_rungs.ssim`) and pixel RMSE in [0, 1] units."""
    import torch

    from tasks.scoring.image_rungs import ssim

    with torch.inference_mode():
        e0, e1 = renderer.scorer.embed_images(before), renderer.scorer.embed_images(after)
    return {
        "clip_sim_image": torch.nn.functional.cosine_similarity(e0, e1).float().numpy(),
        "ssim": ssim(before, after).numpy(),
        "rmse": (after.float() - before.float()).pow(2).mean((1, 2, 3)).sqrt().numpy(),
    }


def sharing_pairs(
    cfg: PipelineConfig, triplets: Sequence, samples: int, renderer=None, images: dict | None = None
) -> pd.DataFrame:
    """The same seeds rendered twice: with the config's attention sharing and with ``attention=none`` (two
    independent generations from the same noise, the same cfg); :func:`sharing_table` of the two.
    ``images``, a dict, receives each arm's ``(rows, images)`` under ``"shared"`` and ``"none"``."""
    from tasks.render.renderer import Renderer

    renderer = renderer or Renderer(cfg)
    arms = images if images is not None else {}
    for arm, attention in (("shared", None), ("none", "none")):
        drawn: list = []
        rows = render_triplets(cfg, triplets, samples, attention=attention, renderer=renderer, images=drawn)
        arms[arm] = (rows, drawn)
    return sharing_table(renderer, *arms["shared"], *arms["none"])


def sharing_table(
    renderer, shared: pd.DataFrame, shared_images: list, none: pd.DataFrame, none_images: list
) -> pd.DataFrame:
    """One row per sample of two arms rendered from the same seeds (``render_triplets`` rows and their
    ``(before, after)`` images): ``caption_id``, ``seed``, ``p2p_p``, ``cfg_scale``, ``kind``, each of
    :data:`SHARING_METRICS` for both arms (``<metric>_shared``, ``<metric>_none``) and their difference
    (``<metric>_gain``, signed so that positive means the shared pair is closer), and each arm's
    ``passed``. Raises if the arms did not start from the same noise (their before images differ)."""
    import torch

    closeness, befores = {}, {}
    for arm, images in (("shared", shared_images), ("none", none_images)):
        before, after = torch.stack([b for b, _ in images]), torch.stack([a for _, a in images])
        closeness[arm], befores[arm] = pair_closeness(renderer, before, after), before
    if list(shared["seed"]) != list(none["seed"]) or (befores["shared"] - befores["none"]).abs().max() > 1e-3:
        raise AssertionError("the two arms did not start from the same noise (their before images differ)")
    out = shared[["caption_id", "seed", "p2p_p", "cfg_scale", "kind", "input", "output"]].reset_index(
        drop=True
    )
    for m in SHARING_METRICS:
        out[f"{m}_shared"], out[f"{m}_none"] = closeness["shared"][m], closeness["none"][m]
        sign = -1.0 if m == "rmse" else 1.0
        out[f"{m}_gain"] = sign * (out[f"{m}_shared"] - out[f"{m}_none"])
    out["passed_shared"] = shared["passed"].to_numpy(dtype=bool)
    out["passed_none"] = none["passed"].to_numpy(dtype=bool)
    return out


def sign_test(differences: np.ndarray) -> float:
    """Two-sided exact sign test of paired differences (ties dropped): the probability, if a positive and a
    negative difference were equally likely, of a split at least as uneven as the one observed."""
    from math import comb

    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    n, k = len(d), int((d > 0).sum())
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(0, min(k, n - k) + 1))
    return float(min(1.0, 2 * tail / 2**n))


def p_quarters(p: np.ndarray, lo: float = 0.1, hi: float = 0.9, bins: int = 4) -> np.ndarray:
    """The quarter (0..bins-1) of [lo, hi] each p falls in."""
    edges = np.round(np.linspace(lo, hi, bins + 1), 9)  # 0.3, not 0.30000000000000004
    return np.clip(np.searchsorted(edges, np.asarray(p, dtype=float), side="right") - 1, 0, bins - 1)


def sharing_summary(pairs: pd.DataFrame, p_range: tuple[float, float] = (0.1, 0.9)) -> dict:
    """Per metric: both arms' means, the mean gain, the share of pairs closer with sharing, the sign test's
    p-value; and the same by quarter of ``p_range`` (the effect should grow with p), plus the filter's pass
    rate of both arms by quarter."""
    quarter = p_quarters(pairs["p2p_p"].to_numpy(), *p_range)
    out: dict = {"pairs": len(pairs), "metrics": {}, "by_p_quarter": []}
    for m in SHARING_METRICS:
        gain = pairs[f"{m}_gain"].to_numpy()
        out["metrics"][m] = {
            "shared": round(float(pairs[f"{m}_shared"].mean()), 4),
            "none": round(float(pairs[f"{m}_none"].mean()), 4),
            "mean_gain": round(float(gain.mean()), 4),
            "share_closer": round(float((gain > 0).mean()), 4),
            "sign_test_p": sign_test(gain),
        }
    edges = np.linspace(*p_range, 5)
    for q in range(4):
        rows = pairs[quarter == q]
        entry = {
            "p_from": round(float(edges[q]), 3),
            "p_to": round(float(edges[q + 1]), 3),
            "pairs": len(rows),
            "pass_rate_shared": round(float(rows["passed_shared"].mean()), 4) if len(rows) else None,
            "pass_rate_none": round(float(rows["passed_none"].mean()), 4) if len(rows) else None,
        }
        for m in SHARING_METRICS:
            entry[f"{m}_mean_gain"] = round(float(rows[f"{m}_gain"].mean()), 4) if len(rows) else None
        out["by_p_quarter"].append(entry)
    return out
