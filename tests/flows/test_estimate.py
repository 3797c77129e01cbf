"""`editforge estimate`: the scaling rules on hand-made manifests, then a pilot partition of a real demo
run predicting the partition held out, and the command line."""

import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks import registry
from tasks.common.config import load_config
from tasks.estimate.model import PilotData, estimate, predict, replay, wilson
from tasks.render.scheduling import SamplingPolicy

runner = CliRunner()


# ---------------------------------------------------------------------------- rules, no flows (unit)


def _manifests(
    text_in=10,
    text_out=8,
    triplets=8,
    samples=32,
    unet_calls=300,
    passed=20,
    kept=16,
    with_kept=7,
    seconds=10.0,
):
    return {
        "captions": [{"counts": {"out": text_in}, "wall_time_s": 0.1}],
        "text": [
            {"counts": {"in": text_in, "out": text_out}, "timings_s": {"generate": 2.0}, "wall_time_s": 3.0}
        ],
        "render": [
            {
                "counts": {
                    "samples": samples,
                    "unet_calls": unet_calls,
                    "passed": passed,
                    "out": kept,
                    "triplets_with_kept_pair": with_kept,
                    "triplets_satisfied": triplets - 2,
                    "triplets_exhausted": 2,
                    "triplets_gave_up": 0,
                },
                "timings_s": {"render": seconds},
                "unet_calls_this_run": unet_calls,
                "wall_time_s": 2 * seconds,
            }
        ],
        "filter": [{"counts": {"in": samples, "out": kept}, "wall_time_s": 0.5}],
        "pack": [{"counts": {"in": kept, "out": kept}, "wall_time_s": 0.5}],
    }


def test_same_policy_scales_per_triplet_and_by_the_step_ratio():
    pilot = load_config("demo", ["render.steps=10"])
    target = load_config("demo", ["render.steps=20", "captions.num_captions=100"])
    est = predict(target, pilot, PilotData(_manifests()))
    text, render = est["stages"]["text"], est["stages"]["render"]
    assert text["acceptance"] == 0.8 and text["triplets"] == 80  # 100 captions x 8/10
    assert render["rule"].startswith("same sampling policy")
    assert render["unet_calls"] == pytest.approx(
        300 / 8 * 20 / 10 * 80
    )  # per triplet x step ratio x triplets
    assert render["kept_pairs"] == pytest.approx(16 / 8 * 80) and render["samples"] == pytest.approx(
        32 / 8 * 80
    )
    assert render["triplets_with_kept_pair"] == pytest.approx(7 / 8 * 80)
    # its interval: Wilson on 7 of 8 triplets and on 8 of 10 captions accepted, relative half-widths in quadrature
    (w_lo, w_hi), (a_lo, a_hi) = wilson(7, 8), wilson(8, 10)
    lo, hi = render["triplets_with_kept_pair_ci95"]
    assert lo == pytest.approx(70 * (1 - math.hypot(1 - w_lo / 0.875, 1 - a_lo / 0.8)), rel=1e-3)
    assert hi == pytest.approx(70 * (1 + math.hypot(w_hi / 0.875 - 1, a_hi / 0.8 - 1)), rel=1e-3)
    # GPU-hours: UNet calls over the pilot's UNet calls per render second; --unet-calls-per-s replaces the rate
    assert render["unet_calls_per_s"] == 30.0 and render["hours"] == pytest.approx(6000 / 30 / 3600, rel=1e-3)
    assert render["hours_wall"] == pytest.approx(6000 / 15 / 3600, rel=1e-3)
    faster = predict(target, pilot, PilotData(_manifests()), unet_calls_per_s=300.0)["stages"]["render"]
    assert faster["hours"] == pytest.approx(render["hours"] / 10, rel=1e-3)
    assert any("render.steps" in w and "extrapolation" in w for w in est["warnings"])
    assert not predict(pilot, pilot, PilotData(_manifests()))["warnings"]  # the same config: nothing to warn
    # demo renders on the CPU: CPU-hours priced per CPU-hour, and the totals add up
    assert render["device"] == "cpu"
    usd = est["totals"]["usd_by_stage"]
    assert usd["render"] == pytest.approx(render["hours"] * target.cost.cpu_hour_usd, rel=1e-3)
    assert est["totals"]["usd"] == pytest.approx(sum(usd.values()), rel=1e-3)


