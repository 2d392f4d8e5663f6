"""The baseline of benchmark case 1: rollout IS computed the straightforward way, as verl 0.6.0 does.

Same contract as docs/metrics.md (weights and every `mismatch/` metric), computed the way verl 0.6.0's
`mismatch_helper.py` computes them: every intermediate is a full `[batch, response_len]` tensor,
every metric is its own masked pass ending in `.item()`, per-sequence means are masked row means, and
each percentile is a separate `torch.quantile` call on a fresh copy of the masked weights. The three
places where docs/metrics.md pins down what verl 0.6.0 left loose (non-finite log-probs dropped,
empty sequences left out of sequence metrics, every `exp` in a metric saturated at exp(20)) are added
in the same direct style, so that the numbers agree with the package and the timing compares like
with like. Written from the formulas, not from verl's code. Assumes at least one valid token.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

SAFETY_BOUND = 20.0
EPS = 1e-8
PERCENTILES = {
    "rollout_is_p25": 0.25,
    "rollout_is_p50": 0.5,
    "rollout_is_p75": 0.75,
    "rollout_is_p95": 0.95,
    "rollout_is_p99": 0.99,
}


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values * mask` over `dim` (all elements when None)."""
    product = values * mask
    return product.sum() if dim is None else product.sum(dim=dim)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, summed: Callable = masked_sum
) -> torch.Tensor:
    """`summed(values, mask, dim) / (number of mask entries + 1e-8)`, over `dim` (all elements when None)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return summed(values, mask, dim) / (count + EPS)


class ValidInputs(NamedTuple):
    """The log-probs in the compute dtype, zeroed where a token is not valid, and the validity masks."""

    old: torch.Tensor
    rollout: torch.Tensor
    valid_bool: torch.Tensor
    valid: torch.Tensor
    """`valid_bool` in the compute dtype."""
    nonempty: torch.Tensor
    """`[b]`: rows with a valid token."""
    nonfinite_count: torch.Tensor
    """Marked tokens dropped for a NaN/inf log-prob."""


def valid_inputs(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> ValidInputs:
    """What both baselines add to verl in the package's contract: float64 computation when a log-prob is
    float64 (float32 otherwise), and marked tokens with a non-finite log-prob dropped and counted."""
    dtype = torch.float64 if torch.float64 in (old_log_prob.dtype, rollout_log_prob.dtype) else torch.float32
    old, rollout = old_log_prob.to(dtype), rollout_log_prob.to(dtype)
    marked = response_mask != 0
    finite = torch.isfinite(old) & torch.isfinite(rollout)
    valid_bool = marked & finite
    valid = valid_bool.to(dtype)
    return ValidInputs(
        torch.where(valid_bool, old, torch.zeros_like(old)),
        torch.where(valid_bool, rollout, torch.zeros_like(rollout)),
        valid_bool,
        valid,
        valid.sum(dim=-1) > 0,
        (marked & ~finite).sum(),
    )


def verl_style_rollout_is(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    level: str,
    mode: str,
    upper: float,
    lower: float | None = None,
    veto: float | None = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rollout IS weights `[b, s]` and the `mismatch/` metrics of one batch, verl 0.6.0 style.

    Args:
        old_log_prob: `[b, s]` training log-probs.
        rollout_log_prob: `[b, s]` rollout log-probs.
        response_mask: `[b, s]`, non-zero on valid tokens.
        level: `token`, `sequence` or `geometric`.
        mode: `truncate` or `clip`.
        upper: upper threshold; `lower` defaults to `1 / upper`.
        veto: per-token veto ratio, or None.
    """
    lower = 1.0 / upper if lower is None else lower
    old, rollout, valid_bool, valid, nonempty, nonfinite_count = valid_inputs(
        old_log_prob, rollout_log_prob, response_mask
    )
    dtype = old.dtype

    log_ratio = old - rollout
    if level == "token":
        metric_log = log_ratio
        weights = torch.exp(torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND))
    else:
        if level == "sequence":
            metric_log = masked_sum(log_ratio, valid, dim=-1).unsqueeze(-1)
        else:
            metric_log = masked_mean(log_ratio, valid, dim=-1).unsqueeze(-1)
        weights = torch.exp(torch.clamp(metric_log, -SAFETY_BOUND, SAFETY_BOUND)).expand_as(old)

    if veto is not None:
        catastrophic = (log_ratio < math.log(veto)) & valid_bool
        vetoed = catastrophic.any(dim=-1, keepdim=True)
        veto_mask = (~vetoed).to(dtype)
    else:
        catastrophic = torch.zeros_like(valid_bool)
        vetoed = torch.zeros(old.shape[0], 1, dtype=torch.bool, device=old.device)

    metrics = _weight_metrics(weights, metric_log, valid, valid_bool, nonempty, level, upper, lower)
    metrics["rollout_is_veto_fraction"] = vetoed.squeeze(-1)[nonempty].float().mean().item()
    metrics["rollout_is_catastrophic_token_fraction"] = masked_mean(catastrophic.to(dtype), valid).item()
    metrics["rollout_is_nonfinite_token_fraction"] = (nonfinite_count / (nonfinite_count + valid.sum() + EPS)).item()

    if mode == "truncate":
        bounded = weights.clamp(max=upper)
    else:
        keep = ((weights >= lower) & (weights <= upper)).to(dtype)
        metrics["rollout_is_clipped_fraction"] = masked_mean(1 - keep, valid).item()
        sequence_clipped = ((keep == 0) & valid_bool).any(dim=-1)
        metrics["rollout_is_seq_clipped_fraction"] = sequence_clipped[nonempty].float().mean().item()
        # verl 0.6.0's own names for the same two shares (the package reports both).
        metrics["rollout_is_masked_fraction"] = metrics["rollout_is_clipped_fraction"]
        metrics["rollout_is_seq_masked_fraction"] = metrics["rollout_is_seq_clipped_fraction"]
        bounded = weights * keep
    if veto is not None:
        bounded = bounded * veto_mask
    bounded = bounded * valid

    metrics.update(_mismatch_metrics(old, rollout, log_ratio, valid, nonempty))
    return bounded, {"mismatch/" + key: float(value) for key, value in metrics.items()}


