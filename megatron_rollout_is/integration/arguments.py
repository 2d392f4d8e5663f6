"""`--rollout-is-*` command-line flags in Megatron's `extra_args_provider` style.

Megatron-LM owns the `--rl-*` names; these flags never reuse them.
"""

import argparse
from dataclasses import fields, replace

from ..config import LEVELS, MODE_ALIASES, MODES, RolloutISConfig

# Flags explicitly given on the command line win over the YAML file; None marks "not given".
_CONFIG_FLAGS = {
    "rollout_is": "--rollout-is",
    "rollout_is_threshold": "--rollout-is-threshold",
    "rollout_is_threshold_lower": "--rollout-is-threshold-lower",
    "rollout_is_level": "--rollout-is-level",
    "rollout_is_mode": "--rollout-is-mode",
    "rollout_is_veto_threshold": "--rollout-is-veto-threshold",
}


VETO_DISABLED = "none"


def _float_or_none(text: str):
    if text.strip().lower() in ("none", "null", "off"):
        return VETO_DISABLED
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_rollout_is_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the rollout IS flags as a group of their own; returns `parser` (extra_args_provider)."""
    group = parser.add_argument_group(title="rollout importance sampling")
    group.add_argument(
        "--rollout-is", action=argparse.BooleanOptionalAction, default=None,
        help="Multiply the policy loss by the IS weights. Without it (or with --no-rollout-is), a set "
        "threshold only computes and logs the mismatch/ metrics (monitoring mode).",
    )
    group.add_argument(
        "--rollout-is-threshold", type=float, default=None,
        help="Upper bound of the IS weights (> 0); unset turns rollout IS off. Typical: token 1.5-5, "
        "sequence 2-10, geometric 1.0002-1.001.",
    )
    group.add_argument(
        "--rollout-is-threshold-lower", type=float, default=None,
        help="Lower bound for clip mode and the metrics; default 1/upper.",
    )
    group.add_argument("--rollout-is-level", choices=LEVELS, default=None, help="Aggregation level (default token).")
    group.add_argument(
        "--rollout-is-mode", choices=MODES + tuple(MODE_ALIASES), default=None,
        help="truncate: cap at the upper bound; clip (alias mask): zero weights outside [lower, upper]. Default truncate.",
    )
    group.add_argument(
        "--rollout-is-veto-threshold", type=_float_or_none, default=None, metavar="RATIO|none",
        help="Zero the whole sequence when a token ratio falls below this (default 1e-4); 'none' disables it.",
    )
    group.add_argument(
        "--rollout-is-bypass", action="store_true",
        help="Take pi_old as the detached current log-prob (no separate old-log-prob pass); the weights "
        "are then computed per micro-batch inside the loss.",
    )
    group.add_argument(
        "--rollout-is-config", default=None, metavar="YAML",
        help="verl-style YAML with algorithm.rollout_is* keys; flags given explicitly override it.",
    )
    group.add_argument(
        "--rollout-is-dump-dir", default=None, metavar="DIR",
        help="Write per-step old/rollout log-probs and masks here for `megatron-rollout-is report`.",
    )
    return parser


def rollout_is_config_from_args(args: argparse.Namespace) -> RolloutISConfig:
    """The validated `RolloutISConfig` of parsed flags (YAML first, explicit flags on top).

    Raises:
        ValueError / TypeError: a value fails validation; the message names the flag.
    """
    given = {name: getattr(args, name, None) for name in _CONFIG_FLAGS}
    overrides = {name: value for name, value in given.items() if value is not None}
    if overrides.get("rollout_is_veto_threshold") == VETO_DISABLED:
        overrides["rollout_is_veto_threshold"] = None
    # Errors of the YAML file itself name its keys; only what the flags set is named as flags.
    config = RolloutISConfig.from_yaml(args.rollout_is_config) if args.rollout_is_config else None
    try:
        if config is None:
            return RolloutISConfig(**overrides)
        return replace(config, **overrides)
    except (ValueError, TypeError) as error:
        flagged = [f.name for f in fields(RolloutISConfig)] if config is None else list(overrides)
        raise type(error)(_with_flag_names(str(error), flagged)) from None


def _with_flag_names(message: str, names: list) -> str:
    for name in sorted(names, key=len, reverse=True):
        message = message.replace(name, _CONFIG_FLAGS[name])
    return message
