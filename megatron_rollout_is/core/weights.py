"""Rollout IS weights from a shard of tokens, split into the steps that sharding needs.

A sequence may be cut across context-parallel ranks, so its weight is computed in three steps:
(a) `sequence_partials` sums what each rank holds of every sequence (all columns are SUM-reducible),
(b) the caller reduces those `[batch, NUM_PARTIALS]` partials over the ranks sharing the sequences
    (nothing to do in a single process), before anything is exponentiated or bounded,
(c) `bounded_weights` turns the reduced partials and the local tokens into the final weights.
All math is in log space; the safety clamp and the bounds are applied only at the end.
See docs/metrics.md for the exact contract.
"""

import math
from enum import IntEnum
from typing import NamedTuple, Optional

import torch

from ..config import RolloutISConfig

SAFETY_BOUND = 20.0
"""exp(20) ~ 4.9e8: log weights are clamped to [-20, 20] before exponentiation."""

GEOMETRIC_EPS = 1e-8


class Partial(IntEnum):
    """Columns of the per-sequence partial statistics; every column is reduced with SUM."""

    LOG_RATIO_SUM = 0
    """sum over valid tokens of old - rollout."""
    TOKENS = 1
    """number of valid tokens."""
    CATASTROPHIC = 2
    """valid tokens with log ratio below log(veto threshold)."""
    OLD_SUM = 3
    """sum over valid tokens of the old (training) log-prob."""
    ROLLOUT_SUM = 4
    """sum over valid tokens of the rollout log-prob."""
    TOKEN_WEIGHT_SUM = 5
    """token level only: sum over valid tokens of the safety-clamped token weight."""
    TOKENS_NOT_KEPT = 6
    """token level, clip mode only: valid tokens whose weight falls outside [lower, upper]."""


NUM_PARTIALS = len(Partial)


