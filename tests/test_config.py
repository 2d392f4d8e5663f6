"""RolloutISConfig: defaults, semantics, validation messages and verl-style loading."""

import math

import pytest

from megatron_rollout_is import RolloutISConfig


def test_defaults_follow_the_seed():
    config = RolloutISConfig()
    assert config.rollout_is is False
    assert config.rollout_is_threshold is None
    assert config.rollout_is_threshold_lower is None
    assert config.rollout_is_level == "token"
    assert config.rollout_is_mode == "truncate"
    assert config.rollout_is_veto_threshold == 1e-4
    assert not config.enabled and not config.applies_weights


def test_threshold_is_the_switch_and_monitoring_mode():
    monitoring = RolloutISConfig(rollout_is_threshold=2.0)
    assert monitoring.enabled and not monitoring.applies_weights
    applied = RolloutISConfig(rollout_is=True, rollout_is_threshold=2.0)
    assert applied.enabled and applied.applies_weights
    assert applied.lower_threshold == pytest.approx(0.5)


def test_mask_is_an_alias_of_clip():
    assert RolloutISConfig(rollout_is_threshold=2.0, rollout_is_mode="mask").rollout_is_mode == "clip"


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(rollout_is_threshold=0.0), ValueError, ["rollout_is_threshold", "> 0"]),
        (dict(rollout_is_threshold=-2.0), ValueError, ["rollout_is_threshold", "> 0"]),
        (dict(rollout_is_threshold=math.inf), ValueError, ["rollout_is_threshold", "finite"]),
        (dict(rollout_is_threshold=math.nan), ValueError, ["rollout_is_threshold", "finite"]),
        (dict(rollout_is_threshold=2.0, rollout_is_threshold_lower=-1.0), ValueError, ["rollout_is_threshold_lower"]),
        (dict(rollout_is_threshold=2.0, rollout_is_threshold_lower=3.0), ValueError, ["must be below", "rollout_is_threshold"]),
        (dict(rollout_is_threshold=0.5), ValueError, ["must be below", "set both explicitly"]),
        (dict(rollout_is_threshold=2.0, rollout_is_level="tokens"), ValueError, ["rollout_is_level", "'token'"]),
        (dict(rollout_is_threshold=2.0, rollout_is_mode="cap"), ValueError, ["rollout_is_mode", "'truncate'", "'mask'"]),
        (dict(rollout_is_threshold=2.0, rollout_is_veto_threshold=1.5), ValueError, ["rollout_is_veto_threshold", "(0, 1)"]),
        (dict(rollout_is_threshold=2.0, rollout_is_veto_threshold=0.0), ValueError, ["rollout_is_veto_threshold", "> 0"]),
        (dict(rollout_is_threshold="2.0"), TypeError, ["rollout_is_threshold", "number"]),
        (dict(rollout_is_threshold=True), TypeError, ["rollout_is_threshold", "number"]),
        (dict(rollout_is="yes", rollout_is_threshold=2.0), ValueError, ["rollout_is", "bool", "'token'"]),
        (dict(rollout_is=1.0, rollout_is_threshold=2.0), TypeError, ["rollout_is", "bool"]),
        (dict(rollout_is_threshold=2.0, rollout_is_level=1), TypeError, ["rollout_is_level", "string"]),
        (dict(rollout_is=True), ValueError, ["rollout_is_threshold", "null"]),
        (dict(rollout_is_threshold_lower=0.5), ValueError, ["rollout_is_threshold_lower", "upper threshold"]),
    ],
)
def test_validation_names_the_field_and_the_fix(kwargs, error, words):
    with pytest.raises(error) as caught:
        RolloutISConfig(**kwargs)
    for word in words:
        assert word in str(caught.value)


def test_from_mapping_reads_the_algorithm_section_and_yaml_strings():
    config = RolloutISConfig.from_mapping(
        {
            "algorithm": {
                "rollout_is": True,
                "rollout_is_threshold": "3.0",
                "rollout_is_threshold_lower": 0.33,
                "rollout_is_level": "token",
                "rollout_is_mode": "clip",
                "rollout_is_veto_threshold": "1e-5",
                "gamma": 1.0,
            },
            "actor_rollout_ref": {"rollout": {"calculate_log_probs": True}},
        }
    )
    assert config == RolloutISConfig(True, 3.0, 0.33, "token", "clip", 1e-5)


def test_from_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "algorithm:\n  rollout_is: true\n  rollout_is_threshold: 1.0002\n  rollout_is_threshold_lower: 0.9998\n"
        "  rollout_is_level: geometric\n  rollout_is_mode: clip\n  rollout_is_veto_threshold: null\n"
    )
    config = RolloutISConfig.from_yaml(path)
    assert config == RolloutISConfig(True, 1.0002, 0.9998, "geometric", "clip", None)


@pytest.mark.parametrize(
    "mapping, where",
    [
        ({"actor_rollout_ref": {"actor": {"tis_imp_ratio_cap": 2.0}}}, "actor_rollout_ref.actor.tis_imp_ratio_cap"),
        ({"algorithm": {"tis_imp_ratio_cap": 2.0}}, "algorithm.tis_imp_ratio_cap"),
        ({"tis_imp_ratio_cap": 2.0}, "tis_imp_ratio_cap"),
    ],
)
def test_removed_tis_key_fails_with_the_migration(mapping, where):
    with pytest.raises(ValueError) as caught:
        RolloutISConfig.from_mapping(mapping)
    message = str(caught.value)
    assert where in message
    for replacement in ("rollout_is: true", "rollout_is_threshold", "rollout_is_level: token", "rollout_is_mode: truncate"):
        assert replacement in message


def test_unknown_rollout_is_key_is_rejected():
    with pytest.raises(ValueError, match="rollout_is_treshold"):
        RolloutISConfig.from_mapping({"algorithm": {"rollout_is_treshold": 2.0}})
