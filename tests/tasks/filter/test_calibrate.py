"""The statistics of `calibrate-filter`: Wilson intervals, weighted precision/recall, kappa, ROC, the search."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.common.config import Selection
from tasks.filter import calibrate as stats


def test_wilson_matches_the_textbook_values_and_effective_sizes():
    low, high = stats.wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = stats.wilson(0, 10)
    assert low == pytest.approx(0, abs=1e-12) and round(high, 4) == 0.2775
    assert stats.wilson(0, 0) != stats.wilson(0, 0)  # (nan, nan): no data, no interval
    # 99% is wider than 95%; a fractional (effective) size works
    assert stats.wilson(8, 10, 0.99)[0] < stats.wilson(8, 10)[0]
    assert 0 < stats.wilson(3.5, 7.2)[0] < 0.5 < stats.wilson(3.5, 7.2)[1] < 1


def test_weighted_precision_counts_each_pair_for_its_stratum():
    # two strata: 4 labelled pairs standing for 1 pair each, 2 standing for 10 each
    rule = np.array([True, True, True, True, True, False])
    truth = np.array([True, True, True, True, False, True])
    w = np.array([1, 1, 1, 1, 10, 10], dtype=float)
    out = stats.evaluate(rule, truth, w)
    assert out["precision"] == pytest.approx(4 / 14)  # the weight-10 failure dominates
    assert out["recall"] == pytest.approx(4 / 14)
    unweighted = stats.evaluate(rule, truth, np.ones(6))
    assert unweighted["precision"] == pytest.approx(4 / 5)
    # the interval is that of the effective size (14^2 / 104 ~ 1.9 pairs), much wider than of 5 pairs
    assert out["precision_high"] - out["precision_low"] > unweighted["precision_high"] - unweighted["precision_low"]
    assert out["passing"] == 5 and out["good"] == 5 and out["labelled"] == 6


def test_kappa_of_agreement_chance_and_disagreement():
    a = np.array([True, True, False, False] * 5)
    assert stats.kappa(a, a) == pytest.approx(1.0)
    assert stats.kappa(a, ~a) == pytest.approx(-1.0)
    assert stats.kappa(a, np.array([True, False] * 10)) == pytest.approx(0.0)
    assert stats.kappa(np.ones(4, bool), np.ones(4, bool)) is None  # both constant: undefined


def test_roc_area_of_a_perfect_a_useless_and_an_inverted_score():
    truth = np.array([True] * 5 + [False] * 5)
    assert stats.roc(np.arange(10, 0, -1.0), truth, np.ones(10))["auc"] == pytest.approx(1.0)
    assert stats.roc(np.arange(1, 11.0), truth, np.ones(10))["auc"] == pytest.approx(0.0)
    assert stats.roc(np.ones(10), truth, np.ones(10))["auc"] == pytest.approx(0.5)  # ties: one step
    curve = stats.roc(np.arange(10, 0, -1.0), truth, np.ones(10))
    assert stats.rate_at(curve, 6) == (0.0, 1.0) and stats.rate_at(curve, 100) == (0.0, 0.0)
    assert stats.roc(np.ones(3), np.ones(3, bool), np.ones(3))["auc"] is None
    # Hanley & McNeil's interval: 0.5 +- 1.96 x 0.058 with 50 good and 50 bad pairs
    coin = stats.roc(np.ones(100), np.arange(100) < 50, np.ones(100))
    assert (coin["auc_low"], coin["auc_high"]) == pytest.approx((0.5 - 0.1137, 0.5 + 0.1137), abs=1e-3)


def test_people_truth_takes_the_majority_and_leaves_out_ties_and_unsure():
    rows = [(0, "a", "good", "x"), (0, "a", "good", "y"), (0, "a", "wrong", "z"),   # 2 of 3: good
            (0, "b", "good", "x"), (0, "b", "broken", "y"),                         # tie: left out
            (0, "c", "unsure", "x"),                                                 # unsure only: left out
            (0, "d", "wrong", "x"), (0, "d", "unsure", "y")]                         # wrong
    labels = pd.DataFrame(rows, columns=["partition", "sample_key", "label", "reviewer"]).assign(
        pair_sha256="h", weight=2.0)
    truth = stats.people_truth(labels).set_index("sample_key")
    assert truth["good"].to_dict() == {"a": True, "d": False}
    assert truth.loc["a", "reviewers"] == 3 and truth.loc["a", "weight"] == 2.0
    agree = stats.reviewer_agreement(labels, min_shared=1)
    assert {tuple(a["reviewers"]): a["shared"] for a in agree} == {("x", "y"): 2, ("x", "z"): 1, ("y", "z"): 1}


def _samples(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Samples whose goodness rises with the direction score (and not with the others)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0, 1, n)
    df = pd.DataFrame({"caption_id": [f"c{i // 4}" for i in range(n)], "seed": np.arange(n),
                       "clip_sim_dir": d, "clip_sim_image": rng.uniform(0.3, 1, n),
                       "clip_sim_0": rng.uniform(0.5, 1, n), "clip_sim_1": rng.uniform(0.5, 1, n)})
    good = rng.uniform(0, 1, n) < d ** 2
    return df, good


def test_search_finds_thresholds_that_hold_their_precision_on_held_out_pairs():
    fit, good = _samples(1200, 1)
    base = Selection(clip_image_threshold=0.3, clip_caption_threshold=0.5, clip_direction_threshold=0.2)
    found = stats.search(fit, good, np.ones(len(fit)), base, ("clip",), target=0.8)["found"]
    assert found is not None and found["precision_low"] >= 0.8
    assert found["thresholds"]["clip_direction_threshold"] > 0.7  # the one score that matters is raised
    held, truth = _samples(1200, 2)
    rule = stats.clip_rules(held, base.model_copy(update=found["thresholds"]))["CLIP (all three)"]
    assert stats.evaluate(rule, truth, np.ones(len(held)))["precision"] >= 0.8
    # an unreachable target: nothing found, the best lower bound reported
    none = stats.search(fit, good, np.ones(len(fit)), base, ("clip",), target=0.999)
    assert none["found"] is None and 0.8 < none["best_precision_low"] < 0.999


def test_search_needs_enough_passing_pairs():
    d = np.linspace(0, 1, 40)
    df = pd.DataFrame({"caption_id": [f"c{i}" for i in range(40)], "seed": 0, "clip_sim_dir": d,
                       "clip_sim_image": 0.9, "clip_sim_0": 0.9, "clip_sim_1": 0.9})
    good = d >= 0.5  # 20 good pairs, the highest directional similarities
    base = Selection(clip_image_threshold=0.3, clip_caption_threshold=0.5, clip_direction_threshold=0.0)
    found = stats.search(df, good, np.ones(40), base, ("clip",), target=0.5, min_passing=25)["found"]
    assert found["passing"] >= 25 and found["recall"] == 1.0  # all 20 good ones, and at least 5 others
    assert stats.search(df, good, np.ones(40), base, ("clip",), target=0.5, min_passing=41)["found"] is None


def test_clustered_intervals_count_triplets_not_their_copies():
    groups = np.repeat(np.arange(10), 8)  # 10 triplets of 8 samples, every label shared within its triplet
    truth = np.repeat(np.arange(10) < 5, 8)
    rule = np.ones(80, bool)
    flat = stats.evaluate(rule, truth, np.ones(80))
    clustered = stats.evaluate(rule, truth, np.ones(80), groups=groups)
    assert clustered["precision"] == flat["precision"] == 0.5
    assert (clustered["precision_low"], clustered["precision_high"]) == pytest.approx(stats.wilson(5, 10))
    assert clustered["precision_low"] < flat["precision_low"]
    # independent labels: clustering by singletons changes nothing
    single = stats.evaluate(rule, truth, np.ones(80), groups=np.arange(80))
    assert single["precision_low"] == pytest.approx(flat["precision_low"])


def test_the_grid_search_and_one_rule_give_the_same_estimate():
    df, good = _samples(400, 5)
    groups = df["caption_id"].to_numpy()
    w = np.random.default_rng(0).choice([1.0, 3.0], len(df))
    base = Selection(clip_image_threshold=0.3, clip_caption_threshold=0.5, clip_direction_threshold=0.2)
    found = stats.search(df, good, w, base, ("clip",), target=0.6, groups=groups, chunk=7)["found"]
    rule = stats.clip_rules(df, base.model_copy(update=found["thresholds"]))["CLIP (all three)"]
    one = stats.evaluate(rule, good, w, groups=groups)
    assert (one["precision"], one["precision_low"], one["recall"]) == pytest.approx(
        (found["precision"], found["precision_low"], found["recall"]))
    assert one["passing"] == found["passing"]