def test_replay_of_a_sampling_policy_matches_hand_counts():
    fixed = SamplingPolicy.from_config(
        load_config(
            "demo", ["render.adaptive.enabled=false", "render.samples_per_triplet=4", "render.keep.top_k=2"]
        )
    )
    r = replay(fixed, 0.5, 2)  # Binomial(4, 1/2): kept = min(2, passed)
    assert r["samples"] == 4 and r["passed"] == pytest.approx(2)
    assert r["kept"] == pytest.approx(2 - 2 * 1 / 16 - 4 / 16) and r["any_kept"] == pytest.approx(15 / 16)
    adaptive = SamplingPolicy.from_config(
        load_config("demo", ["render.samples_per_triplet=4"])
    )  # rounds of 2, stop at 2 passed
    q = 0.3
    r = replay(adaptive, q, 2)
    assert r["samples"] == pytest.approx(2 * q * q + 4 * (1 - q * q))
    assert replay(adaptive, 0.0, 2)["any_kept"] == 0 and replay(adaptive, 1.0, 2)["samples"] == 2


@pytest.mark.parametrize("preset", ["demo", "paper", "fast", "turbo"])
def test_the_sampling_signature_is_the_render_plans_policy(preset):
    from tasks.estimate.model import sampling_signature

    cfg = load_config(preset)
    sig, policy = sampling_signature(cfg), SamplingPolicy.from_config(cfg)
    assert (
        sig["render.samples_per_triplet"],
        sig["render.adaptive.round_size"],
        sig["render.adaptive.target_passed"],
        sig["render.adaptive.give_up_after"],
    ) == (policy.max_samples, policy.round_size, policy.target_passed, policy.give_up_after)


def test_another_policy_is_replayed_with_each_triplets_pass_rate_and_warned():
    pilot = load_config("demo", ["render.samples_per_triplet=4"])  # adaptive, rounds of 2
    target = load_config(
        "demo",
        ["render.samples_per_triplet=4", "render.adaptive.enabled=false", "render.early_reject.at=null"],
    )
    # two triplets: one whose 2 samples both passed (rate 1), one that passed none of 4 (rate 0)
    samples = pd.DataFrame(
        {
            "caption_id": ["a", "a", "b", "b", "b", "b"],
            "unet_steps": [10, 10, 10, 5, 10, 5],
            "passed": [True, True, False, False, False, False],
            "kept": [True, True, *[False] * 4],
            "early_rejected": [False, False, False, True, False, True],
        }
    )
    data = PilotData(
        _manifests(triplets=2, samples=6, unet_calls=50, passed=2, kept=2, with_kept=1), samples=samples
    )
    render = predict(target, pilot, data)["stages"]["render"]
    assert render["rule"].startswith("target policy replayed")
    assert render["samples_per_triplet"] == 4  # fixed 4 samples, no early rejection: 4 x 10 steps
    assert render["unet_calls_per_triplet"] == 40
    assert render["kept_pairs_per_triplet"] == 1 and render["triplets_with_kept_pair_per_triplet"] == 0.5
    warnings = predict(target, pilot, data)["warnings"]
    assert any("render sampling differs" in w and "render.adaptive.round_size" in w for w in warnings)


def test_a_triplet_target_tops_the_captions_up_as_the_flow_does():
    cfg = load_config("demo", ["captions.num_captions=50", "text.target_triplets=100"])
    text = predict(cfg, cfg, PilotData(_manifests()))["stages"]["text"]
    topped = math.ceil((100 - 50 * 0.8) / 0.8 * 1.1)  # flows.target.top_up
    assert text["captions_topped_up"] == topped and text["captions_in"] == 50 + topped
    assert text["triplets"] == pytest.approx((50 + topped) * 0.8)


