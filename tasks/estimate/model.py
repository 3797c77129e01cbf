"""The cost model of `editforge estimate`: what a full run will cost, from the measured rates of a pilot run.

    editforge estimate --preset paper --from-preset demo --from-set output_root=/tmp/pilot --partitions 0

The TARGET is the run you plan (``--preset`` + ``--set``); the PILOT is a run already on disk
(``--from-preset`` + ``--from-set``; by default the target itself, e.g. its first partitions). Only
partitions finished under the pilot config's hashes count (``--partitions`` restricts them further).
No Prefect and no model is needed: :func:`estimate` reads the pilot's ``_SUCCESS.json`` manifests, its
``samples.parquet`` / ``triplets.parquet`` and the captions ledger, and returns a dict (the JSON file).

The rules, stage by stage (captions → triplets, text tokens, render, GPU-hours, money) and how their 95%
intervals are made: docs/estimate.md, "The rules".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tasks import registry
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import figures
from tasks.common.errors import PermanentError
from tasks.render.scheduling import STATUSES, SamplingPolicy

Z95 = 1.959964
CHARS_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 3
CHAT_TOKENS_PER_REPLY = 3
TOKEN_RULE = (
    f"chars/{CHARS_PER_TOKEN} (OpenAI: about 4 characters of English per token), plus "
    f"{CHAT_TOKENS_PER_MESSAGE} tokens per chat message and {CHAT_TOKENS_PER_REPLY} per reply"
)
# render settings that change what a sample looks like (pass rates) or costs (speed), not how many are drawn
IMAGE_KEYS = (
    "models.diffusion",
    "models.diffusion_path",
    "models.vae_path",
    "models.clip",
    "models.clip_path",
    "render.scheduler",
    "render.steps",
    "render.height",
    "render.width",
    "render.dtype",
    "render.guidance",
    "render.attention",
    "render.cfg_range",
    "render.p_range",
    "render.clip_resize",
)


class EstimateError(PermanentError, ValueError):
    """Nothing to estimate from (no finished pilot partition), said with what to run."""


@dataclass
class PilotData:
    """What the estimate reads of the pilot: manifests per stage (finished partitions used), and when
    readable the render samples, the text triplets and the captions ledger records."""

    manifests: dict[str, list[dict]]
    partitions: dict[str, list[int]] = field(default_factory=dict)
    not_finished: dict[str, list[int]] = field(default_factory=dict)
    samples: pd.DataFrame | None = None
    triplets: pd.DataFrame | None = None
    generations: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- reading


def read_pilot(pilot: PipelineConfig, partitions: list[int] | None = None) -> PilotData:
    """The pilot's finished partitions (under its hashes), restricted to ``partitions`` when given."""
    from tasks.captions.generations import ledger

    data = PilotData(manifests={})
    samples, triplets = [], []
    for stage in registry.chain():
        ids = registry.partition_ids(pilot, stage.name)
        if partitions is not None:
            ids = [i for i in ids if i in partitions] if stage.partitions == "all" else ids
        found = registry.manifests(pilot, stage.name, ids)
        data.manifests[stage.name] = [m for m in found.values() if m]
        data.partitions[stage.name] = [i for i, m in found.items() if m]
        data.not_finished[stage.name] = [i for i, m in found.items() if not m]
        for pid in data.partitions[stage.name]:
            folder = registry.partition_url(pilot, stage.name, pid)
            if stage.name == "render":
                samples.append(_read(storage.url_join(folder, layout.SAMPLES_FILE)))
            elif stage.name == "text":
                triplets.append(_read(storage.url_join(folder, layout.TRIPLETS_FILE)))
    data.samples = _concat(samples)
    data.triplets = _concat(triplets)
    try:
        data.generations = [g.record for g in ledger(pilot)]
    except (OSError, ValueError):
        data.generations = []
    return data


def _read(url: str) -> pd.DataFrame | None:
    try:
        return storage.read_parquet(url)
    except (OSError, ValueError):
        return None


def _concat(frames: list[pd.DataFrame | None]) -> pd.DataFrame | None:
    if not frames or any(f is None for f in frames):
        return None  # a partition's table is missing: the figures that need every row are left out
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ statistics


def _sum(manifests: list[dict], key: str) -> int:
    return sum(int(m.get("counts", {}).get(key, 0)) for m in manifests)


