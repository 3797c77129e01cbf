"""Render throughput and UNet calls per kept pair, in one run on one model and one set of settings.

    python bench/render_throughput.py                                       # tiny models, CPU, < 3 min
    python bench/render_throughput.py --preset sd15-arch --size 512 --device cuda   # full-size SD 1.5, GPU

(a) Samples per second of the batched renderer (the render stage's `Renderer.render_scored`: many
    samples in one UNet batch, CLIP on decoded tensors) against a faithful re-implementation of the
    reference loop (instruct-pix2pix `generate_img_dataset.py`: one sample at a time, UNet batch of 4,
    k-diffusion Euler ancestral with one noise draw per step shared by the pair, sharing while
    `p > i / (len(sigmas) - 2)`, decode, CLIP-score one pair). Same components, same steps. The
    reference's attention is explicit (its modified ldm `CrossAttention`: einsum scores and softmax,
    the before image's probabilities copied to the after image); the loop is timed with that
    (`ip2p-explicit`, the quoted speedup) and with our SDPA processors (the share due to batching
    alone). The two paths' images are compared as a fidelity check.
(b) UNet calls per kept pair (one sample x one step = one 4-image UNet call; the reference spends
    100 x 100 = 10,000 per triplet) for fixed-100 sampling against adaptive sampling, giving up, and
    early rejection, over pass rates 1-50%. The tiny models' CLIP scores are noise, so outcomes are
    synthetic: each triplet gets a pass rate (uniform, or a mixture where a fraction of triplets never
    pass — the paper's release kept nothing for ~31% of its triplets) and each sample passes with it.
    Early rejection is modelled by two stated, settable numbers: `--er-recall` (share of failing samples
    it catches) and `--er-false-reject` (share of passing samples it wrongly drops), or both measured:
    `--er-calibration FILE` reads them (and the step fraction) at the recommended margin from `editforge calibrate-early --json
    FILE` (dry-run samples of real models). The samples are
    planned by the render stage's own `RenderPlan` / `SamplingPolicy`. Measured outcomes instead of the
    synthetic curves (which stay, as the what-if): `--measured-pass-rates FILE...` reads the per-triplet
    pass rates of a real render's `samples.parquet` (e.g. the `world` preset's run, or
    `bench/world_pass_rates.py`'s `world_samples.parquet`) and adds `curves.measured`, overall and by
    edit kind when the files tell it.
(c) p-branching (`render.p_branches` K, `render.keep_per_seed`): each seed renders K stratified p values
    off one before image and one after trunk. Measured on the real renderer (same model, one run, side
    by side): N independent samples vs N/K seeds x K branches, rendered as trees and, for a fidelity and
    cost reference, as the same N samples without branching (`RenderSettings.branching=False`); wall
    clock, UNet calls (sample-steps, the project's unit) and UNet images (the exact compute) per sample,
    and the spread of the after images within a seed's branches vs across seeds. Synthetic, as (b): UNet
    calls per kept pair and kept pairs per 1,000 UNet calls for branching policies vs their independent
    counterparts, plus distinct seeds per kept pair (diversity). Two stated, settable assumptions:
    `--branch-pass-slope` (pass rate vs p: q(p) = q (1 + s (2 (p - p_lo) / (p_hi - p_lo) - 1)); 0: p does
    not matter) and `--branch-corr` (correlation of the pass propensity between a seed's branches, a
    Gaussian copula: 0 independent, 1 a seed's branches pass or fail together), one curve per value.

Writes bench/results/render_throughput.json and prints one summary line.
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
import torch

from tasks.common.config import load_config
from tasks.render.attention import AttentionControl, install_attention
from tasks.render.conditioning import build_conditioning
from tasks.render.early import early_step_count
from tasks.render.pairs import PairRequest, decode_latents
from tasks.render.renderer import Renderer, settings_from
from tasks.render.sampling import sample_params
from tasks.render.scheduling import RenderPlan, SamplingPolicy
from tasks.render.seeds import sample_seeds

CAPTIONS = [
    ("a photo of a cat sitting on a sofa", "a photo of a dog sitting on a sofa"),
    ("a red house by the sea", "a red house by the sea at night"),
    ("portrait of a girl, oil painting", "portrait of a girl wearing a hat, oil painting"),
    ("a mountain lake in summer", "a mountain lake in winter"),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- (a) throughput


def reference_sample(
    renderer: Renderer, control: AttentionControl, request: PairRequest, steps: int, size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One sample exactly as the reference loop: UNet batch [u-before, u-after, c-before, c-after]."""
    comps, device, dtype = renderer.diffusion, renderer.device, renderer.dtype
    params = sample_params(request.seed)
    scheduler = comps.scheduler
    scheduler.set_timesteps(steps, device=device)
    sigmas = scheduler.sigmas.to(device)
    cond = build_conditioning(
        comps, [(request.input_caption, request.output_caption)], size, size, device, dtype
    )
    generator = torch.Generator(device=device).manual_seed(request.seed)
    latent = size // comps.vae_scale_factor
    x = torch.randn(
        1, comps.unet.config.in_channels, latent, latent, generator=generator, device=device, dtype=dtype
    )
    x = (x * scheduler.init_noise_sigma).repeat(2, 1, 1, 1)
    control.load(AttentionControl.for_samples([params.p2p_p]))
    for i in range(len(sigmas) - 1):
        control.active = torch.tensor([params.p2p_p > i / (len(sigmas) - 2)])  # the reference's rule, inline
        sigma, t = sigmas[i], scheduler.timesteps[i]
        model_in = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
        eps = comps.unet(model_in, t, **cond.unet_kwargs(), return_dict=False)[0]
        uncond, cond_eps = eps.chunk(2)
        eps = uncond + (cond_eps - uncond) * params.cfg_scale
        denoised = x.float() - sigma * eps.float()
        sigma_to = sigmas[i + 1]
        sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x = x.float() + (x.float() - denoised) / sigma * (sigma_down - sigma)
        if sigma_to > 0:
            noise = torch.randn(x[:1].shape, generator=generator, device=device, dtype=dtype)
            x = x + noise.float() * sigma_up
        x = x.to(dtype)
    images = decode_latents(comps.vae, x)
    metrics = renderer.score(images[:1], images[1:], [request.input_caption], [request.output_caption])
    return images.cpu(), metrics


