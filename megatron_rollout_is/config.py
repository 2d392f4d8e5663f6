"""The one configuration of rollout importance sampling, with verl's key names and semantics."""

import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "clip")
# verl renamed `clip` to `mask` after 0.6.0; both spellings mean "zero weights outside [lower, upper]".
MODE_ALIASES = {"mask": "clip"}

TIS_MIGRATION = (
    "`tis_imp_ratio_cap` was removed with the old token-level TIS. Replace it with "
    "`algorithm.rollout_is: true`, `algorithm.rollout_is_threshold: <the old cap>`, "
    "`algorithm.rollout_is_level: token` and `algorithm.rollout_is_mode: truncate` "
    "(and keep `actor_rollout_ref.rollout.calculate_log_probs: true`)."
)


@dataclass
class RolloutISConfig:
    """Configuration of rollout importance sampling (verl's `algorithm.rollout_is*` keys).

    The threshold is the on/off switch: with `rollout_is_threshold` None nothing is computed.
    With a threshold set and `rollout_is` False the weights and `mismatch/` metrics are computed
    and logged but the loss is not reweighted (monitoring mode).
    """

    rollout_is: bool = False
    """Multiply the policy loss by the IS weights. False with a threshold set = monitoring only."""

    rollout_is_threshold: Optional[float] = None
    """Upper bound of the IS weights (> 0). None turns rollout IS off entirely. Typical values:
    token 1.5-5.0, sequence 2.0-10.0, geometric 1.0002-1.001."""

    rollout_is_threshold_lower: Optional[float] = None
    """Lower bound, used by `clip` mode and by the metrics. None means 1 / rollout_is_threshold."""

    rollout_is_level: str = "token"
    """How token ratios are aggregated: `token` (per token), `sequence` (product over the
    response) or `geometric` (geometric mean over the response)."""

    rollout_is_mode: str = "truncate"
    """`truncate`: cap weights at the upper bound. `clip` (alias `mask`): zero the weights outside
    [lower, upper]."""

    rollout_is_veto_threshold: Optional[float] = 1e-4
    """A sequence with any token ratio below this (in (0, 1)) gets weight 0. None disables the veto."""

    def __post_init__(self):
        if not isinstance(self.rollout_is, bool):
            raise TypeError(
                f"rollout_is must be a bool, got {self.rollout_is!r}; use true (apply the weights) "
                "or false (monitoring only)."
            )
        self.rollout_is_threshold = _positive_or_none("rollout_is_threshold", self.rollout_is_threshold)
        self.rollout_is_threshold_lower = _positive_or_none(
            "rollout_is_threshold_lower", self.rollout_is_threshold_lower
        )
        self.rollout_is_level = _choice("rollout_is_level", self.rollout_is_level, LEVELS, {})
        self.rollout_is_mode = _choice("rollout_is_mode", self.rollout_is_mode, MODES, MODE_ALIASES)
        veto = _positive_or_none("rollout_is_veto_threshold", self.rollout_is_veto_threshold)
        if veto is not None and veto >= 1.0:
            raise ValueError(
                f"rollout_is_veto_threshold must lie in (0, 1), got {veto}; it is a ratio far below 1 "
                "(default 1e-4), or null to disable the veto."
            )
        self.rollout_is_veto_threshold = veto
        if self.rollout_is and self.rollout_is_threshold is None:
            raise ValueError(
                "rollout_is is true but rollout_is_threshold is null, which turns IS off; set "
                "rollout_is_threshold (e.g. 2.0) or set rollout_is to false."
            )
        if self.rollout_is_threshold_lower is not None and self.rollout_is_threshold is None:
            raise ValueError(
                "rollout_is_threshold_lower is set but rollout_is_threshold is null; set the upper "
                "threshold too, or drop the lower one."
            )
        if self.enabled and self.lower_threshold >= self.rollout_is_threshold:
            raise ValueError(
                f"rollout_is_threshold_lower ({self.lower_threshold}) must be below "
                f"rollout_is_threshold ({self.rollout_is_threshold}); with an upper threshold <= 1 the "
                "default lower (1/upper) is not below it either, so set both explicitly."
            )

    @property
    def enabled(self) -> bool:
        """Whether weights and metrics are computed at all."""
        return self.rollout_is_threshold is not None

    @property
    def applies_weights(self) -> bool:
        """Whether the policy loss is multiplied by the weights (not only monitored)."""
        return self.enabled and self.rollout_is

    @property
    def lower_threshold(self) -> float:
        """The effective lower bound: `rollout_is_threshold_lower`, or 1/upper when unset."""
        if self.rollout_is_threshold_lower is not None:
            return self.rollout_is_threshold_lower
        return 1.0 / self.rollout_is_threshold

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "RolloutISConfig":
        """Builds the config from a verl-style mapping.

        Accepts either a full trainer config (keys under `algorithm:`) or the flat `rollout_is*`
        keys. Numbers written as strings (YAML reads `1e-4` as a string) are converted.

        Raises:
            ValueError: the mapping still holds `tis_imp_ratio_cap` (anywhere), has unknown
                `rollout_is*` keys, or a value fails validation.
        """
        _reject_removed_keys(mapping, path="")
        section = mapping.get("algorithm", mapping)
        if not isinstance(section, Mapping):
            raise TypeError(f"`algorithm` must be a mapping of rollout_is* keys, got {type(section).__name__}.")
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in section.items():
            if not str(key).startswith("rollout_is"):
                continue
            if key not in known:
                raise ValueError(
                    f"unknown key `{key}`; the rollout IS keys are: {', '.join(sorted(known))}."
                )
            values[key] = _from_text(value)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "RolloutISConfig":
        """Reads a verl-style YAML file (see `from_mapping`)."""
        import yaml

        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}.")
        return cls.from_mapping(data)


def _positive_or_none(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or null, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"{name} must be a finite number > 0, got {value}; its log is taken, so use e.g. 2.0 "
            "(or null to leave it unset)."
        )
    return value


def _choice(name: str, value: Any, allowed: tuple, aliases: dict) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {allowed}, got {value!r}.")
    value = aliases.get(value, value)
    if value not in allowed:
        spelled = allowed + tuple(aliases)
        raise ValueError(f"{name} must be one of {spelled}, got {value!r}.")
    return value


def _from_text(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("null", "none", "~"):
            return None
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _reject_removed_keys(node: Any, path: str) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "tis_imp_ratio_cap":
                raise ValueError(f"`{where}` is no longer supported. {TIS_MIGRATION}")
            _reject_removed_keys(value, where)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _reject_removed_keys(value, f"{path}[{index}]")
