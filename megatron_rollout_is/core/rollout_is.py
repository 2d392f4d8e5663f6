"""One micro-batch of rollout IS, and the single-process entry point built from it."""

from typing import Optional

import torch

from ..config import RolloutISConfig
from .quantiles import Reducer
from .statistics import StepStatistics
from .weights import bounded_weights, prepare_shard, safety_weights, sequence_partials, token_weights


def reduces_per_micro_batch(config: RolloutISConfig) -> bool:
    """Whether the weights need the per-sequence partials reduced before bounding.

    Sequence and geometric weights do; token weights only do for the sequence-wide veto. Otherwise
    the partials (needed by the metrics alone) are reduced once, when the step is finalized.
    """
    return config.rollout_is_level != "token" or config.rollout_is_veto_threshold is not None


def micro_batch_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: RolloutISConfig,
    statistics: StepStatistics,
    reduce_partials: Optional[Reducer] = None,
) -> torch.Tensor:
    """Weights of one micro-batch shard; records its statistics into `statistics`.

    Args:
        old_log_prob: `[b, s]` training log-probs of this rank's tokens.
        rollout_log_prob: `[b, s]` rollout log-probs, same positions.
        response_mask: `[b, s]` non-zero on valid tokens.
        config: an enabled rollout IS config.
        statistics: the step's accumulator.
        reduce_partials: sums `[b, NUM_PARTIALS]` in place over the ranks sharing these sequences
            (context parallelism); used only when `reduces_per_micro_batch(config)`.

    Returns:
        `[b, s]` detached weights, float32 (float64 for float64 inputs), 0 on masked tokens.
    """
    shard = prepare_shard(old_log_prob, rollout_log_prob, response_mask)
    token_w = token_weights(shard.log_ratio) if config.rollout_is_level == "token" else None
    local_partials = sequence_partials(shard, config, token_w)
    partials = local_partials
    if reduce_partials is not None and reduces_per_micro_batch(config):
        partials = reduce_partials(local_partials.clone())
    statistics.add(shard, partials, local_partials, token_w)
    weights = safety_weights(shard, partials, config, token_w)
    return bounded_weights(weights, shard.valid, partials, config)


def compute_rollout_importance_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_level: str = "token",
    rollout_is_mode: str = "truncate",
    rollout_is_threshold: Optional[float] = 2.0,
    rollout_is_threshold_lower: Optional[float] = None,
    rollout_is_veto_threshold: Optional[float] = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rollout importance weights and every `mismatch/` metric of one batch (single process).

    Args:
        old_log_prob: `[batch, response_len]` training-policy log-probs, any float dtype/device.
        rollout_log_prob: `[batch, response_len]` rollout-engine log-probs.
        response_mask: `[batch, response_len]`, non-zero on tokens that are trained on.
        rollout_is_level: `token`, `sequence` or `geometric`.
        rollout_is_mode: `truncate`, or `clip` (alias `mask`).
        rollout_is_threshold: upper bound (> 0).
        rollout_is_threshold_lower: lower bound; None means 1 / upper.
        rollout_is_veto_threshold: per-token veto ratio in (0, 1), or None.

    Returns:
        `(weights, metrics)`: weights `[batch, response_len]`, detached, float32 (float64 when an
        input is float64), 0 on masked tokens and vetoed sequences; metrics `{"mismatch/...": float}`
        as documented in docs/metrics.md.
    """
    if rollout_is_threshold is None:
        raise ValueError(
            "rollout_is_threshold is None, which means rollout IS is off; pass a threshold "
            "(e.g. 2.0 for token level) to compute weights and metrics."
        )
    config = RolloutISConfig(
        rollout_is=True,
        rollout_is_threshold=rollout_is_threshold,
        rollout_is_threshold_lower=rollout_is_threshold_lower,
        rollout_is_level=rollout_is_level,
        rollout_is_mode=rollout_is_mode,
        rollout_is_veto_threshold=rollout_is_veto_threshold,
    )
    statistics = StepStatistics(config)
    weights = micro_batch_weights(old_log_prob, rollout_log_prob, response_mask, config, statistics)
    return weights, statistics.finalize()