def throughput(args: argparse.Namespace) -> dict:
    overrides = [
        f"models.diffusion={args.preset}",
        f"models.clip={args.clip}",
        f"render.device={args.device}",
        f"render.dtype={args.dtype}",
        f"render.height={args.size}",
        f"render.width={args.size}",
        f"render.steps={args.steps}",
        f"render.compile={str(args.compile).lower()}",
    ]
    cfg = load_config("demo", overrides)
    renderer = Renderer(cfg)
    settings = settings_from(cfg)
    device = renderer.device
    seeds = sample_seeds("bench", max(args.ref_samples, args.batched_samples) + 1)
    requests = [PairRequest(f"t{i % 4}", *CAPTIONS[i % 4], seed) for i, seed in enumerate(seeds)]

    # the reference loop, its processors installed once (AttentionControl for one sample): `explicit` is
    # the reference code's attention (ldm CrossAttention: einsum scores, softmax, the before image's
    # attention probabilities copied to the after image); `sdpa` the same loop on our SDPA processors
    ref_runs: dict[str, dict] = {}
    ref_images: list[torch.Tensor] = []
    for kind in ["explicit", "sdpa"] if args.reference_attention == "both" else [args.reference_attention]:
        control = AttentionControl.for_samples([0.0])
        previous = renderer.diffusion.unet.attn_processors
        install_attention(renderer.diffusion.unet, "ip2p-explicit" if kind == "explicit" else "ip2p", control)
        try:
            with torch.inference_mode():
                reference_sample(renderer, control, requests[-1], args.steps, args.size)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                images = [
                    reference_sample(renderer, control, r, args.steps, args.size)[0]
                    for r in requests[: args.ref_samples]
                ]
                sync(device)
                seconds = time.perf_counter() - t0
        finally:
            renderer.diffusion.unet.set_attn_processor(previous)
        ref_images = ref_images or images
        rate = args.ref_samples / seconds
        ref_runs[kind] = {
            "attention": kind,
            "samples": args.ref_samples,
            "seconds": round(seconds, 3),
            "samples_per_s": round(rate, 4),
            "images_per_s": round(2 * rate, 4),
        }

    batch = min(args.batch or renderer.auto_batch_samples(settings, 64), args.batched_samples)
    renderer.render_scored(requests[-1:], settings, cfg.render.keep)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    outputs = [
        renderer.render_scored(requests[i : i + batch], settings, cfg.render.keep)
        for i in range(0, args.batched_samples, batch)
    ]
    sync(device)
    batched_seconds = time.perf_counter() - t0
    before = torch.cat([o.pairs.before for o in outputs])
    after = torch.cat([o.pairs.after for o in outputs])
    diff = max(
        float((torch.stack([before[i], after[i]]) - ref_images[i]).abs().max())
        for i in range(min(args.ref_samples, args.batched_samples))
    )
    batched_rate = args.batched_samples / batched_seconds
    reference = ref_runs[next(iter(ref_runs))]  # the reference code's own attention when it was timed
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "preset": args.preset,
        "clip": args.clip,
        "size": args.size,
        "steps": args.steps,
        "dtype": str(renderer.dtype),
        "compile": renderer.compiled,
        "batch_samples": batch,
        "unet_batch": 4 * batch,
        "reference": reference,
        **(
            {"reference_sdpa": ref_runs["sdpa"]}
            if "sdpa" in ref_runs and reference is not ref_runs["sdpa"]
            else {}
        ),
        "batched": {
            "samples": args.batched_samples,
            "seconds": round(batched_seconds, 3),
            "samples_per_s": round(batched_rate, 4),
            "images_per_s": round(2 * batched_rate, 4),
        },
        "speedup": round(batched_rate / reference["samples_per_s"], 3),
        **(
            {"speedup_vs_sdpa_reference": round(batched_rate / ref_runs["sdpa"]["samples_per_s"], 3)}
            if "sdpa" in ref_runs and reference is not ref_runs["sdpa"]
            else {}
        ),
        "max_abs_image_diff_batched_vs_reference": diff,
    }


# --------------------------------------------------------------------------- (b) UNet calls per kept pair


def simulate(
    policy: SamplingPolicy,
    rates: np.ndarray,
    steps: int,
    early_after: int | None,
    recall: float,
    false_reject: float,
    top_k: int,
    seed: int,
    cohort: int = 64,
) -> dict:
    """Plan and 'render' with synthetic outcomes; count UNet calls, early decodes and kept pairs."""
    ids = [f"{i:016x}" for i in range(len(rates))]
    rate_of = dict(zip(ids, rates))
    plan = RenderPlan(ids, policy)
    calls = decodes = samples = 0
    passes: dict[str, int] = dict.fromkeys(ids, 0)
    while batch := plan.next_cohort(cohort):
        results = []
        for s in batch:
            rng = np.random.default_rng([seed, int(s.caption_id, 16), s.index])
            would_pass = bool(rng.random() < rate_of[s.caption_id])
            rejected = early_after is not None and bool(
                rng.random() < (false_reject if would_pass else recall)
            )
            calls += early_after if rejected else steps
            decodes += int(early_after is not None)
            passed = would_pass and not rejected
            passes[s.caption_id] += int(passed)
            results.append((s.caption_id, s.index, passed))
        samples += len(batch)
        plan.record(results)
    kept = sum(min(top_k, n) for n in passes.values())
    return {
        "samples": samples,
        "unet_calls": calls,
        "early_decodes": decodes,
        "kept": kept,
        "triplets_with_kept": sum(n > 0 for n in passes.values()),
        **plan.status_counts(),
    }


