"""One micro-batch of rollout correction: importance weights and the rejection mask.

A sequence may be cut across context-parallel ranks, so every per-sequence decision (sequence and
geometric weights, the veto, sequence rejection criteria) is taken in three steps:

1. `StepStatistics.local_partials` sums (or maxes) what this rank holds of every sequence;
2. the caller reduces those `[b, columns]` partials over the ranks sharing the sequences (nothing to
   do in one process), before anything is exponentiated, bounded or compared;
3. the reduced partials and the local tokens give the weights and the mask.

Everything is in log space; the safety clamp and the bounds come last.
"""

from typing import NamedTuple

import torch

from .inputs import prepare_shard
from .plan import CorrectionPlan
from .quantiles import Reducer
from .statistics import StepStatistics
from .terms import MEAN_EPS, SequenceTerms, TokenTerms

NORMALISE_BELOW = 1e-8
"""A batch-normalisation factor at or below this is not applied (reported as 1.0), as in verl."""


class Correction(NamedTuple):
    """What the loss needs from one micro-batch."""

    weights: torch.Tensor | None
    """`[b, s]` detached weights (0 on invalid tokens), or None when the plan applies none."""

    keep: torch.Tensor
    """`[b, s]` bool: valid tokens that no rejection criterion rejects (the loss trains on these)."""


def correct_micro_batch(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    plan: CorrectionPlan,
    statistics: StepStatistics,
    reduce_partials: Reducer | None = None,
    normalize_over: Reducer | None = None,
    owns_sequences: bool = True,
) -> Correction:
    """Weights and rejection mask of one micro-batch shard; records its statistics.

    Args:
        old_log_prob: `[b, s]` training log-probs of this rank's tokens (pi_theta in bypass mode).
        rollout_log_prob: `[b, s]` rollout log-probs, same positions.
        response_mask: `[b, s]` non-zero on response tokens.
        plan: the correction plan.
        statistics: the step's accumulator.
        reduce_partials: reduces `[b, columns]` partials in place (a `Reducer`) over the ranks
            sharing these sequences (SUM, and MAX on `statistics.max_columns`); used when the plan
            decides per sequence.
        normalize_over: with `batch_normalize`, sums a float64 `[2]` tensor (weight total, count) in
            place (a `Reducer`) over the ranks whose weights share one normalisation factor; None
            for one process.
        owns_sequences: whether this rank counts the sequences it shares (sequence-level batch
            normalisation counts each sequence once).

    Returns:
        The `Correction`: weights in float32 (float64 for float64 inputs) and the keep mask.
    """
    shard = prepare_shard(old_log_prob, rollout_log_prob, response_mask)
    terms = TokenTerms(shard, plan)
    partials = statistics.local_partials(terms)
    if reduce_partials is not None and plan.decides_per_sequence:
        reduce_partials(partials)  # in place: the partials are this call's own fresh tensor
    statistics.add(terms, partials)
    sequences = SequenceTerms(partials, statistics.column_index, plan)
    keep = shard.valid
    if plan.token_criteria:
        keep = keep & ~terms.token_rejected
    if plan.sequence_criteria:
        keep = keep & sequences.sequence_keep.unsqueeze(1)
    spec = plan.weights
    if spec is None:
        return Correction(None, keep)
    if spec.level == "token" and sequences.not_vetoed is None:
        weights = terms.on_valid(terms.bounded_weight)  # shared with the statistics that read it
    else:
        if spec.level == "token":
            weights = terms.bounded_weight
        else:
            weights = sequences.bounded_weight.unsqueeze(1).expand_as(shard.log_ratio)
        valid = shard.valid if sequences.not_vetoed is None else shard.valid & sequences.not_vetoed.unsqueeze(1)
        weights = torch.where(valid, weights, 0.0)
    if spec.batch_normalize:
        factor = batch_norm_factor(weights, shard.valid, sequences, normalize_over, owns_sequences)
        statistics.record_batch_norm_factor(factor)
        if factor != 1.0:
            weights = weights / factor
    return Correction(weights if spec.applied else None, keep)


def batch_norm_factor(weights, valid, sequences: SequenceTerms, normalize_over, owns_sequences: bool) -> float:
    """The mean weight the batch is divided by: over valid tokens (token level) or over non-empty
    sequences of each sequence's mean weight (sequence levels); 1.0 when it is <= 1e-8.

    Rejection does not enter: the mean is over every valid token (sequence) of the input mask.
    """
    if sequences.plan.weights.level == "token":
        totals = torch.stack([weights.sum(dtype=torch.float64), valid.sum(dtype=torch.float64)])
    else:
        row_means = sequences.row_mean(sequences.bounded_weight.double())
        present = sequences.tokens > 0
        totals = torch.stack([row_means[present].sum(), present.sum(dtype=torch.float64)])
        if not owns_sequences:
            totals.zero_()
    if normalize_over is not None:
        normalize_over(totals)
    total, count = totals.tolist()
    if sequences.plan.weights.level == "token":
        count += MEAN_EPS
    mean = total / count if count > 0 else 0.0
    return mean if mean > NORMALISE_BELOW else 1.0
