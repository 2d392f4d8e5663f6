"""`--rollout-is-*` flags into `RolloutISConfig`, and the demo's layout validation."""

import argparse
import re

import pytest

from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.integration.arguments import add_rollout_is_args, rollout_is_config_from_args


def _config(*flags):
    parser = add_rollout_is_args(argparse.ArgumentParser())
    return rollout_is_config_from_args(parser.parse_args(list(flags)))


def test_no_flags_leave_rollout_is_off():
    config = _config()
    assert config == RolloutISConfig()
    assert not config.enabled and config.rollout_is_veto_threshold == 1e-4


def test_every_flag_round_trips():
    config = _config(
        "--rollout-is",
        "--rollout-is-threshold",
        "2.5",
        "--rollout-is-threshold-lower",
        "0.25",
        "--rollout-is-level",
        "sequence",
        "--rollout-is-mode",
        "truncate",
        "--rollout-is-veto-threshold",
        "1e-3",
    )
    assert config == RolloutISConfig(
        rollout_is=True,
        rollout_is_threshold=2.5,
        rollout_is_threshold_lower=0.25,
        rollout_is_level="sequence",
        rollout_is_mode="truncate",
        rollout_is_veto_threshold=1e-3,
    )
    assert config.applies_weights


def test_threshold_without_rollout_is_is_monitoring_mode():
    config = _config("--rollout-is-threshold", "2")
    assert config.enabled and not config.applies_weights


@pytest.mark.parametrize("spelling", ["none", "None", "null", "off"])
def test_veto_none_disables_the_veto(spelling):
    config = _config("--rollout-is-threshold", "2", "--rollout-is-veto-threshold", spelling)
    assert config.rollout_is_veto_threshold is None


def test_mask_is_an_alias_of_clip():
    assert _config("--rollout-is-threshold", "2", "--rollout-is-mode", "mask").rollout_is_mode == "clip"


def test_yaml_then_explicit_flags_override(tmp_path):
    path = tmp_path / "rollout_is.yaml"
    path.write_text(
        "algorithm:\n"
        "  rollout_is: true\n"
        "  rollout_is_threshold: 3.0\n"
        "  rollout_is_level: geometric\n"
        "  rollout_is_mode: mask\n"
        "  rollout_is_veto_threshold: 1e-3\n"
    )
    from_yaml = _config("--rollout-is-config", str(path))
    assert from_yaml == RolloutISConfig(True, 3.0, None, "geometric", "clip", 1e-3)
    overridden = _config(
        "--rollout-is-config",
        str(path),
        "--rollout-is-threshold",
        "1.001",
        "--rollout-is-threshold-lower",
        "0.999",
        "--rollout-is-veto-threshold",
        "none",
    )
    assert overridden == RolloutISConfig(True, 1.001, 0.999, "geometric", "clip", None)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rollout-is-threshold", "-1"], "--rollout-is-threshold"),
        (["--rollout-is-threshold", "0"], "--rollout-is-threshold"),
        (["--rollout-is-threshold", "inf"], "--rollout-is-threshold"),
        (["--rollout-is-threshold", "2", "--rollout-is-veto-threshold", "2"], "--rollout-is-veto-threshold"),
        (["--rollout-is-threshold", "2", "--rollout-is-threshold-lower", "3"], "--rollout-is-threshold-lower"),
        (["--rollout-is-threshold-lower", "0.5"], "--rollout-is-threshold-lower"),
        (["--rollout-is"], "--rollout-is-threshold"),
        # verl 0.6.0 settings that do nothing while --rollout-is-threshold is unset.
        (["--rollout-is-level", "sequence"], "--rollout-is-level"),
        (["--rollout-is-mode", "clip"], "--rollout-is-mode"),
        (["--rollout-is-veto-threshold", "1e-3"], "--rollout-is-veto-threshold"),
    ],
)
def test_bad_values_name_the_flag(flags, named):
    with pytest.raises(ValueError) as error:
        _config(*flags)
    assert named in str(error.value)
    assert "rollout_is_" not in str(error.value), "the message should use flag names, not field names"


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rollout-is-level", "tokens"], "--rollout-is-level"),
        (["--rollout-is-mode", "cap"], "--rollout-is-mode"),
        (["--rollout-is-veto-threshold", "tiny"], "--rollout-is-veto-threshold"),
        (["--rollout-is-threshold", "two"], "--rollout-is-threshold"),
        # Python's float() reads "0_5" as 5.0; an underscore is never part of a number here.
        (["--rollout-is-threshold-lower", "0_5"], "--rollout-is-threshold-lower"),
        (["--rollout-is-veto-threshold", "1_0e-4"], "--rollout-is-veto-threshold"),
        (["--rollout-top-p", "0_9"], "--rollout-top-p"),
        (["--rollout-temperature", "warm"], "--rollout-temperature"),
    ],
)
def test_unparsable_values_are_argparse_errors_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit):
        _config(*flags)
    assert named in capsys.readouterr().err


