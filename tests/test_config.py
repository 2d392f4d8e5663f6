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
        (
            dict(rollout_is_threshold=2.0, rollout_is_threshold_lower=3.0),
            ValueError,
            ["must be below", "rollout_is_threshold"],
        ),
        (dict(rollout_is_threshold=0.5), ValueError, ["must be below", "set both explicitly"]),
        (dict(rollout_is_threshold=2.0, rollout_is_level="tokens"), ValueError, ["rollout_is_level", "'token'"]),
        (
            dict(rollout_is_threshold=2.0, rollout_is_mode="cap"),
            ValueError,
            ["rollout_is_mode", "'truncate'", "'mask'"],
        ),
        (
            dict(rollout_is_threshold=2.0, rollout_is_veto_threshold=1.5),
            ValueError,
            ["rollout_is_veto_threshold", "(0, 1)"],
        ),
        (
            dict(rollout_is_threshold=2.0, rollout_is_veto_threshold=0.0),
            ValueError,
            ["rollout_is_veto_threshold", "> 0"],
        ),
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
    for replacement in (
        "rollout_is: true",
        "rollout_is_threshold",
        "rollout_is_level: token",
        "rollout_is_mode: truncate",
    ):
        assert replacement in message


def test_unknown_rollout_is_key_is_rejected():
    with pytest.raises(ValueError, match="rollout_is_treshold"):
        RolloutISConfig.from_mapping({"algorithm": {"rollout_is_treshold": 2.0}})


# ------------------------------------------------------------------------------------------------
# verl HEAD keys (algorithm.rollout_correction)
# ------------------------------------------------------------------------------------------------

from megatron_rollout_is.config import PRESETS, RolloutCorrectionConfig  # noqa: E402


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_verl_head_preset_builds_and_keeps_its_keys(name):
    config = RolloutCorrectionConfig.preset(name)
    assert config.key_dialect == "verl-head" and config.plan.metric_names == "rollout_corr"
    for key, value in PRESETS[name].items():
        assert getattr(config, key) == value, key
    factory = getattr(RolloutCorrectionConfig, name)()
    assert factory == config and factory.plan == config.plan


def test_verl_head_factories_take_verls_keyword_arguments():
    config = RolloutCorrectionConfig.decoupled_geo_rs_seq_tis(is_threshold=3.0, rs_threshold=1.001)
    assert (config.rollout_is, config.rollout_is_threshold) == ("sequence", 3.0)
    assert (config.rollout_rs, config.rollout_rs_threshold) == ("seq_mean_k1", 1.001)
    icepop = RolloutCorrectionConfig.decoupled_token_icepop(threshold=4.0, threshold_lower=0.25)
    assert icepop.rollout_is_threshold == "0.25_4.0" and icepop.plan.weights.bound == "mask"
    assert icepop.plan.weights.lower == 0.25 and icepop.plan.weights.upper == 4.0


