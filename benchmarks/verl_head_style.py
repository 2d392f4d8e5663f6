"""The baseline of benchmark case 5: rollout correction computed the straightforward way, as verl HEAD does.

Same contract as docs/rollout_correction.md (IS weights, the rejection-modified response mask and every
`rollout_corr/` metric, per-criterion rejection metrics and batch normalisation included), computed in
the structure of verl HEAD's `rollout_corr_helper.py`: the weights, then the rejection criteria one by
one, then the off-policy metrics, each of them recomputing what it needs from the `[batch, response_len]`
log ratio; every intermediate is a full `[batch, response_len]` tensor (sequence statistics are
broadcast back to it), every metric is its own masked pass ending in `.item()`, and masked sums and
means go through verl_F-style helpers (zero outside the mask, multiply by it, sum).

The project's documented deviations from verl HEAD are added in the same direct style, so that the
numbers agree with the package and the timing compares like with like: non-finite log-probs drop their
token, sequences without a valid token take part in no sequence statistic, perplexities and `k3_kl`
saturate at exp(20), the sequence-level `rollout_is_min` is saturated like `_max`, `k3` is
`expm1(lr) - lr`, and this project's extensions (the geometric level, the `rollout_is_mode` override
with its `clamp` bound) are computed the same way. Written from the formulas, not from verl's code.
Assumes at least one valid token (verl raises otherwise).
"""

import math

import torch

import verl_style
from verl_style import EPS, SAFETY_BOUND, sequence_mean_metrics, valid_inputs

TOKEN_CRITERIA = ("token_k1", "token_k2", "token_k3")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set (values elsewhere zeroed first, then multiplied by the mask)."""
    product = torch.where(mask.bool(), values, 0.0) * mask
    return product.sum() if dim is None else product.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`verl_style.masked_mean` with this module's `masked_sum`."""
    return verl_style.masked_mean(values, mask, dim, summed=masked_sum)


