"""verl-HEAD-style rollout correction, single process, against the float64 oracle (docs/rollout_correction.md).

`compute_rollout_correction_and_rejection_mask` and `compute_offpolicy_metrics` are compared with
`tests/oracle_correction.py` (which verl's real helper validates, see tests/peers/) on random batches
over every option: IS level (token, sequence, geometric and its alias sequence_mean), TIS numbers,
IcePop bands, the two-sided clamp, batch normalisation, each rejection criterion alone and chained
with shared, per-criterion and list thresholds, k1 bands and numbers; batches hold empty rows, all
masked batches, NaN/inf on valid tokens and |log-ratios| up to 1000, in float64, float32 and bf16
with bool, float and integer masks. Batches and thresholds come from tests/correction_cases.py:
thresholds sit between neighbouring data values, so every criterion bites and no decision sits
within rounding of its threshold.

Tolerances. The oracle is float64 with correctly rounded sums; the implementation computes in float64
when a log-prob input is float64, else float32 (working epsilon `eps`). A log-weight carries an
absolute error of about `eps * A` (A: the |log-ratios| summed over what it aggregates, clamped at
the safety bound), which `exp` turns into a relative error; sums of N terms add `eps * log2(N)`;
metrics that cancel (means of mixed signs, `chi2_token = mean - 1`, `|s_i - 1|`) carry that error
relative to the magnitude before cancelling; moment-based standard deviations are compared through
the variance. On top: rel 1e-9 (float64) and 1e-5 (float32).
"""

import math

import pytest
import torch

from correction_cases import (
    cancellation_scale,
    is_moment_std,
    is_threshold,
    random_batch,
    rs_threshold,
    std_clamp_bound,
    valid_tokens,
)
from oracle_correction import RS_CRITERIA, SAFETY_BOUND, oracle_offpolicy_metrics, oracle_rollout_correction

try:
    from megatron_rollout_is import compute_offpolicy_metrics, compute_rollout_correction_and_rejection_mask

    _MISSING = None
except ImportError as error:  # the drop-ins land with issue 11; the oracle checks below run regardless
    _MISSING = f"megatron_rollout_is does not export the verl-HEAD drop-ins yet ({error})"

requires_dropin = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

E = 1e-8  # the contract's epsilon in token and row means
_SAFETY = 8.0  # multiplies every eps-based bound


# ---------------------------------------------------------------------------------------------
# Comparison with the oracle.
# ---------------------------------------------------------------------------------------------


def _make_batch(seed, dtype=torch.float64, mask_dtype=torch.bool, batch=8, length=48, huge=False):
    """Random batch of tests/correction_cases.py, empty rows included."""
    return random_batch(torch.Generator().manual_seed(seed), batch, length, dtype, mask_dtype, huge=huge)


def _error_model(old, rollout, mask):
    """(eps, base rel, amplitude A, log2 N, max |log-prob|) of this batch, per the module docstring."""
    wide = torch.float64 in (old.dtype, rollout.dtype)
    eps = torch.finfo(torch.float64 if wide else torch.float32).eps
    valid = valid_tokens(old, rollout, mask)
    lr = torch.where(valid, (old.double() - rollout.double()).abs().clamp(max=SAFETY_BOUND), 0.0)
    amplitude = float(lr.sum(-1).max()) if valid.any() else 0.0
    num_tokens = int(valid.sum())
    logprobs = torch.cat([old.double()[valid].abs(), rollout.double()[valid].abs()])
    return (
        eps,
        (1e-9 if wide else 1e-5),
        amplitude,
        math.log2(num_tokens + 2),
        float(logprobs.max()) if num_tokens else 0.0,
    )


def assert_metrics_close(got, want, old, rollout, mask, options=None):
    eps, base, amplitude, log_n, logprob_max = _error_model(old, rollout, mask)
    assert set(got) == set(want)
    rel = base + _SAFETY * eps * (1.0 + amplitude + log_n)
    failures = []
    for key, expected in want.items():
        value = got[key]
        if type(value) is not float or not math.isfinite(value):
            failures.append(f"{key}: {value!r} is not a finite Python float")
            continue
        if is_moment_std(key):
            scale = max(1.0, std_clamp_bound(key, options))
            ok = abs(value**2 - expected**2) <= 2 * rel * expected**2 + _SAFETY * eps * log_n * scale**2
        else:
            absolute = _SAFETY * eps * log_n * (cancellation_scale(key, want) + amplitude + logprob_max)
            ok = abs(value - expected) <= rel * abs(expected) + absolute
        if not ok:
            failures.append(f"{key}: got {value!r}, oracle {expected!r}")
    assert not failures, "\n".join(failures)


