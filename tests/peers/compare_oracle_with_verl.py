#!/usr/bin/env python3
"""Checks this project's float64 oracles against verl's real code (a tool, not part of the suite).

    python tests/peers/compare_oracle_with_verl.py head  [--cases 300] [--seed 0]
    python tests/peers/compare_oracle_with_verl.py 0.6.0 [--cases 200] [--seed 0]

Run it with a Python where `verl` (the 0.9.1 wheel for `head`, the 0.6.0 wheel for `0.6.0`) and
torch import; `bash tests/peers/run_verl_tests.sh compare-head` sets one up. It never imports
`megatron_rollout_is`.

`head`: `tests/oracle_correction.py` against verl's `compute_rollout_correction_and_rejection_mask`
and `compute_offpolicy_metrics` on random batches without empty rows, for every option (IS level,
TIS and IcePop thresholds, batch normalisation, each rejection criterion alone and chained, shared
and per-criterion thresholds, k1 bands), then one probe per documented difference
(docs/rollout_correction.md, "Differences from verl HEAD"), which must show verl differing exactly
as documented. `0.6.0`: `tests/oracle.py` against verl 0.6.0's `compute_rollout_importance_weights`
(verl's clip-mode names included) and `compute_mismatch_metrics`.

Tolerances (float64 inputs). verl's `masked_mean` divides by `mask.sum() + 1e-8`; the sum of a
bool/integer/float32 mask is float32, where the 1e-8 vanishes, while the contract keeps it (as verl
does for a float64 mask). With a float64 mask the two agree to rounding (rel 1e-11, abs 1e-13);
with any other mask to rel 1e-7 and 1e-8 relative to the magnitude before any cancellation.
Moment-based `_std` values are compared through the variance (an absolute `1e-8 * scale^2`): the
contract's `1e-8` alone gives a constant column a std of `scale * sqrt(1e-8 / N)`. k3 terms carry
an absolute 1e-13 (verl's `exp(lr) - 1 - lr` against `expm1(lr) - lr`). Exit status 1 when an
undocumented disagreement shows.
"""

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from correction_cases import (  # noqa: E402
    cancellation_scale,
    is_moment_std,
    is_threshold,
    random_batch,
    rs_threshold,
    std_clamp_bound,
)
from oracle import oracle_mismatch_metrics, oracle_rollout_is  # noqa: E402
from oracle_correction import RS_CRITERIA, oracle_offpolicy_metrics, oracle_rollout_correction  # noqa: E402

MASK_DTYPES = (torch.bool, torch.float32, torch.float64, torch.int64)
PROJECT_ONLY_KEYS = {"rollout_corr/nonfinite_token_fraction", "nonfinite_token_fraction"}


# ---------------------------------------------------------------------------------------------
# Random batches.
# ---------------------------------------------------------------------------------------------


def _random_batch(gen, dtype=torch.float64, mask_dtype=torch.bool, empty_rows=False):
    """A batch of 1..8 rows of 1..48 tokens, without empty rows unless asked."""
    batch = int(torch.randint(1, 9, (1,), generator=gen))
    length = int(torch.randint(1, 49, (1,), generator=gen))
    return random_batch(gen, batch, length, dtype, mask_dtype, empty_rows=empty_rows)


def _rs_threshold(name, old, rollout, mask, gen):
    """float32 k3 bounds stay >= 1e-3, above the cancellation of verl's `exp(lr) - 1 - lr`
    (documented, and probed separately)."""
    floor = 1e-3 if name.endswith("k3") and old.dtype != torch.float64 else 1e-12
    return rs_threshold(name, old, rollout, mask, gen, floor)


def _is_threshold(level, old, rollout, mask, gen):
    """Every spelling verl takes: an int, a string number, a float (TIS) or a `"lo_hi"` band (IcePop)."""
    pick = float(torch.rand(1, generator=gen))
    if pick < 0.15:
        return 2
    form = "string" if pick < 0.3 else "number" if pick < 0.6 else "band"
    return is_threshold(form, level, old, rollout, mask, gen)