def wilson(successes: float, n: float, z: float = Z95) -> list[float] | None:
    """Wilson score interval of a proportion (None without observations)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_interval(values: pd.Series | None, mean: float, z: float = Z95) -> list[float] | None:
    """``mean`` +- z x the standard error of the per-triplet ``values`` (None without two of them)."""
    if values is None or len(values) < 2:
        return None
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values))
    return [max(0.0, mean - half), mean + half]


def _scaled(interval: list[float] | None, factor: float) -> list[float] | None:
    return None if interval is None else [_num(interval[0] * factor), _num(interval[1] * factor)]


def _num(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.{digits}g}") if abs(x) < 1e4 else round(x, 1)


def _get(cfg: PipelineConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def _differences(
    target: PipelineConfig, pilot: PipelineConfig, keys: tuple[str, ...]
) -> dict[str, tuple[Any, Any]]:
    return {k: (_get(pilot, k), _get(target, k)) for k in keys if _get(pilot, k) != _get(target, k)}


def sampling_signature(cfg: PipelineConfig) -> dict[str, Any]:
    """What decides how many samples a triplet gets and which pass: the effective policy (a setting that
    is off does not count: ``round_size`` without rounds, the margin without early rejection)."""
    r, policy = cfg.render, SamplingPolicy.from_config(cfg).settings()
    sig: dict[str, Any] = {
        key: policy[key]
        for key in (
            "render.samples_per_triplet",
            "render.adaptive.round_size",
            "render.adaptive.target_passed",
            "render.adaptive.give_up_after",
        )
    }
    sig |= {
        "render.keep": r.keep.model_dump(mode="json"),
        "render.early_reject.at": r.early_reject.at if r.steps >= 2 else None,
        "render.p_branches": policy["render.p_branches"],  # the replay below models independent samples
        "render.keep_per_seed": policy["render.keep_per_seed"],
    }
    if sig["render.early_reject.at"] is not None:
        sig |= {
            "render.early_reject.margin": r.early_reject.margin,
            "render.early_reject.metrics": list(r.early_reject.metrics),
            "render.early_reject.dry_run": r.early_reject.dry_run,
        }
    return sig


def sampling_differences(
    target: PipelineConfig,
    pilot: PipelineConfig,
    keys: tuple[str, ...] | None = None,
) -> dict[str, tuple[Any, Any]]:
    was, now = sampling_signature(pilot), sampling_signature(target)
    names = keys or tuple(dict.fromkeys([*was, *now]))
    return {k: (was.get(k), now.get(k)) for k in names if was.get(k) != now.get(k)}


def early_steps(cfg: PipelineConfig) -> int | None:
    """Steps an early-rejected sample costs (``tasks.render.early.early_step_count``, without torch)."""
    at, steps = cfg.render.early_reject.at, cfg.render.steps
    if at is None or steps < 2 or cfg.render.early_reject.dry_run:
        return None
    return min(steps - 1, max(1, round(at * steps)))


def replay(policy, q: float, top_k: int) -> dict[str, float]:
    """Expected samples, passes, kept pairs and P(at least one kept) of one triplet under ``policy``
    when each sample passes independently with probability ``q`` (exact, over the policy's rounds)."""
    states = {(0, 0): 1.0}
    out = {"samples": 0.0, "passed": 0.0, "kept": 0.0, "any_kept": 0.0}
    while states:
        following: dict[tuple[int, int], float] = {}
        for (drawn, passed), prob in states.items():
            end = policy.round_end(drawn)
            n = end - drawn
            for j in range(n + 1):
                pj = prob * math.comb(n, j) * q**j * (1 - q) ** (n - j)
                if pj <= 0:
                    continue
                total = passed + j
                if policy.decide(end, total) is None:
                    following[(end, total)] = following.get((end, total), 0.0) + pj
                    continue
                out["samples"] += pj * end
                out["passed"] += pj * total
                out["kept"] += pj * min(top_k, total)
                out["any_kept"] += pj * (total > 0)
        states = following
    return out


# ------------------------------------------------------------------------------------------- the stages


def _text(target: PipelineConfig, pilot: PipelineConfig, data: PilotData, warnings: list[str]) -> dict:
    from tasks.text.format import RETRIED

    ms = data.manifests.get("text", [])
    tin, tout = _sum(ms, "in"), _sum(ms, "out")
    if not tin:
        raise EstimateError(
            "the pilot has no finished text partition under its config "
            f"(text/{registry.stage_hash(pilot, 'text')} in {pilot.output_root})"
        )
    gens = _sum(ms, "generation_attempts") or tin
    accepted, tries, rule = float(tout), float(gens), "pilot text out / in"
    table = data.triplets
    mt, mp = target.text.max_attempts, pilot.text.max_attempts
    if mt != mp:
        if table is None or "attempt" not in table:
            warnings.append(
                f"text.max_attempts {mp} (pilot) -> {mt} (target): no triplets table to replay, "
                "the pilot's acceptance is used as it is"
            )
        else:
            attempt = table["attempt"].astype(int)
            ok = table["status"] == "ok"
            if mt < mp:
                accepted = float((ok & (attempt <= mt) & (attempt >= 1)).sum())
                tries = float(attempt.clip(upper=mt).sum())
                rule = f"pilot's tries cut at the target's {mt}"
            else:
                retried = attempt >= 2
                retry_tries = float((attempt - 1).clip(lower=0).sum())
                retry_rate = float((ok & retried).sum()) / retry_tries if retry_tries else tout / tin
                left = float(((~ok) & table["reject_reason"].isin(RETRIED) & (attempt == mp)).sum())
                extra = mt - mp
                miss = 1 - retry_rate
                accepted = tout + left * (1 - miss**extra)
                tries = gens + left * sum(miss**j for j in range(extra))
                rule = f"{extra} more tries for the {int(left)} retryable rejections, each accepted at {retry_rate:.2f}"
                warnings.append(
                    f"text.max_attempts {mp} (pilot) -> {mt} (target): acceptance extrapolated ({rule})"
                )
    from tasks.common.config import tiny_lm_refusal

    if tiny_lm_refusal(target):
        warnings.append(
            "the target names no LM (models.lm_path, or text.backend=openai): its text stage would refuse "
            "to run; text figures are the pilot's LM's"
        )
    for key in (
        "text.backend",
        "models.lm",
        "models.lm_path",
        "text.openai.base_model",
        "text.openai.model",
        "text.temperature",
        "text.max_new_tokens",
    ):
        if _get(pilot, key) != _get(target, key):
            warnings.append(
                f"{key}: {_get(pilot, key)!r} (pilot) -> {_get(target, key)!r} (target): text "
                "acceptance and answer lengths are the pilot's"
            )
    rate = accepted / tin
    rate_ci = wilson(accepted, tin)

    c = target.captions
    goal = target.text.target_triplets
    captions = float(c.num_captions)
    triplets = captions * rate
    topped = 0.0
    if goal and triplets < goal and rate > 0:  # flows.target.top_up: shortfall / rate + 10%, in one round
        topped = math.ceil((goal - triplets) / rate * 1.1)
        captions += topped
        triplets = captions * rate
    per_caption_tries = tries / tin
    out = {
        "captions_in": int(captions),
        "captions_topped_up": int(topped),
        "acceptance": _num(rate),
        "acceptance_ci95": [_num(x) for x in rate_ci] if rate_ci else None,
        "acceptance_rule": rule,
        "triplets": _num(triplets),
        "triplets_ci95": (_scaled(rate_ci, captions) if not goal else None),
        "target_triplets": goal,
        "tries_per_caption": _num(per_caption_tries),
        "generations": _num(captions * per_caption_tries),
        "backend": target.text.backend,
        "pilot": {
            "in": tin,
            "out": tout,
            "generation_attempts": gens,
            "partitions": data.partitions.get("text", []),
        },
    }
    if goal and triplets < goal:
        warnings.append(f"text.target_triplets {goal}: not reachable at the pilot's acceptance {rate:.3f}")
    out |= _tokens(target, data, captions * per_caption_tries)
    # local generation time: the pilot's seconds per try
    seconds = sum(float(m.get("timings_s", {}).get("generate", 0.0)) for m in ms)
    wall = sum(float(m.get("wall_time_s", 0.0)) for m in ms)
    out["seconds_per_try"] = _num(seconds / gens) if seconds else None
    out["wall_seconds_per_caption"] = _num(wall / tin) if wall else None
    return out


def _tokens(target: PipelineConfig, data: PilotData, tries: float) -> dict:
    """Prompt / completion tokens per try (chars/4), from the pilot's inputs and answers."""
    from prompts.templates import chat_messages, finetune_prompt

    table = data.triplets
    if table is None or not len(table):
        return {"input_tokens": None, "output_tokens": None, "token_method": None}
    t = target.text
    answered = table[table["attempt"].astype(int) >= 1] if "attempt" in table else table
    answered = answered if len(answered) else table
    if t.backend == "openai" and t.openai.endpoint == "chat":
        prompt_chars = answered["input"].map(lambda s: sum(len(m["content"]) for m in chat_messages(s)))
        overhead = 2 * CHAT_TOKENS_PER_MESSAGE + CHAT_TOKENS_PER_REPLY
    else:
        prompt_chars = answered["input"].map(lambda s: len(finetune_prompt(s)))
        overhead = 0
    prompt = float(prompt_chars.mean()) / CHARS_PER_TOKEN + overhead
    completion = (
        answered["raw_completion"].fillna("").str.len().div(CHARS_PER_TOKEN).clip(upper=t.max_new_tokens)
    )
    per_try = float(completion.mean())
    return {
        "input_tokens_per_try": _num(prompt),
        "output_tokens_per_try": _num(per_try),
        "input_tokens": _num(prompt * tries),
        "output_tokens": _num(per_try * tries),
        "token_method": TOKEN_RULE,
    }


def _finetune_tokens(target: PipelineConfig) -> dict:
    """The openai fine-tune's training tokens: the seed triplets' train split, chars/4, times the epochs."""
    from prompts.templates import chat_example, completion_example
    from seed_annotations.schema import load_triplets, split_train_val

    t = target.text
    try:
        seeds = load_triplets(t.seed_annotations_path())
    except (OSError, ValueError):
        return {}
    train, _ = split_train_val(seeds, t.val_fraction, t.seed)
    if t.openai.endpoint == "chat":
        chars = sum(
            sum(len(m["content"]) for m in chat_example(s.input, s.edit, s.output)["messages"]) for s in train
        )
        chars_tokens = chars / CHARS_PER_TOKEN + len(train) * 3 * CHAT_TOKENS_PER_MESSAGE
    else:
        chars_tokens = sum(
            len(v) for s in train for v in completion_example(s.input, s.edit, s.output).values()
        )
        chars_tokens /= CHARS_PER_TOKEN
    epochs = t.openai.finetune_epochs or target.cost.finetune_epochs_assumed
    return {
        "finetune_examples": len(train),
        "finetune_epochs": epochs,
        "finetune_training_tokens": _num(chars_tokens * epochs),
    }


def _render(
    target: PipelineConfig,
    pilot: PipelineConfig,
    data: PilotData,
    triplets: float,
    triplets_ci: list[float] | None,
    warnings: list[str],
) -> dict:
    ms = data.manifests.get("render", [])
    counts: Counter = Counter()
    for m in ms:
        counts.update(m.get("counts", {}))
    rp, rt = pilot.render, target.render
    n_trip = sum(counts.get(f"triplets_{s}", 0) for s in STATUSES)
    if not n_trip and counts.get("unet_calls_reference"):
        n_trip = counts["unet_calls_reference"] // (rp.samples_per_triplet * rp.steps)
    if not n_trip:
        raise EstimateError(
            "the pilot has no finished render partition with a triplet under its config "
            f"(render/{registry.stage_hash(pilot, 'render')} in {pilot.output_root}): run "
            "`editforge stage render` on a few partitions first"
        )
    for key, (was, now) in _differences(target, pilot, IMAGE_KEYS).items():
        warnings.append(
            f"{key}: {was!r} (pilot) -> {now!r} (target): pass rates and speed are the pilot's, an "
            "extrapolation"
        )
    step_ratio = rt.steps / rp.steps
    per = _per_triplet(data.samples)
    sampling_diff = sampling_differences(target, pilot)
    out: dict[str, Any] = {
        "pilot": {
            "triplets": n_trip,
            "samples": counts.get("samples", 0),
            "unet_calls": counts.get("unet_calls", 0),
            "passed": counts.get("passed", 0),
            "kept": counts.get("out", 0),
            "triplets_with_kept_pair": counts.get("triplets_with_kept_pair", 0),
            "early_rejected": counts.get("early_rejected", 0),
            "triplet_statuses": {s: counts.get(f"triplets_{s}", 0) for s in STATUSES},
            "partitions": data.partitions.get("render", []),
        }
    }
    if not sampling_diff:
        rule = "same sampling policy: the pilot's figures per triplet; UNet calls x target/pilot steps"
        rates = {
            "samples": counts.get("samples", 0) / n_trip,
            "passed": counts.get("passed", 0) / n_trip,
            "kept": counts.get("out", 0) / n_trip,
            "any_kept": counts.get("triplets_with_kept_pair", 0) / n_trip,
            "unet_calls": counts.get("unet_calls", 0) / n_trip * step_ratio,
        }
        per_values = (
            None
            if per is None
            else {
                "unet_calls": per["unet_calls"] * step_ratio,
                "kept": per["kept"],
                "samples": per["samples"],
                "any_kept": per["any_kept"],
            }
        )
        ci = {
            k: mean_interval(None if per_values is None else per_values[k], rates[k])
            for k in ("unet_calls", "kept", "samples")
        }
        ci["any_kept"] = wilson(counts.get("triplets_with_kept_pair", 0), n_trip)
        spread = {k: float(v.std(ddof=1)) for k, v in (per_values or {}).items() if len(v) > 1}
    else:
        rule, rates, ci, spread = _replayed(target, pilot, counts, per, data.samples, sampling_diff, warnings)
    out["rule"] = rule
    out["triplets"] = _num(triplets)
    for name, key in (
        ("samples", "samples"),
        ("passed", "passed"),
        ("kept_pairs", "kept"),
        ("triplets_with_kept_pair", "any_kept"),
        ("unet_calls", "unet_calls"),
    ):
        out[name] = _num(rates[key] * triplets)
        interval = _combined(rates[key], ci.get(key), triplets, triplets_ci)
        if interval is not None:
            out[f"{name}_ci95"] = interval
        out[f"{name}_per_triplet"] = _num(rates[key])
        if key in spread:  # the spread between triplets (a partition of m triplets: sd x sqrt(m))
            out[f"{name}_per_triplet_sd"] = _num(spread[key])
    out["unet_calls_per_kept_pair"] = _num(rates["unet_calls"] / rates["kept"]) if rates["kept"] else None
    out["unet_calls_reference"] = _num(triplets * rt.samples_per_triplet * rt.steps)
    return out


def _combined(
    rate: float, rate_ci: list[float] | None, triplets: float, triplets_ci: list[float] | None
) -> list[float] | None:
    """The interval of rate x triplets: the two relative half-widths (each side) added in quadrature."""
    if rate_ci is None and triplets_ci is None:
        return None
    total = rate * triplets

    def rel(value: float, interval: list[float] | None, side: int) -> float:
        return 0.0 if interval is None or not value else abs(interval[side] - value) / value

    low = math.hypot(rel(rate, rate_ci, 0), rel(triplets, triplets_ci, 0))
    high = math.hypot(rel(rate, rate_ci, 1), rel(triplets, triplets_ci, 1))
    if not total and rate_ci is not None:  # a zero rate: its own interval, scaled
        return _scaled(rate_ci, triplets)
    return [_num(max(0.0, total * (1 - low))), _num(total * (1 + high))]


def _per_triplet(samples: pd.DataFrame | None) -> pd.DataFrame | None:
    """One row per rendered pilot triplet: samples, UNet calls, passed, kept, kept >= 1."""
    if samples is None or not len(samples):
        return None
    g = samples.groupby("caption_id")
    per = pd.DataFrame(
        {
            "samples": g.size(),
            "unet_calls": g["unet_steps"].sum(),
            "passed": g["passed"].sum(),
            "kept": g["kept"].sum(),
        }
    ).astype(float)
    per["any_kept"] = (per["kept"] > 0).astype(float)
    return per


def _replayed(
    target: PipelineConfig,
    pilot: PipelineConfig,
    counts: Counter,
    per: pd.DataFrame | None,
    samples: pd.DataFrame | None,
    diff: dict,
    warnings: list[str],
) -> tuple[str, dict, dict, dict]:
    """Another sampling policy: the target's rounds replayed with each pilot triplet's pass rate."""
    from tasks.common.selection import passes

    rt = target.render
    names = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in diff.items())
    warnings.append(
        f"render sampling differs from the pilot's ({names}): samples, passes and kept pairs are the "
        "target's rounds replayed with the pilot's pass rate per triplet, an extrapolation"
    )
    rates_q: pd.Series
    if samples is not None and len(samples) and "render.keep" in diff:
        early = samples["early_rejected"].astype(bool)
        passed = passes(samples, rt.keep).fillna(False).astype(bool) & ~early
        rates_q = passed.groupby(samples["caption_id"]).mean()
        warnings.append(
            f"render.keep differs: the pilot's samples are re-judged by the target's thresholds "
            f"({int(passed.sum())} of {len(samples)} pass them)"
        )
    elif per is not None:
        rates_q = per["passed"] / per["samples"]
    else:
        total = counts.get("samples", 0)
        rates_q = pd.Series([counts.get("passed", 0) / total if total else 0.0])
        warnings.append("no samples table: one pooled pass rate for every triplet (no per-triplet variation)")
    policy = SamplingPolicy.from_config(target)
    top_k = rt.keep.top_k
    cache: dict[float, dict[str, float]] = {}
    rows = []
    for q in rates_q.round(6):
        if q not in cache:
            cache[q] = replay(policy, float(q), top_k)
        rows.append(cache[q])
    frame = pd.DataFrame(rows)
    # early rejection: the pilot's share of failing samples dropped, when the pilot used the target's
    failing_pilot = counts.get("samples", 0) - counts.get("passed", 0)
    after = early_steps(target)
    drop = 0.0
    if after is not None:
        early_keys = ("render.early_reject.at", "render.early_reject.margin", "render.early_reject.metrics")
        if (
            not sampling_differences(target, pilot, early_keys)
            and early_steps(pilot) is not None
            and failing_pilot
        ):
            drop = counts.get("early_rejected", 0) / failing_pilot
        else:
            warnings.append(
                "early rejection: the pilot did not measure the target's, so no failing sample is assumed "
                "dropped early (an upper bound on UNet calls; editforge calibrate-early measures it)"
            )
    failing_cost = drop * (after or rt.steps) + (1 - drop) * rt.steps
    frame["unet_calls"] = frame["passed"] * rt.steps + (frame["samples"] - frame["passed"]) * failing_cost
    rates = {k: float(frame[k].mean()) for k in ("samples", "passed", "kept", "any_kept", "unet_calls")}
    ci = {k: mean_interval(frame[k], rates[k]) for k in rates}
    spread = {k: float(frame[k].std(ddof=1)) for k in rates if len(frame) > 1}
    rule = (
        f"target policy replayed (max {policy.max_samples}, rounds {policy.round_size}, target_passed "
        f"{policy.target_passed}, give_up_after {policy.give_up_after}, top_k {top_k}) with "
        f"{len(rates_q)} pilot pass rate(s); failing samples dropped early: {drop:.2f}"
    )
    return rule, rates, ci, spread