def assert_matches_oracle(old, rollout, mask, **options):
    """Runs the drop-in and the oracle on one batch and compares weights, mask and every metric."""
    weights, modified_mask, metrics = compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    want_w, want_mask, want_metrics = oracle_rollout_correction(old, rollout, mask, **options)
    wide = torch.float64 in (old.dtype, rollout.dtype)
    assert modified_mask.dtype == mask.dtype and modified_mask.shape == mask.shape
    assert torch.equal(modified_mask.cpu(), want_mask), (modified_mask != want_mask).nonzero()[:5].tolist()
    if want_w is None:
        assert weights is None
    else:
        assert weights.dtype == (torch.float64 if wide else torch.float32) and weights.shape == old.shape
        assert not weights.requires_grad and torch.isfinite(weights).all()
        eps, base, amplitude, log_n, _ = _error_model(old, rollout, mask)
        token_rel = base + _SAFETY * eps * (1.0 + amplitude + log_n)
        bad = (weights.double().cpu() - want_w).abs() > token_rel * want_w.abs()
        assert not bad.any(), f"weights differ at {bad.nonzero()[:5].tolist()}"
    assert_metrics_close(metrics, want_metrics, old, rollout, mask, options)
    return weights, modified_mask, metrics


# ---------------------------------------------------------------------------------------------
# The oracle against numbers worked out by hand (run with or without the drop-ins).
# ---------------------------------------------------------------------------------------------


def _from_log_ratios(old, log_ratio, mask):
    old = torch.tensor(old, dtype=torch.float64)
    return old, old - torch.tensor(log_ratio, dtype=torch.float64), torch.tensor(mask, dtype=torch.bool)


LN = math.log
# Row 0: lr = ln 3, 0, ln 1/2; row 1: ln 1.5, ln 0.8 and a padded token. N = 5.
HAND_BATCH = _from_log_ratios(
    [[-1.0, -2.0, -2.0], [-1.0, -1.0, -3.0]], [[LN(3), 0.0, LN(0.5)], [LN(1.5), LN(0.8), 7.0]], [[1, 1, 1], [1, 1, 0]]
)


def _hand_token_tis():
    """Token TIS at U = 2.5 (L = 0.4): raw 3, 1, 1/2 | 3/2, 4/5; w = 2.5, 1, 1/2 | 3/2, 4/5."""
    n = 5 + E
    mean, mean_square = 6.3 / n, 10.39 / n
    s0, s1 = 4.0 / (3 + E), 2.3 / (2 + E)
    mo0, mo1 = -5.0 / (3 + E), -2.0 / (2 + E)
    d0, d1 = -LN(1.5) / (3 + E), -LN(1.2) / (2 + E)
    expected = {
        "rollout_is_mean": mean,
        "rollout_is_max": 2.5,
        "rollout_is_min": 0.5,
        "rollout_is_ratio_fraction_high": 1 / n,
        "rollout_is_ratio_fraction_low": 0.0,
        "rollout_is_std": math.sqrt(mean_square - mean**2),
        "rollout_is_eff_sample_size": (mean + E) ** 2 / mean_square,
        "rollout_is_seq_mean": (s0 + s1) / 2,
        "rollout_is_seq_std": (s0 - s1) / math.sqrt(2),
        "rollout_is_seq_max": s0,
        "rollout_is_seq_min": s1,
        "rollout_is_seq_max_deviation": s0 - 1,
        "rollout_is_seq_fraction_high": 0.0,
        "rollout_is_seq_fraction_low": 0.0,
        "training_ppl": (math.exp(-mo0) + math.exp(-mo1)) / 2,
        "training_log_ppl": -(mo0 + mo1) / 2,
        "rollout_ppl": (math.exp(-mo0 - d0) + math.exp(-mo1 - d1)) / 2,
        "rollout_log_ppl": -(mo0 + d0 + mo1 + d1) / 2,
        "kl": -LN(1.8) / n,
        "k3_kl": (1.8 - LN(1.8)) / n,
        "log_ppl_diff": (d0 + d1) / 2,
        "log_ppl_abs_diff": -(d0 + d1) / 2,
        "log_ppl_diff_max": d1,
        "log_ppl_diff_min": d0,
        "ppl_ratio": (math.exp(d0) + math.exp(d1)) / 2,
        "chi2_token": 13.14 / n - 1,
        "chi2_seq": (2.25 + 1.44) / 2 - 1,
        "nonfinite_token_fraction": 0.0,
    }
    weights = [[2.5, 1.0, 0.5], [1.5, 0.8, 0.0]]
    return dict(rollout_is="token", rollout_is_threshold=2.5), weights, [[1, 1, 1], [1, 1, 0]], expected