def calls_curve(args: argparse.Namespace) -> dict:
    k, steps = args.top_k, args.sim_steps
    er_at = early_step_count(args.er_at, steps)
    adaptive = SamplingPolicy(args.max_samples, args.round_size, k)
    give_up = SamplingPolicy(args.max_samples, args.round_size, k, args.give_up_after)
    strategies = {  # name: (policy, steps per sample, early-rejection step or None)
        "fixed_100": (SamplingPolicy(args.max_samples), steps, None),
        "adaptive": (adaptive, steps, None),
        "adaptive_early_rejection": (adaptive, steps, er_at),
        "adaptive_give_up": (give_up, steps, None),
        "adaptive_give_up_early_rejection": (give_up, steps, er_at),
        "fast_preset": (give_up, args.fast_steps, early_step_count(args.er_at, args.fast_steps)),
    }

    def point(rates: np.ndarray, row: dict) -> dict:
        for name, (policy, n_steps, early_after) in strategies.items():
            sim = simulate(
                policy, rates, n_steps, early_after, args.er_recall, args.er_false_reject, k, args.seed
            )
            per_kept = sim["unet_calls"] / sim["kept"] if sim["kept"] else float("inf")
            cost = (
                (sim["unet_calls"] + args.decode_cost * sim["early_decodes"]) / sim["kept"]
                if sim["kept"]
                else float("inf")
            )
            row[name] = {
                **sim,
                "unet_calls_per_kept_pair": round(per_kept, 1),
                "cost_per_kept_pair_incl_early_decodes": round(cost, 1),
            }
        base = row["fixed_100"]
        for name in strategies:
            row[name]["ratio_vs_fixed_100"] = (
                round(row[name]["unet_calls_per_kept_pair"] / base["unet_calls_per_kept_pair"], 4)
                if base["kept"]
                else None
            )
            row[name]["kept_vs_fixed_100"] = round(row[name]["kept"] / max(base["kept"], 1), 4)
            row[name]["triplets_with_kept_vs_fixed_100"] = round(
                row[name]["triplets_with_kept"] / max(base["triplets_with_kept"], 1), 4
            )
            row[name]["kept_per_1000_unet_calls"] = round(
                1000 * row[name]["kept"] / row[name]["unet_calls"], 3
            )
        return row

    def branched_point(rates, trees, row):
        """p-branching policies replaying measured seed trees; ratios against the independent fixed-100."""
        base = row["fixed_100"]
        g = args.branches
        for name, policy in (
            ("fixed_100", SamplingPolicy(args.max_samples)),
            ("adaptive", adaptive),
            ("adaptive_give_up", give_up),
        ):
            pol = SamplingPolicy(
                policy.max_samples, policy.round_size, policy.target_passed, policy.give_up_after, g, 1
            )
            sim = simulate_branches(pol, rates, steps, k, 1, 0.0, 0.0, (0.1, 0.9), args.seed, trees=trees)
            per_kept = sim["unet_calls"] / sim["kept"] if sim["kept"] else float("inf")
            row[f"{name}_branches_{g}"] = {
                **sim,
                "unet_calls_per_kept_pair": round(per_kept, 1),
                "cost_per_kept_pair_incl_early_decodes": round(per_kept, 1),
                "kept_per_1000_unet_calls": round(1000 * sim["kept"] / sim["unet_calls"], 3),
                "ratio_vs_fixed_100": round(per_kept / base["unet_calls_per_kept_pair"], 4)
                if base["kept"]
                else None,
                "kept_vs_fixed_100": round(sim["kept"] / max(base["kept"], 1), 4),
                "triplets_with_kept_vs_fixed_100": round(
                    sim["triplets_with_kept"] / max(base["triplets_with_kept"], 1), 4
                ),
            }

    curves = {}
    for hopeless in args.hopeless:
        rows = []
        for rate in args.pass_rates:
            rng = np.random.default_rng(int(rate * 1e6) + int(hopeless * 1e3))
            live = rng.random(args.sim_triplets) >= hopeless
            rates = np.where(live, min(1.0, rate / (1 - hopeless)), 0.0)
            rows.append(point(rates, {"pass_rate": rate}))
        curves[f"hopeless_{hopeless:g}"] = rows
    measured = None
    if args.measured_pass_rates:
        measured = measured_pass_rates(args.measured_pass_rates)
        trees = measured_trees(args.measured_pass_rates, args.branches) if args.branches > 1 else {}
        rng = np.random.default_rng(args.seed)
        groups = [("all", measured)] + (
            [(kind, g) for kind, g in measured.groupby("kind", sort=True)] if "kind" in measured else []
        )
        rows = []
        for (
            kind,
            group,
        ) in groups:  # each group's triplets resampled (with replacement) to the simulated count
            drawn = rng.choice(group["caption_id"].to_numpy(), size=args.sim_triplets, replace=True)
            rates = group.set_index("caption_id").loc[drawn, "pass_rate"].to_numpy()
            row = point(
                rates,
                {
                    "kind": kind,
                    "triplets_measured": len(group),
                    "pass_rate": round(float(group["pass_rate"].mean()), 4),
                    "hopeless_share": round(float((group["pass_rate"] == 0).mean()), 4),
                },
            )
            if trees and all(c in trees for c in drawn):
                branched_point(rates, [trees[c] for c in drawn], row)
            rows.append(row)
        curves["measured"] = rows
        # the same draws, each triplet's rate drawn from its posterior under a Beta prior fitted to all the
        # measured triplets: a triplet with no pass in its few samples gets a small rate, not zero
        prior = beta_prior(measured)
        rng = np.random.default_rng(args.seed)
        rows = []
        for kind, group in groups:
            drawn = rng.choice(group["caption_id"].to_numpy(), size=args.sim_triplets, replace=True)
            by_id = group.set_index("caption_id")
            passed = np.round(
                by_id.loc[drawn, "pass_rate"].to_numpy() * by_id.loc[drawn, "samples"].to_numpy()
            )
            n = by_id.loc[drawn, "samples"].to_numpy()
            rates = rng.beta(prior[0] + passed, prior[1] + n - passed)
            rows.append(
                point(
                    rates,
                    {
                        "kind": kind,
                        "triplets_measured": len(group),
                        "pass_rate": round(float(rates.mean()), 4),
                        "share_below_1pct": round(float((rates < 0.01).mean()), 4),
                    },
                )
            )
        curves["measured_posterior"] = rows
    return {
        "assumptions": {
            "triplets_per_point": args.sim_triplets,
            "top_k": k,
            "max_samples": args.max_samples,
            "steps": steps,
            "fast_preset_steps": args.fast_steps,
            "round_size": args.round_size,
            "give_up_after": args.give_up_after,
            "early_reject_at": args.er_at,
            "early_reject_recall_on_failing": args.er_recall,
            "early_reject_false_reject_on_passing": args.er_false_reject,
            "early_reject_source": args.er_calibration or "assumed (--er-recall / --er-false-reject)",
            "early_decode_cost_in_unet_calls": args.decode_cost,
            "hopeless_fractions": args.hopeless,
            "note": "synthetic outcomes: each sample passes independently with its triplet's rate; early-rejection "
            "precision/recall are assumptions (not measured on real models); kept = min(top_k, passes)",
            "measured_pass_rates": (
                {
                    "files": args.measured_pass_rates,
                    "triplets": len(measured),
                    "note": "curves.measured: each triplet's measured pass rate (passed / drawn in "
                    "the files) stands for its true rate; a triplet with none passing is "
                    "hopeless there. curves.measured_posterior: the same triplets, each "
                    "rate drawn from its Beta posterior (prior fitted to all measured "
                    "triplets: alpha, beta = beta_prior), so few samples without a pass "
                    "no longer mean hopeless; branching is not replayed there. The "
                    "synthetic curves are the what-if",
                    "beta_prior": beta_prior(measured),
                }
                if measured is not None
                else None
            ),
        },
        "curves": curves,
    }


