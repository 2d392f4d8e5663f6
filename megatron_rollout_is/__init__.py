"""Rollout importance sampling for RL fine-tuning, sharded across Megatron-Core's parallel layouts."""

from .config import RolloutISConfig
from .core import compute_rollout_importance_weights

__all__ = ["RolloutISConfig", "compute_rollout_importance_weights"]
__version__ = "0.1.0"