def _hand_seq_sum_k2():
    """seq_sum_k2 at U = 0.2: v_0 = (ln^2 3 + ln^2 2) / 2 = 0.844 rejects row 0, v_1 = 0.107 keeps row 1."""
    n = 5 + E
    v0, v1 = (LN(3) ** 2 + LN(0.5) ** 2) / 2, (LN(1.5) ** 2 + LN(0.8) ** 2) / 2
    c_mean, c_square = (0.6 + 2 * v1) / n, (0.12 + 2 * v1**2) / n
    p = "rollout_rs_seq_sum_k2_"
    expected = {
        p + "mean": (3 * v0 + 2 * v1) / n,
        p + "max": v0,
        p + "min": v1,
        p + "fraction_high": 0.5,
        p + "fraction_low": 0.0,
        p + "std": math.sqrt(c_square - c_mean**2),
        p + "seq_mean": (v0 + v1) / 2,
        p + "seq_std": (v0 - v1) / math.sqrt(2),
        p + "seq_max": v0,
        p + "seq_min": v1,
        p + "seq_max_deviation": v0,
        p + "seq_fraction_high": 0.5,
        p + "masked_fraction": 3 / n,
        p + "seq_masked_fraction": 0.5,
        "rollout_rs_masked_fraction": 3 / n,
        "rollout_rs_seq_masked_fraction": 0.5,
    }
    return dict(rollout_rs="seq_sum_k2", rollout_rs_threshold=0.2), None, [[0, 0, 0], [1, 1, 0]], expected


HAND_CASES = {"token_tis": _hand_token_tis(), "seq_sum_k2": _hand_seq_sum_k2()}


def _run(source, old, rollout, mask, **options):
    run = oracle_rollout_correction if source == "oracle" else compute_rollout_correction_and_rejection_mask
    return run(old, rollout, mask, **options)


