"""Pure rollout-correction math (no torch.distributed): plans, weights, rejection, statistics, quantiles."""

from .correction import Correction, correct_micro_batch
from .inputs import SAFETY_BOUND
from .plan import CorrectionPlan, Criterion, WeightSpec
from .rollout_correction import (
    SUPPORTED_ROLLOUT_RS_OPTIONS,
    compute_is_metrics,
    compute_offpolicy_metrics,
    compute_rollout_correction_and_rejection_mask,
)
from .rollout_is import compute_mismatch_metrics, compute_rollout_importance_weights
from .statistics import StepStatistics, metric_names

__all__ = [
    "Correction",
    "CorrectionPlan",
    "Criterion",
    "SAFETY_BOUND",
    "SUPPORTED_ROLLOUT_RS_OPTIONS",
    "StepStatistics",
    "WeightSpec",
    "compute_is_metrics",
    "compute_mismatch_metrics",
    "compute_offpolicy_metrics",
    "compute_rollout_correction_and_rejection_mask",
    "compute_rollout_importance_weights",
    "correct_micro_batch",
    "metric_names",
]
