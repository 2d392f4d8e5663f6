"""The inputs of a rollout correction: checked, upcast, and split into valid and dropped tokens.

A token is *valid* when the response mask marks it and both its log-probs are finite; a marked
token with a NaN or infinite log-prob is dropped (and counted), whatever sits at unmarked positions
is ignored. All later math works on the log ratio `old - rollout` of valid tokens, in log space.
"""

from typing import NamedTuple

import torch

SAFETY_BOUND = 20.0
"""exp(20) ~ 4.9e8: log weights are clamped to [-20, 20] before exponentiation."""


class TokenShard(NamedTuple):
    """Validated inputs of one shard, in the compute dtype."""

    log_ratio: torch.Tensor
    """`[b, s]` old - rollout, 0 where not valid."""
    valid: torch.Tensor
    """`[b, s]` bool: marked valid by the mask and both log-probs finite."""
    nonfinite: torch.Tensor
    """`[b, s]` bool: marked valid by the mask but a log-prob is NaN or infinite (an empty tensor
    when there is none)."""
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
    for name, tensor in (
        ("old_log_prob", old_log_prob),
        ("rollout_log_prob", rollout_log_prob),
        ("response_mask", response_mask),
    ):
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
                f"{name} is on {tensor.device} but old_log_prob is on {old_log_prob.device}; move them to one device."
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
    marked_log_ratio = torch.where(marked, log_ratio, 0.0)
    # A NaN or infinite log ratio on a marked token makes the sum non-finite: one cheap reduction
    # spares the per-token test in the usual case (an overflowing sum only takes the slow path).
    if bool(torch.isfinite(marked_log_ratio.sum())):
        return TokenShard(marked_log_ratio, marked, marked.new_zeros(0), torch.where(marked, old, 0.0))
    valid = marked & torch.isfinite(log_ratio)
    nonfinite = marked ^ valid  # valid is the finite part of marked
    return TokenShard(torch.where(valid, log_ratio, 0.0), valid, nonfinite, torch.where(valid, old, 0.0))