SOURCES = ["oracle", pytest.param("implementation", marks=requires_dropin)]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", HAND_CASES)
def test_hand_computed(source, name):
    options, weights, modified_mask, expected = HAND_CASES[name]
    got_w, got_mask, got_m = _run(source, *HAND_BATCH, **options)
    if weights is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w.double(), torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert torch.equal(got_mask, torch.tensor(modified_mask, dtype=torch.bool))
    for key, want in expected.items():
        assert got_m["rollout_corr/" + key] == pytest.approx(want, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("source", SOURCES)
def test_icepop_and_clamp_by_hand(source):
    """Raw token ratios 0.4, 0.8, 6 against the band [0.5, 5]: IcePop zeroes, clamp bounds both ways
    (a number U clamps to [1/U, U])."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    rollout = -torch.tensor([[0.4, 0.8, 6.0]], dtype=torch.float64).log()
    mask = torch.ones(1, 3, dtype=torch.bool)
    w, got_mask, m = _run(source, old, rollout, mask, rollout_is="token", rollout_is_threshold="0.5_5.0")
    torch.testing.assert_close(w.double(), torch.tensor([[0.0, 0.8, 0.0]], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(got_mask, mask)
    n = 3 + E
    assert m["rollout_corr/rollout_is_oob_ratio"] == pytest.approx(2 / n, rel=1e-12)
    assert m["rollout_corr/rollout_is_std"] == pytest.approx(math.sqrt(0.64 / n - (0.8 / n) ** 2), rel=1e-12)
    assert m["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx((0.8 / n + E) ** 2 / (0.64 / n), rel=1e-12)
    w, _, m = _run(
        source, old, rollout, mask, rollout_is="token", rollout_is_threshold="0.5_5.0", rollout_is_mode="clamp"
    )
    torch.testing.assert_close(w.double(), torch.tensor([[0.5, 0.8, 5.0]], dtype=torch.float64), rtol=1e-12, atol=0)
    assert "rollout_corr/rollout_is_oob_ratio" not in m
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / n, rel=1e-12)
    assert m["rollout_corr/rollout_is_ratio_fraction_low"] == pytest.approx(1 / n, rel=1e-12)
    w, _, _ = _run(source, old, rollout, mask, rollout_is="token", rollout_is_threshold=2.0, rollout_is_mode="clamp")
    torch.testing.assert_close(w.double(), torch.tensor([[0.5, 0.8, 2.0]], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("source", SOURCES)
def test_k1_band_bounds_the_inverse_ratio(source):
    """k1 = -log(rho), so `"lo_hi"` keeps rho in [1/hi, 1/lo] (verl's code): rho = 1.5 fails "0.7_2.0"."""
    old = torch.zeros(2, 2, dtype=torch.float64)
    rollout = torch.tensor([[-LN(1.5)] * 2, [LN(1.5)] * 2], dtype=torch.float64)  # rho = 1.5, then 1/1.5
    mask = torch.ones(2, 2, dtype=torch.bool)
    for criterion in ("token_k1", "seq_sum_k1", "seq_mean_k1"):
        threshold = "0.7_2.0" if criterion != "seq_sum_k1" else "0.45_4.0"  # the sum doubles log(rho)
        _, got_mask, _ = _run(source, old, rollout, mask, rollout_rs=criterion, rollout_rs_threshold=threshold)
        assert got_mask.tolist() == [[False, False], [True, True]], criterion
        _, got_mask, _ = _run(source, old, rollout, mask, rollout_rs=criterion, rollout_rs_threshold=2.5)
        assert got_mask.all(), criterion  # a number x is the band [1/x, x]: symmetric


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("level", ["sequence", "geometric", "sequence_mean"])
def test_batch_normalisation_by_hand(source, level):
    """Sequence weights 2 (S = ln 2 over 2 tokens) and 1/2 (one token), an empty row left out: f = mean."""
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    rollout = torch.tensor([[-LN(2), 0.0], [LN(2), 5.0], [9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    w0 = 2.0 if level == "sequence" else math.exp(LN(2) / (2 + E))
    w1 = 0.5 if level == "sequence" else math.exp(-LN(2) / (1 + E))
    factor = (w0 * 2 / (2 + E) + w1 / (1 + E)) / 2  # the mean of the row means
    w, _, m = _run(
        source, old, rollout, mask, rollout_is=level, rollout_is_threshold=3.0, rollout_is_batch_normalize=True
    )
    want = torch.tensor([[w0, w0], [w1, 0.0], [0.0, 0.0]], dtype=torch.float64) / factor
    torch.testing.assert_close(w.double(), want, rtol=1e-12, atol=0)
    assert m["rollout_corr/rollout_is_batch_norm_factor"] == pytest.approx(factor, rel=1e-12)
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx((2 * w0 + w1) / (3 + E), rel=1e-12)  # before it


def test_oracle_key_sets():
    old, rollout, mask = _make_batch(1, batch=3, length=5)
    _, _, m = oracle_rollout_correction(
        old,
        rollout,
        mask,
        rollout_is="token",
        rollout_is_threshold="0.5_2",
        rollout_is_batch_normalize=True,
        rollout_rs="token_k1,seq_max_k3",
        rollout_rs_threshold="0.5_2,1.0",
    )
    per_criterion = {
        "mean",
        "max",
        "min",
        "std",
        "fraction_high",
        "fraction_low",
        "seq_mean",
        "seq_std",
        "seq_max",
        "seq_min",
        "seq_max_deviation",
        "seq_fraction_high",
        "masked_fraction",
        "seq_masked_fraction",
    }
    assert {k for k in m if "token_k1" in k} == {
        f"rollout_corr/rollout_rs_token_k1_{s}" for s in per_criterion | {"seq_fraction_low"}
    }
    assert {k for k in m if "seq_max_k3" in k} == {f"rollout_corr/rollout_rs_seq_max_k3_{s}" for s in per_criterion}
    assert len([k for k in m if k.startswith("rollout_corr/rollout_is_")]) == 16
    assert len(oracle_offpolicy_metrics(old, rollout, mask)) == 14
    assert set(oracle_offpolicy_metrics(old, None, mask)) == {"training_ppl", "training_log_ppl"}


# ---------------------------------------------------------------------------------------------
# The drop-ins against the oracle, randomized.
# ---------------------------------------------------------------------------------------------

IS_CASES = [
    (level, form, mode)
    for level in ("token", "sequence", "geometric", "sequence_mean")
    for form, mode in (("number", None), ("string", None), ("band", None), ("number", "mask"), ("band", "clamp"))
]


@requires_dropin
@pytest.mark.parametrize("level,form,mode", IS_CASES)
def test_is_weights_match_oracle(level, form, mode):
    seed = 100 + IS_CASES.index((level, form, mode))
    gen = torch.Generator().manual_seed(seed)
    old, rollout, mask = _make_batch(seed, mask_dtype=(torch.bool, torch.float32, torch.int64)[seed % 3])
    threshold = is_threshold(form, "geometric" if level == "sequence_mean" else level, old, rollout, mask, gen)
    for normalize in (False, True):
        assert_matches_oracle(
            old,
            rollout,
            mask,
            rollout_is=level,
            rollout_is_threshold=threshold,
            rollout_is_mode=mode,
            rollout_is_batch_normalize=normalize,
        )


@requires_dropin
@pytest.mark.parametrize("criterion", RS_CRITERIA)
def test_each_rejection_criterion_matches_oracle(criterion):
    seed = 200 + RS_CRITERIA.index(criterion)
    gen = torch.Generator().manual_seed(seed)
    for mask_dtype in (torch.bool, torch.float64):
        old, rollout, mask = _make_batch(seed, mask_dtype=mask_dtype)
        _, modified_mask, metrics = assert_matches_oracle(
            old,
            rollout,
            mask,
            rollout_rs=criterion,
            rollout_rs_threshold=rs_threshold(criterion, old, rollout, mask, gen),
        )
        assert 0.0 < metrics[f"rollout_corr/rollout_rs_{criterion}_masked_fraction"] < 1.0  # it bites


CHAINS = [
    ("token_k1", "seq_mean_k3"),
    ("seq_sum_k2", "token_k3", "seq_max_k2"),
    ("seq_mean_k1", "seq_sum_k1", "token_k2", "seq_max_k3"),
    ("seq_sum_k3", "seq_mean_k2"),
]


@requires_dropin
@pytest.mark.parametrize("chain", CHAINS, ids="+".join)
@pytest.mark.parametrize("spelling", ["per_criterion", "list", "shared", "duplicates"])
def test_chained_criteria_match_oracle(chain, spelling):
    seed = 300 + 10 * CHAINS.index(chain) + ["per_criterion", "list", "shared", "duplicates"].index(spelling)
    gen = torch.Generator().manual_seed(seed)
    old, rollout, mask = _make_batch(seed, mask_dtype=torch.float32)
    thresholds = [rs_threshold(name, old, rollout, mask, gen) for name in chain]
    rollout_rs = ",".join(chain)
    if spelling == "per_criterion":
        spec = ", ".join(str(t) for t in thresholds)
    elif spelling == "list":
        spec = thresholds
    elif spelling == "shared":
        spec = 1.0 + float(torch.rand(1, generator=gen))  # one number >= 1 is valid for every criterion
    else:
        rollout_rs, spec = f" {rollout_rs} , {chain[0]}", ",".join(str(t) for t in thresholds)
    is_options = dict(rollout_is="token", rollout_is_threshold=2.0) if seed % 2 else {}
    assert_matches_oracle(old, rollout, mask, rollout_rs=rollout_rs, rollout_rs_threshold=spec, **is_options)


@requires_dropin
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_low_precision_inputs_match_oracle(dtype, level):
    seed = 400 + 3 * (dtype == torch.bfloat16) + ["token", "sequence", "geometric"].index(level)
    gen = torch.Generator().manual_seed(seed)
    old, rollout, mask = _make_batch(seed, dtype=dtype)
    chain = ("token_k1", "seq_sum_k2", "seq_max_k3")
    spec = ",".join(str(rs_threshold(name, old, rollout, mask, gen)) for name in chain)
    form = "band" if level == "token" else "number"
    assert_matches_oracle(
        old,
        rollout,
        mask,
        rollout_is=level,
        rollout_is_threshold=is_threshold(form, level, old, rollout, mask, gen),
        rollout_is_batch_normalize=True,
        rollout_rs=",".join(chain),
        rollout_rs_threshold=spec,
    )


@requires_dropin
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_offpolicy_metrics_match_oracle(dtype):
    old, rollout, mask = _make_batch(500, dtype=dtype, mask_dtype=torch.float32)
    assert_metrics_close(
        compute_offpolicy_metrics(old, rollout, mask), oracle_offpolicy_metrics(old, rollout, mask), old, rollout, mask
    )
    assert_metrics_close(
        compute_offpolicy_metrics(old, None, mask), oracle_offpolicy_metrics(old, None, mask), old, old, mask
    )


# ---------------------------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------------------------

EVERYTHING = dict(
    rollout_is="sequence",
    rollout_is_threshold="0.5_2.0",
    rollout_is_batch_normalize=True,
    rollout_rs="token_k1,seq_mean_k2,seq_max_k3",
    rollout_rs_threshold="0.5_2.0,0.1,1.0",
)


@requires_dropin
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64], ids=str)
def test_all_masked_batch_gives_zeros(mask_dtype):
    old, rollout, _ = _make_batch(7, batch=3, length=6)
    mask = torch.zeros(3, 6, dtype=mask_dtype)
    weights, modified_mask, metrics = assert_matches_oracle(old, rollout, mask, **EVERYTHING)
    assert (weights == 0).all() and not modified_mask.any()
    assert all(value == 0.0 for value in metrics.values())
    assert all(value == 0.0 for value in compute_offpolicy_metrics(old, rollout, mask).values())


@requires_dropin
def test_non_finite_log_probs_are_dropped():
    """NaN/inf on valid tokens: the result is the one without those tokens, plus their count."""
    old, rollout, mask = _make_batch(8, batch=6, length=20)
    mask[:, :3] = True
    broken_old, broken_rollout = old.clone(), rollout.clone()
    broken_old[0, 1], broken_rollout[2, 0], broken_old[4, 2] = float("nan"), -float("inf"), float("inf")
    old[:, -2:] = rollout[:, -2:] = float("nan")  # padding may hold anything
    mask[:, -2:] = False
    broken_old[:, -2:] = broken_rollout[:, -2:] = float("nan")
    weights, modified_mask, metrics = assert_matches_oracle(broken_old, broken_rollout, mask, **EVERYTHING)
    dropped = mask.clone()
    dropped[0, 1] = dropped[2, 0] = dropped[4, 2] = False
    clean_w, clean_mask, clean_m = compute_rollout_correction_and_rejection_mask(old, rollout, dropped, **EVERYTHING)
    assert torch.equal(weights, clean_w) and torch.equal(modified_mask, clean_mask)
    num_valid = int(dropped.sum())
    assert metrics.pop("rollout_corr/nonfinite_token_fraction") == pytest.approx(3 / (3 + num_valid + 1e-8), rel=1e-12)
    assert clean_m.pop("rollout_corr/nonfinite_token_fraction") == 0.0
    assert metrics == pytest.approx(clean_m, rel=1e-12, abs=1e-15)


@requires_dropin
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_huge_log_ratios_stay_finite(dtype):
    """|lr| up to 1000: every exp saturates at exp(20), nothing overflows, the oracle still holds."""
    old, rollout, mask = _make_batch(9, dtype=dtype, huge=True)
    for level in ("token", "sequence", "geometric"):
        weights, _, metrics = assert_matches_oracle(old, rollout, mask, **{**EVERYTHING, "rollout_is": level})
        assert torch.isfinite(weights).all() and all(math.isfinite(v) for v in metrics.values())
    metrics = compute_offpolicy_metrics(old, rollout, mask)
    assert metrics["k3_kl"] > 1.0 and all(math.isfinite(v) for v in metrics.values())


@requires_dropin
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_icepop_band_missing_every_weight_stays_finite(level):
    """Every raw weight outside the band: verl divides by zero in the ESS; here ESS 0, factor 1."""
    old, rollout, mask = _make_batch(12, batch=4, length=10)
    rollout = old + 3.0 + torch.rand(old.shape, dtype=torch.float64)  # every ratio below exp(-3)
    weights, _, metrics = assert_matches_oracle(
        old, rollout, mask, rollout_is=level, rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True
    )
    assert not weights.any()
    assert metrics["rollout_corr/rollout_is_eff_sample_size"] == 0.0
    assert metrics["rollout_corr/rollout_is_batch_norm_factor"] == 1.0


@requires_dropin
def test_sequence_mean_is_the_geometric_level():
    old, rollout, mask = _make_batch(10)
    geometric = compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_is="geometric")
    alias = compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_is="sequence_mean")
    assert torch.equal(geometric[0], alias[0]) and geometric[2] == alias[2]


BAD_ARGUMENTS = [
    (dict(rollout_is="token", rollout_is_threshold=True), "rollout_is_threshold"),
    (dict(rollout_is="token", rollout_is_threshold="2.0_0.5"), "rollout_is_threshold"),
    (dict(rollout_is="token", rollout_is_threshold=-1.0), "rollout_is_threshold"),
    (dict(rollout_is="token", rollout_is_threshold="0.5_2.0", rollout_is_mode="truncate"), "rollout_is_mode"),
    (dict(rollout_is="bogus"), "rollout_is"),
    (dict(rollout_rs="token_k4", rollout_rs_threshold=2.0), "rollout_rs"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold=None), "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2,seq_sum_k3", rollout_rs_threshold="1.0,2.0,3.0"), "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="0.5_2.0"), "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold=0.0), "rollout_rs_threshold"),
    (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="1.5_0.5"), "rollout_rs_threshold"),
    (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold=0.5), "rollout_rs_threshold"),
]