def verl_head_style_correction(
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
    """IS weights, the rejection-modified mask and the `rollout_corr/` metrics of one batch, verl HEAD style.

    Arguments and return value as `megatron_rollout_is.compute_rollout_correction_and_rejection_mask`:
    `(weights [b, s] or None, modified response mask [b, s] in the mask's dtype, metrics)`. Inputs are
    assumed valid (no argument checks).
    """
    old, rollout, _, valid, nonempty, nonfinite_count = valid_inputs(old_log_prob, rollout_log_prob, response_mask)
    log_ratio = old - rollout
    metrics = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights, is_metrics = _is_weights(
            log_ratio, valid, nonempty, rollout_is, rollout_is_threshold, rollout_is_mode, rollout_is_batch_normalize
        )
        metrics.update(is_metrics)
    keep = valid
    if rollout_rs is not None:
        rejection_keep, rs_metrics = _rejection_mask(log_ratio, valid, nonempty, rollout_rs, rollout_rs_threshold)
        keep = keep * rejection_keep
        metrics.update(rs_metrics)
    modified_response_mask = (response_mask * keep).to(response_mask.dtype)
    metrics.update(_offpolicy_metrics(old, rollout, valid, nonempty, nonfinite_count))
    return weights, modified_response_mask, {"rollout_corr/" + key: float(value) for key, value in metrics.items()}


def _is_bounds(threshold, mode: str | None) -> tuple:
    """`(bound, lower, upper)` of `rollout_is_threshold` and `rollout_is_mode`."""
    if isinstance(threshold, str) and "_" in threshold:
        lower_text, upper_text = threshold.split("_", 1)
        lower, upper = float(lower_text), float(upper_text)
        default = "mask"
    else:
        upper = float(threshold)
        lower, default = 1.0 / upper, "truncate"
    bound = {"clip": "mask"}.get(mode, mode) if mode is not None else default
    return bound, lower, upper


def _is_weights(log_ratio, valid, nonempty, level, threshold, mode, batch_normalize) -> tuple:
    """Bounded (and batch-normalised) weights `[b, s]` and the IS metrics."""
    level = {"sequence_mean": "geometric"}.get(level, level)
    bound, lower, upper = _is_bounds(threshold, mode)
    if level == "token":
        log_ratio_for_metrics = log_ratio
        raw_weights = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    else:
        if level == "sequence":
            log_ratio_for_metrics = masked_sum(log_ratio, valid, dim=-1).unsqueeze(-1)
        else:
            log_ratio_for_metrics = masked_mean(log_ratio, valid, dim=-1).unsqueeze(-1)
        clamped = torch.clamp(log_ratio_for_metrics, min=-SAFETY_BOUND, max=SAFETY_BOUND)
        raw_weights = torch.exp(clamped).expand_as(log_ratio)
    raw_weights = raw_weights * valid

    if bound == "truncate":
        weights = raw_weights.clamp(max=upper)
    elif bound == "clamp":
        weights = raw_weights.clamp(min=lower, max=upper) * valid
    else:
        kept = (raw_weights >= lower) & (raw_weights <= upper)
        weights = torch.where(kept, raw_weights, torch.zeros_like(raw_weights))

    metrics = _is_metrics(weights, raw_weights, log_ratio_for_metrics, valid, nonempty, level, upper, lower)
    if bound == "mask":
        out_of_band = (raw_weights < lower) | (raw_weights > upper)
        metrics["rollout_is_oob_ratio"] = masked_mean(out_of_band.to(valid.dtype), valid).item()
    weights = weights.detach()

    if batch_normalize:
        if level == "token":
            weights_mean = masked_mean(weights, valid)
        else:
            sequence_weights = masked_mean(weights, valid, dim=-1)
            sequence_mask = nonempty.to(weights.dtype)
            weights_mean = (sequence_weights * sequence_mask).sum() / sequence_mask.sum().clamp_min(EPS)
        if weights_mean > 1e-8:
            weights = weights / weights_mean
            metrics["rollout_is_batch_norm_factor"] = weights_mean.item()
        else:
            metrics["rollout_is_batch_norm_factor"] = 1.0
    return weights, metrics


def _is_metrics(weights, raw_weights, log_ratio_for_metrics, valid, nonempty, level, upper, lower) -> dict:
    """The `rollout_is_*` metrics of the bounded weights (before batch normalisation)."""
    metrics = {}
    if level == "token":
        metrics["rollout_is_mean"] = masked_mean(weights, valid).item()
        above = (raw_weights > upper).to(valid.dtype)
        below = (raw_weights < lower).to(valid.dtype)
        metrics["rollout_is_ratio_fraction_high"] = masked_mean(above, valid).item()
        metrics["rollout_is_ratio_fraction_low"] = masked_mean(below, valid).item()
        valid_bool = valid.bool()
        metrics["rollout_is_max"] = weights.masked_fill(~valid_bool, float("-inf")).max().item()
        metrics["rollout_is_min"] = weights.masked_fill(~valid_bool, float("inf")).min().item()
    else:
        sequence_log = log_ratio_for_metrics.squeeze(-1)[nonempty]
        metrics["rollout_is_max"] = torch.exp(torch.clamp(sequence_log.max(), max=SAFETY_BOUND)).item()
        metrics["rollout_is_min"] = torch.exp(torch.clamp(sequence_log.min(), max=SAFETY_BOUND)).item()
        metrics["rollout_is_mean"] = masked_mean(weights, valid).item()
        metrics["rollout_is_ratio_fraction_high"] = (sequence_log > math.log(upper)).float().mean().item()
        metrics["rollout_is_ratio_fraction_low"] = (sequence_log < math.log(lower)).float().mean().item()

    if valid.sum() > 1:
        weights_for_std = weights.clamp(min=0.0, max=upper)
        mean_clamped = masked_mean(weights_for_std, valid)
        variance = masked_mean(weights_for_std.square(), valid) - mean_clamped.square()
        metrics["rollout_is_std"] = torch.sqrt(torch.clamp(variance, min=0.0)).item()
    else:
        metrics["rollout_is_std"] = 0.0
    weights_for_ess = weights.clamp(min=0.0, max=upper)
    normalized = weights_for_ess / (masked_mean(weights_for_ess, valid) + EPS)
    metrics["rollout_is_eff_sample_size"] = 1.0 / masked_mean(normalized.square(), valid).item()

    sequence_means = masked_mean(weights, valid, dim=-1)[nonempty]
    metrics.update(sequence_mean_metrics(sequence_means))
    # The shares of extreme sequences read the raw row means: a truncated mean never exceeds the bound.
    raw_sequence_means = masked_mean(raw_weights, valid, dim=-1)[nonempty]
    metrics["rollout_is_seq_fraction_high"] = (raw_sequence_means > upper).float().mean().item()
    metrics["rollout_is_seq_fraction_low"] = (raw_sequence_means < lower).float().mean().item()
    return metrics


def _rs_thresholds(options: list, threshold_spec) -> dict:
    """Per criterion `(lower, upper)` in the units the statistic is compared in (log for k1)."""
    specs = [part.strip() for part in str(threshold_spec).split(",") if part.strip()]
    if len(specs) == 1:
        specs = specs * len(options)
    thresholds = {}
    for option, spec in zip(options, specs):
        if option.endswith("k1"):
            lower_text, upper_text = spec.split("_", 1) if "_" in spec else (str(1.0 / float(spec)), spec)
            thresholds[option] = (math.log(float(lower_text)), math.log(float(upper_text)))
        else:
            thresholds[option] = (None, float(spec))
    return thresholds


def _rejection_mask(log_ratio, valid, nonempty, rollout_rs: str, rollout_rs_threshold) -> tuple:
    """The `[b, s]` keep mask (1 where every criterion passes) and the `rollout_rs_*` metrics."""
    options = list(dict.fromkeys(option.strip() for option in rollout_rs.split(",") if option.strip()))
    thresholds = _rs_thresholds(options, rollout_rs_threshold)
    log_ratio_safe = torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)
    terms = {"k1": -log_ratio_safe, "k2": 0.5 * log_ratio_safe**2, "k3": torch.expm1(log_ratio_safe) - log_ratio_safe}
    valid_bool = valid.bool()
    combined_mask = torch.ones_like(valid)
    metrics = {}
    for option in options:
        lower, upper = thresholds[option]
        token_term = terms[option[-2:]]
        if option in TOKEN_CRITERIA:
            level, per_sequence = "token", None
            per_token = token_term
        else:
            level = "sequence"
            if option.startswith("seq_sum"):
                per_sequence = masked_sum(token_term, valid, dim=-1)
            elif option.startswith("seq_mean"):
                per_sequence = masked_mean(token_term, valid, dim=-1)
            else:
                per_sequence = token_term.masked_fill(~valid_bool, float("-inf")).max(dim=-1).values
                per_sequence = torch.where(per_sequence == float("-inf"), torch.zeros_like(per_sequence), per_sequence)
            per_token = per_sequence.unsqueeze(-1).expand_as(valid)
        token_keep_bool = per_token <= upper
        if lower is not None:
            token_keep_bool = token_keep_bool & (per_token >= lower)
        token_keep = token_keep_bool.to(valid.dtype)
        combined_mask = combined_mask * token_keep
        metrics.update(_rs_metrics(option, per_token, per_sequence, valid, nonempty, level, upper, lower))
        metrics[f"rollout_rs_{option}_masked_fraction"] = masked_mean(1 - token_keep, valid).item()
        sequence_rejected = (~token_keep_bool & valid_bool).any(dim=-1)
        metrics[f"rollout_rs_{option}_seq_masked_fraction"] = sequence_rejected[nonempty].float().mean().item()

    metrics["rollout_rs_masked_fraction"] = masked_mean(1 - combined_mask, valid).item()
    final_keep = (combined_mask > 0.5) & valid_bool
    sequence_has_rejected = (~final_keep & valid_bool).any(dim=-1)
    metrics["rollout_rs_seq_masked_fraction"] = sequence_has_rejected[nonempty].float().mean().item()
    return combined_mask, metrics


