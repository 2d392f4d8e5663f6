"""Case 1: weights + every metric in one process, the package against the verl-0.6.0-style baseline."""

import functools
import statistics

import torch

from harness import interleaved_times, peak_extra_bytes
from megatron_rollout_is.core import compute_rollout_importance_weights
from verl_style import verl_style_rollout_is

# (level, upper threshold) pairs in the range the seed document recommends for each level.
LEVEL_THRESHOLDS = (("token", 2.0), ("sequence", 5.0), ("geometric", 1.01))
MODES = ("truncate", "clip")
VETO = 1e-4


def make_batch(batch: int, length: int, seed: int, device: torch.device, dtype=torch.float32):
    """Right-padded rollout batch `[batch, length]`: (old, rollout, bool mask).

    Rollout log-probs are -Exp(0.7); the trainer's differ by N(0, 0.05) noise per token, with rare
    (1e-5) -12-nat outliers that trip the 1e-4 veto on a few sequences. Response lengths are
    uniform in [length / 4, length].
    """
    generator = torch.Generator().manual_seed(seed)
    rollout = -torch.empty(batch, length, dtype=torch.float64).exponential_(0.7, generator=generator)
    noise = 0.05 * torch.randn(batch, length, generator=generator, dtype=torch.float64)
    outliers = torch.rand(batch, length, generator=generator) < 1e-5
    old = rollout + torch.where(outliers, torch.full_like(noise, -12.0), noise)
    lengths = torch.randint(max(length // 4, 1), length + 1, (batch, 1), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths
    return old.to(device, dtype), rollout.to(device, dtype), mask.to(device)


def _package(old, rollout, mask, level, mode, upper):
    return compute_rollout_importance_weights(
        old,
        rollout,
        mask,
        rollout_is_level=level,
        rollout_is_mode=mode,
        rollout_is_threshold=upper,
        rollout_is_veto_threshold=VETO,
    )


def _reference(old, rollout, mask, level, mode, upper):
    return verl_style_rollout_is(old, rollout, mask, level, mode, upper, veto=VETO)


def agreement(old, rollout, mask, level, mode, upper) -> dict:
    """Largest differences between the package and the baseline on the same inputs (see `compare_metrics`)."""
    weights, metrics = _package(old, rollout, mask, level, mode, upper)
    ref_weights, ref_metrics = _reference(old, rollout, mask, level, mode, upper)
    worst_key, worst = compare_metrics(metrics, ref_metrics)
    weight_diff = (weights.double() - ref_weights.double()).abs().max().item()
    return {"weight_max_abs_diff": weight_diff, "metric_max_rel_diff": worst, "worst_metric": worst_key}


def compare_metrics(metrics: dict, ref_metrics: dict) -> tuple:
    """`(worst key, max |a - b| / max(|b|, 1e-6))` over the metrics; the key sets must be equal.

    Raises:
        AssertionError: the key sets differ (the message lists the keys only one side has).
    """
    if set(metrics) != set(ref_metrics):
        raise AssertionError(f"metric keys differ: {sorted(set(metrics) ^ set(ref_metrics))}")
    worst_key, worst = None, 0.0
    for key, expected in ref_metrics.items():
        diff = abs(metrics[key] - expected) / max(abs(expected), 1e-6)
        if diff >= worst:
            worst_key, worst = key, diff
    return worst_key, worst


def time_and_memory(package, reference, device: torch.device, repeats: int) -> dict:
    """Interleaved median times and peak extra bytes of two argument-less calls, and their ratios.

    Run both once (untimed) before: the first call of a configuration pays one-off costs.
    """
    package_times, reference_times = interleaved_times([package, reference], device, repeats, warmup=0)
    package_s, reference_s = statistics.median(package_times), statistics.median(reference_times)
    package_bytes = peak_extra_bytes(package, device)
    reference_bytes = peak_extra_bytes(reference, device)
    return {
        "package_s": package_s,
        "reference_s": reference_s,
        "time_ratio": package_s / reference_s,
        "time_ratio_of_minimums": min(package_times) / min(reference_times),
        "package_peak_bytes": package_bytes,
        "reference_peak_bytes": reference_bytes,
        "memory_ratio": package_bytes / reference_bytes,
    }


def run(batch: int, length: int, device: torch.device, repeats: int, check_batch: tuple[int, int]) -> list[dict]:
    """One result row per (level, mode): time and peak-memory ratios package / baseline.

    The float32 benchmark batch is timed and profiled; agreement is checked twice: in float64 on a
    `check_batch` (b, s) batch (the formulas must agree to rounding) and in float32 on the benchmark
    batch (reported: float32 rounding of the baseline's one-pass sums shows there).
    """
    old, rollout, mask = make_batch(batch, length, seed=0, device=device)
    check_inputs = make_batch(*check_batch, seed=1, device=device, dtype=torch.float64)
    rows = []
    for level, upper in LEVEL_THRESHOLDS:
        for mode in MODES:
            args = (old, rollout, mask, level, mode, upper)
            agreement_float32 = agreement(*args)  # also the untimed warm-up run of both
            measured = time_and_memory(
                functools.partial(_package, *args), functools.partial(_reference, *args), device, repeats
            )
            rows.append(
                {
                    "level": level,
                    "mode": mode,
                    "threshold": upper,
                    "batch": batch,
                    "length": length,
                    **measured,
                    "agreement_float64": agreement(*check_inputs, level, mode, upper),
                    "agreement_float32": agreement_float32,
                }
            )
    return rows