def head_options(gen, old, rollout, mask):
    """Every option combination of verl HEAD's API, drawn for this batch."""
    options = []
    for rollout_is in (None, "token", "sequence"):
        for normalize in (False, True):
            threshold = _is_threshold(rollout_is or "token", old, rollout, mask, gen)
            options.append(
                dict(rollout_is=rollout_is, rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize)
            )
    for name in RS_CRITERIA:
        options.append(dict(rollout_rs=name, rollout_rs_threshold=_rs_threshold(name, old, rollout, mask, gen)))
    chain = [RS_CRITERIA[int(i)] for i in torch.randperm(len(RS_CRITERIA), generator=gen)[:3]]
    per_criterion = ",".join(str(_rs_threshold(name, old, rollout, mask, gen)) for name in chain)
    options.append(
        dict(
            rollout_is="token",
            rollout_is_threshold=_is_threshold("token", old, rollout, mask, gen),
            rollout_rs=" , ".join(chain),
            rollout_rs_threshold=per_criterion,
        )
    )
    options.append(
        dict(
            rollout_is="sequence",
            rollout_is_threshold=2.0,
            rollout_is_batch_normalize=True,
            rollout_rs=",".join(chain + chain[:1]),
            rollout_rs_threshold=1.0 + float(torch.rand(1, generator=gen)),
        )
    )
    return options


# ---------------------------------------------------------------------------------------------
# Comparison.
# ---------------------------------------------------------------------------------------------


def _tolerance(key, mask_dtype, wide, want):
    """(kind, rel, abs) for one metric, per the module docstring; `want` is the oracle's metrics."""
    if not wide:
        rel, absolute = 1e-4, 1e-6
    elif mask_dtype == torch.float64:
        rel, absolute = 1e-11, 1e-13
    else:
        # Where the 1e-8 sits differently: 1e-8 relative to the magnitude before any cancellation.
        rel, absolute = 1e-7, 1e-8 * cancellation_scale(key, want)
    if "fraction" in key:
        rel = max(rel, 1.2e-7)  # verl averages float32 flags (`.float().mean()`) even for float64 input
    if is_moment_std(key):
        return "variance", rel, 1e-8 if wide else 1e-5
    return "value", rel, absolute


def compare_metrics(got, want, mask_dtype, wide, scales=None):
    """Disagreements between verl's metrics `got` and the oracle's `want`, as strings.

    `scales`: the clamp bound of each moment-based std (its variance tolerance scales with it).
    """
    problems = []
    missing = set(want) - set(got) - PROJECT_ONLY_KEYS
    extra = set(got) - set(want)
    if missing or extra:
        problems.append(f"key sets differ: oracle only {sorted(missing)}, verl only {sorted(extra)}")
    for key in sorted(set(got) & set(want)):
        g, w = float(got[key]), float(want[key])
        kind, rel, absolute = _tolerance(key, mask_dtype, wide, want)
        if kind == "variance":
            scale = max(1.0, (scales or {}).get(key, 1.0)) ** 2
            ok = abs(g * g - w * w) <= absolute * scale + 2 * rel * w * w
        else:
            ok = abs(g - w) <= absolute + rel * abs(w)
        if not (ok or (math.isnan(g) and math.isnan(w))):
            problems.append(f"{key}: verl {g!r} oracle {w!r}")
    return problems


def _std_scales(options, metrics):
    """Clamp bound of every moment-based std in `metrics` (the variance tolerance scales with its square)."""
    return {key: std_clamp_bound(key, options) for key in metrics if is_moment_std(key)}


def compare_head_case(verl, old, rollout, mask, options):
    wide = old.dtype == torch.float64
    weights, oracle_mask, oracle_metrics = oracle_rollout_correction(old, rollout, mask, **options)
    try:
        proto, verl_mask, verl_metrics = verl.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, **options
        )
    except ZeroDivisionError:
        # Documented: verl's effective sample size divides by zero when every IcePop weight is 0.
        all_zero = weights is not None and not weights.any()
        return ([] if all_zero else ["verl raised ZeroDivisionError"]), {"icepop_all_zero": True}
    problems = []
    if (proto is None) != (weights is None):
        problems.append(f"weights: verl {proto is not None}, oracle {weights is not None}")
    elif weights is not None:
        verl_w = proto.batch["rollout_is_weights"].double()
        rel = 1e-7 if wide else 1e-5 * (1.0 + float((old.double() - rollout.double()).abs().sum(-1).max()))
        bad = (verl_w - weights).abs() > rel * weights.abs() + (1e-300 if wide else 1e-30)
        if bad.any():
            problems.append(f"weights differ at {bad.nonzero()[:3].tolist()}")
    if verl_mask.dtype != oracle_mask.dtype or not torch.equal(verl_mask, oracle_mask):
        problems.append(f"modified mask differs ({verl_mask.dtype} vs {oracle_mask.dtype})")
    problems += compare_metrics(verl_metrics, oracle_metrics, mask.dtype, wide, _std_scales(options, oracle_metrics))
    return problems, oracle_metrics