def _rs_metrics(option, statistic, per_sequence, valid, nonempty, level, upper, lower) -> dict:
    """The per-criterion metrics of one rejection criterion's statistic (`[b, s]`, sequence values broadcast)."""
    prefix = f"rollout_rs_{option}"
    floor = lower if lower is not None else 0.0
    sequence_values = per_sequence if per_sequence is not None else masked_mean(statistic, valid, dim=-1)
    sequence_values = sequence_values[nonempty]
    metrics = {f"{prefix}_mean": masked_mean(statistic, valid).item()}
    if level == "sequence":
        metrics[f"{prefix}_max"] = sequence_values.max().item()
        metrics[f"{prefix}_min"] = sequence_values.min().item()
        metrics[f"{prefix}_fraction_high"] = (sequence_values > upper).float().mean().item()
        low = (sequence_values < lower).float().mean().item() if lower is not None else 0.0
    else:
        valid_bool = valid.bool()
        metrics[f"{prefix}_max"] = statistic.masked_fill(~valid_bool, float("-inf")).max().item()
        metrics[f"{prefix}_min"] = statistic.masked_fill(~valid_bool, float("inf")).min().item()
        metrics[f"{prefix}_fraction_high"] = masked_mean((statistic > upper).to(valid.dtype), valid).item()
        low = masked_mean((statistic < lower).to(valid.dtype), valid).item() if lower is not None else 0.0
    metrics[f"{prefix}_fraction_low"] = low

    if valid.sum() > 1:
        clamped = statistic.clamp(min=floor, max=upper)
        mean_clamped = masked_mean(clamped, valid)
        variance = masked_mean(clamped.square(), valid) - mean_clamped.square()
        metrics[f"{prefix}_std"] = torch.sqrt(torch.clamp(variance, min=0.0)).item()
    else:
        metrics[f"{prefix}_std"] = 0.0

    metrics[f"{prefix}_seq_mean"] = sequence_values.mean().item()
    metrics[f"{prefix}_seq_std"] = sequence_values.std().item() if sequence_values.numel() > 1 else 0.0
    metrics[f"{prefix}_seq_max"] = sequence_values.max().item()
    metrics[f"{prefix}_seq_min"] = sequence_values.min().item()
    metrics[f"{prefix}_seq_max_deviation"] = sequence_values.abs().max().item()
    metrics[f"{prefix}_seq_fraction_high"] = (sequence_values > upper).float().mean().item()
    if lower is not None:
        metrics[f"{prefix}_seq_fraction_low"] = (sequence_values < lower).float().mean().item()
    return metrics