@requires_dropin
@pytest.mark.parametrize("options,argument", BAD_ARGUMENTS, ids=lambda x: str(x)[:40] if isinstance(x, dict) else x)
def test_bad_arguments_name_the_argument(options, argument):
    old, rollout, mask = _make_batch(11, batch=2, length=4)
    with pytest.raises((ValueError, TypeError), match=argument):
        compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)


# ---------------------------------------------------------------------------------------------
# compute_is_metrics: verl HEAD's helper takes the weights its caller built.
# ---------------------------------------------------------------------------------------------


def _hand_weights(log_ratio, mask, level, threshold):
    """float64 raw and truncated weights `[b, s]` written from the contract (0 on masked tokens)."""
    valid = mask != 0
    if level == "token":
        log_weight = log_ratio
    else:
        log_weight = torch.where(valid, log_ratio, 0.0).sum(dim=1, keepdim=True)
        if level == "geometric":
            log_weight = log_weight / valid.sum(dim=1, keepdim=True)
        log_weight = log_weight.expand_as(log_ratio)
    raw = torch.where(valid, torch.exp(log_weight.clamp(-SAFETY_BOUND, SAFETY_BOUND)), 0.0)
    return raw.clamp(max=threshold), raw


@pytest.mark.parametrize(
    "level, form",
    [
        ("token", "tokens"),
        ("sequence", "tokens"),
        ("sequence", "row_sums"),
        ("geometric", "tokens"),
        ("geometric", "row_sums"),
    ],
)
def test_compute_is_metrics_accepts_the_weights_of_each_level(level, form):
    from megatron_rollout_is import compute_is_metrics

    old, rollout, mask = _make_batch(12, batch=6, length=10)
    mask[:, -2:] = False  # padding whose log ratios are not 0
    log_ratio = old - rollout
    assert bool((log_ratio[:, -2:] != 0).all())
    weights, raw = _hand_weights(log_ratio, mask, level, 2.0)
    if form == "row_sums":  # verl passes a sequence level's [b, 1] sums
        log_ratio = torch.where(mask, log_ratio, 0.0).sum(dim=1, keepdim=True)
    metrics = compute_is_metrics(weights, raw, log_ratio, mask, level, 2.0)
    _, _, expected = oracle_rollout_correction(old, rollout, mask, rollout_is=level, rollout_is_threshold=2.0)
    expected = {key.split("/", 1)[1]: value for key, value in expected.items() if "/rollout_is_" in key}
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    with pytest.raises(ValueError, match="raw_rollout_is_weights are not the weights"):
        compute_is_metrics(weights, raw * 1.1, log_ratio, mask, level, 2.0)


@pytest.mark.parametrize("argument", ["rollout_is", "rollout_is_threshold"])
def test_compute_is_metrics_without_weights_names_the_argument(argument):
    from megatron_rollout_is import compute_is_metrics

    old, rollout, mask = _make_batch(13, batch=2, length=4)
    weights, raw = _hand_weights(old - rollout, mask, "token", 2.0)
    arguments = {"rollout_is": "token", "rollout_is_threshold": 2.0}
    arguments[argument] = None
    with pytest.raises(ValueError, match=rf"needs {argument}, got None: rollout_is is one of"):
        compute_is_metrics(weights, raw, old - rollout, mask, **arguments)
