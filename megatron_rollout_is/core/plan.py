"""What a rollout correction computes, in one normalised form both key dialects compile to.

`config.RolloutCorrectionConfig` (verl 0.6.0 keys or verl HEAD keys) and the single-process drop-in
functions parse their arguments into a `CorrectionPlan`; everything below (weights, rejection,
statistics, metrics, the sharded reductions) reads only the plan. Pure Python: no torch here.

Rejection criteria are generated from one table: a divergence term per token (`k1 = -lr`,
`k2 = lr^2 / 2`, `k3 = exp(lr) - 1 - lr`) times an aggregation (`token`, `sum`, `mean`, `max` over
the sequence's valid tokens), named as verl names them (`token_k1`, `seq_sum_k2`, `seq_max_k3`, ...).
"""

import math
import numbers
from dataclasses import dataclass
from typing import Any

LEVELS = ("token", "sequence", "geometric")
LEVEL_ALIASES = {"sequence_mean": "geometric"}
BOUNDS = ("truncate", "mask", "clamp")
# verl 0.6.0 called the band mode `clip`, later verl `mask`; both zero the weights outside [lower, upper].
BOUND_ALIASES = {"clip": "mask"}

DIVERGENCES = ("k1", "k2", "k3")
AGGREGATES = ("token", "sum", "mean", "max")


@dataclass(frozen=True)
class WeightSpec:
    """The importance weights: how token ratios are aggregated and bounded."""

    level: str
    """`token` (per-token ratio), `sequence` (product over the response) or `geometric` (its
    geometric mean, verl's `seq_mean` ratio)."""

    bound: str
    """`truncate` (min(w, upper)), `mask` (w outside [lower, upper] becomes 0: verl 0.6.0 `clip`,
    verl HEAD IcePop) or `clamp` (two-sided truncation to [lower, upper])."""

    upper: float
    """Upper bound (> 0)."""

    lower: float
    """Lower bound (> 0, below `upper`): the band of `mask`/`clamp`; for `truncate` only the metrics
    read it (1 / upper unless set)."""

    applied: bool = True
    """Whether the policy loss is multiplied by the weights (False: metrics only)."""

    batch_normalize: bool = False
    """Divide the weights by their batch mean (verl HEAD `rollout_is_batch_normalize`)."""


@dataclass(frozen=True)
class Criterion:
    """One rejection-sampling criterion: keep a token or sequence iff its statistic is in bounds."""

    divergence: str
    """`k1`, `k2` or `k3`: the per-token term."""

    aggregate: str
    """`token` (reject tokens), or `sum` / `mean` / `max` of the term over a sequence's valid
    tokens (reject whole sequences)."""

    upper: float
    """Keep iff statistic <= upper (for k1: log of the band's upper end)."""

    lower: float | None = None
    """k1 only: keep iff statistic >= lower (log of the band's lower end)."""

    @property
    def name(self) -> str:
        """verl's name: `token_k1`, `seq_sum_k2`, ..."""
        return f"token_{self.divergence}" if self.aggregate == "token" else f"seq_{self.aggregate}_{self.divergence}"

    @property
    def per_sequence(self) -> bool:
        """Whether the criterion rejects whole sequences."""
        return self.aggregate != "token"


@dataclass(frozen=True)
class CorrectionPlan:
    """Everything the math needs to know about a rollout correction."""

    metric_names: str
    """Which metric set is reported: `mismatch` (verl 0.6.0's `mismatch/` keys), `rollout_corr`
    (verl HEAD's `rollout_corr/` keys), or `offpolicy` (the caller names the metrics)."""

    weights: WeightSpec | None = None
    """The importance weights; None computes none."""

    veto_threshold: float | None = None
    """verl 0.6.0 veto: a sequence with a valid token ratio below this gets weight 0 (None: off)."""

    criteria: tuple = ()
    """Rejection criteria (`Criterion`), all must pass."""

    bypass: bool = False
    """pi_old is not a separate pass (see the config's `bypass_mode`)."""

    loss_type: str = "ppo_clip"
    """Bypass mode's loss: `ppo_clip` or `reinforce`."""

    @property
    def sequence_criteria(self) -> tuple:
        """The criteria that reject whole sequences."""
        return tuple(c for c in self.criteria if c.per_sequence)

    @property
    def token_criteria(self) -> tuple:
        """The criteria that reject single tokens."""
        return tuple(c for c in self.criteria if not c.per_sequence)

    @property
    def decides_per_sequence(self) -> bool:
        """Whether a micro-batch's weights or masks need its per-sequence partials reduced first."""
        level = self.weights.level if self.weights is not None else "token"
        return level != "token" or self.veto_threshold is not None or bool(self.sequence_criteria)


def rejection_options() -> list:
    """Every criterion name `rollout_rs` accepts, in table order."""
    names = [f"token_{k}" for k in DIVERGENCES]
    for aggregate in AGGREGATES[1:]:
        names += [f"seq_{aggregate}_{k}" for k in DIVERGENCES if not (aggregate == "max" and k == "k1")]
    return names


NULL_SPELLINGS = ("null", "none", "~")
"""How YAML and flags write "no value"."""