def _speed(
    target: PipelineConfig,
    pilot: PipelineConfig,
    data: PilotData,
    override: float | None,
    warnings: list[str],
) -> dict:
    ms = data.manifests.get("render", [])
    timed = [m for m in ms if figures(m).get("unet_calls_this_run") and m.get("timings_s", {}).get("render")]
    calls = sum(
        int(figures(m)["unet_calls_this_run"]) for m in timed
    )  # a resumed partition: what this run rendered
    seconds = sum(float(m["timings_s"]["render"]) for m in timed)
    wall = sum(float(m.get("wall_time_s", 0.0)) for m in timed)
    measured = calls / seconds if seconds else None
    wall_rate = calls / wall if wall else None
    if override is not None:
        rate, source = override, "--unet-calls-per-s"
        wall_rate = wall_rate * override / measured if wall_rate and measured else None
    else:
        rate, source = measured, "pilot render seconds"
        if rate is None:
            warnings.append(
                "the pilot's render partitions record no render time (all resumed or skipped?): no hours; "
                "give --unet-calls-per-s"
            )
        elif pilot.render.device == "cpu" and target.render.device != "cpu":
            warnings.append(
                f"the pilot rendered on the CPU ({rate:.3g} UNet calls/s) and the target asks for "
                f"render.device={target.render.device}: give --unet-calls-per-s measured on that GPU"
            )
        if rate is not None and pilot.render.batch_samples != target.render.batch_samples:
            warnings.append(
                f"render.batch_samples {pilot.render.batch_samples!r} (pilot) -> "
                f"{target.render.batch_samples!r} (target): the speed is the pilot's"
            )
    return {
        "unet_calls_per_s": _num(rate),
        "unet_calls_per_s_source": source,
        "unet_calls_per_s_measured": _num(measured),
        "unet_calls_per_s_wall": _num(wall_rate),
        "render_seconds_measured": _num(seconds),
        "unet_calls_timed": calls,
    }