def _bites(metrics):
    """What bit in this case: criteria rejecting a proper subset of tokens, TIS, IcePop, normalisation."""
    prefix, suffix = "rollout_corr/rollout_rs_", "_masked_fraction"
    names = {key[len(prefix) : -len(suffix)] for key in metrics if key.startswith(prefix) and key.endswith(suffix)}
    bitten = {name for name in names if name in RS_CRITERIA and 0.0 < metrics[prefix + name + suffix] < 1.0}
    if 0.0 < metrics.get("rollout_corr/rollout_is_ratio_fraction_high", 0.0) < 1.0:
        bitten.add("IS weights above U")
    if 0.0 < metrics.get("rollout_corr/rollout_is_oob_ratio", 0.0) < 1.0:
        bitten.add("IcePop zeroing some")
    if metrics.get("rollout_corr/rollout_is_batch_norm_factor", 1.0) != 1.0:
        bitten.add("batch normalisation")
    return bitten


def run_head_random(verl, cases, seed):
    gen = torch.Generator().manual_seed(seed)
    failures, bitten, compared = [], {}, 0
    for case in range(cases):
        wide = case % 5 != 4
        mask_dtype = MASK_DTYPES[case % len(MASK_DTYPES)]
        old, rollout, mask = _random_batch(gen, torch.float64 if wide else torch.float32, mask_dtype)
        for options in head_options(gen, old, rollout, mask):
            problems, oracle_metrics = compare_head_case(verl, old, rollout, mask, options)
            compared += 1
            if "icepop_all_zero" in oracle_metrics:
                bitten["(IcePop band empty: verl ZeroDivisionError)"] = (
                    bitten.get("(IcePop band empty: verl ZeroDivisionError)", 0) + 1
                )
            for name in _bites(oracle_metrics):
                bitten[name] = bitten.get(name, 0) + 1
            failures += [f"case {case} {old.dtype} mask {mask_dtype} {options}: {p}" for p in problems]
        got = verl.compute_offpolicy_metrics(old, rollout, mask)
        failures += [
            f"case {case} offpolicy: {p}"
            for p in compare_metrics(got, oracle_offpolicy_metrics(old, rollout, mask), mask.dtype, wide)
        ]
        got = verl.compute_offpolicy_metrics(old, None, mask)
        failures += [
            f"case {case} offpolicy without rollout: {p}"
            for p in compare_metrics(got, oracle_offpolicy_metrics(old, None, mask), mask.dtype, wide)
        ]
    print(
        f"head: {compared} option sets on {cases} random batches (float64 and float32, masks "
        f"{', '.join(str(d).removeprefix('torch.') for d in MASK_DTYPES)}), plus compute_offpolicy_metrics"
    )
    print(
        "  cases where it bit (criteria: rejected a proper subset of tokens): "
        + ", ".join(f"{name} {count}" for name, count in sorted(bitten.items()))
    )
    return failures


# ---------------------------------------------------------------------------------------------
# The documented differences, one probe each.
# ---------------------------------------------------------------------------------------------


def probe_empty_rows(verl):
    """Empty rows: the oracle equals verl on the batch without them; verl with them differs."""
    gen = torch.Generator().manual_seed(7)
    old, rollout, mask = random_batch(gen, 4, 12, empty_rows=False)
    mask[1] = False
    keep_rows = [i for i in range(len(mask)) if i != 1]
    options = dict(
        rollout_is="sequence",
        rollout_is_threshold=1.5,
        rollout_rs="token_k2,seq_mean_k1",
        rollout_rs_threshold=f"{_rs_threshold('token_k2', old, rollout, mask, gen)},1.05",
    )
    _, _, oracle_metrics = oracle_rollout_correction(old, rollout, mask, **options)
    _, _, verl_without = verl.compute_rollout_correction_and_rejection_mask(
        old[keep_rows], rollout[keep_rows], mask[keep_rows], **options
    )
    _, _, verl_with = verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    scales = _std_scales(options, oracle_metrics)
    same_without = compare_metrics(verl_without, oracle_metrics, torch.bool, True, scales)
    differing = sorted(
        problem.split(":")[0].removeprefix("rollout_corr/")
        for problem in compare_metrics(verl_with, oracle_metrics, torch.bool, True, scales)
    )
    return not same_without, (
        f"oracle == verl without the empty row {same_without or ''}; with it verl differs in {differing}"
    )


