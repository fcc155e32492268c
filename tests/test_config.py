"""Quantization configs and recipes: shipped recipes, file formats, validation at the boundary."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dmquant.config import (
    AttentionConfig,
    CalibrationConfig,
    LayerRule,
    QuantConfig,
    QuantizerConfig,
    available_recipes,
    load_recipe,
    with_overrides,
)
from dmquant.errors import ConfigError, DmquantError

FIRST_LAST_RULES = [
    ("conv_in|pos_embed.proj", 8, 8),
    ("conv_out|proj_out_2", 8, 8),
]


def _rules(config: QuantConfig) -> list[tuple]:
    return [(r.pattern, r.weight_bits, r.activation_bits) for r in config.rules]


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        QuantConfig.from_dict(data)
    return str(caught.value)


# ---------------------------------------------------------------- shipped recipes


def test_shipped_recipes_are_listed():
    assert available_recipes() == [
        "eda-dm",
        "minmax",
        "mse",
        "ptq4dm",
        "ptqd",
        "ptqd-mixed",
        "q-diffusion",
        "sqnr-hybrid",
    ]


def test_minmax_recipe_has_documented_values():
    config = load_recipe("minmax")
    assert config.name == "minmax"
    assert (config.weight.bits, config.weight.symmetric, config.weight.granularity, config.weight.observer) == (
        8,
        True,
        "channel",
        "minmax",
    )
    assert (
        config.activation.bits,
        config.activation.symmetric,
        config.activation.granularity,
        config.activation.observer,
    ) == (8, False, "tensor", "minmax")
    assert config.weight.describe() == "int8 sym channel minmax"
    assert config.activation.describe() == "uint8 asym tensor minmax"
    assert config.attention.enabled is True and config.attention.softmax_bits == 8 and config.attention.bits is None
    assert config.split_shortcut is False
    assert config.per_step_activations is False
    assert _rules(config) == FIRST_LAST_RULES
    assert not any(rule.keep_fp for rule in config.rules)
    calib = config.calibration
    assert (calib.num_inference_steps, calib.strategy, calib.num_trajectories, calib.batch_size) == (
        20,
        "uniform",
        16,
        16,
    )
    assert config.weight.observer_options() == {} and config.activation.observer_options() == {}


def test_mse_recipe_has_documented_values():
    config = load_recipe("mse")
    assert config.name == "mse"
    for quantizer in (config.weight, config.activation):
        assert quantizer.bits == 8
        assert quantizer.observer == "mse"
        assert quantizer.p == pytest.approx(2.4)
        assert quantizer.observer_options() == {"p": pytest.approx(2.4), "num_candidates": 80, "max_elements": 2**18}
    assert config.weight.symmetric is True and config.weight.granularity == "channel"
    assert config.activation.symmetric is False and config.activation.granularity == "tensor"
    assert config.weight.describe() == "int8 sym channel mse"
    assert config.activation.describe() == "uint8 asym tensor mse"
    assert config.split_shortcut is True
    assert config.attention.softmax_bits == 8
    assert _rules(config) == FIRST_LAST_RULES
    calib = config.calibration
    assert (calib.num_inference_steps, calib.strategy, calib.num_trajectories, calib.batch_size) == (
        20,
        "uniform",
        16,
        16,
    )


def test_recipe_by_path_equals_recipe_by_name():
    from dmquant.config import RECIPES_DIR

    assert load_recipe(RECIPES_DIR / "mse.yaml") == load_recipe("mse")


def test_unknown_recipe_name_lists_shipped_recipes():
    with pytest.raises(ConfigError) as caught:
        load_recipe("msee")
    message = str(caught.value)
    assert "'msee'" in message
    assert "shipped recipes: eda-dm, minmax, mse, ptq4dm" in message


def test_missing_recipe_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_recipe(missing)


def test_config_error_is_a_dmquant_error_and_value_error():
    with pytest.raises(DmquantError):
        load_recipe("no-such-recipe")
    with pytest.raises(ValueError):
        load_recipe("no-such-recipe")


# ---------------------------------------------------------------- recipe files


def test_yaml_recipe_file(tmp_path):
    path = tmp_path / "w4.yaml"
    path.write_text(
        "weight:\n"
        "  bits: 4\n"
        "  observer: percentile\n"
        "  percentile: 99.5\n"
        "activation:\n"
        "  bits: fp8_e4m3\n"
        "  symmetric: true\n"
        "per_step_activations: true\n"
        "rules:\n"
        "  - {pattern: 'time_embedding.*', keep_fp: true}\n"
        "calibration:\n"
        "  num_trajectories: 4\n"
        "  guidance_scale: 2\n"
        "  strategy_options: {count: 3}\n"
    )
    config = load_recipe(path)
    assert config.name == "w4"  # taken from the file name when the file names none
    assert config.weight.bits == 4 and config.weight.format.name == "int4"
    assert config.weight.observer_options() == {"percentile": 99.5, "max_elements": 2**18}
    assert config.activation.format.name == "fp8_e4m3"
    assert config.per_step_activations is True
    assert config.rules == [LayerRule("time_embedding.*", keep_fp=True)]
    assert config.calibration.num_trajectories == 4
    assert config.calibration.guidance_scale == 2.0 and isinstance(config.calibration.guidance_scale, float)
    assert config.calibration.strategy_options == {"count": 3}
    # keys the file leaves out keep their defaults
    assert config.calibration.num_inference_steps == 20
    assert config.split_shortcut is True and config.attention == AttentionConfig()


def test_partial_quantizer_section_keeps_the_other_defaults():
    config = QuantConfig.from_dict({"weight": {"bits": 4}, "activation": {"bits": 6}})
    defaults = QuantConfig()
    assert config.weight == dataclasses.replace(defaults.weight, bits=4)
    assert config.activation == dataclasses.replace(defaults.activation, bits=6)


def test_toml_recipe_file(tmp_path):
    path = tmp_path / "fp8.toml"
    path.write_text(
        'name = "fp8-weights"\n'
        "split_shortcut = false\n"
        "[weight]\n"
        'bits = "fp8_e5m2"\n'
        'granularity = "tensor"\n'
        "[attention]\n"
        "softmax_bits = 16\n"
        "[[rules]]\n"
        'pattern = "conv_in|conv_out"\n'
        "weight_bits = 8\n"
        "[[rules]]\n"
        'pattern = "*.to_q"\n'
        "keep_fp = true\n"
        "[calibration]\n"
        "num_inference_steps = 5\n"
        "batch_size = 2\n"
    )
    config = load_recipe(path)
    assert config.name == "fp8-weights"
    assert config.split_shortcut is False
    assert config.weight.format.name == "fp8_e5m2" and config.weight.granularity == "tensor"
    assert config.attention.softmax_bits == 16
    assert [(r.pattern, r.weight_bits, r.keep_fp) for r in config.rules] == [
        ("conv_in|conv_out", 8, False),
        ("*.to_q", None, True),
    ]
    assert (config.calibration.num_inference_steps, config.calibration.batch_size) == (5, 2)
    assert config.activation == QuantConfig().activation


def test_empty_yaml_file_gives_default_config_named_after_file(tmp_path):
    path = tmp_path / "blank.yaml"
    path.write_text("# nothing here\n")
    config = load_recipe(path)
    assert config == QuantConfig(name="blank")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("broken.yaml", "weight:\n  bits: [8, 4\n", "not valid YAML"),
        ("broken.toml", "[weight\nbits = 4\n", "not valid TOML"),
    ],
)
def test_invalid_recipe_file_names_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_error_in_recipe_file_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("weight:\n  bitz: 4\n")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith("typo.yaml: weight.bitz: unknown key")
    assert "did you mean 'bits'?" in message


@pytest.mark.parametrize("text", ["- weight\n- activation\n", "just some words\n"])
def test_recipe_file_that_is_not_a_mapping_is_a_config_error(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_recipe(path)


# ---------------------------------------------------------------- unknown keys and wrong types


def test_unknown_top_level_key_suggests_close_match():
    message = _error({"wieght": {"bits": 4}})
    assert message.startswith("wieght: unknown key")
    assert "did you mean 'weight'?" in message
    assert "valid keys: name, weight, activation, attention" in message


def test_unknown_nested_key_names_full_path_and_suggests_close_match():
    message = _error({"weight": {"bitz": 4}})
    assert message.startswith("weight.bitz: unknown key")
    assert "did you mean 'bits'?" in message
    assert "valid keys: bits, symmetric" in message


def test_unknown_key_without_close_match_lists_valid_keys():
    message = _error({"calibration": {"zzzzzz": 1}})
    assert message.startswith("calibration.zzzzzz: unknown key")
    assert "did you mean" not in message
    assert "num_trajectories" in message


def test_unknown_key_inside_a_rule_names_its_index():
    message = _error({"rules": [{"pattern": "conv_in"}, {"pattern": "conv_out", "weight_bit": 8}]})
    assert message.startswith("rules[1].weight_bit: unknown key")
    assert "did you mean 'weight_bits'?" in message


def test_string_for_bool_names_the_key():
    message = _error({"weight": {"symmetric": "yes"}})
    assert message == "weight.symmetric: expected bool, got 'yes'"


def test_bool_for_int_names_the_key():
    message = _error({"calibration": {"num_trajectories": True}})
    assert message == "calibration.num_trajectories: expected int, got a boolean"


def test_bool_for_bits_is_refused():
    message = _error({"activation": {"bits": False}})
    assert message.startswith("activation.bits: expected int or str, got a boolean")


def test_float_for_int_names_the_key():
    assert _error({"calibration": {"batch_size": 2.5}}).startswith("calibration.batch_size: expected int, got 2.5")


def test_section_that_is_not_a_mapping():
    assert "expected a mapping, got int" in _error({"attention": 8})


def test_rules_that_are_not_a_list():
    assert _error({"rules": {"pattern": "conv_in"}}).startswith("rules: expected a list, got dict")


# ---------------------------------------------------------------- impossible values


@pytest.mark.parametrize(
    "section, bits, shown",
    [("weight", 9, "9"), ("weight", 1, "1"), ("activation", "int12", "12")],
)
def test_unsupported_integer_bits(section, bits, shown):
    message = _error({section: {"bits": bits}})
    assert message.startswith(f"{section}.")
    assert f"unsupported integer bit width {shown}" in message
    assert "supported: [2, 3, 4, 5, 6, 7, 8, 16]" in message


def test_unknown_format_name():
    assert "unknown quantization format 'fp6'" in _error({"weight": {"bits": "fp6"}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"weight": {"bits": 9}}, "weight.bits"),
        ({"activation": {"bits": "int12"}}, "activation.bits"),
        ({"attention": {"bits": 1}}, "attention.bits"),
        ({"weight": {"granularity": "row"}}, "weight.granularity"),
    ],
)
def test_bad_format_message_names_the_key(data, key):
    assert _error(data).startswith(f"{key}: ")


def test_asymmetric_float_format_is_refused():
    message = _error({"weight": {"bits": "fp8_e4m3", "symmetric": False}})
    assert message.startswith("weight.symmetric:")
    assert "fp8_e4m3" in message


def test_symmetric_float_format_is_accepted():
    assert QuantConfig.from_dict({"weight": {"bits": "fp4_e2m1"}}).weight.format.name == "fp4_e2m1"


@pytest.mark.parametrize("fmt", ["fp8_e5m2", "fp4"])
def test_softmax_bits_as_other_float_format_is_refused(fmt):
    message = _error({"attention": {"softmax_bits": fmt}})
    assert message.startswith("attention.softmax_bits:")
    assert "unsigned integers or fp8_e4m3" in message


def test_softmax_bits_fp8_e4m3_is_accepted_for_fp8_attention():
    assert AttentionConfig(bits="fp8_e4m3", softmax_bits="fp8_e4m3").softmax_bits == "fp8_e4m3"


def test_softmax_bits_16_is_accepted():
    assert AttentionConfig(softmax_bits=16).softmax_bits == 16


@pytest.mark.parametrize("percentile", [50, 100.5, -1])
def test_percentile_out_of_range(percentile):
    message = _error({"activation": {"percentile": percentile}})
    assert message.startswith("activation.percentile: must be in (50, 100]")


def test_percentile_100_is_accepted():
    assert QuantizerConfig(percentile=100).percentile == 100


@pytest.mark.parametrize("momentum", [1.0, -0.1])
def test_momentum_out_of_range(momentum):
    assert _error({"activation": {"momentum": momentum}}).startswith("activation.momentum: must be in [0, 1)")


def test_non_positive_p():
    assert _error({"weight": {"p": 0}}).startswith("weight.p: must be positive")


def test_unknown_observer_lists_valid_ones():
    message = _error({"weight": {"observer": "minmaxx"}})
    assert message.startswith("weight.observer: unknown observer 'minmaxx'")
    assert "'mse'" in message and "'percentile'" in message


@pytest.mark.parametrize("key", ["num_trajectories", "num_inference_steps", "batch_size"])
def test_non_positive_calibration_counts(key):
    assert _error({"calibration": {key: -1}}) == f"calibration.{key}: must be >= 1, got -1"


def test_negative_guidance_scale():
    assert "guidance_scale" in _error({"calibration": {"guidance_scale": -1.0}})


def test_empty_rule_pattern():
    assert _error({"rules": [{"pattern": ""}]}) == "rules[0].pattern: must be a non-empty glob"


def test_rule_without_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rules\[0\]\.pattern"):
        QuantConfig.from_dict({"rules": [{"weight_bits": 8}]})


@pytest.mark.parametrize("override", [{"weight_bits": 8}, {"activation_bits": 4}])
def test_keep_fp_with_bits_is_refused(override):
    message = _error({"rules": [{"pattern": "conv_in", "keep_fp": True, **override}]})
    assert message.startswith("rules[0].")
    assert "'conv_in'" in message
    assert "keep_fp: cannot be combined with weight_bits/activation_bits" in message


def test_bad_rule_bits_names_the_key():
    message = _error({"rules": [{"pattern": "conv_out", "activation_bits": 9}]})
    assert message.startswith("rules[0].activation_bits: unsupported integer bit width 9")


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="num_trajectories"):
        CalibrationConfig(num_trajectories=0)
    with pytest.raises(ConfigError, match="pattern"):
        LayerRule("")


# ---------------------------------------------------------------- with_bits, rules, round trip


def test_with_bits_overrides_only_the_defaults():
    base = load_recipe("mse")
    config = base.with_bits(4, 6)
    assert config.weight.bits == 4 and config.weight.format.name == "int4"
    assert config.activation.format.name == "uint6"
    # everything else about the quantizers stays
    assert (config.weight.observer, config.weight.granularity, config.weight.p) == ("mse", "channel", 2.4)
    assert config.activation.granularity == "tensor"
    # the first/last-layer rules still force 8 bits
    assert _rules(config) == FIRST_LAST_RULES
    assert config.calibration == base.calibration
    assert config.attention == base.attention
    assert config.name == "mse"
    # the original is untouched
    assert base.weight.bits == 8 and base.activation.bits == 8


def test_with_bits_none_keeps_each_default():
    base = load_recipe("minmax")
    assert base.with_bits() == base
    only_weights = base.with_bits(weight_bits=2)
    assert only_weights.weight.bits == 2 and only_weights.activation == base.activation
    only_activations = base.with_bits(activation_bits=6)
    assert only_activations.activation.bits == 6 and only_activations.weight == base.weight


def test_with_bits_validates():
    with pytest.raises(ConfigError, match="unsupported integer bit width 9"):
        load_recipe("mse").with_bits(9)
    with pytest.raises(ConfigError, match="unknown quantization format 'int'"):
        load_recipe("mse").with_bits(activation_bits="int")


def test_rule_matches_pipe_separated_globs():
    rule = LayerRule("conv_in|pos_embed.proj|up_blocks.*.conv_shortcut")
    assert rule.matches("conv_in")
    assert rule.matches("pos_embed.proj")
    assert rule.matches("up_blocks.1.resnets.0.conv_shortcut")
    assert not rule.matches("conv_in2")
    assert not rule.matches("pos_embed.proj.bias")
    assert not rule.matches("down_blocks.1.resnets.0.conv_shortcut")
    assert not rule.matches("Conv_in")  # case-sensitive


def test_single_glob_rule():
    rule = LayerRule("*attn*")
    assert rule.matches("transformer_blocks.0.attn1.to_q")
    assert not rule.matches("transformer_blocks.0.ff.net.2")


@pytest.mark.parametrize("recipe", ["minmax", "mse"])
def test_shipped_recipe_round_trips_through_dict_and_json(recipe):
    config = load_recipe(recipe)
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_custom_config_round_trips():
    config = QuantConfig(
        name="custom-w4",
        weight=QuantizerConfig(bits="fp4_e2m1", granularity="group:32", observer="percentile", percentile=99.0),
        activation=QuantizerConfig(bits=6, symmetric=False, observer="ema", momentum=0.5),
        attention=AttentionConfig(enabled=False, bits=4, softmax_bits=16),
        split_shortcut=False,
        per_step_activations=True,
        rules=[
            LayerRule("conv_in", keep_fp=True),
            LayerRule("conv_out|proj_out_2", weight_bits=8, activation_bits="int8"),
        ],
        calibration=CalibrationConfig(num_inference_steps=7, strategy_options={"count": 2}, num_trajectories=3, seed=5),
    )
    data = config.to_dict()
    assert data["weight"]["bits"] == "fp4_e2m1"
    assert data["rules"][1] == {
        "pattern": "conv_out|proj_out_2",
        "keep_fp": False,
        "weight_bits": 8,
        "activation_bits": "int8",
    }
    rebuilt = QuantConfig.from_dict(json.loads(json.dumps(data)))
    assert rebuilt == config
    assert rebuilt is not config and rebuilt.rules is not config.rules


def test_a_recipe_inherits_from_its_base_and_overrides_key_by_key(tmp_path):
    (tmp_path / "parent.yaml").write_text("weight: {bits: 4, observer: minmax}\nactivation: {bits: 6}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nweight: {bits: 3}\n")
    config = load_recipe(tmp_path / "child.yaml")
    assert config.name == "child"
    assert config.weight.bits == 3 and config.weight.observer == "minmax" and config.activation.bits == 6
    shipped = load_recipe("ptqd")
    assert shipped.reconstruction == load_recipe("q-diffusion").reconstruction and shipped.correction.enabled


def test_recipes_inheriting_in_a_circle_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_recipe(tmp_path / "a.yaml")


def test_a_strategy_s_options_are_replaced_not_merged(tmp_path):
    (tmp_path / "child.yaml").write_text(
        "base: q-diffusion\ncalibration: {strategy: ndtc, strategy_options: {mean: 0.5}}\n"
    )
    config = load_recipe(tmp_path / "child.yaml")
    assert config.calibration.strategy_options == {"mean": 0.5} and config.calibration.num_trajectories == 64


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"weight:\n  bits: 4\n  bits: 8\n", "bits: key given twice (line 2)"),
        (b"weight: {bits: 4}\nweight: {bits: 8}\n", "weight: key given twice"),
        (b"\xff\xfeweight: 1\n", "not UTF-8 text"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
        (b"weight:\n  p: .nan\n", "weight.p: expected a finite number, got nan"),
        (b"reconstruction:\n  learning_rate: .inf\n", "reconstruction.learning_rate: expected a finite number"),
        ("weight:\n  bits: int²\n".encode(), "weight.bits: unknown quantization format 'int²'"),
        ("weight:\n  granularity: 'group:٣'\n".encode(), "weight.granularity: bad granularity"),
        (b"? [1]\n: 2\n", "not valid YAML"),
        (b"weight: [\n", "not valid YAML"),
    ],
    ids=lambda value: value[:12] if isinstance(value, bytes) else None,
)
def test_a_malformed_recipe_file_is_a_config_error_naming_the_key(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(path)


def test_a_recipe_path_that_is_a_directory_is_a_config_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="not a recipe file"):
        load_recipe(tmp_path / "dir.yaml")


def test_a_duplicate_key_in_a_toml_recipe_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[weight]\nbits = 4\nbits = 8\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(path)


@pytest.mark.parametrize("name", ["/dev/null", "../mse", "./mse", "/"])
def test_a_recipe_path_without_a_recipe_suffix_is_not_taken_for_a_name(name):
    with pytest.raises(ConfigError, match=f"{re.escape(name)}: not a recipe file"):
        load_recipe(name)


def test_overrides_take_dotted_paths_whole_sections_and_the_name():
    config = load_recipe("q-diffusion")
    calibration = CalibrationConfig(num_inference_steps=4, num_trajectories=2)
    changed = with_overrides(
        config,
        {
            "name": "variant",
            "calibration": calibration,
            "calibration.guidance_scale": 3.0,
            "reconstruction.enabled": False,
            "rules": [LayerRule("conv_in", keep_fp=True)],
        },
    )
    assert changed.name == "variant" and not changed.reconstruction.enabled
    assert changed.calibration == dataclasses.replace(calibration, guidance_scale=3.0)
    assert changed.rules == [LayerRule("conv_in", keep_fp=True)] and config.reconstruction.enabled
    with pytest.raises(ConfigError, match="reconstruction.enabeld: unknown key"):
        with_overrides(config, {"reconstruction.enabeld": False})
