"""bench/render_throughput.py's measured mode: per-triplet pass rates from a render's samples.parquet (by edit
kind when known) beside the synthetic what-if curves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(path: Path) -> Path:
    rows = []
    cases = {
        "aaaa": (
            "a red circle on a black background, flat style",
            "a blue circle on a black background, flat style",
            3,
        ),
        "bbbb": (
            "a red circle on a black background, flat style",
            "a red circle on a pink background, flat style",
            1,
        ),
        "cccc": (
            "a red circle on a black background, flat style",
            "a red circle on a black background, striped style",
            0,
        ),
    }
    for cid, (a, b, passed) in cases.items():
        rows += [
            {"caption_id": cid, "input": a, "output": b, "passed": i < passed, "attention": "ip2p"}
            for i in range(4)
        ]
        rows += [
            {"caption_id": cid, "input": a, "output": b, "passed": True, "attention": "none"}
            for _ in range(4)
        ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_measured_pass_rates_per_triplet_and_kind(tmp_path):
    bench = _bench("render_throughput")
    rates = bench.measured_pass_rates([str(_samples(tmp_path / "s.parquet"))]).set_index("caption_id")
    assert rates["pass_rate"].to_dict() == {
        "aaaa": 0.75,
        "bbbb": 0.25,
        "cccc": 0.0,
    }  # the attention=none rows left out
    assert rates["kind"].to_dict() == {"aaaa": "colour", "bbbb": "background", "cccc": "style"}


@pytest.mark.component
def test_render_throughput_adds_measured_curves(tmp_path):
    bench = _bench("render_throughput")
    out = tmp_path / "rt.json"
    assert (
        bench.main(
            [
                "--skip-throughput",
                "--sim-triplets",
                "24",
                "--pass-rates",
                "0.1",
                "--hopeless",
                "0",
                "--max-samples",
                "16",
                "--measured-pass-rates",
                str(_samples(tmp_path / "s.parquet")),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    measured = {row["kind"]: row for row in result["unet_calls"]["curves"]["measured"]}
    assert set(measured) == {"all", "background", "colour", "style"}
    assert measured["style"]["hopeless_share"] == 1.0 and measured["style"]["fixed_100"]["kept"] == 0
    assert (
        measured["colour"]["adaptive"]["unet_calls_per_kept_pair"]
        < measured["colour"]["fixed_100"]["unet_calls_per_kept_pair"]
    )
    assert "hopeless_0" in result["unet_calls"]["curves"]  # the synthetic what-if stays
    assert result["unet_calls"]["assumptions"]["measured_pass_rates"]["triplets"] == 3


def _branched_samples(path: Path) -> Path:
    """Independent rows and p-branching rows (arm=branches_2): triplet aaaa's seeds pass in one branch of two,
    bbbb's never."""
    rows = []
    a, b = "a red circle on a black background, flat style", "a blue circle on a black background, flat style"
    for cid, passing in (("aaaa", True), ("bbbb", False)):
        rows += [
            {
                "caption_id": cid,
                "input": a,
                "output": b,
                "seed": s,
                "branch": 0,
                "p2p_p": 0.5,
                "passed": passing and s % 2 == 0,
                "attention": "ip2p",
                "arm": "independent",
            }
            for s in range(4)
        ]
        rows += [
            {
                "caption_id": cid,
                "input": a,
                "output": b,
                "seed": 100 + s,
                "branch": br,
                "p2p_p": 0.3 + 0.4 * br,
                "passed": passing and br == 1,
                "attention": "ip2p",
                "arm": "branches_2",
            }
            for s in range(2)
            for br in range(2)
        ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_measured_trees_are_the_branched_arms_seeds(tmp_path):
    bench = _bench("render_throughput")
    path = str(_branched_samples(tmp_path / "b.parquet"))
    rates = bench.measured_pass_rates([path]).set_index("caption_id")["pass_rate"].to_dict()
    assert rates == {"aaaa": 0.5, "bbbb": 0.0}  # the independent arm only
    trees = bench.measured_trees([path], 2)
    assert sorted(trees) == ["aaaa", "bbbb"] and len(trees["aaaa"]) == 2
    ps, passed = trees["aaaa"][0]
    assert list(ps) == [0.3, 0.7] and list(passed) == [False, True]
    assert bench.measured_trees([path], 4) == {}


@pytest.mark.component
def test_render_throughput_replays_measured_trees_for_branching_policies(tmp_path):
    bench = _bench("render_throughput")
    out = tmp_path / "rt.json"
    assert (
        bench.main(
            [
                "--skip-throughput",
                "--skip-branching",
                "--sim-triplets",
                "16",
                "--pass-rates",
                "0.1",
                "--hopeless",
                "0",
                "--max-samples",
                "16",
                "--round-size",
                "4",
                "--top-k",
                "1",
                "--branches",
                "2",
                "--measured-pass-rates",
                str(_branched_samples(tmp_path / "b.parquet")),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    row = next(r for r in result["unet_calls"]["curves"]["measured"] if r["kind"] == "all")
    branched, alone = row["adaptive_branches_2"], row["adaptive"]
    # aaaa keeps its pair either way, bbbb never does; a tree of 2 branches costs less than 2 independent seeds
    assert (
        branched["triplets_with_kept"]
        == alone["triplets_with_kept"]
        == row["fixed_100"]["triplets_with_kept"]
    )
    assert branched["triplets_with_kept_vs_fixed_100"] == 1.0
    assert branched["unet_calls"] < row["fixed_100_branches_2"]["unet_calls"] < row["fixed_100"]["unet_calls"]
    assert branched["ratio_vs_fixed_100"] < 1
    goals = result["goals"]["measured_5x_fewer_calls_per_kept_pair_le_5pct_fewer_triplets"]
    assert set(goals) >= {"adaptive", "adaptive_branches_2", "adaptive_give_up_branches_2"}
    # at posterior rates bbbb (0 of 4) is no longer hopeless: fixed-100 finds it a pair now and then
    posterior = next(r for r in result["unet_calls"]["curves"]["measured_posterior"] if r["kind"] == "all")
    assert posterior["fixed_100"]["triplets_with_kept"] >= row["fixed_100"]["triplets_with_kept"]
    assert "adaptive_branches_2" not in posterior


def test_beta_prior_takes_the_binomial_noise_out_of_the_spread():
    bench = _bench("render_throughput")
    # every triplet at the same true rate: the spread is binomial noise only -> the flat prior
    same = pd.DataFrame({"pass_rate": [0.25, 0.5, 0.25, 0.5], "samples": [4, 4, 4, 4]})
    assert bench.beta_prior(same) == (1.0, 1.0)
    # half never pass, half always: a U-shaped prior with the measured mean
    split = pd.DataFrame({"pass_rate": [0.0, 1.0] * 10, "samples": [16] * 20})
    a, b = bench.beta_prior(split)
    assert a < 1 and b < 1 and a / (a + b) == pytest.approx(0.5)


def _sweep_rows() -> pd.DataFrame:
    """Two triplets x 3 seeds in three arms from the same noise: with p the direction falls and SSIM rises;
    p=0.8's first sample fails the direction check that it passes at p=0.2 and without sharing."""
    rows = []
    a, b = "a red circle on a black background, flat style", "a blue circle on a black background, flat style"
    for arm, p in (("none", None), ("p=0.2", 0.2), ("p=0.8", 0.8)):
        shift = 0.0 if p is None else p
        for t, cid in enumerate(("aaaa", "bbbb")):
            for s in range(3):
                direction = 0.40 - 0.2 * shift + 0.01 * s
                rows.append(
                    {
                        "caption_id": cid,
                        "seed": 10 * t + s,
                        "arm": arm,
                        "p": np.nan if p is None else p,
                        "input": a,
                        "output": b,
                        "kind": "colour",
                        "clip_sim_image": 0.6 + 0.1 * shift,
                        "clip_sim_dir": direction,
                        "clip_sim_0": 0.3,
                        "clip_sim_1": 0.3,
                        "ssim": 0.5 + 0.2 * shift + 0.01 * s,
                        "rmse": 0.2 - 0.05 * shift,
                        "unet_steps": 20,
                    }
                )
    df = pd.DataFrame(rows)
    limits = {"clip_sim_image": 0.55, "clip_sim_0": 0.2, "clip_sim_1": 0.2, "clip_sim_dir": 0.245}
    for check, m in (("image", "clip_sim_image"), ("caption_0", "clip_sim_0"), ("caption_1", "clip_sim_1")):
        df[f"check_{check}"] = df[m] >= limits[m]
    df["check_direction"] = df["clip_sim_dir"] >= limits["clip_sim_dir"]
    df["check_filter"] = df[[f"check_{c}" for c in ("image", "caption_0", "caption_1", "direction")]].all(
        axis=1
    )
    df["passed"] = df["check_filter"]
    return df


def test_p_sweep_summary_pairs_each_p_with_none_and_the_previous_p():
    from tasks.common.config import Selection

    bench = _bench("world_pass_rates")
    selection = Selection(
        clip_image_threshold=0.55, clip_caption_threshold=0.2, clip_direction_threshold=0.245, top_k=2
    )
    sweep = bench.p_sweep_summary(_sweep_rows(), selection)
    assert sweep["ps"] == [0.2, 0.8] and sweep["samples_per_arm"] == 6 and sweep["triplets"] == 2
    arms = {a["arm"]: a for a in sweep["arms"]}
    assert list(arms) == ["none", "p=0.2", "p=0.8"]
    # direction 0.40/0.41/0.42 without sharing, 0.36.. at p=0.2, 0.24/0.25/0.26 at p=0.8
    assert arms["none"]["pass_direction"] == arms["p=0.2"]["pass_direction"] == 1.0
    assert arms["p=0.8"]["pass_direction"] == pytest.approx(4 / 6, abs=1e-4)
    assert (
        arms["p=0.8"]["pass_filter"] == pytest.approx(4 / 6, abs=1e-4) and arms["none"]["pass_filter"] == 1.0
    )
    # kept: top 2 of 3 passing per triplet; at p=0.8 each triplet's seed 0 fails, two are left
    assert [arms[k]["kept"] for k in arms] == [4, 4, 4]
    assert arms["none"]["kept_per_1000_unet_calls"] == pytest.approx(1000 * 4 / 120, abs=1e-3)
    late = sweep["vs_previous_p"][0]
    assert (late["p"], late["previous_p"]) == (0.8, 0.2)
    assert late["clip_sim_dir"]["mean_diff"] == pytest.approx(-0.12)
    assert late["clip_sim_dir"]["share_higher"] == 0.0 and late["clip_sim_dir"][
        "sign_test_p"
    ] == pytest.approx(2 / 64)
    assert late["ssim"]["mean_diff"] == pytest.approx(0.12)
    assert late["pass_direction"] == {
        "diff": pytest.approx(-2 / 6, abs=1e-4),
        "only_this": 0,
        "only_other": 2,
        "sign_test_p": 0.5,
    }
    assert [e["p"] for e in sweep["vs_none"]] == [0.2, 0.8]
    assert sweep["vs_none"][0]["rmse"]["mean_diff"] == pytest.approx(-0.01)
    assert sweep["trend"]["clip_sim_dir"]["share_falling"] == 1.0
    assert sweep["trend"]["ssim"]["share_rising"] == 1.0
    assert sweep["trend"]["filter"]["share_falling"] == pytest.approx(2 / 6, abs=1e-4)
    assert set(sweep["by_kind"]) == {"colour"} and sweep["by_kind"]["colour"]["arms"] == sweep["arms"]


@pytest.mark.component
def test_world_p_sweep_smoke_renders_every_p_from_the_same_noise(tmp_path, capsys):
    bench = _bench("world_pass_rates")
    out = tmp_path / "w.json"
    assert bench.main(["--smoke", "--p-sweep", "0.2,0.8", "--out", str(out)]) == 0
    assert any(line.startswith("world_pass_rates: ") for line in capsys.readouterr().out.splitlines())
    sweep = json.loads(out.read_text())["p_sweep"]
    assert [a["arm"] for a in sweep["arms"]] == ["none", "p=0.2", "p=0.8"] and sweep["samples_per_arm"] == 10
    assert len(sweep["by_kind"]) == 5 and {"vs_none", "vs_previous_p", "trend"} <= set(sweep)
    rows = pd.read_parquet(tmp_path / "world_p_sweep_samples.parquet")
    by_arm = {arm: g.reset_index(drop=True) for arm, g in rows.groupby("arm")}
    for arm, p in (("p=0.2", 0.2), ("p=0.8", 0.8)):
        assert (by_arm[arm]["p2p_p"] == p).all()
        assert list(by_arm[arm]["seed"]) == list(by_arm["none"]["seed"])
        assert list(by_arm[arm]["cfg_scale"]) == list(by_arm["none"]["cfg_scale"])
    # the input image does not depend on p: its caption score is the same in every arm
    assert np.allclose(by_arm["p=0.8"]["clip_sim_0"], by_arm["none"]["clip_sim_0"], atol=1e-4)
    # the stored rows summarise to the same sweep without rendering
    again = tmp_path / "again.json"
    assert (
        bench.main(["--p-sweep-from", str(tmp_path / "world_p_sweep_samples.parquet"), "--out", str(again)])
        == 0
    )
    assert json.loads(again.read_text())["p_sweep"] == sweep


def test_world_p_sweep_rejects_a_bad_p_list(capsys):
    bench = _bench("world_pass_rates")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--p-sweep", "0.9,0.1"])
    assert exit_.value.code == 2 and "error: --p-sweep '0.9,0.1'" in capsys.readouterr().err


def test_threshold_grid_finds_where_the_p_curve_falls(tmp_path, capsys):
    from tasks.common.config import Selection

    bench = _bench("world_pass_rates")
    selection = Selection(
        clip_image_threshold=0.55, clip_caption_threshold=0.2, clip_direction_threshold=0.245, top_k=2
    )
    rows = _sweep_rows()
    grid = bench.fall_over_thresholds(rows, selection, np.array([0.55, 0.7]), np.array([0.1, 0.245]))
    assert grid["ps"] == [0.2, 0.8] and grid["grid_points"] == 4 and grid["caption_threshold"] == 0.2
    # direction 0.36-0.38 at p=0.2 and 0.24-0.26 at p=0.8: at 0.245 the seed-0 samples fail only at p=0.8;
    # image-image 0.62 / 0.68 never passes 0.7
    assert grid["largest_fall"] == {
        "clip_sim_image": 0.55,
        "clip_sim_dir": 0.245,
        "pass_by_p": [1.0, pytest.approx(4 / 6, abs=1e-4)],
        "peak_p": 0.2,
        "fall": pytest.approx(1 / 3, abs=1e-4),
        "only_at_peak": 2,
        "only_at_largest_p": 0,
        "sign_test_p": 0.5,
    }
    assert grid["falling_share"] == 0.25 and grid["falls_below_p_0_05"] == 0
    assert (
        list(grid["by_kind"]) == ["colour"]
        and grid["by_kind"]["colour"]["largest_fall"] == grid["largest_fall"]
    )
    # from stored rows on the command line
    rows.to_parquet(tmp_path / "sweep.parquet")
    out = tmp_path / "g.json"
    argv = ["--p-sweep-from", str(tmp_path / "sweep.parquet"), "--threshold-grid", "0.55:0.56:0.1"]
    assert bench.main([*argv, "0.1:0.3:0.145", "--out", str(out)]) == 0
    assert "the largest fall from the peak to p=0.8 is 33.3% at 0.550 / 0.245" in capsys.readouterr().out
    assert json.loads(out.read_text())["p_sweep"]["threshold_grid"]["grid_points"] == 2
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--threshold-grid", "0.5:0.9:0.1", "0.1:0.5:0.1"])
    assert exit_.value.code == 2 and "--threshold-grid reads a p-sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "0.3:0.1:0.1"])
    assert exit_.value.code == 2 and "STOP must exceed START" in capsys.readouterr().err