def probe_all_masked(verl):
    old = torch.randn(2, 3, dtype=torch.float64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    _, _, metrics = oracle_rollout_correction(
        old, old - 0.1, mask, rollout_is="token", rollout_rs="token_k2", rollout_rs_threshold=1.0
    )
    try:
        verl.compute_rollout_correction_and_rejection_mask(old, old - 0.1, mask, rollout_is="token")
        raised = "nothing"
    except (ValueError, AssertionError) as error:
        raised = type(error).__name__
    return raised != "nothing" and all(v == 0.0 for v in metrics.values()), f"verl raises {raised}; oracle all 0.0"


def probe_icepop_all_zero(verl):
    old = torch.zeros(2, 4, dtype=torch.float64)
    rollout = torch.full((2, 4), 3.0, dtype=torch.float64)  # every ratio exp(-3), below the band
    mask = torch.ones(2, 4, dtype=torch.bool)
    outcome = {}
    for normalize in (False, True):
        try:
            _, _, m = verl.compute_rollout_correction_and_rejection_mask(
                old,
                rollout,
                mask,
                rollout_is="token",
                rollout_is_threshold="0.5_2.0",
                rollout_is_batch_normalize=normalize,
            )
            outcome[normalize] = f"factor {m.get('rollout_corr/rollout_is_batch_norm_factor')}"
        except ZeroDivisionError:
            outcome[normalize] = "ZeroDivisionError"
    _, _, m = oracle_rollout_correction(
        old, rollout, mask, rollout_is="token", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True
    )
    detail = (
        f"verl without normalisation: {outcome[False]}, with: {outcome[True]}; oracle factor "
        f"{m['rollout_corr/rollout_is_batch_norm_factor']}, "
        f"eff_sample_size {m['rollout_corr/rollout_is_eff_sample_size']}"
    )
    return outcome[True] == "ZeroDivisionError", detail


def probe_saturation(verl):
    """k3_kl past lr = 88 (float32), perplexities past 20 nats, sequence rollout_is_min past B."""
    old = torch.tensor([[0.0, -1.0], [-0.5, -0.2]], dtype=torch.float32)
    rollout = torch.tensor([[-95.0, -1.5], [-1.0, -0.7]], dtype=torch.float32)
    mask = torch.ones(2, 2, dtype=torch.bool)
    verl_m = verl.compute_offpolicy_metrics(old, rollout, mask)
    oracle_m = oracle_offpolicy_metrics(old, rollout, mask)
    k3 = (verl_m["k3_kl"], oracle_m["k3_kl"])
    low = torch.full((2, 3), -30.0, dtype=torch.float64)  # d_i = 25 and -mo_i = 30 nats, past B
    ppl = (
        verl.compute_offpolicy_metrics(low, low + 25.0, mask.new_ones(2, 3))["ppl_ratio"],
        oracle_offpolicy_metrics(low, low + 25.0, mask.new_ones(2, 3))["ppl_ratio"],
        verl.compute_offpolicy_metrics(low, low, mask.new_ones(2, 3))["training_ppl"],
        oracle_offpolicy_metrics(low, low, mask.new_ones(2, 3))["training_ppl"],
    )
    far = torch.tensor([[0.0] * 4, [0.0] * 4], dtype=torch.float64)
    far_rollout = torch.tensor([[-6.0] * 4, [-7.0] * 4], dtype=torch.float64)  # S = 24, 28
    _, _, vm = verl.compute_rollout_correction_and_rejection_mask(
        far, far_rollout, mask.new_ones(2, 4), rollout_is="sequence"
    )
    _, _, om = oracle_rollout_correction(far, far_rollout, mask.new_ones(2, 4), rollout_is="sequence")
    seq_min = (vm["rollout_corr/rollout_is_min"], om["rollout_corr/rollout_is_min"])
    ok = (
        math.isinf(k3[0])
        and math.isfinite(k3[1])
        and ppl[0] > ppl[1] == ppl[3] == math.exp(20.0) < ppl[2]
        and seq_min[0] > seq_min[1] == math.exp(20.0)
    )
    return ok, (
        f"k3_kl verl {k3[0]} oracle {k3[1]:.6g}; ppl_ratio verl {ppl[0]:.6g} oracle {ppl[1]:.6g}; "
        f"training_ppl verl {ppl[2]:.6g} oracle {ppl[3]:.6g}; sequence rollout_is_min verl {seq_min[0]:.6g} "
        f"oracle {seq_min[1]:.6g}"
    )


def probe_nonfinite(verl):
    gen = torch.Generator().manual_seed(3)
    old, rollout, mask = random_batch(gen, 4, 12, empty_rows=False)
    row, col = mask.nonzero()[0].tolist()
    old[row, col] = float("nan")
    _, verl_mask, vm = verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_is="token")
    weights, oracle_mask, om = oracle_rollout_correction(old, rollout, mask, rollout_is="token")
    verl_nan = sorted(k.removeprefix("rollout_corr/") for k, v in vm.items() if math.isnan(v))
    dropped = mask.clone()
    dropped[row, col] = False
    _, _, clean = oracle_rollout_correction(old, rollout, dropped, rollout_is="token")
    same = all(math.isclose(om[k], clean[k], rel_tol=1e-12, abs_tol=0) for k in clean if k not in PROJECT_ONLY_KEYS)
    return (bool(verl_nan) and same and not bool(oracle_mask[row, col]) and bool(verl_mask[row, col])), (
        f"verl NaN metrics: {verl_nan}; oracle = oracle without the token, nonfinite_token_fraction "
        f"{om['rollout_corr/nonfinite_token_fraction']:.4g}; "
        f"modified mask at the token: verl {bool(verl_mask[row, col])}, "
        f"oracle {bool(oracle_mask[row, col])} (the contract's 'dropped', see the findings)"
    )


