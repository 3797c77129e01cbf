"""The statistics of what Prompt-to-Prompt sharing buys (tasks.world_eval.evaluate): the paired sign test and the
summary by quarter of p that the world models' test and bench/world_pass_rates.py report."""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd
import pytest

from tasks.world_eval.evaluate import SHARING_METRICS, p_quarters, sharing_summary, sign_test


def test_sign_test_is_the_exact_binomial_tail_and_drops_ties():
    assert sign_test(np.array([1.0] * 10)) == pytest.approx(2 / 2**10)
    # 8 of 10 positive: P(X <= 2) + P(X >= 8) under Binomial(10, 1/2)
    assert sign_test(np.array([1.0] * 8 + [-1.0] * 2)) == pytest.approx(
        2 * sum(comb(10, i) for i in range(3)) / 2**10
    )
    assert sign_test(np.array([1.0] * 8 + [-1.0] * 2 + [0.0] * 5)) == sign_test(
        np.array([1.0] * 8 + [-1.0] * 2)
    )
    assert sign_test(np.array([1.0, -1.0] * 50)) == 1.0
    assert sign_test(np.zeros(4)) == 1.0


def test_p_quarters_split_the_range_into_four():
    assert list(p_quarters(np.array([0.1, 0.29, 0.3, 0.5, 0.69, 0.7, 0.9, 0.95, 0.05]))) == [
        0,
        0,
        1,
        2,
        2,
        3,
        3,
        3,
        0,
    ]


def test_sharing_summary_reports_each_metric_overall_and_by_quarter():
    rng = np.random.default_rng(0)
    n = 200
    p = rng.uniform(0.1, 0.9, n)
    gain = 0.05 * p + rng.normal(0, 0.01, n)  # closer with sharing, the more so the larger p
    pairs = pd.DataFrame({"p2p_p": p, "passed_shared": p > 0.3, "passed_none": p > 0.8})
    for m in SHARING_METRICS:
        sign = -1.0 if m == "rmse" else 1.0
        pairs[f"{m}_none"] = 0.5
        pairs[f"{m}_shared"] = 0.5 + sign * gain
        pairs[f"{m}_gain"] = gain
    summary = sharing_summary(pairs)
    assert summary["pairs"] == n
    for m in SHARING_METRICS:
        s = summary["metrics"][m]
        assert s["mean_gain"] == pytest.approx(gain.mean(), abs=1e-4) and s["sign_test_p"] < 1e-6
    assert s["shared"] < s["none"]  # rmse: lower is closer
    quarters = summary["by_p_quarter"]
    assert [q["p_from"] for q in quarters] == [0.1, 0.3, 0.5, 0.7] and sum(q["pairs"] for q in quarters) == n
    gains = [q["ssim_mean_gain"] for q in quarters]
    assert gains == sorted(gains)
    assert quarters[0]["pass_rate_shared"] == 0.0 and quarters[3]["pass_rate_shared"] == 1.0
    assert quarters[3]["pass_rate_none"] < 1.0