def test_a_removed_yaml_key_points_to_the_migration(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("actor_rollout_ref:\n  actor:\n    tis_imp_ratio_cap: 2.0\n")
    # The file's own error names YAML keys, not flags.
    with pytest.raises(ValueError, match=r"tis_imp_ratio_cap.*`algorithm\.rollout_is_threshold: <the old cap>`"):
        _config("--rollout-is-config", str(path))


def test_no_rollout_is_turns_a_yaml_config_into_monitoring(tmp_path):
    path = tmp_path / "on.yaml"
    path.write_text("algorithm:\n  rollout_is: true\n  rollout_is_threshold: 3.0\n")
    assert _config("--rollout-is-config", str(path)).applies_weights
    config = _config("--rollout-is-config", str(path), "--no-rollout-is")
    assert config.enabled and not config.applies_weights and config.rollout_is_threshold == 3.0


def _demo_args(*flags):
    from megatron_rollout_is.demo.arguments import build_parser

    return build_parser().parse_args(list(flags))


@pytest.mark.parametrize(
    "flags, world_size, named",
    [
        (["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"], 2, "world size 2"),
        (["--global-batch-size", "40", "--micro-batch-size", "16"], 1, "--global-batch-size"),
        (["--global-batch-size", "64", "--micro-batch-size", "16"], 8, "data-parallel size 8"),
        (["--global-batch-size", "60", "--micro-batch-size", "4", "--group-size", "8"], 1, "--group-size"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers"),
        (["--tensor-model-parallel-size", "4", "--num-attention-heads", "2"], 4, "--tensor-model-parallel-size"),
        (["--micro-batch-size", "0"], 1, "--micro-batch-size"),
        (["--rollout-is", "--rollout-is-threshold", "-2"], 1, "--rollout-is-threshold"),
    ],
)
def test_demo_rejects_impossible_layouts_naming_the_flag(flags, world_size, named):
    from megatron_rollout_is.demo.arguments import validate_args

    with pytest.raises(ValueError) as error:
        validate_args(_demo_args(*flags), world_size)
    assert named in str(error.value)


def test_demo_derives_the_data_parallel_size():
    from megatron_rollout_is.demo.arguments import validate_args

    args = _demo_args(
        "--tensor-model-parallel-size",
        "2",
        "--global-batch-size",
        "32",
        "--micro-batch-size",
        "4",
        "--rollout-is-threshold",
        "2",
    )
    config = validate_args(args, world_size=8)
    assert args.data_parallel_size == 4
    assert config == RolloutISConfig(rollout_is_threshold=2.0)


def test_demo_task_flags_fail_at_parse_time():
    from megatron_rollout_is.demo.arguments import validate_args

    with pytest.raises(ValueError, match="--min-digits <= --max-digits"):
        validate_args(_demo_args("--min-digits", "5", "--max-digits", "3"), world_size=1)


def test_verl_head_flags_round_trip():
    from megatron_rollout_is.config import RolloutCorrectionConfig

    config = _config(
        "--rollout-is",
        "sequence",
        "--rollout-is-threshold",
        "0.5_2.0",
        "--rollout-is-mode",
        "clamp",
        "--rollout-is-batch-normalize",
        "--rollout-rs",
        "seq_mean_k1,seq_max_k3",
        "--rollout-rs-threshold",
        "0.99_1.01,0.05",
        "--rollout-bypass-mode",
        "--rollout-loss-type",
        "reinforce",
    )
    assert config == RolloutCorrectionConfig(
        rollout_is="sequence",
        rollout_is_threshold="0.5_2.0",
        rollout_is_mode="clamp",
        rollout_is_batch_normalize=True,
        rollout_rs="seq_mean_k1,seq_max_k3",
        rollout_rs_threshold="0.99_1.01,0.05",
        bypass_mode=True,
        loss_type="reinforce",
    )
    assert config.plan.bypass and config.plan.loss_type == "reinforce" and len(config.plan.criteria) == 2


def test_a_preset_flag_with_overrides():
    config = _config("--rollout-correction-preset", "decoupled_k3_rs_token_tis", "--rollout-rs-threshold", "0.02")
    assert (config.rollout_is, config.rollout_rs, config.rollout_rs_threshold) == ("token", "seq_mean_k3", "0.02")


def test_a_verl_head_yaml_then_flags(tmp_path):
    path = tmp_path / "corr.yaml"
    path.write_text("algorithm:\n  rollout_correction:\n    rollout_is: token\n    rollout_is_threshold: 0.5_5.0\n")
    assert _config("--rollout-is-config", str(path)).plan.weights.bound == "mask"
    config = _config("--rollout-is-config", str(path), "--rollout-rs", "token_k2", "--rollout-rs-threshold", "0.1")
    assert config.rollout_rs == "token_k2" and config.plan.weights.upper == 5.0


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rollout-rs", "token_k9", "--rollout-rs-threshold", "1"], "--rollout-rs"),
        (["--rollout-rs", "token_k1"], "--rollout-rs-threshold"),
        (["--rollout-loss-type", "reinforce"], "--rollout-bypass-mode"),
        (["--rollout-is-batch-normalize"], "--rollout-is-batch-normalize"),
        (["--rollout-is", "token", "--rollout-is-level", "sequence"], "--rollout-is-level"),
        (["--rollout-bypass-mode", "--rollout-is", "token"], "--rollout-loss-type"),
        (
            ["--rollout-is", "token", "--rollout-is-threshold", "0.5_2_3"],
            "--rollout-is-threshold '0.5_2_3' is not a band",
        ),
        (["--rollout-is", "token", "--rollout-is-threshold", "a_2"], "--rollout-is-threshold (lower end of 'a_2')"),
        (["--rollout-is", "sequence", "--rollout-is-level", "token"], "--rollout-is-level 'token' is a verl 0.6.0 key"),
        (
            ["--rollout-rs", "token_k2", "--rollout-rs-threshold", "1", "--rollout-is-mode", "truncate"],
            "--rollout-is-mode 'truncate' does nothing while --rollout-is is null",
        ),
    ],
)
def test_verl_head_flag_errors_name_the_flag(flags, named):
    with pytest.raises(ValueError) as error:
        _config(*flags)
    assert named in str(error.value), str(error.value)