def _cpu_stage(data: PilotData, stage: str, unit: str, amount: float) -> dict:
    ms = data.manifests.get(stage, [])
    wall = sum(float(m.get("wall_time_s", 0.0)) for m in ms)
    done = _sum(ms, unit)
    per = wall / done if done else None
    return {
        "items": _num(amount),
        "item": unit,
        "wall_seconds_per_item": _num(per),
        "hours": _num(per * amount / 3600) if per is not None else None,
    }


# ------------------------------------------------------------------------------------------ the estimate


def predict(
    target: PipelineConfig,
    pilot: PipelineConfig,
    data: PilotData,
    *,
    unet_calls_per_s: float | None = None,
    gpus: int = 1,
) -> dict:
    """The estimate (a JSON-ready dict) of ``target`` from what was measured on ``pilot`` (``data``)."""
    warnings: list[str] = []
    resources = registry.stage_resources(target)
    prices = target.cost
    text = _text(target, pilot, data, warnings)
    triplets = float(text["triplets"] or 0)
    render = _render(target, pilot, data, triplets, text["triplets_ci95"], warnings)
    speed = _speed(target, pilot, data, unet_calls_per_s, warnings)
    render |= speed
    rate, wall_rate = speed["unet_calls_per_s"], speed["unet_calls_per_s_wall"]
    per_part = target.captions.num_captions / target.captions.num_partitions
    partitions = max(1, math.ceil(text["captions_in"] / per_part))
    device = "gpu" if resources["render"].gpus else "cpu"
    render["device"] = device
    render["hours"] = _num(render["unet_calls"] / rate / 3600) if rate else None
    render["hours_ci95"] = (
        _scaled(render["unet_calls_ci95"], 1 / rate / 3600)
        if rate and render.get("unet_calls_ci95")
        else None
    )
    render["hours_wall"] = _num(render["unet_calls"] / wall_rate / 3600) if wall_rate else None
    render["partitions"] = partitions
    if render["hours"] is not None:
        per_hours = render["hours"] / partitions
        render["hours_per_partition"] = _num(per_hours)
        render["elapsed_hours"] = _num(math.ceil(partitions / gpus) * per_hours)

    # text: GPU time locally, tokens on the API
    text_device = "gpu" if resources["text"].gpus else "cpu"
    text["device"] = "api" if target.text.backend == "openai" else text_device
    text["hours"] = None
    if target.text.backend == "local":
        if pilot.text.backend != "local":
            warnings.append(
                "text: the pilot used the openai backend, the target the local one: no generation time"
            )
        elif text.get("seconds_per_try"):
            text["hours"] = _num(text["generations"] * text["seconds_per_try"] / 3600)
    else:
        text |= _finetune_tokens(target)
        if target.cost.text_price_model not in {target.text.openai.base_model, target.text.openai.model}:
            warnings.append(
                f"cost.text_*: the prices are for {target.cost.text_price_model!r}, the target uses "
                f"{target.text.openai.model or target.text.openai.base_model!r}: set cost.text_* for it"
            )
    captions = _cpu_stage(data, "captions", "out", text["captions_in"])
    filter_ms = data.manifests.get("filter", [])
    render_kept_pilot = render["pilot"]["kept"]
    filter_ratio = _sum(filter_ms, "out") / render_kept_pilot if filter_ms and render_kept_pilot else 1.0
    if _differences(target, pilot, ("filter",)):
        warnings.append(
            "filter settings differ from the pilot's: its kept / render kept ratio is the pilot's"
        )
    filter_stage = _cpu_stage(data, "filter", "in", render["samples"] or 0)
    filter_stage["kept_pairs"] = _num((render["kept_pairs"] or 0) * filter_ratio)
    pack = _cpu_stage(data, "pack", "in", filter_stage["kept_pairs"] or 0)
    _source_check(target, pilot, data, text["captions_in"], warnings)

    usd: dict[str, float | None] = {}
    hours = {"gpu": 0.0, "cpu": 0.0}

    def bill(stage: str, device: str, h: float | None) -> None:
        if h is None:
            usd[stage] = None
            return
        hours[device if device in hours else "cpu"] += h
        usd[stage] = _num(h * (prices.gpu_hour_usd if device == "gpu" else prices.cpu_hour_usd))

    bill("captions", "cpu", captions["hours"])
    if target.text.backend == "local":
        bill("text", text["device"], text["hours"])
    else:
        discount = prices.batch_discount if target.text.openai.mode == "batch" else 1.0
        money = None
        if text.get("input_tokens") is not None:
            money = (
                (
                    text["input_tokens"] * prices.text_input_per_mtok_usd
                    + text["output_tokens"] * prices.text_output_per_mtok_usd
                )
                / 1e6
                * discount
            )
        usd["text"] = _num(money)
        if text.get("finetune_training_tokens") is not None:
            usd["finetune"] = _num(text["finetune_training_tokens"] * prices.text_training_per_mtok_usd / 1e6)
    bill("render", device, render["hours"])
    bill("filter", "cpu", filter_stage["hours"])
    bill("pack", "cpu", pack["hours"])
    stages = {"captions": captions, "text": text, "render": render, "filter": filter_stage, "pack": pack}
    if (
        target.judges.vlm.enabled
    ):  # the VLM judge: its measured cost per kept pair, for the kept pairs predicted
        stages["judge"] = _judge(target, data, filter_stage["kept_pairs"], warnings)
        usd["judge"] = stages["judge"].get("projected_cost_usd")
    known = [v for v in usd.values() if v is not None]
    return {
        "target": _describe(target),
        "pilot": _describe(pilot)
        | {"partitions": data.partitions, "not_finished": {k: v for k, v in data.not_finished.items() if v}},
        "warnings": warnings,
        "stages": stages,
        "totals": {
            "gpu_hours": _num(hours["gpu"]),
            "cpu_hours": _num(hours["cpu"]),
            "render_elapsed_hours": render.get("elapsed_hours"),
            "gpus": gpus,
            "usd": _num(sum(known)) if known else None,
            "usd_by_stage": usd,
            "usd_incomplete": [k for k, v in usd.items() if v is None],
        },
        "prices": prices.model_dump(mode="json"),
        "not_included": [
            "the training flow (editforge train)",
            "the local fine-tune (one partition; its time is the pilot's finetune wall_time_s)",
            "storage and egress",
        ],
    }


