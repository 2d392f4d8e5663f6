"""verl HEAD's single-process API (`rollout_corr_helper`): weights, rejection mask, `rollout_corr/` metrics.

Signatures and return conventions follow verl HEAD, except that the weights come back as a tensor
(verl wraps them in a `DataProto` under `rollout_is_weights`). docs/rollout_correction.md is the
contract, including where this deliberately differs from verl.
"""

import torch

from .catalog_rollout_corr import is_metrics, offpolicy_metrics
from .correction import correct_micro_batch
from .inputs import SAFETY_BOUND
from .plan import (
    LEVEL_ALIASES,
    LEVELS,
    CorrectionPlan,
    WeightSpec,
    parse_band,
    parse_bound,
    parse_criteria,
    parse_level,
    rejection_options,
)
from .rollout_is import batch_metrics
from .statistics import StepStatistics
from .terms import MEAN_EPS

SUPPORTED_ROLLOUT_RS_OPTIONS = set(rejection_options())
"""Every `rollout_rs` criterion name."""


def head_weight_spec(rollout_is: str | None, threshold, mode: str | None, batch_normalize: bool) -> WeightSpec | None:
    """The weights of verl HEAD's keyword arguments (None when `rollout_is` or the threshold is None)."""
    if rollout_is is None or threshold is None:
        return None
    level = parse_level("rollout_is", rollout_is)
    low, high = parse_band("rollout_is_threshold", threshold)
    bound = parse_bound("rollout_is_mode", mode or ("truncate" if low is None else "mask"))
    if bound == "truncate" and low is not None:
        raise ValueError(
            f"rollout_is_threshold {threshold!r} is a band; rollout_is_mode truncate would ignore its "
            "lower end: use mask (IcePop) or clamp, or give one number."
        )
    lower = low if low is not None else 1.0 / high
    if bound != "truncate" and lower >= high:
        raise ValueError(f"rollout_is_threshold {threshold!r} gives an empty band [{lower:g}, {high:g}].")
    return WeightSpec(level, bound, high, lower, applied=True, batch_normalize=batch_normalize)


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
    rollout_is_mode: str | None = None,
) -> tuple:
    """IS weights, the rejection-modified response mask and every `rollout_corr/` metric of one batch.

    Args:
        old_log_prob: `[batch, response_len]` training log-probs, any float dtype/device.
        rollout_log_prob: `[batch, response_len]` rollout log-probs.
        response_mask: `[batch, response_len]`, non-zero on response tokens.
        rollout_is: `None` (no weights), `token`, `sequence`, `geometric` (alias `sequence_mean`).
        rollout_is_threshold: a number (TIS upper bound) or `"lo_hi"` (IcePop band).
        rollout_is_batch_normalize: divide the weights by their batch mean.
        rollout_rs: comma-separated rejection criteria, or None.
        rollout_rs_threshold: one threshold or one per criterion.
        rollout_is_mode: this project's override of the bounding: `truncate`, `mask` or `clamp`.

    Returns:
        `(weights or None, modified_response_mask, metrics)`: weights `[batch, response_len]`
        detached (float32, float64 for float64 inputs), 0 on masked tokens; the mask in the input's
        dtype with rejected (and non-finite) tokens zeroed; metrics `{"rollout_corr/...": float}`.
    """
    if isinstance(rollout_is_batch_normalize, bool) is False:
        raise TypeError(f"rollout_is_batch_normalize must be a bool, got {rollout_is_batch_normalize!r}.")
    spec = head_weight_spec(rollout_is, rollout_is_threshold, rollout_is_mode, rollout_is_batch_normalize)
    criteria = parse_criteria(rollout_rs, rollout_rs_threshold) if rollout_rs is not None else ()
    plan = CorrectionPlan("rollout_corr", spec, criteria=criteria)
    statistics = StepStatistics(plan)
    correction = correct_micro_batch(old_log_prob, rollout_log_prob, response_mask, plan, statistics)
    if response_mask.dtype == torch.bool:
        modified = response_mask & correction.keep  # a bool AND is ~50x cheaper than torch.where here
    else:
        modified = torch.where(correction.keep, response_mask, torch.zeros((), dtype=response_mask.dtype))
    return correction.weights, modified, statistics.finalize()