def number_from_text(text: str) -> float | None:
    """`text` as a float when it is one plain number, else None.

    The one parser of numbers written as text (YAML values, flags). Unlike `float()`, an underscore
    is never part of a number: Python reads "0.5_2" as 0.52 and "1_5" as 15, but here `_` separates
    the ends of a `"lo_hi"` band.
    """
    if "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def positive_number(name: str, value: Any) -> float:
    """`value` as a finite float > 0 (a number or a string holding one); errors name `name`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not a boolean ({value!r}).")
    if isinstance(value, str):
        number = number_from_text(value)
        if number is None:
            raise ValueError(f"{name} must be a number, got {value!r}.")
        value = number
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0 (e.g. 2.0), got {value}.")
    return value


def parse_band(name: str, value: Any) -> tuple:
    """A threshold `x` or `"lo_hi"` as `(lo or None, hi)`; checks positivity and `lo <= hi`."""
    if isinstance(value, str) and "_" in value:
        if value.count("_") != 1:
            raise ValueError(f"{name} {value!r} is not a band: write it as 'lower_upper', e.g. '0.5_2.0'.")
        low_text, high_text = value.strip().split("_")
        low, high = (
            positive_number(f"{name} (lower end of {value!r})", low_text),
            positive_number(f"{name} (upper end of {value!r})", high_text),
        )
        if low > high:
            raise ValueError(f"{name} {value!r} is inverted: write it as 'lower_upper' with lower <= upper.")
        return low, high
    return None, positive_number(name, value)


def parse_level(name: str, value: Any) -> str:
    """An IS level name (aliases resolved); errors name `name`."""
    if name == "rollout_is" and isinstance(value, str) and LEVEL_ALIASES.get(value, value) not in LEVELS:
        raise ValueError(
            f"rollout_is must be a bool (verl 0.6.0 keys: apply the weights) or a weight level (verl "
            f"HEAD keys: one of {LEVELS + tuple(LEVEL_ALIASES)}, or null), got {value!r}."
        )
    return _choice(name, value, LEVELS, LEVEL_ALIASES)


def parse_bound(name: str, value: Any) -> str:
    """A bounding mode name (aliases resolved); errors name `name`."""
    return _choice(name, value, BOUNDS, BOUND_ALIASES)


def _choice(name: str, value: Any, allowed: tuple, aliases: dict) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {allowed + tuple(aliases)}, got {value!r}.")
    value = aliases.get(value, value)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed + tuple(aliases)}, got {value!r}.")
    return value


def parse_criteria(
    options: Any, thresholds: Any, options_name: str = "rollout_rs", thresholds_name: str = "rollout_rs_threshold"
) -> tuple:
    """`rollout_rs` / `rollout_rs_threshold` as a tuple of `Criterion` (duplicates dropped).

    Args:
        options: comma-separated criterion names (or a list of them).
        thresholds: one threshold for all criteria or one per criterion (comma-separated string or
            list). k2/k3: a positive upper bound. k1: `"lo_hi"` (keep iff log(lo) <= k1 <= log(hi))
            or a number x meaning `"1/x_x"`.
        options_name, thresholds_name: how errors name the two settings (keys or flags).

    Raises:
        ValueError / TypeError naming the setting and the fix.
    """
    names = _split(options_name, options)
    known = rejection_options()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{options_name} has unknown criteria {unknown}; the criteria are: {', '.join(known)}.")
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError(f"{options_name} names no criterion; use e.g. 'seq_mean_k1', or null to turn rejection off.")
    if thresholds is None:
        raise ValueError(f"{options_name} is set but {thresholds_name} is null; give one threshold per criterion.")
    values = _split(thresholds_name, thresholds) if isinstance(thresholds, (str, list, tuple)) else [thresholds]
    if len(values) == 1:
        values = values * len(names)
    if len(values) != len(names):
        raise ValueError(
            f"{thresholds_name} has {len(values)} values for the {len(names)} criteria {names} of {options_name}: "
            "give one value for all of them or exactly one per criterion, in the same order."
        )
    return tuple(_criterion(name, value, thresholds_name) for name, value in zip(names, values))


def _split(name: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [v.strip() if isinstance(v, str) else v for v in value]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a comma-separated string, got {value!r}.")
    return [part.strip() for part in value.split(",") if part.strip()]


def _criterion(name: str, threshold: Any, thresholds_name: str) -> Criterion:
    aggregate = "token" if name.startswith("token_") else name.split("_")[1]
    divergence = name[-2:]
    where = f"{thresholds_name} for {name}"
    if divergence != "k1":
        if isinstance(threshold, str) and "_" in threshold:
            raise ValueError(f"{where} must be one upper bound (a k2/k3 divergence is >= 0), got {threshold!r}.")
        return Criterion(divergence, aggregate, positive_number(where, threshold))
    low, high = parse_band(where, threshold)
    if low is None:
        low = 1.0 / high
        if low > high:
            raise ValueError(
                f"{where} is {high}: a single k1 threshold x means the band [1/x, x], which needs x >= 1; "
                "write the band as 'lower_upper' (e.g. '0.999_1.001')."
            )
    return Criterion(divergence, aggregate, math.log(high), math.log(low))
