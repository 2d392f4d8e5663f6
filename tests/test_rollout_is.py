"""Single-process rollout IS weights and metrics against the float64 oracle (docs/metrics.md).

Tolerances. The oracle is float64 with correctly rounded sums. The implementation computes in float64
when either log-prob input is float64 and in float32 otherwise, so its error is bounded by the working
epsilon `eps` times the magnitude the rounding acts on, never by a fixed number:
- a log-weight carries an absolute error of about `eps * A` (`A` = |lr_t| at token level, the
  sum of |lr_t| over the sequence at sequence level, that sum over `n_i` at geometric level), which
  `exp` turns into a relative error of the weight; sums of N terms add about `eps * log2(N)`;
- means of log-probs and of `rollout - old` cancel, so their error is absolute, `eps * max|log-prob|`;
- both standard deviations are compared through the variance with an absolute bound of `eps` times the
  squared scale, because `sqrt` of a rounding error near a zero variance is not small relatively (the
  geometric thresholds 1.0002 / 0.9998 give std ~1e-4, whose float32 variance is mostly rounding);
- a float32 `torch.quantile` places its rank `q * (n - 1)` to about `eps * n`, so a percentile may
  move along the local gap between neighbouring sorted weights by that fraction.
On top of that: `rel 1e-9` for float64 and `rel 1e-5` for float32 computation.
"""

import math

import pytest
import torch

from megatron_rollout_is import compute_rollout_importance_weights
from oracle import SAFETY_BOUND, expected_metric_keys, linear_quantile, oracle_rollout_is

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "clip", "mask")
VETOES = (None, 1e-4, 1e-2)
# (upper, lower): default reciprocal lower, the same given explicitly, and an asymmetric one.
THRESHOLDS = {
    "token": ((1.5, None), (2.0, None), (2.0, 0.5), (5.0, 0.8)),
    "sequence": ((1.5, None), (2.0, None), (2.0, 0.5), (5.0, 0.8)),
    "geometric": ((1.0002, 0.9998), (2.0, None), (1.5, 0.5)),
}
_SAFETY = 8.0  # multiplies every eps-based bound below


def _case_matrix():
    return [
        (level, mode, upper, lower, veto)
        for level in LEVELS
        for mode in MODES
        for upper, lower in THRESHOLDS[level]
        for veto in VETOES
    ]


