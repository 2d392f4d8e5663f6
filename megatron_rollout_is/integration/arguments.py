"""Rollout-correction command-line flags in Megatron's `extra_args_provider` style.

verl 0.6.0 keys are `--rollout-is-*` flags, verl HEAD keys `--rollout-is ...`, `--rollout-rs*`,
`--rollout-bypass-mode`, `--rollout-loss-type` and `--rollout-correction-preset`; `--rollout-is-config`
reads a YAML file of either dialect. Megatron-LM owns the `--rl-*` names; these flags never reuse them.
The loss settings (`--rollout-is-bypass`, `--rollout-loss-denominator`, the sampling replay and
`--rollout-temperature`) become a `PolicyLossConfig` through `policy_loss_config_from_args`.
"""

import argparse
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..config import RolloutCorrectionConfig
from ..core.plan import BOUND_ALIASES, BOUNDS, LEVEL_ALIASES, LEVELS, NULL_SPELLINGS, number_from_text
from ..dialects import LOSS_TYPES, PRESETS
from .loss import PolicyLossConfig, check_loss_settings

# Config fields and their flags; a flag not given is None, so the YAML (or preset) keeps its value.
_CONFIG_FLAGS = {
    "rollout_is": "--rollout-is",
    "rollout_is_threshold": "--rollout-is-threshold",
    "rollout_is_threshold_lower": "--rollout-is-threshold-lower",
    "rollout_is_level": "--rollout-is-level",
    "rollout_is_mode": "--rollout-is-mode",
    "rollout_is_veto_threshold": "--rollout-is-veto-threshold",
    "rollout_is_batch_normalize": "--rollout-is-batch-normalize",
    "rollout_rs": "--rollout-rs",
    "rollout_rs_threshold": "--rollout-rs-threshold",
    "bypass_mode": "--rollout-bypass-mode",
    "loss_type": "--rollout-loss-type",
}

# PolicyLossConfig fields and their flags; errors of the loss settings name the flags.
_LOSS_FLAGS = {
    "temperature": "--rollout-temperature",
    "rollout_top_k": "--rollout-top-k",
    "rollout_top_p": "--rollout-top-p",
    "rollout_min_p": "--rollout-min-p",
    "rollout_tie_rule": "--rollout-tie-rule",
    "bypass": "--rollout-is-bypass",
    "loss_denominator": "--rollout-loss-denominator",
}

VETO_DISABLED = "none"


