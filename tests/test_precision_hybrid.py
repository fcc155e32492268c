"""Hybrid precision: greedy promotion of blocks by SQNR gain per BOP, within a BOPs budget."""

import dataclasses

import pytest

from dmquant import api
from dmquant.config import CalibrationConfig, HybridConfig, load_recipe
from dmquant.core.layers import QUANT_LAYERS
from dmquant.errors import ConfigError
from dmquant.jobs import forward_cost
from dmquant.models import load_model
from dmquant.precision.hybrid import BlockChoice, greedy_promotions, promotion_rules


def test_greedy_promotion_by_gain_per_bop_within_the_budget():
    choices = [
        BlockChoice("a", 3.0, 10),
        BlockChoice("b", 4.0, 20),
        BlockChoice("c", 1.0, 1),
        BlockChoice("d", -1.0, 5),  # gains nothing: never promoted
        BlockChoice("e", 2.0, 0),  # free: always
    ]
    assert greedy_promotions(choices, 12) == ["e", "c", "a"]
    assert greedy_promotions(choices, 0) == ["e"]
    assert greedy_promotions(choices, 100) == ["e", "c", "a", "b"]


def test_a_rule_covers_exactly_its_block():
    (rule,) = promotion_rules(["down_blocks.0.resnets.1"], 8, 8)
    assert rule.matches("down_blocks.0.resnets.1.conv1") and rule.matches("down_blocks.0.resnets.1.time_emb_proj")
    assert not rule.matches("down_blocks.0.resnets.10.conv1") and not rule.matches("down_blocks.0.resnets.1")
    with pytest.raises(ConfigError, match="max_bops_ratio"):
        HybridConfig(max_bops_ratio=0.9)


def test_hybrid_recipe_promotes_blocks_within_its_budget_and_saves_them(tmp_path):
    model = load_model("tiny-unet")
    config = load_recipe("minmax").with_bits(4, 8)
    config = dataclasses.replace(config, calibration=CalibrationConfig(num_inference_steps=3, num_trajectories=2))
    config = dataclasses.replace(
        config, hybrid=HybridConfig(enabled=True, max_bops_ratio=1.15, num_inference_steps=2, num_samples=2)
    )
    quantized = api.quantize(model, config, progress=False)
    plan = api.info(quantized.denoiser).extra["hybrid"]
    assert plan["promoted"] and len(plan["promoted"]) < len(plan["blocks"])
    assert plan["bops"] < plan["bops_after"] <= 1.15 * plan["bops"]
    first = plan["promoted"][0]

    def weight_bits(model, block):
        return {m.weight_quantizer.bits for m in model.get_submodule(block).modules() if isinstance(m, QUANT_LAYERS)}

    assert weight_bits(quantized.denoiser, first) == {8}
    cost = forward_cost(quantized, model.make_conditioning(1))["bops"]
    plain = api.quantize(model, dataclasses.replace(config, hybrid=HybridConfig()), progress=False)
    assert cost == pytest.approx(plan["bops_after"], rel=1e-9)
    assert forward_cost(plain, model.make_conditioning(1))["bops"] == pytest.approx(plan["bops"], rel=1e-9)
    api.save(quantized.denoiser, tmp_path / "hybrid")
    loaded = api.load(tmp_path / "hybrid")
    assert weight_bits(loaded, first) == {8}
