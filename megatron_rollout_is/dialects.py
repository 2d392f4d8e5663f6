"""verl's two key dialects: which settings belong to which, verl HEAD's presets, and how a
`RolloutCorrectionConfig`'s keys compile to the `core.plan.CorrectionPlan` the math reads.

Compiling also validates: every setting that would do nothing in the chosen dialect or mode is an
error naming the key and the fix, and the config's fields are normalised in place (e.g. verl
0.6.0's `rollout_is_mode: mask` becomes `clip`).
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .core.plan import (
    CorrectionPlan,
    WeightSpec,
    number_from_text,
    parse_band,
    parse_bound,
    parse_criteria,
    parse_level,
    positive_number,
)

if TYPE_CHECKING:
    from .config import RolloutCorrectionConfig

VERL_06, VERL_HEAD = "verl-0.6", "verl-head"
DIALECTS = (VERL_06, VERL_HEAD)
LOSS_TYPES = ("ppo_clip", "reinforce")
DEFAULT_VETO = 1e-4
HEAD_DEFAULT_THRESHOLD = 2.0

_GEO, _K3 = (
    {"rollout_rs": "seq_mean_k1", "rollout_rs_threshold": "0.999_1.001"},
    {"rollout_rs": "seq_mean_k3", "rollout_rs_threshold": 0.01},
)
_BYPASS_PPO, _BYPASS_PG = (
    {"bypass_mode": True, "loss_type": "ppo_clip"},
    {"bypass_mode": True, "loss_type": "reinforce"},
)
PRESETS = {
    "decoupled_token_is": {"rollout_is": "token", "rollout_is_threshold": 2.0},
    "decoupled_seq_is": {"rollout_is": "sequence", "rollout_is_threshold": 2.0},
    "decoupled_token_icepop": {"rollout_is": "token", "rollout_is_threshold": "0.5_5.0"},
    "decoupled_seq_is_rs": {
        "rollout_is": "sequence",
        "rollout_is_threshold": 2.0,
        "rollout_rs": "seq_sum_k1",
        "rollout_rs_threshold": "0.5_2.0",
    },
    "decoupled_geo_rs": dict(_GEO),
    "decoupled_geo_rs_seq_tis": {"rollout_is": "sequence", "rollout_is_threshold": 2.0, **_GEO},
    "decoupled_geo_rs_token_tis": {"rollout_is": "token", "rollout_is_threshold": 2.0, **_GEO},
    "decoupled_k3_rs": dict(_K3),
    "decoupled_k3_rs_seq_tis": {"rollout_is": "sequence", "rollout_is_threshold": 2.0, **_K3},
    "decoupled_k3_rs_token_tis": {"rollout_is": "token", "rollout_is_threshold": 2.0, **_K3},
    "bypass_ppo_clip": dict(_BYPASS_PPO),
    "bypass_ppo_clip_geo_rs": {**_GEO, **_BYPASS_PPO},
    "bypass_ppo_clip_k3_rs": {**_K3, **_BYPASS_PPO},
    "bypass_pg_is": {"rollout_is": "sequence", "rollout_is_threshold": 2.0, **_BYPASS_PG},
    "bypass_pg_token_icepop": {"rollout_is": "token", "rollout_is_threshold": "0.5_5.0", **_BYPASS_PG},
    "bypass_pg_geo_rs": {**_GEO, **_BYPASS_PG},
    "bypass_pg_geo_rs_seq_tis": {"rollout_is": "sequence", "rollout_is_threshold": 2.0, **_GEO, **_BYPASS_PG},
    "bypass_pg_geo_rs_token_tis": {"rollout_is": "token", "rollout_is_threshold": 2.0, **_GEO, **_BYPASS_PG},
    "disabled": {},
}
"""verl HEAD's named presets (`RolloutCorrectionConfig.<name>()` there) as key settings."""


def _is_band(value: Any) -> bool:
    return isinstance(value, str) and "_" in value


# The settings only one dialect has: (key, how errors name it, whether a value selects the dialect).
# A key's default selects neither; `rollout_is`, `rollout_is_threshold` and `rollout_is_mode` are keys
# of both dialects, told apart by their values.
_DIALECT_SETTINGS = {
    VERL_06: (
        ("rollout_is", "rollout_is: true", lambda value: value is True),
        ("rollout_is_level", "rollout_is_level", lambda value: value not in (None, "token")),
        ("rollout_is_threshold_lower", "rollout_is_threshold_lower", lambda value: value is not None),
        ("rollout_is_veto_threshold", "rollout_is_veto_threshold", lambda value: value != DEFAULT_VETO),
    ),
    VERL_HEAD: (
        ("rollout_is", "rollout_is (a level name)", lambda value: isinstance(value, str)),
        ("rollout_is_threshold", "rollout_is_threshold (a 'lo_hi' band)", _is_band),
        ("rollout_is_batch_normalize", "rollout_is_batch_normalize", lambda value: value is not False),
        ("rollout_rs", "rollout_rs", lambda value: value is not None),
        ("rollout_rs_threshold", "rollout_rs_threshold", lambda value: value is not None),
        ("bypass_mode", "bypass_mode", lambda value: value is not False),
        ("loss_type", "loss_type", lambda value: value != "ppo_clip"),
    ),
}
_SHARED_KEYS = {"rollout_is", "rollout_is_threshold", "rollout_is_mode"}