def _judge(target: PipelineConfig, data: PilotData, kept_pairs: float | None, warnings: list[str]) -> dict:
    """The VLM judge's tokens and money (tasks.judge.cost) from the pilot's judge and filter manifests,
    projected for the kept pairs predicted."""
    from tasks.judge.cost import estimate as judge_cost

    judged, filtered = data.manifests.get("judge", []), data.manifests.get("filter", [])
    if not any(m.get("counts", {}).get("vlm_judged") for m in judged) or not filtered:
        warnings.append(
            "judges.vlm.enabled: the pilot judged nothing (run it with the VLM rung on): the judge's "
            "cost is not included"
        )
        return {"judged": 0, "projected_cost_usd": None}
    if target.judges.vlm.model not in {figures(m).get("vlm_model") for m in judged} - {None}:
        warnings.append(
            f"judges.vlm.model: the pilot's judge tokens are priced for {target.judges.vlm.model!r}"
        )
    return judge_cost(judged, filtered, round(kept_pairs or 0))


def _describe(cfg: PipelineConfig) -> dict:
    return {
        "name": cfg.name,
        "output_root": cfg.output_root,
        "hashes": {s.name: registry.stage_hash(cfg, s.name) for s in registry.chain()},
    }


def _source_check(
    target: PipelineConfig, pilot: PipelineConfig, data: PilotData, captions: float, warnings: list[str]
) -> None:
    """Warn when the target reads the pilot's source and that source holds fewer captions than needed."""
    if not data.generations or target.captions.source != pilot.captions.source:
        return
    if registry.stage_hash(target, "captions") != registry.stage_hash(pilot, "captions"):
        return
    eligible = data.generations[-1].get("counts", {}).get("rows_accepted")
    if eligible is not None and captions > eligible:
        warnings.append(
            f"captions.source {target.captions.source!r} holds {eligible} eligible captions; the target "
            f"needs {int(captions)}: point captions.source at the full LAION files"
        )


def estimate(
    target: PipelineConfig,
    pilot: PipelineConfig | None = None,
    *,
    partitions: list[int] | None = None,
    unet_calls_per_s: float | None = None,
    gpus: int = 1,
) -> dict:
    """Read the pilot run (default: the target itself) and predict the target (see the module doc)."""
    pilot = pilot or target
    data = read_pilot(pilot, partitions)
    if not data.manifests.get("render") or not data.manifests.get("text"):
        chosen = f" among partitions {partitions}" if partitions is not None else ""
        raise EstimateError(
            f"no finished text and render partitions{chosen} under the pilot config '{pilot.name}' "
            f"in {pilot.output_root} (text/{registry.stage_hash(pilot, 'text')}, "
            f"render/{registry.stage_hash(pilot, 'render')}): run a few partitions first "
            "(editforge run, or editforge stage ... --partitions 0) or point --from-preset/--from-set "
            "at a finished run"
        )
    return predict(target, pilot, data, unet_calls_per_s=unet_calls_per_s, gpus=gpus)


def default_json_url(target: PipelineConfig) -> str:
    return storage.url_join(target.output_root, f"estimate-{target.name}.json")