def test_preset_and_yaml_together_are_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  rollout_correction:\n    rollout_is: token\n")
    with pytest.raises(ValueError, match="--rollout-correction-preset and --rollout-is-config"):
        _config("--rollout-is-config", str(path), "--rollout-correction-preset", "decoupled_token_is")


@pytest.mark.parametrize(
    "threshold, bound, lower, upper",
    [
        ("0.5_2", "mask", 0.5, 2.0),
        ("1_5", "mask", 1.0, 5.0),
        ("2", "truncate", 0.5, 2.0),
        ("1e1", "truncate", 0.1, 10.0),
    ],
)
def test_a_threshold_flag_with_an_underscore_is_a_band(threshold, bound, lower, upper):
    weights = _config("--rollout-is", "token", "--rollout-is-threshold", threshold).plan.weights
    assert (weights.bound, weights.lower, weights.upper) == (bound, lower, upper)


def test_flag_names_replace_whole_names_only(tmp_path):
    path = tmp_path / "head.yaml"
    path.write_text("algorithm:\n  rollout_correction:\n    rollout_is: token\n    rollout_is_threshold: 3.0\n")
    with pytest.raises(ValueError) as error:
        _config("--rollout-is-config", str(path), "--no-rollout-is")
    # The YAML's key keeps its name; only the flag given (--no-rollout-is, i.e. rollout_is) is renamed.
    assert str(error.value).startswith("rollout_is_threshold=3.0 does nothing while --rollout-is is null")
    assert "--rollout-is_" not in str(error.value)


def _loss_config(*flags, **extra):
    from megatron_rollout_is.integration.arguments import policy_loss_config_from_args

    args = add_rollout_is_args(argparse.ArgumentParser()).parse_args(list(flags))
    return policy_loss_config_from_args(args, rollout_is_config_from_args(args), **extra)


