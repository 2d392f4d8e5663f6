"""The verl HEAD corrections a report evaluates: named presets, a rejection sweep, the run's own config.

* Presets: verl HEAD's decoupled presets (`config.PRESETS`), computed on the dumps' pi_old as
  training computes them. Bypass presets compute their weights and rejection from pi_theta inside
  the loss; the dumps hold pi_old, which equals pi_theta for the first (or only) optimizer step of a
  rollout batch and drifts from it after. On pi_old a bypass preset's weights and rejection are
  exactly those of the decoupled preset with the same keys, so the report names that twin's numbers
  for it (`bypass_twins`); `bypass_ppo_clip` corrects only through PPO's clip of
  pi_theta / pi_rollout, which the report does not model, so it has no twin.
* Rejection sweep: per criterion of `SWEEP_CRITERIA`, one threshold per quantile level of
  `SWEEP_LEVELS` of the criterion's own statistic pooled over the run (so the sweep always runs from
  "rejects about 75%" to "rejects nothing"), each alone and with token TIS 2.0 (the IS half of verl's
  `*_token_tis` presets). Thresholds are the quantile plus small margins (`QUANTILE_MARGIN`,
  `LOG_RATIO_RESOLUTION`) rounded up to 3 significant digits (k1 bands below 2: `x - 1`), so the
  configuration printed is the one evaluated and the top level still rejects nothing.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from ..config import RolloutCorrectionConfig
from ..core import WeightSpec
from ..dialects import PRESETS, VERL_HEAD

if TYPE_CHECKING:
    import numpy as np

NONE, IS_ONLY, RS_ONLY, COMBINED = "none", "IS only", "RS only", "IS + RS"
FAMILIES = (NONE, IS_ONLY, RS_ONLY, COMBINED)
SWEEP_LEVELS = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
SWEEP_CRITERIA = {
    "token_k1": "|lr| per token (symmetric band: keep ratios in [1/x, x])",
    "seq_mean_k1": "|mean lr| per sequence (geometric band: keep geometric ratios in [1/x, x])",
    "seq_mean_k3": "mean k3 per sequence (upper bound)",
    "seq_max_k2": "max lr^2 / 2 per sequence (upper bound)",
    "seq_max_k3": "max k3 per sequence (upper bound)",
}
SWEEP_IS = {"rollout_is": "token", "rollout_is_threshold": 2.0}
SIGNIFICANT_DIGITS = 3
QUANTILE_MARGIN = 1e-5
"""Relative margin above a quantile: the threshold clears float32 rounding of the statistic."""
LOG_RATIO_RESOLUTION = 1e-5
"""Absolute margin (nats) of k1 thresholds, squared over 2 for k2/k3: float32 log-probs of tens of
nats carry ~1e-6 of rounding, so finer thresholds would judge noise (and k2/k3 bounds stay > 0)."""
CONFIG_KEYS = (
    "rollout_is",
    "rollout_is_threshold",
    "rollout_is_mode",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_threshold",
)


@dataclass(frozen=True)
class CorrectionCandidate:
    """One verl HEAD correction (decoupled mode) the report evaluates."""

    label: str
    """How the report names it (the preset name, the sweep point, `run config: ...`)."""
    rollout_is: str | None = None
    """Weight level (`token`, `sequence`, `geometric`); None: no weights."""
    rollout_is_threshold: float | str | None = None
    """TIS upper bound, or an IcePop `"lo_hi"` band."""
    rollout_is_mode: str | None = None
    """This project's bounding override (`truncate`, `mask`, `clamp`); None: verl's default."""
    rollout_is_batch_normalize: bool = False
    """Divide the weights by their batch mean."""
    rollout_rs: str | None = None
    """Comma-separated rejection criteria; None: no rejection."""
    rollout_rs_threshold: float | str | None = None
    """One threshold for all criteria or one per criterion."""
    preset: str | None = None
    """verl HEAD's preset name, None for sweep points and the run's config."""
    quantile: float | None = None
    """Sweep points: the quantile level of the criterion's statistic the threshold sits at."""
    note: str | None = None
    """What the reader must know about how it was evaluated (e.g. a bypass config on pi_old)."""

    def kwargs(self) -> dict:
        """Keyword arguments of `compute_rollout_correction_and_rejection_mask`."""
        return {
            "rollout_is": self.rollout_is,
            "rollout_is_threshold": self.rollout_is_threshold,
            "rollout_is_batch_normalize": self.rollout_is_batch_normalize,
            "rollout_rs": self.rollout_rs,
            "rollout_rs_threshold": self.rollout_rs_threshold,
            "rollout_is_mode": self.rollout_is_mode,
        }

    @property
    def family(self) -> str:
        """`none`, `IS only`, `RS only` or `IS + RS`."""
        return FAMILIES[(self.rollout_is is not None) + 2 * (self.rollout_rs is not None)]

    @property
    def weighted(self) -> bool:
        return self.rollout_is is not None

    @property
    def rejects(self) -> bool:
        return self.rollout_rs is not None

    def keys(self) -> dict:
        """The `algorithm.rollout_correction` keys that differ from verl HEAD's defaults."""
        keys = {k: v for k, v in self.kwargs().items() if v not in (None, False)}
        if self.rollout_is is None:
            keys.pop("rollout_is_threshold", None)
        return keys

    def config(self) -> RolloutCorrectionConfig:
        """The validated config (raises as the trainer would on a bad one)."""
        return RolloutCorrectionConfig(**self.keys(), dialect=VERL_HEAD)

    @cached_property
    def weight_spec(self) -> WeightSpec | None:
        """The weights' level, bound and thresholds as the config validates them (None: no weights)."""
        return self.config().plan.weights

    def yaml(self) -> str:
        """The configuration as a verl HEAD `algorithm.rollout_correction` block."""
        lines = ["algorithm:", "  rollout_correction:"]
        if self.preset is not None:
            lines[1] += f"  # verl HEAD preset {self.preset}"
        keys = self.keys()
        if not keys:
            lines.append("    rollout_is: null  # no weights, no rejection: rollout_corr/ metrics only")
        lines += [f"    {key}: {_yaml_value(value)}" for key, value in keys.items()]
        return "\n".join(lines)


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value[:1].isdigit() else value  # "0.5_5.0" stays a string in any YAML
    return repr(value)