def only_keys(dialect: str) -> set:
    """The keys only `dialect` has (a YAML section of the other dialect must not hold them)."""
    return {key for key, _, _ in _DIALECT_SETTINGS[dialect]} - _SHARED_KEYS


def dialect_markers(values: Mapping[str, Any]) -> tuple:
    """`(verl 0.6.0 settings, verl HEAD settings)`: how errors name the dialect-selecting settings in
    `values` (config keys to values; a missing key is at its default, which selects neither)."""
    return tuple(
        [label for key, label, selects in _DIALECT_SETTINGS[dialect] if key in values and selects(values[key])]
        for dialect in DIALECTS
    )


def infer_dialect(config: "RolloutCorrectionConfig") -> str:
    """`config.dialect`, or the dialect its keys imply; an error naming what to drop when they mix both."""
    old, new = dialect_markers(config.as_mapping())
    if config.dialect is not None and config.dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {DIALECTS} or None (inferred), got {config.dialect!r}.")
    if old and new:
        raise ValueError(
            f"the config mixes verl 0.6.0 keys ({', '.join(old)}) with verl HEAD keys ({', '.join(new)}); use one "
            f"dialect. For verl HEAD drop {', '.join(old)}: rollout_is names the level (token/sequence/geometric), "
            "rejection (rollout_rs) replaces the veto, and a YAML holds the keys under algorithm.rollout_correction. "
            f"For verl 0.6.0 drop {', '.join(new)} (docs/rollout_correction.md maps one onto the other)."
        )
    if config.dialect == VERL_HEAD and old:
        raise ValueError(
            f"verl 0.6.0 key(s) {', '.join(old)} in a verl HEAD config; drop them: rollout_is names the level, "
            "rejection (rollout_rs) replaces the veto (docs/rollout_correction.md)."
        )
    if config.dialect == VERL_06 and new:
        raise ValueError(
            f"verl HEAD key(s) {', '.join(new)} in a verl 0.6.0 config; drop them, or write every key in verl "
            "HEAD's form (in a YAML: under algorithm.rollout_correction)."
        )
    return config.dialect or (VERL_HEAD if new else VERL_06)


def compile_plan(config: "RolloutCorrectionConfig") -> CorrectionPlan | None:
    """The validated plan of `config`'s keys in its dialect (None: correction off); normalises its fields."""
    return _head_plan(config) if infer_dialect(config) == VERL_HEAD else _v06_plan(config)


def _v06_plan(config: "RolloutCorrectionConfig") -> CorrectionPlan | None:
    """verl 0.6.0 semantics: the threshold is the on/off switch, `rollout_is` applies the weights."""
    applied = config.rollout_is if config.rollout_is is not None else False
    if not isinstance(applied, bool):
        raise TypeError(f"rollout_is must be a bool with verl 0.6.0 keys, got {applied!r}.")
    level = parse_level("rollout_is_level", config.rollout_is_level or "token")
    bound = parse_bound("rollout_is_mode", config.rollout_is_mode or "truncate")
    threshold = config.rollout_is_threshold
    if isinstance(threshold, (str, bool)):
        raise TypeError(f"rollout_is_threshold must be a number or null with verl 0.6.0 keys, got {threshold!r}.")
    lower = _positive_or_none("rollout_is_threshold_lower", config.rollout_is_threshold_lower)
    veto = _positive_or_none("rollout_is_veto_threshold", config.rollout_is_veto_threshold)
    if veto is not None and veto >= 1.0:
        raise ValueError(
            f"rollout_is_veto_threshold must lie in (0, 1), got {veto}; it is a ratio far below 1 "
            "(default 1e-4), or null to disable the veto."
        )
    config.rollout_is = applied
    if threshold is None:
        _reject_settings_while_off(config, level, bound)
        return None  # level and mode stay as given: `dataclasses.replace` may still turn it on
    config.rollout_is_level, config.rollout_is_mode = level, "clip" if bound == "mask" else bound
    upper = positive_number("rollout_is_threshold", threshold)
    config.rollout_is_threshold, config.rollout_is_threshold_lower = upper, lower
    lower = lower if lower is not None else 1.0 / upper
    if lower >= upper:
        raise ValueError(
            f"rollout_is_threshold_lower ({lower}) must be below rollout_is_threshold ({upper}); with "
            "an upper threshold <= 1 the default lower (1/upper) is not below it either, so set both "
            "explicitly."
        )
    weights = WeightSpec(level, bound, upper, lower, applied=applied)
    return CorrectionPlan("mismatch", weights, veto_threshold=veto)