def _offpolicy_metrics(old, rollout, valid, nonempty, nonfinite_count) -> dict:
    """Perplexities, KL estimators, chi-square divergences and the dropped-token share."""
    mean_old = masked_mean(old, valid, dim=-1)[nonempty]
    metrics = {
        "training_ppl": torch.exp(torch.clamp(-mean_old, max=SAFETY_BOUND)).mean().item(),
        "training_log_ppl": (-mean_old).mean().item(),
        "kl": masked_mean(rollout - old, valid).item(),
    }
    log_ratio = old - rollout
    k3 = torch.expm1(torch.clamp(log_ratio, max=SAFETY_BOUND)) - log_ratio
    metrics["k3_kl"] = masked_mean(k3, valid).item()
    mean_rollout = masked_mean(rollout, valid, dim=-1)[nonempty]
    metrics["rollout_ppl"] = torch.exp(torch.clamp(-mean_rollout, max=SAFETY_BOUND)).mean().item()
    metrics["rollout_log_ppl"] = (-mean_rollout).mean().item()
    log_ppl_diff = mean_rollout - mean_old
    metrics["log_ppl_diff"] = log_ppl_diff.mean().item()
    metrics["log_ppl_abs_diff"] = log_ppl_diff.abs().mean().item()
    metrics["log_ppl_diff_max"] = log_ppl_diff.max().item()
    metrics["log_ppl_diff_min"] = log_ppl_diff.min().item()
    metrics["ppl_ratio"] = torch.exp(torch.clamp(log_ppl_diff, max=SAFETY_BOUND)).mean().item()

    rho_token = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    metrics["chi2_token"] = (masked_mean(rho_token.square(), valid) - 1.0).item()
    log_ratio_sum = masked_sum(log_ratio, valid, dim=-1)[nonempty]
    log_ratio_sum_safe = torch.clamp(log_ratio_sum, min=-SAFETY_BOUND, max=SAFETY_BOUND)
    metrics["chi2_seq"] = (torch.exp(2.0 * log_ratio_sum_safe).mean() - 1.0).item()
    dropped, tokens = nonfinite_count.item(), valid.sum().item()
    metrics["nonfinite_token_fraction"] = dropped / (dropped + tokens) if dropped + tokens > 0 else 0.0
    return metrics
