"""Rollout importance sampling and rollout correction for RL fine-tuning, sharded across
Megatron-Core's parallel layouts."""

from .config import RolloutCorrectionConfig, RolloutISConfig
from .core import (
    SUPPORTED_ROLLOUT_RS_OPTIONS,
    compute_is_metrics,
    compute_mismatch_metrics,
    compute_offpolicy_metrics,
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_importance_weights,
)

__all__ = [
    "RolloutCorrectionConfig",
    "RolloutISConfig",
    "SUPPORTED_ROLLOUT_RS_OPTIONS",
    "compute_is_metrics",
    "compute_mismatch_metrics",
    "compute_offpolicy_metrics",
    "compute_rollout_correction_and_rejection_mask",
    "compute_rollout_importance_weights",
]
__version__ = "0.2.0"