def _make_mask(gen, batch, length):
    """Rows mix right padding, left padding, holes, full and empty rows."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        kind = int(torch.randint(0, 5, (1,), generator=gen))
        n = int(torch.randint(1, length + 1, (1,), generator=gen))
        if kind == 0:
            mask[i, :n] = True
        elif kind == 1:
            mask[i, length - n :] = True
        elif kind == 2:
            mask[i] = torch.rand(length, generator=gen) < 0.7
        elif kind == 3:
            mask[i] = True
        # kind 4: an empty row
    return mask


def _make_inputs(seed, batch=16, length=128, level="token", dtype=torch.float64):
    """Random log-probs whose log-ratios straddle every threshold tested at `level`.

    Per-row noise scales are log-uniform in [1e-5, 1] so that rows fall inside, near and outside
    the thresholds (1.0002 as well as 5.0); sparse outliers of +-3..12 nats trip the vetoes.
    """
    gen = torch.Generator().manual_seed(seed)
    rollout = -torch.empty(batch, length, dtype=torch.float64).exponential_(0.7, generator=gen)
    row_scale = 10.0 ** (-5.0 * torch.rand(batch, 1, generator=gen, dtype=torch.float64))
    if level == "sequence":
        row_scale = row_scale * 3.0 / math.sqrt(length)
    noise = torch.randn(batch, length, generator=gen, dtype=torch.float64) * row_scale
    outlier = torch.rand(batch, length, generator=gen) < 0.003
    size = 3.0 + 9.0 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(batch, length, generator=gen) < 0.7, -1.0, 1.0).double()
    noise = torch.where(outlier, sign * size, noise)
    old = (rollout + noise).to(dtype)
    return old, rollout.to(dtype), _make_mask(gen, batch, length)


def _run_impl(old, rollout, mask, level, mode, upper, lower, veto):
    return compute_rollout_importance_weights(
        old,
        rollout,
        mask,
        rollout_is_level=level,
        rollout_is_mode=mode,
        rollout_is_threshold=upper,
        rollout_is_threshold_lower=lower,
        rollout_is_veto_threshold=veto,
    )


def _tolerances(old, rollout, mask, level, upper, lower, expected_metrics):
    """Per-token weight rtol and per-metric (kind, rtol, atol), from the bounds in the module docstring."""
    wide = torch.float64 in (old.dtype, rollout.dtype)
    eps = torch.finfo(torch.float64 if wide else torch.float32).eps
    base = 1e-9 if wide else 1e-5
    o, r = old.detach().double(), rollout.detach().double()
    valid = (mask != 0) & o.isfinite() & r.isfinite()
    lr = torch.where(valid, o - r, 0.0)
    n = valid.sum(-1, keepdim=True).double()
    if level == "token":
        amplitude = lr.abs()
    else:
        amplitude = lr.abs().sum(-1, keepdim=True).expand_as(lr).clone()
        if level == "geometric":
            amplitude = amplitude / n.clamp(min=1.0)
    num_tokens = int(valid.sum())
    log_n = math.log2(num_tokens + 2)
    a_max = float(amplitude[valid].max()) if num_tokens else 0.0
    m_max = float(torch.cat([o[valid].abs(), r[valid].abs()]).max()) if num_tokens else 0.0

    token_rtol = base + _SAFETY * eps * (1.0 + amplitude)
    weight_eps = _SAFETY * eps * (1.0 + a_max + log_n)
    weight_rel = base + weight_eps
    logprob_abs = _SAFETY * eps * (1.0 + m_max) * log_n
    k3_scale = float(torch.where(valid, lr.clamp(max=SAFETY_BOUND).exp() + lr.abs() + 1.0, 0.0).sum())
    k3_scale /= max(num_tokens, 1)

    tol = {}
    for key in expected_metrics:
        name = key.removeprefix("mismatch/")
        if "fraction" in name:
            tol[key] = ("value", base + _SAFETY * eps, 0.0)
        elif name in ("rollout_is_std", "rollout_is_seq_std"):
            scale = max(upper, lower) if name == "rollout_is_std" else expected_metrics["mismatch/rollout_is_seq_max"]
            tol[key] = ("variance", weight_rel, 4.0 * weight_eps * scale**2)
        elif name == "rollout_is_seq_max_deviation":
            tol[key] = ("value", weight_rel, weight_eps * max(1.0, expected_metrics["mismatch/rollout_is_seq_max"]))
        elif name.startswith("rollout_is_"):
            tol[key] = ("value", weight_rel, 0.0)
        elif name in ("mismatch_training_ppl", "mismatch_rollout_ppl", "mismatch_ppl_ratio"):
            tol[key] = ("value", base + _SAFETY * eps * (1.0 + m_max) * log_n, 0.0)
        elif name == "mismatch_k3_kl":
            tol[key] = ("value", base, logprob_abs * k3_scale)
        else:
            tol[key] = ("value", base, logprob_abs)
    return token_rtol, tol, eps


def _percentile_slack(old, rollout, mask, level, eps):
    """Absolute slack of each percentile: a rank off by ~eps * n moves along the local gap."""
    unbounded, _ = oracle_rollout_is(old, rollout, mask, level, "truncate", 1e300, None, None)
    valid = (mask != 0) & old.isfinite() & rollout.isfinite()
    w = sorted(unbounded[valid].tolist())
    slack = {}
    if not w:
        return slack
    for key, q in (("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95), ("p99", 0.99)):
        pos = q * (len(w) - 1)
        window = w[max(0, math.floor(pos) - 1) : math.ceil(pos) + 2]
        slack["mismatch/rollout_is_" + key] = 4.0 * eps * len(w) * (window[-1] - window[0])
    return slack


def _assert_close_to_oracle(old, rollout, mask, level, mode, upper, lower, veto):
    weights, metrics = _run_impl(old, rollout, mask, level, mode, upper, lower, veto)
    expected_w, expected_m = oracle_rollout_is(old, rollout, mask, level, mode, upper, lower, veto)
    lower_eff = 1.0 / upper if lower is None else lower
    token_rtol, tol, eps = _tolerances(old, rollout, mask, level, upper, lower_eff, expected_m)
    for key, value in _percentile_slack(old, rollout, mask, level, eps).items():
        tol[key] = tol[key][:2] + (value,)

    assert set(metrics) == set(expected_m)
    wide = torch.float64 in (old.dtype, rollout.dtype)
    assert weights.dtype == (torch.float64 if wide else torch.float32)
    assert weights.shape == old.shape
    assert torch.isfinite(weights).all()
    got_w = weights.double()
    assert (got_w[mask == 0] == 0).all()
    error = (got_w - expected_w).abs()
    bad = error > token_rtol * expected_w.abs()
    assert not bad.any(), (
        f"weights differ at {bad.nonzero()[:5].tolist()}: got {got_w[bad][:5].tolist()}, "
        f"oracle {expected_w[bad][:5].tolist()}"
    )

    failures = []
    for key, want in expected_m.items():
        got = metrics[key]
        if not isinstance(got, float) or not math.isfinite(got):
            failures.append(f"{key}: {got!r} is not a finite Python float")
            continue
        kind, rtol, atol = tol[key]
        if kind == "variance":
            ok = abs(got * got - want * want) <= atol + 2.0 * rtol * want * want
        else:
            ok = abs(got - want) <= atol + rtol * abs(want)
        if not ok:
            failures.append(f"{key}: got {got!r}, oracle {want!r}")
    assert not failures, "\n".join(failures)
    return weights, metrics


# ---------------------------------------------------------------------------------------------
# The oracle against numbers worked out by hand.
# ---------------------------------------------------------------------------------------------


def _from_log_ratios(old, log_ratio):
    old = torch.tensor(old, dtype=torch.float64)
    return old, old - torch.tensor(log_ratio, dtype=torch.float64)


def _hand_cases():
    ln = math.log
    cases = []

    # Token level, truncate at 2 (lower 1/2), no veto. Valid w = 3, 1, 1/4 | 3/2, 4/5 (row 1 ends padded).
    old, rollout = _from_log_ratios(
        [[-1.0, -2.0, -2.0], [-1.0, -1.0, -3.0]], [[ln(3), 0.0, ln(0.25)], [ln(1.5), ln(0.8), 7.0]]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # wc = clamp(w, 1/2, 2) = 2, 1, 1/2, 3/2, 4/5: mean 5.8/5 = 1.16, mean of squares 8.14/5 = 1.628.
    # s_0 = 4.25/3, s_1 = 2.3/2 = 1.15. mo = -5/3, -1; d_i = mr_i - mo_i = -mean lr = -ln(3/4)/3, -ln(6/5)/2,
    # so -mr_i = -mo_i - d_i.
    d0, d1 = -ln(0.75) / 3, -ln(1.2) / 2
    s0, s1 = 4.25 / 3, 1.15
    expected = {
        "rollout_is_mean": 6.55 / 5,
        "rollout_is_std": math.sqrt(1.628 - 1.16**2),
        "rollout_is_eff_sample_size": 1.16**2 / 1.628,
        "rollout_is_max": 3.0,
        "rollout_is_min": 0.25,
        "rollout_is_ratio_fraction_high": 0.2,
        "rollout_is_ratio_fraction_low": 0.2,
        "rollout_is_veto_fraction": 0.0,
        "rollout_is_catastrophic_token_fraction": 0.0,
        "rollout_is_nonfinite_token_fraction": 0.0,
        # sorted w = 1/4, 4/5, 1, 3/2, 3; rank q*4: 1, 2, 3, 3.8, 3.96.
        "rollout_is_p25": 0.8,
        "rollout_is_p50": 1.0,
        "rollout_is_p75": 1.5,
        "rollout_is_p95": 1.5 + 0.8 * 1.5,
        "rollout_is_p99": 1.5 + 0.96 * 1.5,
        "rollout_is_seq_mean": (s0 + s1) / 2,
        "rollout_is_seq_std": (s0 - s1) / math.sqrt(2),
        "rollout_is_seq_max": s0,
        "rollout_is_seq_min": s1,
        "rollout_is_seq_max_deviation": s0 - 1,
        "rollout_is_seq_fraction_high": 0.0,
        "rollout_is_seq_fraction_low": 0.0,
        "mismatch_training_ppl": (math.exp(5 / 3) + math.e) / 2,
        "mismatch_rollout_ppl": (math.exp(5 / 3 - d0) + math.exp(1 - d1)) / 2,
        "mismatch_training_log_ppl": (5 / 3 + 1) / 2,
        "mismatch_rollout_log_ppl": (5 / 3 - d0 + 1 - d1) / 2,
        # sum of lr = ln(3 * 1/4 * 3/2 * 4/5) = ln(0.9).
        "mismatch_kl": -ln(0.9) / 5,
        "mismatch_k3_kl": (3 + 1 + 0.25 + 1.5 + 0.8 - ln(0.9) - 5) / 5,
        "mismatch_log_ppl_diff": (d0 + d1) / 2,
        "mismatch_log_ppl_abs_diff": (abs(d0) + abs(d1)) / 2,
        "mismatch_log_ppl_diff_max": d0,
        "mismatch_log_ppl_diff_min": d1,
        "mismatch_ppl_ratio": (math.exp(d0) + math.exp(d1)) / 2,
    }
    weights = [[2.0, 1.0, 0.25], [1.5, 0.8, 0.0]]
    cases.append(("token_truncate", (old, rollout, mask, "token", "truncate", 2.0, None, None), weights, expected))

    # Sequence level, clip in [1/2, 2], veto 1e-2 (log = -4.6). Row 0: S = ln(2 * 3/4) = ln 1.5, kept.
    # Row 1: lr = ln 1e-3 (catastrophic), ln 2, ln 100, so S = ln 0.2: outside the band and vetoed.
    old, rollout = _from_log_ratios(
        [[-0.5, -1.0, -7.0], [-8.0, -0.2, -0.1]], [[ln(2), ln(0.75), 3.0], [ln(1e-3), ln(2), ln(100)]]
    )
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # Valid w = 1.5, 1.5, 0.2, 0.2, 0.2; wc = 1.5, 1.5, 0.5, 0.5, 0.5: mean 0.9, mean of squares 1.05.
    mo0, mo1 = -0.75, -8.3 / 3
    d0, d1 = -ln(1.5) / 2, -ln(0.2) / 3
    expected = {
        "rollout_is_mean": 3.6 / 5,
        "rollout_is_std": math.sqrt(1.05 - 0.81),
        "rollout_is_eff_sample_size": 0.81 / 1.05,
        "rollout_is_max": 1.5,
        "rollout_is_min": 0.2,
        "rollout_is_ratio_fraction_high": 0.0,
        "rollout_is_ratio_fraction_low": 0.5,
        "rollout_is_veto_fraction": 0.5,
        "rollout_is_catastrophic_token_fraction": 0.2,
        "rollout_is_nonfinite_token_fraction": 0.0,
        "rollout_is_p25": 0.2,
        "rollout_is_p50": 0.2,
        "rollout_is_p75": 1.5,
        "rollout_is_p95": 1.5,
        "rollout_is_p99": 1.5,
        "rollout_is_seq_mean": 0.85,
        "rollout_is_seq_std": 1.3 / math.sqrt(2),
        "rollout_is_seq_max": 1.5,
        "rollout_is_seq_min": 0.2,
        "rollout_is_seq_max_deviation": 0.8,
        "rollout_is_seq_fraction_high": 0.0,
        "rollout_is_seq_fraction_low": 0.5,
        "rollout_is_clipped_fraction": 0.6,
        "rollout_is_seq_clipped_fraction": 0.5,
        "rollout_is_masked_fraction": 0.6,
        "rollout_is_seq_masked_fraction": 0.5,
        "mismatch_training_ppl": (math.exp(-mo0) + math.exp(-mo1)) / 2,
        "mismatch_rollout_ppl": (math.exp(-mo0 - d0) + math.exp(-mo1 - d1)) / 2,
        "mismatch_training_log_ppl": (-mo0 - mo1) / 2,
        "mismatch_rollout_log_ppl": (-mo0 - d0 - mo1 - d1) / 2,
        "mismatch_kl": -ln(0.3) / 5,
        "mismatch_k3_kl": (2 + 0.75 + 1e-3 + 2 + 100 - ln(0.3) - 5) / 5,
        "mismatch_log_ppl_diff": (d0 + d1) / 2,
        "mismatch_log_ppl_abs_diff": (-d0 + d1) / 2,
        "mismatch_log_ppl_diff_max": d1,
        "mismatch_log_ppl_diff_min": d0,
        "mismatch_ppl_ratio": (1.5**-0.5 + 0.2 ** (-1 / 3)) / 2,
    }
    weights = [[1.5, 1.5, 0.0], [0.0, 0.0, 0.0]]
    cases.append(("sequence_clip_veto", (old, rollout, mask, "sequence", "clip", 2.0, None, 1e-2), weights, expected))

    # Geometric, truncate at 1.2 with lower 0.9, veto 1e-4. Row 0: G = ln(2 * 4 * 1)/3 = ln 2, so w = 2
    # on all three tokens, truncated to 1.2. Row 1 is empty (its garbage must not count): K = 1, N = 3.
    old, rollout = _from_log_ratios(
        [[-1.0, -1.0, -1.0], [500.0, -900.0, 3.0]], [[ln(2), ln(4), 0.0], [-950.0, 900.0, 40.0]]
    )
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    expected = {
        # wc = 1.2 everywhere, yet the 1e-8 of the masked means leaves a variance of
        # 1.44 * (3 / (3 + 1e-8) - 9 / (3 + 1e-8)^2) ~ 1.44e-8 / 3, so std ~ 6.9e-5 rather than 0.
        "rollout_is_mean": 2.0,
        "rollout_is_std": math.sqrt(1.44 * 3 / (3 + 1e-8) - (3.6 / (3 + 1e-8)) ** 2),
        "rollout_is_eff_sample_size": 1.0,
        "rollout_is_max": 2.0,
        "rollout_is_min": 2.0,
        "rollout_is_ratio_fraction_high": 1.0,
        "rollout_is_ratio_fraction_low": 0.0,
        "rollout_is_veto_fraction": 0.0,
        "rollout_is_catastrophic_token_fraction": 0.0,
        "rollout_is_nonfinite_token_fraction": 0.0,
        "rollout_is_p25": 2.0,
        "rollout_is_p50": 2.0,
        "rollout_is_p75": 2.0,
        "rollout_is_p95": 2.0,
        "rollout_is_p99": 2.0,
        "rollout_is_seq_mean": 2.0,
        "rollout_is_seq_std": 0.0,
        "rollout_is_seq_max": 2.0,
        "rollout_is_seq_min": 2.0,
        "rollout_is_seq_max_deviation": 1.0,
        "rollout_is_seq_fraction_high": 1.0,
        "rollout_is_seq_fraction_low": 0.0,
        "mismatch_training_ppl": math.e,
        "mismatch_rollout_ppl": 2 * math.e,
        "mismatch_training_log_ppl": 1.0,
        "mismatch_rollout_log_ppl": 1.0 + ln(2),
        "mismatch_kl": -ln(2),
        "mismatch_k3_kl": (2 + 4 + 1 - ln(8) - 3) / 3,
        "mismatch_log_ppl_diff": -ln(2),
        "mismatch_log_ppl_abs_diff": ln(2),
        "mismatch_log_ppl_diff_max": -ln(2),
        "mismatch_log_ppl_diff_min": -ln(2),
        "mismatch_ppl_ratio": 0.5,
    }
    weights = [[1.2, 1.2, 1.2], [0.0, 0.0, 0.0]]
    cases.append(
        ("geometric_empty_row", (old, rollout, mask, "geometric", "truncate", 1.2, 0.9, 1e-4), weights, expected)
    )
    return cases


HAND_CASES = _hand_cases()


@pytest.mark.parametrize("source", ["oracle", "implementation"])
@pytest.mark.parametrize("name,args,weights,expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_computed(source, name, args, weights, expected):
    run = oracle_rollout_is if source == "oracle" else _run_impl
    got_w, got_m = run(*args)
    # The hand values drop the 1e-8 of every masked mean: a relative 1e-8 at most.
    torch.testing.assert_close(got_w.double(), torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert set(got_m) == {"mismatch/" + k for k in expected}
    for key, want in expected.items():
        assert got_m["mismatch/" + key] == pytest.approx(want, rel=1e-7, abs=1e-12), key


def test_oracle_quantile_is_torch_linear_quantile():
    gen = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 10, 257):
        values = torch.randn(n, generator=gen, dtype=torch.float64).exp()
        ordered = sorted(values.tolist())
        for q in (0.0, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0):
            want = float(torch.quantile(values, q))
            assert linear_quantile(ordered, q) == pytest.approx(want, rel=1e-14, abs=0.0)


# ---------------------------------------------------------------------------------------------
# Randomized comparison with the oracle.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,level,mode,upper,lower,veto", [(1000 + i, *case) for i, case in enumerate(_case_matrix())]
)
def test_matches_oracle_float64(seed, level, mode, upper, lower, veto):
    old, rollout, mask = _make_inputs(seed, level=level)
    _assert_close_to_oracle(old, rollout, mask, level, mode, upper, lower, veto)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode,veto", [("truncate", None), ("clip", 1e-4), ("mask", 1e-2)])
def test_matches_oracle_low_precision(dtype, level, mode, veto):
    upper, lower = (1.0002, 0.9998) if level == "geometric" and mode == "clip" else (2.0, None)
    seed = 50 + 10 * LEVELS.index(level) + MODES.index(mode)
    old, rollout, mask = _make_inputs(seed, level=level, dtype=dtype)
    _assert_close_to_oracle(old, rollout, mask, level, mode, upper, lower, veto)


# ---------------------------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------------------------

SEED_KEYS = (
    "rollout_is_mean",
    "rollout_is_eff_sample_size",
    "rollout_is_veto_fraction",
    "rollout_is_max",
    "rollout_is_min",
    "rollout_is_std",
    "rollout_is_p50",
    "rollout_is_p95",
    "rollout_is_p99",
    "rollout_is_ratio_fraction_high",
    "rollout_is_ratio_fraction_low",
    "rollout_is_catastrophic_token_fraction",
    "mismatch_training_ppl",
    "mismatch_rollout_ppl",
    "mismatch_ppl_ratio",
    "mismatch_kl",
    "mismatch_k3_kl",
    "mismatch_log_ppl_diff",
)


@pytest.mark.parametrize("mode", MODES)
def test_metric_keys_are_the_documented_set(mode):
    old, rollout, mask = _make_inputs(5, batch=3, length=6)
    _, metrics = _run_impl(old, rollout, mask, "token", mode, 2.0, None, 1e-4)
    assert set(metrics) == expected_metric_keys(mode)
    assert {"mismatch/" + key for key in SEED_KEYS} <= set(metrics)
    clip_only = expected_metric_keys("clip") - expected_metric_keys("truncate")
    assert clip_only == {
        "mismatch/rollout_is_clipped_fraction",
        "mismatch/rollout_is_seq_clipped_fraction",
        "mismatch/rollout_is_masked_fraction",
        "mismatch/rollout_is_seq_masked_fraction",
    }
    assert all(type(value) is float for value in metrics.values())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", MODES)
def test_all_masked_batch_gives_zero_weights_and_zero_metrics(level, mode):
    old, rollout, _ = _make_inputs(3, batch=4, length=9, level=level)
    for mask in (torch.zeros(4, 9, dtype=torch.bool), torch.zeros(4, 9), torch.zeros(4, 9, dtype=torch.long)):
        weights, metrics = _run_impl(old, rollout, mask, level, mode, 2.0, None, 1e-4)
        assert (weights == 0).all()
        assert set(metrics) == expected_metric_keys(mode)
        assert all(value == 0.0 and type(value) is float for value in metrics.values())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ("truncate", "clip"))
def test_non_finite_log_probs_are_dropped_and_counted(level, mode):
    old, rollout, mask = _make_inputs(13, batch=6, length=20, level=level)
    mask[:, :4] = True
    mask[:, -3:] = False
    # Padding may hold anything, NaN included: it must not show anywhere.
    old[:, -3:] = float("nan")
    rollout[:, -2:] = -float("inf")
    reference_w, reference_m = _run_impl(old, rollout, mask, level, mode, 2.0, None, 1e-4)
    # Three valid tokens turn non-finite: the result is the one without them, plus F = 3.
    broken_old, broken_rollout = old.clone(), rollout.clone()
    # old = -inf would be a catastrophic token, were it not dropped.
    broken_old[0, 1], broken_rollout[2, 0], broken_old[4, 3] = float("nan"), -float("inf"), -float("inf")
    dropped = mask.clone()
    dropped[0, 1] = dropped[2, 0] = dropped[4, 3] = False
    expected_w, expected_m = _run_impl(old, rollout, dropped, level, mode, 2.0, None, 1e-4)
    weights, metrics = _assert_close_to_oracle(broken_old, broken_rollout, mask, level, mode, 2.0, None, 1e-4)
    assert torch.equal(weights, expected_w)
    num_valid = int(dropped.sum())
    assert metrics.pop("mismatch/rollout_is_nonfinite_token_fraction") == pytest.approx(3 / (3 + num_valid), rel=1e-7)
    assert expected_m.pop("mismatch/rollout_is_nonfinite_token_fraction") == 0.0
    for key, value in expected_m.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert reference_m["mismatch/rollout_is_nonfinite_token_fraction"] == 0.0
    assert torch.isfinite(reference_w).all()

    # Every valid token non-finite: nothing is left (N = 0), yet the fraction reads ~1.
    all_nan = torch.full_like(old, float("nan"))
    weights, metrics = _run_impl(all_nan, rollout, mask, level, mode, 2.0, None, 1e-4)
    assert (weights == 0).all()
    assert metrics.pop("mismatch/rollout_is_nonfinite_token_fraction") == pytest.approx(1.0, rel=1e-7)
    assert all(value == 0.0 for value in metrics.values())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ("truncate", "clip"))
def test_all_vetoed_batch_gives_zero_weights_and_finite_metrics(level, mode):
    old, rollout, mask = _make_inputs(11, batch=6, length=20, level=level)
    mask[:, 3] = True  # every row non-empty, each with a catastrophic token somewhere
    for i in range(6):
        t = int(mask[i].nonzero()[i % int(mask[i].sum())])
        old[i, t] = rollout[i, t] - 12.0
    weights, metrics = _assert_close_to_oracle(old, rollout, mask, level, mode, 2.0, None, 1e-4)
    assert (weights == 0).all()
    assert metrics["mismatch/rollout_is_veto_fraction"] == 1.0
    assert metrics["mismatch/rollout_is_catastrophic_token_fraction"] > 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode,veto", [("truncate", None), ("clip", 1e-4)])
def test_huge_log_ratios_stay_finite(dtype, level, mode, veto):
    gen = torch.Generator().manual_seed(17)
    # Log-probs anywhere in [-1000, 0]: log-ratios up to +-1000 and perplexities far beyond exp(20).
    rollout = (-1000.0 * torch.rand(8, 40, generator=gen, dtype=torch.float64)).to(dtype)
    old = (-1000.0 * torch.rand(8, 40, generator=gen, dtype=torch.float64)).to(dtype)
    old[0] = rollout[0] + 1000.0  # a row of +1000 (old above 0 is fine for the math)
    old[1] = rollout[1] - 1000.0
    mask = _make_mask(gen, 8, 40)
    mask[:2] = True
    weights, metrics = _assert_close_to_oracle(old, rollout, mask, level, mode, 2.0, None, veto)
    assert torch.isfinite(weights).all()
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("level", ("sequence", "geometric"))
@pytest.mark.parametrize("shift", (100.0, 1000.0))
def test_min_weight_saturates_when_every_sequence_is_far_above(level, shift):
    # Every S_i (and G_i) is >= 100: the table's exp(min_i S_i) falls under the closing rule of
    # docs/metrics.md, "every exp in a metric is saturated at exp(B)" (exp(1000) would be inf).
    old, rollout, mask = _make_inputs(19, batch=4, length=10, level=level)
    mask[:, 0] = True
    old = rollout + shift
    _, metrics = _assert_close_to_oracle(old, rollout, mask, level, "truncate", 2.0, None, None)
    assert metrics["mismatch/rollout_is_min"] == pytest.approx(math.exp(SAFETY_BOUND), rel=1e-12)
    assert metrics["mismatch/rollout_is_max"] == pytest.approx(math.exp(SAFETY_BOUND), rel=1e-12)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ("truncate", "clip"))
def test_single_valid_token(level, mode):
    old, rollout, _ = _make_inputs(23, batch=3, length=5, level=level)
    old[1, 2] = rollout[1, 2] + 0.3
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2] = True
    weights, metrics = _assert_close_to_oracle(old, rollout, mask, level, mode, 2.0, None, 1e-4)
    assert metrics["mismatch/rollout_is_std"] == 0.0
    assert metrics["mismatch/rollout_is_seq_std"] == 0.0
    log_weight = 0.3 / (1 + 1e-8) if level == "geometric" else 0.3
    assert weights[1, 2] == pytest.approx(math.exp(log_weight), rel=1e-12)
    assert weights.count_nonzero() == 1


@pytest.mark.parametrize("level", LEVELS)
def test_mask_dtypes_agree(level):
    old, rollout, mask = _make_inputs(29, batch=5, length=16, level=level)
    reference = _run_impl(old, rollout, mask, level, "clip", 2.0, None, 1e-2)
    for other in (mask.long(), mask.int(), mask.float(), mask.double(), mask.to(torch.uint8)):
        weights, metrics = _run_impl(old, rollout, other, level, "clip", 2.0, None, 1e-2)
        assert torch.equal(weights, reference[0])
        assert metrics == reference[1]
    # Non-zero means valid, whatever the value: weights are not scaled by the mask.
    gen = torch.Generator().manual_seed(1)
    scaled = mask.double() * (0.25 + 3.0 * torch.rand(mask.shape, generator=gen, dtype=torch.float64))
    _assert_close_to_oracle(old, rollout, scaled, level, "clip", 2.0, None, 1e-2)
    weights, metrics = _run_impl(old, rollout, scaled, level, "clip", 2.0, None, 1e-2)
    torch.testing.assert_close(weights, reference[0], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("level", LEVELS)
def test_non_contiguous_inputs(level):
    old, rollout, mask = _make_inputs(31, batch=6, length=24, level=level)
    old_t = old.t().contiguous().t()
    rollout_s = torch.stack([rollout, torch.full_like(rollout, 5.0)], dim=-1)[..., 0]
    mask_t = mask.t().contiguous().t()
    assert not (old_t.is_contiguous() or rollout_s.is_contiguous() or mask_t.is_contiguous())
    weights, _ = _assert_close_to_oracle(old_t, rollout_s, mask_t, level, "truncate", 2.0, None, 1e-4)
    dense_w, _ = _run_impl(old, rollout, mask, level, "truncate", 2.0, None, 1e-4)
    torch.testing.assert_close(weights, dense_w, rtol=1e-12, atol=0.0)


def test_weight_dtype_follows_inputs():
    old, rollout, mask = _make_inputs(37, batch=4, length=8)
    for old_dtype, rollout_dtype, want in [
        (torch.float64, torch.float64, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.bfloat16, torch.float64),
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float32, torch.float32),
    ]:
        a, b = old.to(old_dtype), rollout.to(rollout_dtype)
        weights, _ = _assert_close_to_oracle(a, b, mask, "token", "truncate", 2.0, None, 1e-4)
        assert weights.dtype == want, (old_dtype, rollout_dtype)


@pytest.mark.parametrize("level", LEVELS)
def test_weights_are_detached(level):
    old, rollout, mask = _make_inputs(41, batch=4, length=8, level=level)
    old = old.float().requires_grad_()
    rollout = rollout.float().requires_grad_()
    weights, metrics = _run_impl(old * 1.0, rollout, mask, level, "truncate", 2.0, None, 1e-4)
    assert not weights.requires_grad and weights.grad_fn is None
    assert all(type(value) is float for value in metrics.values())


@pytest.mark.parametrize("level", LEVELS)
def test_mask_mode_is_clip_and_default_lower_is_reciprocal(level):
    old, rollout, mask = _make_inputs(43, batch=8, length=32, level=level)
    clip_w, clip_m = _run_impl(old, rollout, mask, level, "clip", 1.5, None, 1e-4)
    mask_w, mask_m = _run_impl(old, rollout, mask, level, "mask", 1.5, None, 1e-4)
    assert torch.equal(clip_w, mask_w) and clip_m == mask_m
    explicit_w, explicit_m = _run_impl(old, rollout, mask, level, "clip", 1.5, 1 / 1.5, 1e-4)
    torch.testing.assert_close(explicit_w, clip_w, rtol=1e-12, atol=0.0)
    for key, value in clip_m.items():
        assert explicit_m[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("level", LEVELS)
def test_empty_rows_take_part_in_no_metric(level):
    old, rollout, mask = _make_inputs(47, batch=5, length=12, level=level)
    mask[:, 0] = True
    padded = [torch.cat([x, y]) for x, y in zip((old, rollout), _make_inputs(48, batch=3, length=12)[:2])]
    padded_mask = torch.cat([mask, torch.zeros(3, 12, dtype=torch.bool)])
    weights, metrics = _run_impl(old, rollout, mask, level, "clip", 2.0, None, 1e-4)
    padded_w, padded_m = _run_impl(*padded, padded_mask, level, "clip", 2.0, None, 1e-4)
    torch.testing.assert_close(padded_w[:5], weights, rtol=1e-12, atol=0.0)
    assert (padded_w[5:] == 0).all()
    for key, value in metrics.items():
        assert padded_m[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