def test_fewer_tries_cut_each_captions_history_and_tokens_follow_the_answers():
    pilot = load_config("demo", ["text.max_attempts=3"])
    target = load_config("demo", ["text.max_attempts=1", "captions.num_captions=4"])
    triplets = pd.DataFrame(
        {
            "input": ["a cat"] * 4,
            "raw_completion": ["make it red\n%%\na red cat"] * 4,
            "status": ["ok", "ok", "ok", "rejected"],
            "reject_reason": [None, None, None, "unparseable"],
            "attempt": [1, 2, 3, 3],
        }
    )
    m = _manifests(text_in=4, text_out=3)
    m["text"][0]["counts"]["generation_attempts"] = 9
    text = predict(target, pilot, PilotData(m, triplets=triplets))["stages"]["text"]
    assert text["acceptance"] == 0.25 and text["tries_per_caption"] == 1  # only the first-try answer counts
    # tokens: chars/4 of the completion prompt "{input}\n##\n" and the answer, one try per caption
    assert text["input_tokens_per_try"] == len("a cat\n##\n") / 4
    assert text["output_tokens_per_try"] == len("make it red\n%%\na red cat") / 4
    assert text["input_tokens"] == pytest.approx(4 * len("a cat\n##\n") / 4)


def test_the_openai_backend_is_priced_per_token_and_batch_halves_it():
    cfg = load_config("demo", ["text.backend=openai", "captions.num_captions=1000"])
    triplets = pd.DataFrame(
        {
            "input": ["a cat"] * 10,
            "raw_completion": ["x" * 40] * 10,
            "status": ["ok"] * 10,
            "reject_reason": [None] * 10,
            "attempt": [1] * 10,
        }
    )
    data = PilotData(_manifests(), triplets=triplets)
    online = predict(cfg, cfg, data)["stages"]["text"], predict(cfg, cfg, data)["totals"]["usd_by_stage"]
    text, usd = online
    assert text["output_tokens"] == pytest.approx(1000 * 10) and text["device"] == "api"
    assert usd["text"] == pytest.approx(
        (text["input_tokens"] * 0.30 + text["output_tokens"] * 1.20) / 1e6, rel=1e-3
    )
    assert usd["finetune"] == pytest.approx(text["finetune_training_tokens"] * 3.0 / 1e6, rel=1e-3)
    batch = load_config(
        "demo", ["text.backend=openai", "captions.num_captions=1000", "text.openai.mode=batch"]
    )
    assert predict(batch, batch, data)["totals"]["usd_by_stage"]["text"] == pytest.approx(
        usd["text"] / 2, rel=1e-3
    )


def test_prices_are_operational_and_in_no_stage_hash():
    base = load_config("paper")
    priced = load_config(
        "paper", ["cost.gpu_hour_usd=9", "cost.text_input_per_mtok_usd=1", "cost.batch_discount=1"]
    )
    assert all(registry.stage_hash(base, s) == registry.stage_hash(priced, s) for s in registry.STAGES)


# ----------------------------------------------------------- a real demo run: partition 0 predicts 1 (flow)

SMALL = [
    "captions.num_captions=48",
    "text.batch_size=12",
    "render.steps=4",
    "render.keep.clip_direction_threshold=0.05",
    "render.samples_per_triplet=6",
]  # the demo's thresholds, adaptive rounds of 2 and early rejection stay


@pytest.fixture(scope="module")
def demo_run(prefect_harness, tmp_path_factory):
    from flows.generate import generate

    root = tmp_path_factory.mktemp("estimate-demo")
    overrides = [f"output_root={root}", "name=estimate-test", *SMALL]
    generate("demo", overrides)
    return root, overrides