class TokenShard(NamedTuple):
    """Validated inputs of one shard, in the compute dtype."""

    log_ratio: torch.Tensor
    """`[b, s]` old - rollout, 0 where not valid."""
    valid: torch.Tensor
    """`[b, s]` bool: marked valid by the mask and both log-probs finite."""
    nonfinite: torch.Tensor
    """`[b, s]` bool: marked valid by the mask but a log-prob is NaN or infinite."""
    old_log_prob: torch.Tensor
    """`[b, s]` old log-probs, 0 where not valid."""


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_inputs(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Checks that the inputs are three `[b, s]` tensors on one device, log-probs floating point.

    Raises:
        TypeError: an input is not a tensor, or a log-prob tensor is not floating point.
        ValueError: shapes differ or are not 2-D, or devices differ.
    """
    for name, tensor in (("old_log_prob", old_log_prob), ("rollout_log_prob", rollout_log_prob), ("response_mask", response_mask)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [batch, response_len], got {type(tensor).__name__}.")
    for name, tensor in (("old_log_prob", old_log_prob), ("rollout_log_prob", rollout_log_prob)):
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of log-probs, got {tensor.dtype}.")
    if old_log_prob.dim() != 2:
        raise ValueError(
            f"old_log_prob must be [batch, response_len], got shape {tuple(old_log_prob.shape)} "
            f"(rollout_log_prob has {tuple(rollout_log_prob.shape)}, response_mask "
            f"{tuple(response_mask.shape)}); pass one row per sequence and one column per response "
            "token (no broadcasting: a [batch] or [batch, 1] value must be repeated per token)."
        )
    for name, tensor in (("rollout_log_prob", rollout_log_prob), ("response_mask", response_mask)):
        if tensor.shape != old_log_prob.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but old_log_prob has {tuple(old_log_prob.shape)}; "
                "all three must be [batch, response_len] with the same positions (no broadcasting: a "
                "[batch] or [batch, 1] value must be repeated per token)."
            )
        if tensor.device != old_log_prob.device:
            raise ValueError(
                f"{name} is on {tensor.device} but old_log_prob is on {old_log_prob.device}; move them "
                "to one device."
            )


def prepare_shard(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> TokenShard:
    """Checks (`check_inputs`) and upcasts the three `[b, s]` inputs.

    Values at invalid positions (padding) are ignored whatever they hold; NaN/inf log-probs at
    valid positions drop the token (see `TokenShard.nonfinite`): a NaN or infinite log-prob makes
    the log ratio NaN or infinite, which is what is tested.
    """
    check_inputs(old_log_prob, rollout_log_prob, response_mask)
    dtype = compute_dtype(old_log_prob, rollout_log_prob)
    old = old_log_prob.detach().to(dtype)
    log_ratio = old - rollout_log_prob.detach().to(dtype)
    marked = response_mask.detach()
    marked = marked if marked.dtype == torch.bool else marked != 0
    valid = marked & torch.isfinite(log_ratio)
    nonfinite = marked ^ valid  # valid is the finite part of marked
    return TokenShard(torch.where(valid, log_ratio, 0.0), valid, nonfinite, torch.where(valid, old, 0.0))


def token_weights(log_ratio: torch.Tensor) -> torch.Tensor:
    """Safety-clamped per-token ratios `exp(clamp(log_ratio, -20, 20))`, `[b, s]`."""
    return torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))


def kept(weights: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Where clip mode keeps a weight: `lower <= w <= upper`."""
    return (weights >= lower) & (weights <= upper)


def sequence_partials(shard: TokenShard, config: RolloutISConfig, token_w: Optional[torch.Tensor]) -> torch.Tensor:
    """Step (a): this shard's per-sequence partial sums, `[b, NUM_PARTIALS]` (columns: `Partial`).

    Args:
        shard: the prepared tokens.
        config: the rollout IS config (level, mode, thresholds, veto).
        token_w: token level only, the `token_weights` of the shard (else None).
    """
    dtype = shard.log_ratio.dtype
    log_ratio_sum = shard.log_ratio.sum(dim=1)
    old_sum = shard.old_log_prob.sum(dim=1)
    unused = torch.zeros_like(log_ratio_sum)
    # One stack of the [b] columns: per micro-batch, the fixed cost of many small ops is what counts.
    columns = [unused] * NUM_PARTIALS
    columns[Partial.LOG_RATIO_SUM] = log_ratio_sum
    columns[Partial.TOKENS] = shard.valid.sum(dim=1, dtype=dtype)
    if config.rollout_is_veto_threshold is not None:
        catastrophic = shard.valid & (shard.log_ratio < math.log(config.rollout_is_veto_threshold))
        columns[Partial.CATASTROPHIC] = catastrophic.sum(dim=1, dtype=dtype)
    columns[Partial.OLD_SUM] = old_sum
    columns[Partial.ROLLOUT_SUM] = old_sum - log_ratio_sum
    if token_w is not None:
        # Invalid tokens have log ratio 0, hence weight 1: leave them out.
        columns[Partial.TOKEN_WEIGHT_SUM] = torch.where(shard.valid, token_w, 0.0).sum(dim=1)
        if config.rollout_is_mode == "clip":
            not_kept = shard.valid & ~kept(token_w, config.lower_threshold, config.rollout_is_threshold)
            columns[Partial.TOKENS_NOT_KEPT] = not_kept.sum(dim=1, dtype=dtype)
    return torch.stack(columns, dim=1)


def sequence_log_weights(partials: torch.Tensor, level: str) -> torch.Tensor:
    """Unclamped per-sequence log weight `[b]` from reduced partials: S_i (sequence) or G_i (geometric)."""
    log_sum = partials[:, Partial.LOG_RATIO_SUM]
    if level == "geometric":
        return log_sum / (partials[:, Partial.TOKENS] + GEOMETRIC_EPS)
    return log_sum


def safety_weights(
    shard: TokenShard, partials: torch.Tensor, config: RolloutISConfig, token_w: Optional[torch.Tensor]
) -> torch.Tensor:
    """The safety-clamped weight of every token, `[b, s]`, before bounding and veto."""
    if config.rollout_is_level == "token":
        return token_w
    log_w = sequence_log_weights(partials, config.rollout_is_level).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return torch.exp(log_w).unsqueeze(1).expand_as(shard.log_ratio)


def bounded_weights(weights: torch.Tensor, valid: torch.Tensor, partials: torch.Tensor, config: RolloutISConfig) -> torch.Tensor:
    """Step (c): truncate or clip the safety-clamped weights, apply the veto and the mask.

    Args:
        weights: `[b, s]` safety-clamped weights (`safety_weights`).
        valid: `[b, s]` bool valid tokens.
        partials: `[b, NUM_PARTIALS]` partials reduced over every rank holding part of each sequence.
        config: the rollout IS config.

    Returns:
        `[b, s]` final weights, 0 on invalid tokens and vetoed sequences.
    """
    upper = config.rollout_is_threshold
    keep = valid
    if config.rollout_is_veto_threshold is not None:
        keep = keep & (partials[:, Partial.CATASTROPHIC] == 0).unsqueeze(1)
    if config.rollout_is_mode == "truncate":
        return torch.where(keep, weights.clamp(max=upper), 0.0)
    return torch.where(keep & kept(weights, config.lower_threshold, upper), weights, 0.0)