def measured_pass_rates(paths: list[str]) -> pd.DataFrame:
    """Per-triplet pass rates (passed / drawn) from render ``samples.parquet`` files (a real run's partitions,
    or ``bench/world_pass_rates.py``'s ``world_samples.parquet``, whose ``attention=none`` rows are left
    out): one row per ``caption_id`` with ``pass_rate``, ``samples`` and, when the files tell, ``kind``."""
    import glob

    files = sorted({f for p in paths for f in (glob.glob(p) or [p])})
    frames = [pd.read_parquet(f) for f in files]
    if not frames:
        raise SystemExit(f"--measured-pass-rates: no file matches {paths}")
    df = pd.concat(frames, ignore_index=True)
    if "attention" in df:
        df = df[df["attention"] != "none"]
    if "arm" in df:  # world_pass_rates.py's p-branching arm: replayed by measured_trees
        df = df[df["arm"] == "independent"]
    if not len(df):
        raise SystemExit(f"--measured-pass-rates: no sample rows in {files}")
    if "kind" not in df and {"input", "output"} <= set(df.columns):
        from tasks.world.grammar import edit_kind

        df = df.assign(kind=[edit_kind(a, b) for a, b in zip(df["input"], df["output"])])
    grouped = df.assign(passed=df["passed"].astype(bool)).groupby("caption_id")
    out = pd.DataFrame({"pass_rate": grouped["passed"].mean(), "samples": grouped.size()})
    if "kind" in df:
        out["kind"] = grouped["kind"].first()
    return out.reset_index()


def beta_prior(measured: pd.DataFrame) -> tuple[float, float]:
    """(alpha, beta) of a Beta prior on the per-triplet pass rate, fitted by the method of moments to the
    measured triplets (binomial noise of ``samples`` draws each taken out of the spread); (1, 1) when the
    spread is no wider than the noise."""
    rate, n = measured["pass_rate"].to_numpy(float), measured["samples"].to_numpy(float)
    m = float(np.sum(rate * n) / np.sum(n))
    if not 0 < m < 1:
        return 1.0, 1.0
    noise = float(np.mean(m * (1 - m) / n))
    between = float(rate.var()) - noise
    if between <= 0:
        return 1.0, 1.0
    total = max(m * (1 - m) / between - 1, 1e-3)  # alpha + beta
    return m * total, (1 - m) * total


