"""Pure rollout IS math (no torch.distributed): weights, reducible statistics, exact quantiles."""

from .rollout_is import compute_rollout_importance_weights, micro_batch_weights, reduces_per_micro_batch
from .statistics import StepStatistics, metric_names
from .weights import NUM_PARTIALS, SAFETY_BOUND, Partial

__all__ = [
    "NUM_PARTIALS",
    "Partial",
    "SAFETY_BOUND",
    "StepStatistics",
    "compute_rollout_importance_weights",
    "metric_names",
    "micro_batch_weights",
    "reduces_per_micro_batch",
]
