"""Case 5: verl HEAD's rollout correction in one process, every preset and this project's extensions,
the package against the verl-HEAD-style baseline.

Each configuration is one call of `compute_rollout_correction_and_rejection_mask` (the package) and of
`verl_head_style_correction` (the baseline) with the same keyword arguments. A bypass preset evaluates
the same function on pi_theta against the rollout log-probs (per micro-batch, inside the loss), so it
is timed the same way, as the call its keys make; presets whose keys make the same call (e.g.
`bypass_pg_is` and `decoupled_seq_is`) share one row.
"""

import functools

import torch

from case_weights import compare_metrics, make_batch, time_and_memory
from megatron_rollout_is import compute_rollout_correction_and_rejection_mask
from megatron_rollout_is.config import PRESETS
from verl_head_style import verl_head_style_correction

MODE_KEYS = ("bypass_mode", "loss_type")
"""Preset keys that choose where the loss gets pi_old from, not what the correction computes."""

EXTENSIONS = {
    "geometric IcePop band": {"rollout_is": "geometric", "rollout_is_threshold": "0.99_1.01"},
    "token two-sided clamp": {"rollout_is": "token", "rollout_is_threshold": "0.5_2.0", "rollout_is_mode": "clamp"},
    "token TIS + batch normalisation": {
        "rollout_is": "token",
        "rollout_is_threshold": 2.0,
        "rollout_is_batch_normalize": True,
    },
    "geometric TIS + batch normalisation": {
        "rollout_is": "geometric",
        "rollout_is_threshold": 1.001,
        "rollout_is_batch_normalize": True,
    },
    "token TIS + token_k1,seq_mean_k3,seq_max_k2": {
        "rollout_is": "token",
        "rollout_is_threshold": 2.0,
        "rollout_rs": "token_k1,seq_mean_k3,seq_max_k2",
        "rollout_rs_threshold": "0.5_2.0,0.01,1.0",
    },
}
"""This project's options beyond verl HEAD (geometric level, `rollout_is_mode`, batch normalisation of a
non-verl level, chained criteria with a MAX); thresholds in the range of the benchmark batch."""


def configurations() -> list[dict]:
    """One entry per distinct call: `name`, `presets` (verl HEAD presets making it; empty for an
    extension) and the function's keyword `arguments`."""
    rows = {}
    for name, keys in PRESETS.items():
        arguments = {key: value for key, value in keys.items() if key not in MODE_KEYS}
        row = rows.setdefault(tuple(sorted(arguments.items())), {"name": name, "presets": [], "arguments": arguments})
        row["presets"].append(name)
    extensions = [{"name": name, "presets": [], "arguments": arguments} for name, arguments in EXTENSIONS.items()]
    return list(rows.values()) + extensions


def _package(old, rollout, mask, arguments):
    return compute_rollout_correction_and_rejection_mask(old, rollout, mask, **arguments)


def _reference(old, rollout, mask, arguments):
    return verl_head_style_correction(old, rollout, mask, **arguments)


def agreement(old, rollout, mask, arguments: dict) -> dict:
    """Largest differences between the package and the baseline: weights (max abs), the modified
    masks (number of differing entries) and the metrics (`case_weights.compare_metrics`)."""
    weights, modified, metrics = _package(old, rollout, mask, arguments)
    ref_weights, ref_modified, ref_metrics = _reference(old, rollout, mask, arguments)
    worst_key, worst = compare_metrics(metrics, ref_metrics)
    if (weights is None) != (ref_weights is None):
        raise AssertionError(f"{arguments}: one side returned weights, the other None")
    if modified.dtype != ref_modified.dtype:
        raise AssertionError(f"{arguments}: modified masks of dtypes {modified.dtype} and {ref_modified.dtype}")
    weight_diff = 0.0 if weights is None else (weights.double() - ref_weights.double()).abs().max().item()
    return {
        "weight_max_abs_diff": weight_diff,
        "mask_entries_differing": int((modified != ref_modified).sum()),
        "metric_max_rel_diff": worst,
        "worst_metric": worst_key,
        "metrics": len(metrics),
    }


def run(batch: int, length: int, device: torch.device, repeats: int, check_batch: tuple[int, int]) -> list[dict]:
    """One result row per configuration: time and peak-memory ratios package / baseline.

    As case 1: the float32 `[batch, length]` batch is timed and profiled; agreement is checked in
    float64 on a `check_batch` batch (formulas equal to rounding) and reported in float32 on the
    benchmark batch.
    """
    old, rollout, mask = make_batch(batch, length, seed=0, device=device)
    check_inputs = make_batch(*check_batch, seed=1, device=device, dtype=torch.float64)
    rows = []
    for config in configurations():
        arguments = config["arguments"]
        agreement_float32 = agreement(old, rollout, mask, arguments)  # also the untimed warm-up run of both
        measured = time_and_memory(
            functools.partial(_package, old, rollout, mask, arguments),
            functools.partial(_reference, old, rollout, mask, arguments),
            device,
            repeats,
        )
        rows.append(
            {
                **config,
                "batch": batch,
                "length": length,
                **measured,
                "agreement_float64": agreement(*check_inputs, arguments),
                "agreement_float32": agreement_float32,
            }
        )
    return rows