def preset_candidates() -> list[CorrectionCandidate]:
    """verl HEAD's decoupled presets (`disabled` is the `none` candidate)."""
    return [
        CorrectionCandidate(label="none (disabled)" if name == "disabled" else name, preset=name, **settings)
        for name, settings in PRESETS.items()
        if not settings.get("bypass_mode")
    ]


def bypass_twins() -> dict[str, str | None]:
    """Each bypass preset -> the decoupled preset with the same weight and rejection keys (None: no twin)."""
    decoupled = {tuple(sorted(s.items())): n for n, s in PRESETS.items() if not s.get("bypass_mode")}
    twins = {}
    for name, settings in PRESETS.items():
        if settings.get("bypass_mode"):
            keys = {k: v for k, v in settings.items() if k not in ("bypass_mode", "loss_type")}
            twins[name] = decoupled.get(tuple(sorted(keys.items()))) if keys else None
    return twins


def run_correction_candidate(config: RolloutCorrectionConfig) -> CorrectionCandidate:
    """A verl HEAD run config as a candidate (bypass: evaluated on pi_old, see the module docstring)."""
    values = {key: getattr(config, key) for key in CONFIG_KEYS}
    note = None
    if config.bypass_mode:
        note = f"bypass mode ({config.loss_type}): evaluated on the dumps' pi_old as a stand-in for pi_theta" + (
            "; its PPO clip against the rollout log-probs is not modelled" if config.loss_type == "ppo_clip" else ""
        )
    return CorrectionCandidate(label=f"run config: {config.describe()}", note=note, **values)


def ceil_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """`value` rounded up to `digits` significant digits (0 stays 0), as the float its decimal reads as."""
    if value <= 0.0:
        return 0.0
    exponent = math.floor(math.log10(value)) - digits + 1
    mantissa = math.ceil(value / 10.0**exponent * (1 - 1e-12))
    return float(f"{mantissa}e{exponent}")


def sweep_threshold(criterion: str, quantile_value: float) -> float:
    """The threshold at a quantile of the criterion's statistic (see the module docstring); its
    `repr` is exact, so the label and the YAML show the value evaluated."""
    value = quantile_value * (1.0 + QUANTILE_MARGIN)
    if not criterion.endswith("k1"):
        return ceil_significant(value + LOG_RATIO_RESOLUTION**2 / 2)
    excess = math.expm1(value + LOG_RATIO_RESOLUTION)
    if excess >= 1.0:
        return ceil_significant(math.exp(value))
    rounded = ceil_significant(excess)
    decimals = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(rounded)) if rounded > 0 else 0
    return round(1.0 + rounded, decimals)


def rs_sweep(statistics: Mapping[str, "np.ndarray"]) -> list[CorrectionCandidate]:
    """The rejection sweep on the run's pooled statistics.

    Args:
        statistics: per criterion of `SWEEP_CRITERIA`, the pooled values its threshold is compared
            with (`|lr|` per token for token_k1, per-sequence values for the others).

    Returns:
        For each criterion and distinct threshold (rising): the RS-only candidate, then the one with
        token TIS 2.0.
    """
    import numpy as np  # the report extra's; the rules and the regime verdict import without it

    candidates = []
    for criterion in SWEEP_CRITERIA:
        values = np.asarray(statistics[criterion], dtype=np.float64)
        if values.size == 0:
            continue
        # Equal thresholds (few or tied values) are one point, labelled with the highest level.
        levels = {
            sweep_threshold(criterion, float(q)): level
            for level, q in zip(SWEEP_LEVELS, np.quantile(values, SWEEP_LEVELS))
        }
        for threshold, level in levels.items():
            label = f"RS {criterion} {threshold!r} (q{level:g})"
            point = dict(rollout_rs=criterion, rollout_rs_threshold=threshold, quantile=level)
            candidates.append(CorrectionCandidate(label=label, **point))
            candidates.append(CorrectionCandidate(label=f"{label} + token TIS 2", **point, **SWEEP_IS))
    return candidates