def test_verl_head_plan_normalises_thresholds_and_criteria():
    plan = RolloutCorrectionConfig(
        rollout_is="sequence_mean",
        rollout_is_threshold=2.0,
        rollout_is_mode="clamp",
        rollout_rs="token_k1, seq_max_k3,token_k1",
        rollout_rs_threshold="0.5_2, 0.1",
    ).plan
    assert plan.weights.level == "geometric" and plan.weights.bound == "clamp"
    assert (plan.weights.lower, plan.weights.upper) == (0.5, 2.0)
    assert [c.name for c in plan.criteria] == ["token_k1", "seq_max_k3"]  # duplicates dropped, order kept
    k1, k3 = plan.criteria
    assert k1.lower == pytest.approx(math.log(0.5)) and k1.upper == pytest.approx(math.log(2.0))
    assert k3.upper == 0.1 and k3.lower is None
    single = RolloutCorrectionConfig(rollout_rs="seq_mean_k1", rollout_rs_threshold=1.001).plan.criteria[0]
    assert single.lower == pytest.approx(-math.log(1.001)) and single.upper == pytest.approx(math.log(1.001))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(rollout_rs="token_k4", rollout_rs_threshold=1.0), ValueError, ["rollout_rs", "token_k4", "seq_mean_k1"]),
        (dict(rollout_rs="seq_max_k1", rollout_rs_threshold=1.0), ValueError, ["rollout_rs", "seq_max_k1"]),
        (dict(rollout_rs="token_k1"), ValueError, ["rollout_rs_threshold", "null"]),
        (dict(rollout_rs_threshold=0.1), ValueError, ["rollout_rs_threshold", "rollout_rs is null"]),
        (
            dict(rollout_rs="token_k1,token_k2", rollout_rs_threshold="1.5,0.1,0.2"),
            ValueError,
            ["3 values", "2 criteria", "one per criterion"],
        ),
        (dict(rollout_rs="token_k2", rollout_rs_threshold="0.5_2"), ValueError, ["token_k2", "one upper bound"]),
        (dict(rollout_rs="token_k2", rollout_rs_threshold=-1), ValueError, ["token_k2", "> 0"]),
        (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="2_0.5"), ValueError, ["seq_mean_k1", "inverted"]),
        (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold=0.9), ValueError, ["[1/x, x]", "lower_upper"]),
        (dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="a_b"), ValueError, ["seq_mean_k1", "number"]),
        (dict(rollout_is="tokens"), ValueError, ["rollout_is", "'token'"]),
        (dict(rollout_is="token", rollout_is_threshold="0_2"), ValueError, ["rollout_is_threshold", "> 0"]),
        (dict(rollout_is="token", rollout_is_threshold="2_0.5"), ValueError, ["rollout_is_threshold", "inverted"]),
        (dict(rollout_is="token", rollout_is_threshold=True), TypeError, ["rollout_is_threshold", "boolean"]),
        (
            dict(rollout_is="token", rollout_is_threshold="0.5_2", rollout_is_mode="truncate"),
            ValueError,
            ["band", "mask", "clamp"],
        ),
        (dict(rollout_is="token", rollout_is_threshold=0.5, rollout_is_mode="mask"), ValueError, ["empty"]),
        (dict(rollout_is_batch_normalize=True), ValueError, ["rollout_is_batch_normalize", "rollout_is is null"]),
        (
            dict(rollout_is=None, rollout_is_threshold=5.0, rollout_rs="token_k2", rollout_rs_threshold=1),
            ValueError,
            ["rollout_is_threshold", "does nothing"],
        ),
        (dict(loss_type="reinforce"), ValueError, ["loss_type", "bypass_mode"]),
        (dict(bypass_mode=True, loss_type="sgd"), ValueError, ["loss_type", "ppo_clip"]),
        (dict(bypass_mode=True, rollout_is="token"), ValueError, ["ppo_clip", "would not be applied", "reinforce"]),
        (
            dict(rollout_is="token", rollout_is_level="token", rollout_is_threshold_lower=0.5),
            ValueError,
            ["mixes", "rollout_is_threshold_lower", "rollout_is (a level name)"],
        ),
        (
            dict(rollout_rs="token_k2", rollout_rs_threshold=1.0, rollout_is_veto_threshold=1e-3),
            ValueError,
            ["mixes", "rollout_is_veto_threshold", "rollout_rs"],
        ),
        (dict(rollout_is=True, rollout_is_threshold=2.0, bypass_mode=True), ValueError, ["mixes", "bypass_mode"]),
        (
            dict(rollout_rs="token_k2", rollout_rs_threshold=1.0, dialect="verl-0.6"),
            ValueError,
            ["verl HEAD key", "rollout_rs"],
        ),
        (dict(dialect="verl-7"), ValueError, ["dialect", "verl-head"]),
    ],
)
def test_verl_head_validation_names_the_key_and_the_fix(kwargs, error, words):
    with pytest.raises(error) as caught:
        RolloutCorrectionConfig(**kwargs)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_verl_head_yaml_section_presets_and_defaults(tmp_path):
    stock = tmp_path / "stock.yaml"  # verl HEAD's own default rollout_correction.yaml: metrics only
    stock.write_text(
        "algorithm:\n  rollout_correction:\n    rollout_is: null\n    rollout_is_threshold: 2.0\n"
        "    rollout_rs: null\n    rollout_rs_threshold: null\n    bypass_mode: false\n"
        "    loss_type: ppo_clip\n    rollout_is_batch_normalize: false\n"
    )
    config = RolloutCorrectionConfig.from_yaml(stock)
    assert config.enabled and config.plan.weights is None and not config.plan.criteria
    assert config.plan.metric_names == "rollout_corr"
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "algorithm:\n  rollout_correction:\n    preset: decoupled_geo_rs_token_tis\n"
        "    rollout_rs_threshold: 0.99_1.01\n"
    )
    config = RolloutCorrectionConfig.from_yaml(preset)
    assert config.rollout_is == "token" and config.rollout_rs == "seq_mean_k1"
    assert config.rollout_rs_threshold == "0.99_1.01"


@pytest.mark.parametrize(
    "text, words",
    [
        (
            "algorithm:\n  rollout_correction:\n    rollout_is: token\n    rollout_is_level: token\n",
            ["algorithm.rollout_correction.rollout_is_level", "other verl dialect"],
        ),
        (
            "algorithm:\n  rollout_is: true\n  rollout_is_threshold: 2\n  rollout_correction:\n    rollout_is: token\n",
            ["both", "rollout_correction", "rollout_is_threshold"],
        ),
        ("algorithm:\n  rollout_rs: token_k1\n", ["algorithm.rollout_rs", "rollout_correction"]),
        ("algorithm:\n  rollout_correction:\n    rollout_rss: token_k1\n", ["rollout_rss", "unknown"]),
        ("algorithm:\n  rollout_correction:\n    preset: decoupled_nothing\n", ["decoupled_nothing", "presets"]),
    ],
)
def test_verl_yaml_mistakes_name_the_key(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as caught:
        RolloutCorrectionConfig.from_yaml(path)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_describe_names_what_is_on():
    assert RolloutCorrectionConfig().describe() == "rollout correction off"
    text = RolloutCorrectionConfig.bypass_pg_geo_rs_token_tis().describe()
    assert "IS token truncate 2" in text and "RS seq_mean_k1" in text and "bypass reinforce" in text