@pytest.mark.flow
def test_partition_0_predicts_partition_1(demo_run):
    root, overrides = demo_run
    cfg = load_config("demo", overrides)
    assert registry.partition_ids(cfg, "render") == [0, 1]
    est = estimate(cfg, cfg, partitions=[0])
    assert est["pilot"]["partitions"]["render"] == [0] and not est["warnings"]
    render = est["stages"]["render"]
    held_out = registry.manifests(cfg, "render", [1])[1]["counts"]
    m = sum(held_out[f"triplets_{s}"] for s in ("satisfied", "gave_up", "exhausted"))
    n = render["pilot"]["triplets"]
    report = {}
    for figure, actual in (("unet_calls", held_out["unet_calls"]), ("kept_pairs", held_out["out"])):
        predicted = render[f"{figure}_per_triplet"] * m
        # the error of a sum over m new triplets predicted from a mean over n: sd x sqrt(m (1 + m / n))
        sigma = render[f"{figure}_per_triplet_sd"] * math.sqrt(m * (1 + m / n))
        report[figure] = (predicted, actual, sigma)
        print(
            f"{figure}: predicted {predicted:.1f} for partition 1 ({m} triplets, pilot {n}), actual {actual}, "
            f"error {predicted - actual:+.1f} ({(predicted - actual) / actual:+.1%}), sigma {sigma:.1f}"
        )
    for figure, (predicted, actual, sigma) in report.items():
        assert abs(predicted - actual) <= 2 * sigma, figure  # within the 95% prediction interval
    # and UNet calls within 25% (kept pairs of 16 triplets through three rungs vary more: 2 sigma is ~50% there)
    assert abs(report["unet_calls"][0] - report["unet_calls"][1]) <= 0.25 * report["unet_calls"][1]
    # the whole run: the pilot's rates over every caption of the config
    assert est["stages"]["text"]["captions_in"] == 48
    assert render["hours"] > 0 and est["totals"]["usd"] > 0


@pytest.mark.flow
def test_cli_writes_the_json_and_prints_the_table(demo_run, tmp_path):
    root, overrides = demo_run
    out = tmp_path / "estimate.json"
    args = [
        "estimate",
        "--preset",
        "demo",
        *sum((["--set", o] for o in overrides), []),
        "--partitions",
        "0",
        "--json",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "UNet calls" in result.output and f"wrote {out}" in result.output
    est = json.loads(out.read_text())
    assert set(est) >= {"target", "pilot", "warnings", "stages", "totals", "prices"}
    assert set(est["stages"]) == {"captions", "text", "render", "filter", "pack"}
    assert {"unet_calls", "unet_calls_ci95", "kept_pairs", "hours", "triplets_with_kept_pair"} <= set(
        est["stages"]["render"]
    )
    assert est["pilot"]["overrides"] == overrides and est["target"]["preset"] == "demo"
    # the default JSON path, and a paper target from the demo pilot (an extrapolation: warned)
    paper_root = tmp_path / "paper"
    result = runner.invoke(
        app,
        [
            "estimate",
            "--preset",
            "paper",
            "--set",
            f"output_root={paper_root}",
            "--from-preset",
            "demo",
            *sum((["--from-set", o] for o in overrides), []),
            "--unet-calls-per-s",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    paper = json.loads((paper_root / "estimate-paper.json").read_text())
    assert (
        paper["stages"]["text"]["triplets"] >= 454445 and paper["stages"]["render"]["unet_calls_per_s"] == 200
    )
    assert any("models.diffusion" in w for w in paper["warnings"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--from-preset", "nope"], "unknown preset 'nope'"),
        (["--set", "render.stepz=3"], "render.stepz"),
        (["--partitions", "3-1"], "ends before it starts"),
        (["--unet-calls-per-s", "0"], "a rate above 0"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, needle, tmp_path):
    result = runner.invoke(app, ["estimate", "--set", f"output_root={tmp_path}", *args])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert "Traceback" not in result.output


def test_no_pilot_run_exits_2_saying_what_to_run(tmp_path):
    result = runner.invoke(app, ["estimate", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no finished text and render partitions"), (
        result.output
    )
    assert not (tmp_path / "estimate-demo.json").exists()
    # a pilot named by its preset alone reads that preset's own output_root
    result = runner.invoke(
        app,
        [
            "estimate",
            "--preset",
            "paper",
            "--set",
            f"output_root={tmp_path}",
            "--from-preset",
            "demo",
            "--from-set",
            f"output_root={tmp_path / 'none'}",
        ],
    )
    assert result.exit_code == 2 and f"'demo' in {tmp_path / 'none'}" in result.output, result.output
