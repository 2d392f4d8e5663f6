"""`--rollout-is-*` flags into `RolloutISConfig`, and the demo's layout validation."""

import argparse

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