def compute_offpolicy_metrics(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor | None, response_mask: torch.Tensor
) -> dict:
    """Off-policy diagnostics of one batch, unprefixed (`kl`, `k3_kl`, `chi2_token`, ...).

    With `rollout_log_prob=None`, only `training_ppl` and `training_log_ppl`.
    """
    return batch_metrics(old_log_prob, rollout_log_prob, response_mask, offpolicy_metrics(rollout_log_prob is not None))


def compute_is_metrics(
    rollout_is_weights: torch.Tensor,
    raw_rollout_is_weights: torch.Tensor,
    log_ratio_for_metrics: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str,
    rollout_is_threshold: float,
    rollout_is_threshold_lower: float | None = None,
) -> dict:
    """verl HEAD's IS-metric helper, unprefixed `rollout_is_*` keys (TIS, or a band with a lower bound).

    The metrics are recomputed from `log_ratio_for_metrics` (`[b, s]` token log ratios, or `[b, 1]`
    sequence sums); the two weight tensors must be the weights those log ratios give (checked):
    `raw_rollout_is_weights` is `exp(clamp(lr, -20, 20))` per token, `exp(clamp(S_i, -20, 20))` per
    sequence or `exp(clamp(S_i / (n_i + 1e-8), -20, 20))` at geometric level, 0 on masked tokens.

    Raises:
        ValueError: `rollout_is` or `rollout_is_threshold` is None, or the passed weights are not
            the ones the log ratios and thresholds give.
    """
    for name, value in (("rollout_is", rollout_is), ("rollout_is_threshold", rollout_is_threshold)):
        if value is None:
            raise ValueError(
                f"compute_is_metrics needs {name}, got None: rollout_is is one of {LEVELS + tuple(LEVEL_ALIASES)} "
                "and rollout_is_threshold a number > 0 (without IS weights there are no IS metrics)."
            )
    threshold = (
        rollout_is_threshold
        if rollout_is_threshold_lower is None
        else (f"{rollout_is_threshold_lower}_{rollout_is_threshold}")
    )
    spec = head_weight_spec(rollout_is, threshold, None, False)
    log_ratio = _token_log_ratios(log_ratio_for_metrics, response_mask, spec.level)
    plan = CorrectionPlan("rollout_corr", spec)
    statistics = StepStatistics(plan, is_metrics(spec), prefix="")
    correction = correct_micro_batch(log_ratio, torch.zeros_like(log_ratio), response_mask, plan, statistics)
    valid = response_mask != 0
    for name, given, expected in (
        ("rollout_is_weights", rollout_is_weights, correction.weights),
        ("raw_rollout_is_weights", raw_rollout_is_weights, _raw_weights(log_ratio, valid, spec.level)),
    ):
        expected = torch.where(valid, expected.to(correction.weights.dtype), 0.0)
        if not torch.allclose(torch.where(valid, given, 0.0).to(expected.dtype), expected, rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"{name} are not the weights that log_ratio_for_metrics and the thresholds give; pass "
                "the weights computed from them (the metrics are recomputed from the log ratios)."
            )
    return statistics.finalize()


def _raw_weights(log_ratio: torch.Tensor, valid: torch.Tensor, level: str) -> torch.Tensor:
    """`[b, s]` safety-clamped weights before bounding, from `[b, s]` log ratios (padding ignored)."""
    if level != "token":
        masked = torch.where(valid, log_ratio, 0.0)
        log_ratio = masked.sum(dim=1, keepdim=True)
        if level == "geometric":
            log_ratio = log_ratio / (valid.sum(dim=1, keepdim=True) + MEAN_EPS)
        log_ratio = log_ratio.expand(valid.shape)
    return torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))


def _token_log_ratios(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Token log ratios `[b, s]` with the given per-token values, or per-sequence sums on each
    sequence's first valid token (which reproduces every sequence-level quantity)."""
    if level == "token" or log_ratio.shape == mask.shape:
        return log_ratio
    first = (mask != 0).int().cumsum(dim=1) == 1
    first &= mask != 0
    return torch.where(first, log_ratio.reshape(-1, 1), torch.zeros_like(mask, dtype=log_ratio.dtype))
