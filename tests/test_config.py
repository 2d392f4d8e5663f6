"""RolloutISConfig: defaults, semantics, validation messages and verl-style loading."""

import math
from dataclasses import replace

import pytest

from megatron_rollout_is import RolloutISConfig


def test_defaults_follow_the_seed():
    config = RolloutISConfig()
    assert config.rollout_is is False
    assert config.rollout_is_threshold is None
    assert config.rollout_is_threshold_lower is None
    assert config.rollout_is_veto_threshold == 1e-4
    assert not config.enabled and not config.applies_weights
    # Level and mode default to token and truncate once a threshold turns IS on.
    on = RolloutISConfig(rollout_is_threshold=2.0)
    assert (on.rollout_is_level, on.rollout_is_mode) == ("token", "truncate")
    assert (on.plan.weights.level, on.plan.weights.bound, on.plan.veto_threshold) == ("token", "truncate", 1e-4)


def test_a_config_that_is_off_keeps_level_and_mode_unset_so_replace_can_turn_it_on():
    off = RolloutISConfig()
    assert (off.rollout_is_level, off.rollout_is_mode) == (None, None)
    icepop = replace(off, rollout_is="token", rollout_is_threshold="0.5_2")
    assert icepop.key_dialect == "verl-head"
    assert (icepop.plan.weights.bound, icepop.plan.weights.lower, icepop.plan.weights.upper) == ("mask", 0.5, 2.0)


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
        # verl 0.6.0 ignores these while rollout_is_threshold is null; here they are errors.
        (dict(rollout_is_level="sequence"), ValueError, ["rollout_is_level sequence", "null", "drop it"]),
        (dict(rollout_is_mode="clip"), ValueError, ["rollout_is_mode clip", "rollout_is_threshold"]),
        (dict(rollout_is_veto_threshold=1e-3), ValueError, ["rollout_is_veto_threshold", "rollout_is_threshold"]),
        (dict(rollout_is_veto_threshold=None), ValueError, ["rollout_is_veto_threshold", "does nothing"]),
        (
            dict(rollout_is_level="geometric", rollout_is_mode="clamp"),
            ValueError,
            ["rollout_is_level geometric, rollout_is_mode clamp are set", "drop them"],
        ),
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


# ------------------------------------------------------------------------------------------------
# Numbers written as text, settings that would do nothing, and the dialect errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("2", 2.0), (" 2.5 ", 2.5), ("1e-3", 0.001), ("-1", -1.0), ("0.5_2", None), ("1_5", None), ("two", None)],
)
def test_number_from_text_never_reads_an_underscore_as_part_of_a_number(text, expected):
    from megatron_rollout_is.core.plan import number_from_text

    assert number_from_text(text) == expected


@pytest.mark.parametrize(
    "written, bound, lower, upper",
    [
        ("0.5_2", "mask", 0.5, 2.0),  # float() and YAML 1.1 read this as 0.52
        ("1_5", "mask", 1.0, 5.0),  # ... and this as 15
        ("'0.5_2'", "mask", 0.5, 2.0),
        ("2", "truncate", 0.5, 2.0),
        ("4.0", "truncate", 0.25, 4.0),
    ],
)
def test_an_underscore_in_a_yaml_threshold_always_makes_a_band(tmp_path, written, bound, lower, upper):
    path = tmp_path / "band.yaml"
    path.write_text(f"algorithm:\n  rollout_correction:\n    rollout_is: token\n    rollout_is_threshold: {written}\n")
    weights = RolloutCorrectionConfig.from_yaml(path).plan.weights
    assert (weights.bound, weights.lower, weights.upper) == (bound, lower, upper)
    flat = RolloutCorrectionConfig.from_mapping({"rollout_is": "token", "rollout_is_threshold": written.strip("'")})
    assert (flat.plan.weights.bound, flat.plan.weights.lower, flat.plan.weights.upper) == (bound, lower, upper)


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    path = tmp_path / "v06.yaml"
    path.write_text("algorithm:\n  rollout_is: true\n  rollout_is_threshold: 2\n  rollout_is_veto_threshold: 1e-3\n")
    plan = RolloutISConfig.from_yaml(path).plan
    assert plan.weights.upper == 2.0 and plan.veto_threshold == 0.001


@pytest.mark.parametrize(
    "threshold, words",
    [
        ("0.5_2_3", ["not a band", "'lower_upper'"]),
        ("0.5__2", ["not a band"]),
        ("_2", ["lower end", "must be a number"]),
        ("0.5_", ["upper end", "must be a number"]),
        ("a_2", ["lower end", "'a'"]),
        ("2_0.5", ["inverted"]),
        ("0_2", ["lower end", "> 0"]),
    ],
)
def test_malformed_bands_name_the_key(threshold, words):
    with pytest.raises(ValueError) as caught:
        RolloutCorrectionConfig.from_mapping({"rollout_is": "token", "rollout_is_threshold": threshold})
    assert "rollout_is_threshold" in str(caught.value)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_verl_0_6_stock_keys_with_a_null_threshold_are_off_without_error(tmp_path):
    path = tmp_path / "stock.yaml"  # verl 0.6.0's own defaults
    path.write_text(
        "algorithm:\n  rollout_is: false\n  rollout_is_threshold: null\n  rollout_is_threshold_lower: null\n"
        "  rollout_is_level: token\n  rollout_is_mode: truncate\n  rollout_is_veto_threshold: 1e-4\n"
    )
    assert not RolloutISConfig.from_yaml(path).enabled


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            dict(rollout_rs="token_k2", rollout_rs_threshold=1.0, rollout_is_mode="truncate"),
            ["rollout_is_mode 'truncate' does nothing while rollout_is is null"],
        ),
        (dict(rollout_is="sequence", rollout_is_level="token"), ["rollout_is_level", "name the level in rollout_is"]),
        (
            dict(rollout_rs="token_k2", rollout_rs_threshold=1.0, rollout_is_veto_threshold=None),
            ["mixes", "drop rollout_is_veto_threshold"],
        ),
        (
            dict(rollout_is_veto_threshold=None, dialect="verl-head"),
            ["0.6.0 key(s) rollout_is_veto_threshold in a verl HEAD config; drop them"],
        ),
    ],
)
def test_verl_head_rejects_settings_it_would_ignore(kwargs, words):
    with pytest.raises(ValueError) as caught:
        RolloutCorrectionConfig(**kwargs)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


@pytest.mark.parametrize(
    "key, value", [("loss_type", "reinforce"), ("preset", "decoupled_k3_rs"), ("bypass_mode", True)]
)
def test_verl_head_keys_directly_under_algorithm_are_an_error(key, value):
    with pytest.raises(ValueError) as caught:
        RolloutCorrectionConfig.from_mapping({"algorithm": {key: value}})
    assert f"algorithm.{key}" in str(caught.value) and "under algorithm.rollout_correction" in str(caught.value)


def test_mixing_the_dialects_names_what_to_drop_for_each():
    with pytest.raises(ValueError) as caught:
        RolloutCorrectionConfig(
            rollout_is=True, rollout_is_threshold=2.0, rollout_rs="token_k2", rollout_rs_threshold=1
        )
    message = str(caught.value)
    assert "For verl HEAD drop rollout_is: true" in message
    assert "For verl 0.6.0 drop rollout_rs, rollout_rs_threshold" in message
    assert "algorithm.rollout_correction" in message