def _weight_metrics(weights, metric_log, valid, valid_bool, nonempty, level, upper, lower) -> dict[str, float]:
    """The `rollout_is_*` metrics of the safety-clamped weights `[b, s]` (before bounding)."""
    metrics = {"rollout_is_mean": masked_mean(weights, valid).item()}
    if level == "token":
        valid_weights = weights[valid_bool]
        metrics["rollout_is_max"] = valid_weights.max().item()
        metrics["rollout_is_min"] = valid_weights.min().item()
        metrics["rollout_is_ratio_fraction_high"] = masked_mean((weights > upper).to(valid.dtype), valid).item()
        metrics["rollout_is_ratio_fraction_low"] = masked_mean((weights < lower).to(valid.dtype), valid).item()
    else:
        sequence_log = metric_log.squeeze(-1)[nonempty]
        metrics["rollout_is_max"] = torch.exp(torch.clamp(sequence_log.max(), max=SAFETY_BOUND)).item()
        metrics["rollout_is_min"] = torch.exp(torch.clamp(sequence_log.min(), max=SAFETY_BOUND)).item()
        high, low = metric_log > math.log(upper), metric_log < math.log(lower)
        if level == "sequence":
            metrics["rollout_is_ratio_fraction_high"] = high.squeeze(-1)[nonempty].float().mean().item()
            metrics["rollout_is_ratio_fraction_low"] = low.squeeze(-1)[nonempty].float().mean().item()
        else:
            metrics["rollout_is_ratio_fraction_high"] = masked_mean(high.expand_as(valid).to(valid.dtype), valid).item()
            metrics["rollout_is_ratio_fraction_low"] = masked_mean(low.expand_as(valid).to(valid.dtype), valid).item()

    bounded_for_stats = weights.clamp(lower, upper)
    if valid.sum() > 1:
        clamped_mean = masked_mean(bounded_for_stats, valid)
        variance = masked_mean(bounded_for_stats.square(), valid) - clamped_mean.square()
        metrics["rollout_is_std"] = torch.sqrt(torch.clamp(variance, min=0.0)).item()
    else:
        metrics["rollout_is_std"] = 0.0
    normalized = bounded_for_stats / (masked_mean(bounded_for_stats, valid) + EPS)
    metrics["rollout_is_eff_sample_size"] = (1.0 / masked_mean(normalized.square(), valid)).item()

    sequence_means = masked_mean(weights, valid, dim=-1)[nonempty]
    metrics.update(sequence_mean_metrics(sequence_means))
    metrics["rollout_is_seq_fraction_high"] = (sequence_means > upper).float().mean().item()
    metrics["rollout_is_seq_fraction_low"] = (sequence_means < lower).float().mean().item()

    flat = weights[valid_bool]
    for name, q in PERCENTILES.items():
        metrics[name] = torch.quantile(flat, q).item()
    return metrics


def sequence_mean_metrics(sequence_means: torch.Tensor) -> dict:
    """`rollout_is_seq_mean/_std/_max/_min/_max_deviation` of the row-mean weights of the non-empty rows
    (both verl versions define them alike; std unbiased, 0 for one row)."""
    return {
        "rollout_is_seq_mean": sequence_means.mean().item(),
        "rollout_is_seq_std": sequence_means.std().item() if sequence_means.numel() > 1 else 0.0,
        "rollout_is_seq_max": sequence_means.max().item(),
        "rollout_is_seq_min": sequence_means.min().item(),
        "rollout_is_seq_max_deviation": (sequence_means - 1.0).abs().max().item(),
    }


def _mismatch_metrics(old, rollout, log_ratio, valid, nonempty) -> dict[str, float]:
    """The `mismatch_*` (perplexity and KL) metrics, from zero-padded `[b, s]` log-probs."""
    mean_old = masked_mean(old, valid, dim=-1)[nonempty]
    mean_rollout = masked_mean(rollout, valid, dim=-1)[nonempty]
    metrics = {
        "mismatch_training_ppl": torch.exp(torch.clamp(-mean_old, max=SAFETY_BOUND)).mean().item(),
        "mismatch_rollout_ppl": torch.exp(torch.clamp(-mean_rollout, max=SAFETY_BOUND)).mean().item(),
        "mismatch_training_log_ppl": (-mean_old).mean().item(),
        "mismatch_rollout_log_ppl": (-mean_rollout).mean().item(),
        "mismatch_kl": masked_mean(rollout - old, valid).item(),
    }
    k3 = torch.exp(torch.clamp(log_ratio, max=SAFETY_BOUND)) - log_ratio - 1
    metrics["mismatch_k3_kl"] = masked_mean(k3, valid).item()
    difference = mean_rollout - mean_old
    metrics["mismatch_log_ppl_diff"] = difference.mean().item()
    metrics["mismatch_log_ppl_abs_diff"] = difference.abs().mean().item()
    metrics["mismatch_log_ppl_diff_max"] = difference.max().item()
    metrics["mismatch_log_ppl_diff_min"] = difference.min().item()
    metrics["mismatch_ppl_ratio"] = torch.exp(torch.clamp(difference, max=SAFETY_BOUND)).mean().item()
    return metrics