def probe_padding_nan(verl):
    """Not in the doc's list: NaN log-probs on UNmarked (padding) positions."""
    old = torch.tensor([[-1.0, -0.5, float("nan")], [-0.3, -0.2, -0.1]], dtype=torch.float64)
    rollout = torch.tensor([[-1.1, -0.4, float("nan")], [-0.3, -0.25, -0.2]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    proto, _, vm = verl.compute_rollout_correction_and_rejection_mask(old, rollout, mask, rollout_is="token")
    weights, _, om = oracle_rollout_correction(old, rollout, mask, rollout_is="token")
    verl_w = proto.batch["rollout_is_weights"]
    nan_metrics = sorted(k for k, v in vm.items() if math.isnan(v))
    return (
        True,
        f"verl weight at the padding: {verl_w[0, 2].item()} (oracle {weights[0, 2].item()}); "
        f"verl NaN metrics {nan_metrics}",
    )


def probe_threshold_dtype(verl):
    """Sequence-level ratio fractions: verl compares with float32 log(U) even for float64 input."""
    upper = 1.3
    log32 = float(torch.log(torch.tensor(upper)))
    target = 0.5 * (log32 + math.log(upper))  # strictly between the float32 and float64 log(U)
    old = torch.tensor([[target, 0.0]], dtype=torch.float64)
    rollout = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, _, vm = verl.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is="sequence", rollout_is_threshold=upper
    )
    _, _, om = oracle_rollout_correction(old, rollout, mask, rollout_is="sequence", rollout_is_threshold=upper)
    key = "rollout_corr/rollout_is_ratio_fraction_high"
    return vm[key] != om[key], f"S = {target!r} between float32 and float64 log(1.3): verl {vm[key]}, oracle {om[key]}"


def probe_k3_precision(verl):
    """float32 token_k3 with |lr| < 1e-3: verl's exp(lr) - 1 - lr goes negative or wrong."""
    gen = torch.Generator().manual_seed(11)
    rollout = -torch.rand(4, 64, generator=gen)
    old = rollout + 3e-4 * torch.randn(4, 64, generator=gen)
    mask = torch.ones(4, 64, dtype=torch.bool)
    threshold = 2e-8
    _, vmask, vm = verl.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_rs="token_k3", rollout_rs_threshold=threshold
    )
    _, omask, om = oracle_rollout_correction(old, rollout, mask, rollout_rs="token_k3", rollout_rs_threshold=threshold)
    flips = int((vmask != omask).sum())
    key = "rollout_corr/rollout_rs_token_k3_min"
    return (
        flips > 0,
        f"{flips} of 256 token decisions differ at U = {threshold}; k3 min verl {vm[key]:.3g} oracle {om[key]:.3g}",
    )