def _number(text: str, expected: str = "a number") -> float:
    """A plain number; `core.plan.number_from_text` reads it (an underscore is never part of one)."""
    value = number_from_text(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _veto(text: str):
    if text.strip().lower() in NULL_SPELLINGS + ("off",):
        return VETO_DISABLED
    return _number(text, "a number or 'none'")


def _threshold(text: str):
    """A number, or a `lo_hi` band (kept as text: the config checks both ends)."""
    return text if "_" in text else _number(text, "a number or a 'lower_upper' band")


def _rollout_is(text: str):
    """`--rollout-is LEVEL` (verl HEAD) names the weight level."""
    if text not in LEVELS + tuple(LEVEL_ALIASES):
        raise argparse.ArgumentTypeError(f"expected a level {LEVELS + tuple(LEVEL_ALIASES)}, got {text!r}")
    return text


def add_rollout_is_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the rollout-correction flags as a group of their own; returns `parser` (extra_args_provider)."""
    group = parser.add_argument_group(title="rollout correction (importance sampling and rejection)")
    _add_weight_flags(group)
    _add_rejection_and_mode_flags(group)
    _add_sampling_replay_flags(group)
    group.add_argument(
        "--rollout-is-config",
        default=None,
        metavar="YAML",
        help="verl-style YAML: verl HEAD's algorithm.rollout_correction section (a `preset:` key "
        "allowed) or verl 0.6.0's algorithm.rollout_is* keys; flags given explicitly override it.",
    )
    group.add_argument(
        "--rollout-is-dump-dir",
        default=None,
        metavar="DIR",
        help="Write per-step old/rollout log-probs and masks here for `megatron-rollout-is report`.",
    )
    return parser


def _add_weight_flags(group) -> None:
    group.add_argument(
        "--rollout-is",
        nargs="?",
        const=True,
        default=None,
        type=_rollout_is,
        metavar="LEVEL",
        help="verl 0.6.0: alone, multiply the policy loss by the IS weights (without it, a threshold only logs the "
        "mismatch/ metrics). verl HEAD: with a LEVEL (token, sequence, geometric), compute weights at that level.",
    )
    group.add_argument(
        "--no-rollout-is",
        dest="rollout_is",
        action="store_const",
        const=False,
        help="verl 0.6.0: monitoring only (weights computed and logged, not applied).",
    )
    group.add_argument(
        "--rollout-is-threshold",
        type=_threshold,
        default=None,
        metavar="X|LO_HI",
        help="Upper bound of the IS weights (> 0); verl 0.6.0: unset turns rollout IS off. verl HEAD: a band "
        "'lo_hi' is IcePop (weights outside it become 0). Typical: token 1.5-5, sequence 2-10.",
    )
    group.add_argument(
        "--rollout-is-threshold-lower",
        type=_number,
        default=None,
        help="verl 0.6.0: lower bound for clip mode and the metrics; default 1/upper.",
    )
    group.add_argument(
        "--rollout-is-level", choices=LEVELS, default=None, help="verl 0.6.0: aggregation level (default token)."
    )
    group.add_argument(
        "--rollout-is-mode",
        choices=BOUNDS + tuple(BOUND_ALIASES),
        default=None,
        help="truncate: cap at the upper bound; clip (alias mask): zero weights outside [lower, upper]; "
        "clamp: two-sided truncation. Default: truncate (mask for a 'lo_hi' band).",
    )
    group.add_argument(
        "--rollout-is-veto-threshold",
        type=_veto,
        default=None,
        metavar="RATIO|none",
        help="verl 0.6.0: zero the whole sequence when a token ratio falls below this (default 1e-4); "
        "'none' disables it.",
    )
    group.add_argument(
        "--rollout-is-batch-normalize",
        action="store_true",
        default=None,
        help="verl HEAD: divide the weights by their mean over the step (one extra all-reduce).",
    )


def _add_rejection_and_mode_flags(group) -> None:
    group.add_argument(
        "--rollout-rs",
        default=None,
        metavar="CRITERIA",
        help="verl HEAD: comma-separated rejection criteria, all must pass: token_k1/k2/k3, "
        "seq_sum_k1/k2/k3, seq_mean_k1/k2/k3 (seq_mean_k1 is geometric rejection), seq_max_k2/k3.",
    )
    group.add_argument(
        "--rollout-rs-threshold",
        default=None,
        metavar="T[,T...]",
        help="verl HEAD: one threshold for all criteria or one per criterion; k2/k3: upper bound; "
        "k1: 'lo_hi' band on -log(ratio), or x for [1/x, x].",
    )
    group.add_argument(
        "--rollout-bypass-mode",
        dest="bypass_mode",
        action="store_true",
        default=None,
        help="verl HEAD: no old-log-prob pass; pi_old := rollout log-probs, the correction uses the "
        "current policy per micro-batch.",
    )
    group.add_argument(
        "--rollout-loss-type",
        dest="loss_type",
        choices=LOSS_TYPES,
        default=None,
        help="verl HEAD bypass mode: ppo_clip (ratio against the rollout) or reinforce (-w log pi A).",
    )
    group.add_argument(
        "--rollout-correction-preset",
        default=None,
        choices=list(PRESETS),
        metavar="NAME",
        help=f"verl HEAD's named presets: {', '.join(PRESETS)}; other flags override it.",
    )
    group.add_argument(
        "--rollout-is-bypass",
        action="store_true",
        help="Take pi_old as the detached current log-prob (no old-log-prob pass), with either "
        "dialect; the correction is then computed per micro-batch inside the loss. verl HEAD's "
        "own bypass (pi_old = the rollout log-probs) is --rollout-bypass-mode.",
    )
    group.add_argument(
        "--rollout-loss-denominator",
        choices=("kept", "response"),
        default="kept",
        help="Token count the loss is averaged over: kept tokens (after rejection, the default) or all "
        "response tokens (verl HEAD's bypass mode).",
    )


def _add_sampling_replay_flags(group) -> None:
    group.add_argument(
        "--rollout-temperature",
        type=_number,
        default=1.0,
        metavar="T",
        help="The rollout engine's sampling temperature (> 0): the trainer divides the logits by it when "
        "it scores pi_theta and pi_old. Default: 1.",
    )
    group.add_argument(
        "--rollout-top-k",
        type=int,
        default=None,
        metavar="K",
        help="The rollout engine's top-k: the trainer scores the processed distribution it sampled "
        "from (with vLLM's logprobs_mode=processed_logprobs). Default: off.",
    )
    group.add_argument(
        "--rollout-top-p",
        type=_number,
        default=None,
        metavar="P",
        help="The rollout engine's top-p in (0, 1], replayed as --rollout-top-k. Default: off.",
    )
    group.add_argument(
        "--rollout-min-p",
        type=_number,
        default=None,
        metavar="P",
        help="The rollout engine's min-p in [0, 1], replayed as --rollout-top-k. Default: off.",
    )
    group.add_argument(
        "--rollout-tie-rule",
        choices=("triton", "pytorch"),
        default=None,
        help="Which vLLM top-k/top-p implementation sampled: triton (an engine on a GPU; the default) "
        "or pytorch (without Triton); they keep different tokens among ties at the cut. Needs "
        "--rollout-top-k, --rollout-top-p or --rollout-min-p.",
    )


def sampling_replay_settings(args: argparse.Namespace) -> dict:
    """The `PolicyLossConfig` keywords of the sampling flags: the temperature and the replayed filters."""
    return {
        "temperature": args.rollout_temperature,
        "rollout_top_k": args.rollout_top_k,
        "rollout_top_p": args.rollout_top_p,
        "rollout_min_p": args.rollout_min_p,
        "rollout_tie_rule": args.rollout_tie_rule,
    }


def policy_loss_config_from_args(
    args: argparse.Namespace,
    is_config: RolloutCorrectionConfig,
    settings: Mapping[str, Any] | None = None,
    settings_flags: Mapping[str, str] | None = None,
) -> PolicyLossConfig:
    """The `PolicyLossConfig` of the flags, checked against `is_config` as the loss hook checks it.

    Runs the loss hook's own check (`check_loss_settings`), so that settings which cannot work
    together (e.g. `--rollout-is-bypass` with `--rollout-bypass-mode`) fail now, before any model
    is built.

    Args:
        args: flags parsed by a parser given `add_rollout_is_args`.
        is_config: `rollout_is_config_from_args(args)`.
        settings: the caller's own `PolicyLossConfig` keywords (e.g. the PPO clip range).
        settings_flags: the caller's flag of each of `settings`, for error messages.

    Raises:
        ValueError / TypeError: a setting is out of range or useless with the others; the message
            names the flag.
    """
    keywords = {
        **sampling_replay_settings(args),
        "bypass": args.rollout_is_bypass,
        "loss_denominator": args.rollout_loss_denominator,
        **(settings or {}),
    }
    names = {**_LOSS_FLAGS, **(settings_flags or {})}
    # Messages name a field `PolicyLossConfig.<field>`, or bare when an underscore keeps it from
    # being an English word ("temperature", "bypass").
    flags = {f"PolicyLossConfig.{name}": flag for name, flag in names.items()}
    flags.update({name: flag for name, flag in names.items() if "_" in name})
    flags.update(_config_flags(args))
    try:
        loss_config = PolicyLossConfig(**keywords)
        check_loss_settings(loss_config, is_config)
    except (ValueError, TypeError) as error:
        raise type(error)(_with_flag_names(str(error), flags)) from None
    return loss_config


def config_flag_values(args: argparse.Namespace) -> dict:
    """The `RolloutCorrectionConfig` keys the flags set (a flag not given is left out)."""
    values = {name: getattr(args, name) for name in _CONFIG_FLAGS if getattr(args, name, None) is not None}
    if values.get("rollout_is_veto_threshold") == VETO_DISABLED:
        values["rollout_is_veto_threshold"] = None
    return values


def rollout_is_config_from_args(args: argparse.Namespace) -> RolloutCorrectionConfig:
    """The validated config of parsed flags: preset or YAML first, explicit flags on top.

    Raises:
        ValueError / TypeError: a value fails validation; the message names the flag (or, for the
            YAML's own values, the YAML key).
    """
    overrides = config_flag_values(args)
    yaml_path = getattr(args, "rollout_is_config", None)
    preset = getattr(args, "rollout_correction_preset", None)
    if yaml_path and preset:
        raise ValueError(
            "--rollout-correction-preset and --rollout-is-config both set the base config; name the "
            "preset inside the YAML (`preset:` in algorithm.rollout_correction), or use one of them."
        )
    # Errors of the YAML file itself name its keys; only what the flags set is named as flags.
    base = RolloutCorrectionConfig.from_yaml(yaml_path) if yaml_path else None
    try:
        if preset:
            return RolloutCorrectionConfig.preset(preset, **overrides)
        if base is None:
            return RolloutCorrectionConfig(**overrides)
        return replace(base, **overrides)
    except (ValueError, TypeError) as error:
        raise type(error)(_with_flag_names(str(error), _config_flags(args))) from None


def _config_flags(args: argparse.Namespace) -> dict:
    """The config keys errors name as flags: all without a YAML, else those the flags override."""
    named = _CONFIG_FLAGS if getattr(args, "rollout_is_config", None) is None else config_flag_values(args)
    return {name: _CONFIG_FLAGS[name] for name in named}


def _with_flag_names(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each whole name of `flags` replaced by its flag.

    A name inside a longer one (`rollout_is` in `rollout_is_threshold`) is left alone, and so is a
    name whose flag the message already gives.
    """
    names = sorted((name for name, flag in flags.items() if not _whole(flag).search(message)), key=len, reverse=True)
    if not names:
        return message
    return re.sub(_whole(*names), lambda match: flags[match.group(1)], message)


def _whole(*names: str) -> re.Pattern:
    """Matches any of `names` where it is not part of a longer name (`_`, `-` or `.` joined)."""
    return re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
