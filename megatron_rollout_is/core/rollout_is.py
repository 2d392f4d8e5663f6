"""verl 0.6.0's single-process API (`mismatch_helper`): weights and `mismatch/` metrics of one batch."""

import torch

from .catalog_mismatch import perplexity_metrics
from .correction import correct_micro_batch
from .plan import CorrectionPlan, WeightSpec, parse_bound, parse_level, positive_number
from .statistics import StepStatistics


def verl06_plan(
    level: str, mode: str, threshold: float, lower: float | None, veto: float | None, applied: bool = True
) -> CorrectionPlan:
    """The plan of verl 0.6.0's keyword arguments (validated; errors name the argument)."""
    upper = positive_number("rollout_is_threshold", threshold)
    lower = positive_number("rollout_is_threshold_lower", lower) if lower is not None else 1.0 / upper
    if lower >= upper:
        raise ValueError(f"rollout_is_threshold_lower ({lower}) must be below rollout_is_threshold ({upper}).")
    if veto is not None:
        veto = positive_number("rollout_is_veto_threshold", veto)
        if veto >= 1.0:
            raise ValueError(f"rollout_is_veto_threshold must lie in (0, 1), got {veto}, or be None.")
    spec = WeightSpec(
        parse_level("rollout_is_level", level), parse_bound("rollout_is_mode", mode), upper, lower, applied=applied
    )
    return CorrectionPlan("mismatch", spec, veto_threshold=veto)


def compute_rollout_importance_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_level: str = "token",
    rollout_is_mode: str = "truncate",
    rollout_is_threshold: float | None = 2.0,
    rollout_is_threshold_lower: float | None = None,
    rollout_is_veto_threshold: float | None = 1e-4,
) -> tuple:
    """Rollout importance weights and every `mismatch/` metric of one batch (single process).

    Args:
        old_log_prob: `[batch, response_len]` training-policy log-probs, any float dtype/device.
        rollout_log_prob: `[batch, response_len]` rollout-engine log-probs.
        response_mask: `[batch, response_len]`, non-zero on tokens that are trained on.
        rollout_is_level: `token`, `sequence` or `geometric`.
        rollout_is_mode: `truncate`, `clip` (alias `mask`) or `clamp` (two-sided truncation).
        rollout_is_threshold: upper bound (> 0); None turns rollout IS off.
        rollout_is_threshold_lower: lower bound; None means 1 / upper.
        rollout_is_veto_threshold: per-token veto ratio in (0, 1), or None.

    Returns:
        `(weights, metrics)`: weights `[batch, response_len]`, detached, float32 (float64 when an
        input is float64), 0 on masked tokens and vetoed sequences; metrics `{"mismatch/...": float}`
        as documented in docs/metrics.md. `(None, {})` when `rollout_is_threshold` is None, as verl.
    """
    if rollout_is_threshold is None:
        return None, {}
    plan = verl06_plan(
        rollout_is_level, rollout_is_mode, rollout_is_threshold, rollout_is_threshold_lower, rollout_is_veto_threshold
    )
    statistics = StepStatistics(plan)
    correction = correct_micro_batch(old_log_prob, rollout_log_prob, response_mask, plan, statistics)
    return correction.weights, statistics.finalize()


def compute_mismatch_metrics(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor | None, response_mask: torch.Tensor
) -> dict:
    """verl 0.6.0's training-vs-rollout metrics without IS: `{"mismatch_kl": ..., ...}` (no prefix).

    With `rollout_log_prob=None`, only the training perplexities (`mismatch_training_ppl`,
    `mismatch_training_log_ppl`).
    """
    return batch_metrics(
        old_log_prob, rollout_log_prob, response_mask, perplexity_metrics("mismatch_", rollout_log_prob is not None)
    )


def batch_metrics(old_log_prob, rollout_log_prob, response_mask, metrics: list) -> dict:
    """Unprefixed values of `metrics` (off-policy ones, no weights) on one batch.

    Without rollout log-probs only training-side metrics may be asked for; the log ratio is then 0.
    """
    if rollout_log_prob is None:
        rollout_log_prob = old_log_prob
    plan = CorrectionPlan("offpolicy")
    statistics = StepStatistics(plan, metrics, prefix="")
    correct_micro_batch(old_log_prob, rollout_log_prob, response_mask, plan, statistics)
    return statistics.finalize()