def run_head_probes(verl):
    failures = []
    for probe in (
        probe_empty_rows,
        probe_all_masked,
        probe_icepop_all_zero,
        probe_saturation,
        probe_nonfinite,
        probe_padding_nan,
        probe_threshold_dtype,
        probe_k3_precision,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            confirmed, detail = probe(verl)
        print(f"  {'confirmed' if confirmed else 'NOT AS DOCUMENTED'}: {probe.__name__}: {detail}")
        if not confirmed:
            failures.append(f"{probe.__name__}: {detail}")
    return failures


# ---------------------------------------------------------------------------------------------
# verl 0.6.0.
# ---------------------------------------------------------------------------------------------


def run_060(helper, cases, seed):
    gen = torch.Generator().manual_seed(seed)
    failures, compared = [], 0
    for case in range(cases):
        mask_dtype = MASK_DTYPES[case % len(MASK_DTYPES)]
        old, rollout, mask = _random_batch(gen, torch.float64, mask_dtype)
        for level in ("token", "sequence", "geometric"):
            for mode in ("truncate", "mask"):
                upper = 1.0 + float(torch.rand(1, generator=gen)) * (0.01 if level == "geometric" else 3.0)
                lower = None if case % 2 else 1.0 / (upper + 0.5)
                veto = (None, 1e-4, 1e-2)[case % 3]
                proto, got = helper.compute_rollout_importance_weights(
                    old,
                    rollout,
                    mask,
                    rollout_is_level=level,
                    rollout_is_mode=mode,
                    rollout_is_threshold=upper,
                    rollout_is_threshold_lower=lower,
                    rollout_is_veto_threshold=veto,
                )
                weights, want = oracle_rollout_is(old, rollout, mask, level, mode, upper, lower, veto)
                compared += 1
                want = {k: v for k, v in want.items() if "clipped_fraction" not in k and "nonfinite" not in k}
                problems = compare_metrics(got, want, mask_dtype, True, {"mismatch/rollout_is_std": upper})
                if not torch.allclose(proto.batch["rollout_is_weights"].double(), weights, rtol=1e-7, atol=0):
                    problems.append("weights differ")
                failures += [
                    f"case {case} mask {mask_dtype} {level} {mode} {upper} {lower} {veto}: {p}" for p in problems
                ]
        for source in (rollout, None):
            got = helper.compute_mismatch_metrics(old, source, mask)
            failures += [
                f"case {case} compute_mismatch_metrics: {p}"
                for p in compare_metrics(got, oracle_mismatch_metrics(old, source, mask), mask_dtype, True)
            ]
    none_result = helper.compute_rollout_importance_weights(old, rollout, mask, rollout_is_threshold=None)
    if none_result != oracle_rollout_is(old, rollout, mask, "token", "truncate", None, None, None):
        failures.append(f"threshold None: verl {none_result}")
    print(
        f"0.6.0: {compared} option sets on {cases} random batches, plus compute_mismatch_metrics with and "
        "without rollout log-probs and threshold None"
    )
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("verl", choices=("head", "0.6.0"))
    parser.add_argument("--cases", type=int, default=None, help="random batches (default 300 head, 200 0.6.0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.verl == "head":
        import verl.trainer.ppo.rollout_corr_helper as verl

        failures = run_head_random(verl, args.cases or 300, args.seed)
        print("head: documented differences")
        failures += run_head_probes(verl)
    else:
        import verl.trainer.ppo.mismatch_helper as helper

        failures = run_060(helper, args.cases or 200, args.seed)
    for failure in failures[:60]:
        print("DISAGREEMENT:", failure)
    print(f"{len(failures)} disagreement(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