def measured_trees(paths: list[str], branches: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The measured p-branching seeds of ``branches`` branches, per ``caption_id``: (p of each branch, passed of
    each branch), from `world_pass_rates.py`'s ``arm=branches_K`` rows or a branched run's ``samples.parquet``
    (``branch`` column); {} when the files hold none."""
    import glob

    files = sorted({f for p in paths for f in (glob.glob(p) or [p])})
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if "arm" in df:
        df = df[df["arm"] == f"branches_{branches}"]
    if "attention" in df:
        df = df[df["attention"] != "none"]
    if "branch" not in df or not len(df):
        return {}
    trees: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for (cid, _seed), rows in df.sort_values("branch").groupby(["caption_id", "seed"], sort=True):
        if len(rows) == branches:
            trees.setdefault(cid, []).append((rows["p2p_p"].to_numpy(float), rows["passed"].to_numpy(bool)))
    return trees


def calibrated_early_rejection(path: Path) -> tuple[float, float, float]:
    """(step fraction, recall, false drop) at the recommended margin of an `editforge calibrate-early --json` file."""
    report = json.loads(path.read_text())
    margin = report.get("recommended_margin")
    if margin is None:
        raise SystemExit(
            f"{path}: no recommended margin (no margin kept false drops within "
            f"{report.get('max_false_drop')}); pass --er-recall / --er-false-reject instead"
        )
    row = next(r for r in report["table"] if r["margin"] == margin)
    return float(report["early_reject_at"]), float(row["recall"]), float(row["false_drop"])


# --------------------------------------------------------------------------- (c) p-branching


def stop_step(p: np.ndarray, steps: int) -> np.ndarray:
    """The ip2p rule's first step without sharing (shares at step i iff p > i / (n - 1)), vectorised."""
    if steps == 1:
        return (p > 0).astype(int)
    return np.minimum(steps, np.ceil(p * (steps - 1))).astype(int)


def seed_cost(ps: np.ndarray, steps: int) -> tuple[int, int]:
    """(sample-steps, UNet images) of one seed's branches as rendered by `render_pairs` (no early rejection):
    the pair runs n steps (4 images each), every other distinct stop step's lane n - stop (2 images)."""
    stops = sorted(set(stop_step(ps, steps).tolist()))
    own = sum(steps - s for s in stops[:-1])
    return steps + own, 4 * steps + 2 * own


def simulate_branches(
    policy: SamplingPolicy,
    rates: np.ndarray,
    steps: int,
    top_k: int,
    per_seed: int | None,
    corr: float,
    slope: float,
    p_range: tuple[float, float],
    seed: int,
    cohort: int = 64,
    trees: list | None = None,
) -> dict:
    """Plan (the stage's RenderPlan, seeds of `policy.group` branches) and 'render' with synthetic outcomes:
    branch b of a seed passes iff Phi(sqrt(corr) Z_seed + sqrt(1 - corr) E_b) < q(p_b). With ``trees`` (one
    list per triplet of measured seeds, (p per branch, passed per branch); :func:`measured_trees`) each seed
    replays one of its triplet's measured seeds, drawn with replacement: p values and outcomes as measured."""
    from math import erf, sqrt

    k = policy.group
    lo, hi = p_range
    ids = [f"{i:016x}" for i in range(len(rates))]
    rate_of = dict(zip(ids, rates))
    tree_of = dict(zip(ids, trees)) if trees is not None else {}
    plan = RenderPlan(ids, policy)
    calls = images = samples = 0
    passing: dict[str, list[tuple[float, int]]] = {cid: [] for cid in ids}  # (random rank, seed slot)
    while batch := plan.next_cohort(cohort):
        results = []
        for start in range(0, len(batch), k):
            seed_rows = batch[start : start + k]
            slot = seed_rows[0].index // k
            rng = np.random.default_rng([seed, int(seed_rows[0].caption_id, 16), slot])
            if trees is not None:
                measured = tree_of[seed_rows[0].caption_id]
                ps, outcome = measured[int(rng.integers(len(measured)))]
            else:
                u = rng.random(k)
                ps = lo + (np.arange(k) + u) / k * (hi - lo)
                z, e = rng.standard_normal(), rng.standard_normal(k)
                latent = sqrt(corr) * z + sqrt(1 - corr) * e
                q = np.clip(
                    rate_of[seed_rows[0].caption_id]
                    * (1 + slope * (2 * (ps - lo) / max(hi - lo, 1e-12) - 1)),
                    0,
                    1,
                )
                outcome = np.array([0.5 * (1 + erf(latent[b] / sqrt(2))) < q[b] for b in range(k)])
            c, im = seed_cost(ps, steps) if k > 1 else (steps, 4 * steps)
            calls, images = calls + c, images + im
            for s in seed_rows:
                b = s.index % k
                passed = bool(outcome[b])
                if passed:
                    passing[s.caption_id].append((float(rng.random()), slot))
                results.append((s.caption_id, s.index, passed))
        samples += len(batch)
        plan.record(results)
    kept = seeds = 0
    for rows in passing.values():
        rows.sort(reverse=True)
        taken, per = [], {}
        for _rank, slot in rows:
            if per_seed is None or per.get(slot, 0) < per_seed:
                per[slot] = per.get(slot, 0) + 1
                taken.append(slot)
            if len(taken) == top_k:
                break
        kept += len(taken)
        seeds += len(set(taken))
    return {
        "samples": samples,
        "unet_calls": calls,
        "unet_images": images,
        "kept": kept,
        "distinct_seeds_per_kept_pair": round(seeds / kept, 4) if kept else None,
        "triplets_with_kept": sum(bool(r) for r in passing.values()),
        **plan.status_counts(),
    }


def branching_curve(args: argparse.Namespace) -> dict:
    k, top, steps = args.branches, args.top_k, args.sim_steps
    plain = {
        "fixed_100": SamplingPolicy(args.max_samples),
        "adaptive": SamplingPolicy(args.max_samples, args.round_size, top),
        "adaptive_give_up": SamplingPolicy(args.max_samples, args.round_size, top, args.give_up_after),
    }
    curves = {}
    for corr in args.branch_corr:
        rows = []
        for rate in args.pass_rates:
            rates = np.full(args.sim_triplets, rate)
            row: dict = {"pass_rate": rate}
            for name, policy in plain.items():
                for label, group, per_seed in (
                    (name, 1, 1),
                    (f"{name}_branches_{k}", k, 1),
                    (f"{name}_branches_{k}_keep_all", k, None),
                ):
                    pol = SamplingPolicy(
                        policy.max_samples,
                        policy.round_size,
                        policy.target_passed,
                        policy.give_up_after,
                        group,
                        per_seed if group > 1 else None,
                    )
                    sim = simulate_branches(
                        pol,
                        rates,
                        steps,
                        top,
                        per_seed,
                        corr,
                        args.branch_pass_slope,
                        tuple(args.p_range),
                        args.seed,
                    )
                    kept = sim["kept"]
                    row[label] = {
                        **sim,
                        "unet_calls_per_kept_pair": round(sim["unet_calls"] / kept, 1) if kept else None,
                        "unet_image_calls_per_kept_pair": round(sim["unet_images"] / 4 / kept, 1)
                        if kept
                        else None,
                        "kept_per_1000_unet_calls": round(1000 * kept / sim["unet_calls"], 3),
                        "kept_per_1000_unet_image_calls": round(4000 * kept / sim["unet_images"], 3),
                    }
                base = row[name]
                for label in (f"{name}_branches_{k}", f"{name}_branches_{k}_keep_all"):
                    if base["kept"] and row[label]["kept"]:
                        row[label]["calls_per_kept_vs_independent"] = round(
                            row[label]["unet_calls_per_kept_pair"] / base["unet_calls_per_kept_pair"], 4
                        )
                        row[label]["image_calls_per_kept_vs_independent"] = round(
                            row[label]["unet_image_calls_per_kept_pair"]
                            / base["unet_image_calls_per_kept_pair"],
                            4,
                        )
            rows.append(row)
        curves[f"corr_{corr:g}"] = rows
    return {
        "assumptions": {
            "branches": k,
            "keep_per_seed": 1,
            "p_range": list(args.p_range),
            "steps": steps,
            "pass_rate_vs_p_slope": args.branch_pass_slope,
            "branch_correlations": args.branch_corr,
            "triplets_per_point": args.sim_triplets,
            "top_k": top,
            "max_samples": args.max_samples,
            "round_size": args.round_size,
            "give_up_after": args.give_up_after,
            "note": "synthetic outcomes: a seed's branches pass with q(p_b) each, correlated through a "
            "Gaussian copula (branch_correlations); kept = the top_k of a random order of the "
            "passing samples, at most keep_per_seed per seed (_keep_all: no limit); UNet calls "
            "from the ip2p stop steps of the stratified p draws; no early rejection",
        },
        "curves": curves,
    }


def _pairwise_rmse(images: torch.Tensor) -> list[float]:
    flat = images.flatten(1)
    return [
        float(((flat[a] - flat[b]) ** 2).mean().sqrt())
        for a in range(len(flat))
        for b in range(a + 1, len(flat))
    ]


def branching_measured(args: argparse.Namespace) -> dict:
    """N independent samples vs N/K seeds x K branches (as trees, and as the same samples unbranched)."""
    import dataclasses

    from tasks.common.selection import passes

    k = args.branches
    overrides = [
        f"models.diffusion={args.preset}",
        f"models.clip={args.clip}",
        f"render.device={args.device}",
        f"render.dtype={args.dtype}",
        f"render.height={args.size}",
        f"render.width={args.size}",
        f"render.steps={args.branch_steps}",
    ]
    cfg = load_config("demo", overrides)
    renderer = Renderer(cfg)
    settings = settings_from(cfg)
    device = renderer.device
    n_seeds = args.branch_triplets * args.branch_seeds
    n = n_seeds * k
    seeds = sample_seeds("bench-branch", n)
    independent = [
        PairRequest(f"t{i % args.branch_triplets}", *CAPTIONS[i % args.branch_triplets % 4], s)
        for i, s in enumerate(seeds)
    ]
    branched = [
        PairRequest(f"t{j % args.branch_triplets}", *CAPTIONS[j % args.branch_triplets % 4], seeds[j], b, k)
        for j in range(n_seeds)
        for b in range(k)
    ]
    batch = args.batch or 8
    batch = max(k, batch - batch % k)  # whole seeds per batch, as the stage's cohorts
    runs = {
        "independent_p_branches_1": (independent, settings),
        f"p_branches_{k}": (branched, settings),
        f"p_branches_{k}_unbranched": (branched, dataclasses.replace(settings, branching=False)),
    }
    renderer.render_scored(independent[:1], settings, cfg.render.keep)  # warm-up
    timing: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.branch_repeats):  # interleaved, best of the repeats (a shared, noisy machine)
        for name, (requests, s) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            outputs[name] = [
                renderer.render_scored(requests[i : i + batch], s, cfg.render.keep)
                for i in range(0, len(requests), batch)
            ]
            sync(device)
            timing[name].append(time.perf_counter() - t0)
    out: dict = {
        "preset": args.preset,
        "size": args.size,
        "steps": args.branch_steps,
        "branches": k,
        "samples_per_run": n,
        "seeds_branched": n_seeds,
        "batch_samples": batch,
        "repeats": args.branch_repeats,
        "runs": {},
    }
    for name, scored in outputs.items():
        calls = sum(sum(o.pairs.unet_steps) for o in scored)
        images = sum(sum(o.pairs.unet_images) for o in scored)
        seconds = min(timing[name])
        out["runs"][name] = {
            "seconds": round(seconds, 3),
            "seconds_all": [round(t, 3) for t in timing[name]],
            "s_per_sample": round(seconds / n, 4),
            "unet_calls": calls,
            "unet_images": images,
            "unet_calls_per_sample": round(calls / n, 3),
            "unet_images_per_sample": round(images / n, 3),
        }
    base, tree, flat = (out["runs"][name] for name in runs)
    out["tree_vs_independent"] = {
        key: round(tree[key] / base[key], 4)
        for key in ("s_per_sample", "unet_calls_per_sample", "unet_images_per_sample")
    }
    out["tree_vs_unbranched_same_samples"] = {
        key: round(tree[key] / flat[key], 4)
        for key in ("s_per_sample", "unet_calls_per_sample", "unet_images_per_sample")
    }
    after_tree = torch.cat([o.pairs.after for o in outputs[f"p_branches_{k}"]])
    after_flat = torch.cat([o.pairs.after for o in outputs[f"p_branches_{k}_unbranched"]])
    out["max_abs_image_diff_tree_vs_unbranched"] = float((after_tree - after_flat).abs().max())
    # spread of the after images: a seed's branches vs different seeds of the same triplet
    within = [d for j in range(n_seeds) for d in _pairwise_rmse(after_tree[j * k : (j + 1) * k])]
    across = [
        d
        for t in range(args.branch_triplets)
        for d in _pairwise_rmse(after_tree[[j * k for j in range(n_seeds) if j % args.branch_triplets == t]])
    ]
    out["after_image_rmse"] = {
        "within_seed_branches": round(float(np.mean(within)), 5) if within else None,
        "across_seeds_same_triplet": round(float(np.mean(across)), 5) if across else None,
    }
    # kept under the demo's thresholds with the stage's rule (one per seed) and without it
    import pandas as pd

    metrics = {
        m: torch.cat([o.metrics[m] for o in outputs[f"p_branches_{k}"]]).numpy()
        for m in outputs[f"p_branches_{k}"][0].metrics
    }
    df = pd.DataFrame(
        {"caption_id": [r.key for r in branched], "seed": [r.seed for r in branched], **metrics}
    )
    from tasks.common.selection import per_seed_eligible, select_top_k

    kept_rule = {}
    for label, per_seed in (("keep_per_seed_1", 1), ("keep_all", None)):
        kept = df[select_top_k(df, cfg.render.keep, per_seed_eligible(df, cfg.render.keep, per_seed))]
        kept_rule[label] = {
            "kept": len(kept),
            "distinct_seeds": int(kept.groupby(["caption_id", "seed"]).ngroups),
        }
    out["kept_demo_thresholds"] = {
        "passed": int(passes(df, cfg.render.keep).sum()),
        "top_k": cfg.render.keep.top_k,
        **kept_rule,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="diffusion preset: tiny, sd15-arch, sd15, sdxl")
    parser.add_argument(
        "--clip", default=None, help="CLIP preset (default: tiny; ViT-L-14 random-init for sd15-arch)"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA only)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps, both paths (a)")
    parser.add_argument("--ref-samples", type=int, default=8)
    parser.add_argument(
        "--reference-attention",
        default="both",
        choices=["explicit", "sdpa", "both"],
        help="the reference loop's attention: explicit maps as the reference code (einsum + softmax), "
        "our SDPA processors, or both (the speedup is quoted against explicit)",
    )
    parser.add_argument("--batched-samples", type=int, default=24)
    parser.add_argument(
        "--batch", type=int, default=0, help="samples per UNet batch (0: auto — free GPU memory, 8 on CPU)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: leave as set by OMP_NUM_THREADS)"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--pass-rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
    )
    parser.add_argument(
        "--hopeless",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0, 0.31],
        help="fractions of triplets that never pass (one curve each)",
    )
    parser.add_argument("--sim-triplets", type=int, default=400)
    parser.add_argument("--sim-steps", type=int, default=100)
    parser.add_argument("--fast-steps", type=int, default=25)
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--round-size", type=int, default=8)
    parser.add_argument("--give-up-after", type=int, default=32)
    parser.add_argument("--er-at", type=float, default=0.4)
    parser.add_argument("--er-recall", type=float, default=0.5)
    parser.add_argument("--er-false-reject", type=float, default=0.05)
    parser.add_argument(
        "--er-calibration",
        default=None,
        help="JSON of `editforge calibrate-early --json`: take recall / false drops at its recommended margin",
    )
    parser.add_argument(
        "--measured-pass-rates",
        nargs="+",
        default=None,
        metavar="SAMPLES_PARQUET",
        help="samples.parquet files (globs) of a real render, e.g. runs/world/render/*/part-*/samples.parquet "
        "or bench/results/world_samples.parquet: adds curves.measured (per-triplet measured pass "
        "rates, by edit kind when known) beside the synthetic ones",
    )
    parser.add_argument(
        "--decode-cost",
        type=float,
        default=1.5,
        help="one early VAE decode of a pair + CLIP, in UNet-call units (SD 1.5 at 512²: ~1.5)",
    )
    parser.add_argument("--branches", type=int, default=4, help="(c) p branches per seed")
    parser.add_argument(
        "--branch-corr",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0, 0.5, 0.9],
        help="(c) correlation of a seed's branches' pass propensity (one synthetic curve each)",
    )
    parser.add_argument(
        "--branch-pass-slope",
        type=float,
        default=0.0,
        help="(c) pass rate vs p: q(p) = q (1 + slope (2 (p - p_lo) / (p_hi - p_lo) - 1)); 0: flat",
    )
    parser.add_argument("--p-range", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.9])
    parser.add_argument("--branch-triplets", type=int, default=4, help="(c) measured: triplets")
    parser.add_argument(
        "--branch-seeds", type=int, default=2, help="(c) measured: seeds per triplet (x branches)"
    )
    parser.add_argument("--branch-steps", type=int, default=20, help="(c) measured: denoising steps")
    parser.add_argument(
        "--branch-repeats", type=int, default=2, help="(c) measured: interleaved repeats, best kept"
    )
    parser.add_argument("--skip-branching", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "render_throughput.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long size for the test suite (figures mean little)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.ref_samples, args.batched_samples, args.batch = 2, 2, 4, 2
        args.sim_triplets, args.reference_attention = 20, "sdpa"
        args.branch_triplets, args.branch_seeds, args.branch_steps, args.branch_repeats = 2, 1, 4, 1
    if args.er_calibration:
        args.er_at, args.er_recall, args.er_false_reject = calibrated_early_rejection(
            Path(args.er_calibration)
        )
    args.clip = args.clip or ("ViT-L-14" if args.preset in ("sd15-arch", "sd15", "sdxl") else "tiny")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    result: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    }
    if not args.skip_throughput:
        result["throughput"] = throughput(args)
    result["unet_calls"] = calls_curve(args)
    if not args.skip_branching:
        result["p_branching"] = {"measured": branching_measured(args), "synthetic": branching_curve(args)}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    at10 = {
        name: v
        for row in result["unet_calls"]["curves"]["hopeless_0"]
        for name, v in row.items()
        if row["pass_rate"] == 0.1 and name != "pass_rate"
    }
    result["goals"] = {
        "speedup_ge_3x": result.get("throughput", {}).get("speedup", 0) >= 3,
        "calls_per_kept_le_one_fifth_at_10pct": {
            name: v["ratio_vs_fixed_100"] <= 0.2 for name, v in at10.items()
        },
    }
    curves = result["unet_calls"]["curves"]
    measured_all = next((row for row in curves.get("measured", []) if row["kind"] == "all"), None)
    posterior_all = next((row for row in curves.get("measured_posterior", []) if row["kind"] == "all"), None)
    for label, row in (("measured", measured_all), ("measured_posterior", posterior_all)):
        if (
            row
        ):  # the goal at the measured pass rates: >= 5x fewer UNet calls per kept pair, <= 5% fewer triplets
            result["goals"][f"{label}_5x_fewer_calls_per_kept_pair_le_5pct_fewer_triplets"] = {
                name: bool(
                    v["ratio_vs_fixed_100"] is not None
                    and v["ratio_vs_fixed_100"] <= 0.2
                    and v["triplets_with_kept_vs_fixed_100"] >= 0.95
                )
                for name, v in row.items()
                if isinstance(v, dict) and name != "fixed_100"
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    tp = result.get("throughput")
    parts = []
    if tp:
        vs_sdpa = (
            f", {tp['speedup_vs_sdpa_reference']:.2f}x vs the same loop on SDPA"
            if "speedup_vs_sdpa_reference" in tp
            else ""
        )
        parts.append(
            f"batched {tp['batched']['samples_per_s']:.3g} vs reference ({tp['reference']['attention']} "
            f"attention) {tp['reference']['samples_per_s']:.3g} samples/s = {tp['speedup']:.2f}x{vs_sdpa} "
            f"({tp['preset']} {tp['size']}², {tp['steps']} steps, batch {tp['batch_samples']}, {tp['device']})"
        )
    parts.append(
        "UNet calls per kept pair at 10% pass vs fixed-100: "
        + ", ".join(
            f"{name} {v['ratio_vs_fixed_100']:.2f}" for name, v in at10.items() if name != "fixed_100"
        )
    )
    pb = result.get("p_branching")
    if pb:
        m, k = pb["measured"], args.branches
        row = next((r for r in pb["synthetic"]["curves"].get("corr_0.5", []) if r["pass_rate"] == 0.1), None)
        synth = (
            f"; synthetic 10% pass, corr 0.5: adaptive UNet calls per kept pair x"
            f"{row[f'adaptive_branches_{k}'].get('calls_per_kept_vs_independent', float('nan')):.2f} "
            f"(images x{row[f'adaptive_branches_{k}'].get('image_calls_per_kept_vs_independent', float('nan')):.2f})"
            if row
            else ""
        )
        parts.append(
            f"p-branching K={k} measured ({m['preset']} {m['size']}², {m['steps']} steps): per sample "
            f"wall x{m['tree_vs_independent']['s_per_sample']:.2f}, UNet calls "
            f"x{m['tree_vs_independent']['unet_calls_per_sample']:.2f}, images "
            f"x{m['tree_vs_independent']['unet_images_per_sample']:.2f} vs independent{synth}"
        )
    measured = result["unet_calls"]["curves"].get("measured")
    if measured_all:
        parts.append(
            f"measured pass rates ({measured_all['triplets_measured']} triplets, {measured_all['pass_rate']:.0%} pass, "
            f"{measured_all['hopeless_share']:.0%} hopeless), UNet calls per kept pair vs fixed-100 "
            "(triplets with a pair): "
            + ", ".join(
                f"{name} {v['ratio_vs_fixed_100']} ({v['triplets_with_kept_vs_fixed_100']:.0%})"
                for name, v in measured_all.items()
                if isinstance(v, dict) and name != "fixed_100"
            )
        )
        if posterior_all:
            parts.append(
                "at posterior rates: "
                + ", ".join(
                    f"{name} {v['ratio_vs_fixed_100']} ({v['triplets_with_kept_vs_fixed_100']:.0%})"
                    for name, v in posterior_all.items()
                    if isinstance(v, dict) and name != "fixed_100"
                )
            )
    elif measured:
        parts.append(
            "measured pass rates ("
            + ", ".join(
                f"{row['kind']} {row['pass_rate']:.0%}: adaptive {row['adaptive']['ratio_vs_fixed_100']}"
                for row in measured
            )
            + " of fixed-100's UNet calls per kept pair)"
        )
    print(
        "render_throughput: "
        + "; ".join(parts)
        + f" -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