def test_loss_flags_become_the_policy_loss_config():
    config = _loss_config(
        "--rollout-temperature",
        "0.7",
        "--rollout-top-k",
        "5",
        "--rollout-min-p",
        "0.05",
        "--rollout-tie-rule",
        "pytorch",
        "--rollout-is-bypass",
        "--rollout-rs",
        "token_k2",
        "--rollout-rs-threshold",
        "0.1",
        "--rollout-loss-denominator",
        "response",
        settings={"clip_eps_high": 0.28},
    )
    assert (config.temperature, config.rollout_top_k, config.rollout_top_p, config.rollout_min_p) == (
        0.7,
        5,
        None,
        0.05,
    )
    assert (config.rollout_tie_rule, config.bypass, config.loss_denominator) == ("pytorch", True, "response")
    assert (config.clip_eps_low, config.clip_eps_high) == (0.2, 0.28)
    defaults = _loss_config()
    assert (defaults.temperature, defaults.rollout_tie_rule, defaults.bypass) == (1.0, None, False)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rollout-is-bypass", "--rollout-bypass-mode"], ["--rollout-is-bypass", "--rollout-bypass-mode"]),
        (["--rollout-loss-denominator", "response"], ["--rollout-loss-denominator", "Set --rollout-rs"]),
        (["--rollout-top-p", "1.5"], ["--rollout-top-p must be", "1.5"]),
        (["--rollout-min-p", "2"], ["--rollout-min-p must be"]),
        (["--rollout-top-k", "-3"], ["--rollout-top-k must be"]),
        (["--rollout-temperature", "0"], ["--rollout-temperature must be"]),
        (["--rollout-tie-rule", "pytorch"], ["--rollout-tie-rule", "--rollout-top-k"]),
    ],
)
def test_loss_flag_errors_name_the_flags(flags, named):
    with pytest.raises(ValueError) as error:
        _loss_config(*flags)
    for words in named:
        assert words in str(error.value), str(error.value)
    assert not any(field in str(error.value) for field in ("rollout_top", "rollout_min_p", "PolicyLossConfig.temp"))


def test_the_callers_own_loss_settings_are_named_by_its_flags():
    with pytest.raises(ValueError, match="--clip-eps must be"):
        _loss_config(settings={"clip_eps_low": 1.5}, settings_flags={"clip_eps_low": "--clip-eps"})


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--rollout-is-bypass", "--rollout-bypass-mode"], "(--rollout-bypass-mode, verl HEAD: the PPO ratio"),
        (["--rollout-loss-denominator", "response"], "only matters with rejection (--rollout-rs)"),
        (["--rollout-top-p", "1.5"], "--rollout-top-p must be"),
        (["--rollout-temperature", "-1"], "--rollout-temperature must be"),
        (["--num-query-groups", "0"], "--num-query-groups must be >= 1, got 0"),
        (["--clip-eps", "1.5"], "--clip-eps must be a number in [0, 1)"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--rollout-noise", "-0.5"], "--rollout-noise must be >= 0, got -0.5"),
        (["--eval-interval", "-1"], "--eval-interval must be >= 0, got -1"),
    ],
)
def test_demo_loss_and_model_flags_fail_before_the_model_is_built(flags, named, capsys):
    from megatron_rollout_is.demo.arguments import validate_args
    from megatron_rollout_is.demo.launch import main

    with pytest.raises(ValueError, match=re.escape(named)):
        validate_args(_demo_args(*flags), world_size=1)
    # The entry point reports it in one line and exits 2, before any process group or model.
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1 and "Traceback" not in err


def test_demo_engine_and_trainer_temperatures_are_separate_flags():
    from megatron_rollout_is.demo.arguments import policy_loss_config, validate_args

    args = _demo_args("--temperature", "0.5", "--rollout-temperature", "0.8", "--clip-eps", "0.1")
    loss_config = policy_loss_config(args, validate_args(args, world_size=1))
    assert args.temperature == 0.5
    assert (loss_config.temperature, loss_config.clip_eps_low, loss_config.clip_eps_high) == (0.8, 0.1, 0.1)
    defaults = _demo_args()
    assert defaults.temperature == 1.0
    assert policy_loss_config(defaults, validate_args(defaults, world_size=1)).temperature == 1.0
