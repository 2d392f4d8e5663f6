"""The mismatch regime and patterns (`megatron_rollout_is.regime`) on hand-made metric series."""

import math

import pytest
import torch

from megatron_rollout_is.regime import (
    PATTERN_MIN_STEPS,
    MismatchMonitor,
    classify,
    mismatch_patterns,
    mismatch_regime,
    quantile,
)


def _steps(k3_values, k1_factor=1.0, mean_weight=1.0, prefix="rollout_corr/"):
    names = (
        ("kl", "k3_kl", "rollout_is_mean")
        if prefix == "rollout_corr/"
        else ("mismatch_kl", "mismatch_k3_kl", "rollout_is_mean")
    )
    return [
        {prefix + names[0]: k1_factor * k3, prefix + names[1]: k3, prefix + names[2]: mean_weight} for k3 in k3_values
    ]


def test_levels_follow_the_documented_limits():
    assert classify(1e-4) == "negligible" and classify(5e-3) == "moderate" and classify(0.05) == "severe"
    assert classify(1e-4, chi2_token=0.05) == "severe"  # the more severe reading wins
    assert classify(1e-4, chi2_token=-0.5) == "severe"  # (1 - sqrt(0.5))^2 = 0.086
    with pytest.raises(ValueError, match="numbers"):
        classify(math.nan)
    label, sentence = mismatch_regime({"mismatch/mismatch_k3_kl": 0.03})
    assert label == "severe" and "correction is needed" in sentence
    with pytest.raises(KeyError, match="k3 KL"):
        mismatch_regime({"rollout_corr/kl": 0.1})


def test_bursts_steady_and_support_patterns():
    calm, burst = [0.01] * 30, [0.01] * 27 + [0.9, 1.2, 0.8]  # the stale runs: p95 >> the median
    assert [code for code, _ in mismatch_patterns(_steps(burst))] == ["bursts"]
    noise = [0.3 + 0.02 * math.sin(i) for i in range(30)]  # large and steady
    assert [code for code, _ in mismatch_patterns(_steps(noise))] == ["steady"]
    top_p = _steps([0.017] * 30, k1_factor=11.0, mean_weight=0.82, prefix="mismatch/")
    assert [code for code, _ in mismatch_patterns(top_p)] == ["support"]
    assert mismatch_patterns(_steps(calm, k1_factor=11.0, mean_weight=1.0)) == []  # weight 1: no support loss
    assert mismatch_patterns(_steps(burst[: PATTERN_MIN_STEPS - 1])) == []  # too few steps to judge
    assert mismatch_patterns(_steps([1e-5] * 29 + [1e-3])) == []  # bursts of a negligible mismatch


def test_the_monitor_reports_each_pattern_once():
    monitor = MismatchMonitor(window=40)
    reported = []
    for step in _steps([0.01] * 25 + [1.0] * 3 + [0.01] * 30):
        reported += [code for code, _ in monitor.update(step)]
    assert reported == ["bursts"]


def test_quantile_is_torch_quantile_of_the_finite_values():
    """The patterns' p95 and median (and the study's, which imports the same function)."""
    values = [0.3, 4.0, 1.0, 0.02, 3.0, 2.0, 9.5]
    for q in (0.0, 0.5, 0.95, 1.0):
        expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
        assert quantile(values + [math.nan, None, math.inf], q) == pytest.approx(expected, rel=1e-12)
    assert quantile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    assert math.isnan(quantile([None, math.nan], 0.5))