def _reject_settings_while_off(config: "RolloutCorrectionConfig", level: str, bound: str) -> None:
    """verl 0.6.0's null rollout_is_threshold turns everything off, so any other setting would be ignored."""
    ignored = [
        name
        for name, is_set in (
            ("rollout_is: true", config.rollout_is is True),
            ("rollout_is_threshold_lower", config.rollout_is_threshold_lower is not None),
            (f"rollout_is_level {level}", level != "token"),
            (f"rollout_is_mode {config.rollout_is_mode}", bound != "truncate"),
            ("rollout_is_veto_threshold", config.rollout_is_veto_threshold != DEFAULT_VETO),
        )
        if is_set
    ]
    if ignored:
        one = len(ignored) == 1
        raise ValueError(
            f"{', '.join(ignored)} {'is' if one else 'are'} set but rollout_is_threshold is null, which turns "
            f"rollout IS off (verl 0.6.0 keys): {'it does' if one else 'they do'} nothing. Set the upper threshold "
            f"rollout_is_threshold (e.g. 2.0), or drop {'it' if one else 'them'}."
        )


def _head_plan(config: "RolloutCorrectionConfig") -> CorrectionPlan:
    """verl HEAD semantics; errors for settings that would do nothing (verl ignores them silently)."""
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {config.loss_type!r}.")
    for name in ("rollout_is_batch_normalize", "bypass_mode"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be true or false, got {getattr(config, name)!r}.")
    if not config.bypass_mode and config.loss_type != "ppo_clip":
        raise ValueError(
            f"loss_type {config.loss_type!r} only applies in bypass mode (decoupled mode trains "
            "PPO-clip against pi_old); set bypass_mode: true, or drop loss_type."
        )
    if config.rollout_is_level is not None:
        raise ValueError(
            f"rollout_is_level {config.rollout_is_level!r} is a verl 0.6.0 key, which verl HEAD keys never read; "
            "drop it and name the level in rollout_is (token, sequence or geometric)."
        )
    if config.rollout_is is False:
        config.rollout_is = None  # verl 0.6.0's "no weights applied"; with HEAD keys: no weights
    weights = _head_weights(config)
    if config.bypass_mode and config.loss_type == "ppo_clip" and weights is not None:
        raise ValueError(
            "bypass_mode with loss_type ppo_clip takes the PPO ratio against the rollout log-probs, which already is "
            f"the importance ratio: rollout_is={config.rollout_is!r} would not be applied. Set loss_type: reinforce "
            "to apply the weights, or drop rollout_is (the rollout_corr/ metrics are logged either way)."
        )
    criteria = ()
    if config.rollout_rs is not None:
        criteria = parse_criteria(config.rollout_rs, config.rollout_rs_threshold)
    elif config.rollout_rs_threshold is not None:
        raise ValueError(
            "rollout_rs_threshold is set but rollout_rs is null, so nothing is rejected; name the "
            "criteria in rollout_rs (e.g. seq_mean_k1) or drop the threshold."
        )
    return CorrectionPlan(
        "rollout_corr", weights, criteria=criteria, bypass=config.bypass_mode, loss_type=config.loss_type
    )


def _head_weights(config: "RolloutCorrectionConfig") -> WeightSpec | None:
    threshold = config.rollout_is_threshold
    if config.rollout_is is None:
        if threshold is not None and not _is_default_threshold(threshold):
            raise ValueError(
                f"rollout_is_threshold={threshold!r} does nothing while rollout_is is null; set "
                "rollout_is (token or sequence) to compute weights, or drop the threshold."
            )
        if config.rollout_is_batch_normalize:
            raise ValueError(
                "rollout_is_batch_normalize is true but rollout_is is null: there are no weights to "
                "normalise; set rollout_is or drop rollout_is_batch_normalize."
            )
        if config.rollout_is_mode is not None:
            raise ValueError(
                f"rollout_is_mode {config.rollout_is_mode!r} does nothing while rollout_is is null (no weights); "
                "set rollout_is (token or sequence), or drop the mode."
            )
        return None
    level = parse_level("rollout_is", config.rollout_is)
    if threshold is None:
        threshold = config.rollout_is_threshold = HEAD_DEFAULT_THRESHOLD
    low, high = parse_band("rollout_is_threshold", threshold)
    bound = parse_bound("rollout_is_mode", config.rollout_is_mode or ("truncate" if low is None else "mask"))
    if bound == "truncate" and low is not None:
        raise ValueError(
            f"rollout_is_threshold {threshold!r} is a band but rollout_is_mode truncate only caps at the "
            "upper end; use mask (IcePop: zero outside the band) or clamp (two-sided truncation), or "
            "give one number."
        )
    lower = low if low is not None else 1.0 / high
    if bound != "truncate" and lower >= high:
        raise ValueError(
            f"rollout_is_threshold {threshold!r}: the band [{lower:g}, {high:g}] is empty; use an upper "
            "bound above 1 or a 'lower_upper' band with lower < upper."
        )
    return WeightSpec(level, bound, high, lower, applied=True, batch_normalize=config.rollout_is_batch_normalize)


def _is_default_threshold(threshold: Any) -> bool:
    number = number_from_text(threshold) if isinstance(threshold, str) else threshold
    return isinstance(number, (int, float)) and not isinstance(number, bool) and number == HEAD_DEFAULT_THRESHOLD


def _positive_or_none(name: str, value: Any) -> float | None:
    return None if value is None else positive_number(name, value)
