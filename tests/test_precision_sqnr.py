"""SQNR sensitivity analysis: blocks quantized alone (global), modules on their own input (local)."""

import dataclasses
import math

import pytest
import torch

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, LayerRule, load_recipe
from dmquant.models import load_model
from dmquant.precision.sqnr import Sensitivity, analyze_sensitivity, mean_sqnr_db
from dmquant.sampling import Conditioning


@pytest.fixture(scope="module")
def unet():
    return load_model("tiny-unet")


@pytest.fixture(scope="module")
def calibration(unet):
    return record_for(unet, CalibrationConfig(num_inference_steps=3, num_trajectories=2), progress=False)


def _analyze(unet, quantized):
    return analyze_sensitivity(
        unet.denoiser,
        quantized,
        unet.scheduler,
        num_inference_steps=3,
        conditioning=Conditioning.classes([0, 1]),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )


def test_blocks_and_modules_are_measured_at_every_step_in_execution_order(unet, calibration):
    config = load_recipe("minmax").with_bits(4, 8)
    config = dataclasses.replace(config, rules=[*config.rules, LayerRule("mid_block.attentions.0*", keep_fp=True)])
    quantized = api.quantize(unet.denoiser, config, calibration, progress=False)
    result = _analyze(unet, quantized)
    assert len(result.timesteps) == 3 and all(len(v) == 3 for v in result.blocks.values())
    names = list(result.blocks)
    assert (
        names.index("down_blocks.0.resnets.0")
        < names.index("mid_block.resnets.0")
        < names.index("up_blocks.0.resnets.0")
    )
    assert "mid_block.attentions.0" not in result.blocks  # nothing quantized in it: not a unit
    assert all(math.isfinite(v) and v > 0 for values in result.blocks.values() for v in values)
    assert "conv_in" in result.modules and "mid_block.attentions.0.to_q" not in result.modules
    ranking = result.block_ranking()
    assert [value for _, value in ranking] == sorted(value for _, value in ranking)


def test_fewer_bits_mean_lower_sqnr(unet, calibration):
    results = {}
    for bits in (8, 4):
        quantized = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(bits, 8), calibration, progress=False)
        results[bits] = _analyze(unet, quantized)
    for name in results[8].blocks:
        assert mean_sqnr_db(results[4].blocks[name]) < mean_sqnr_db(results[8].blocks[name])
    assert mean_sqnr_db(results[4].modules["up_blocks.0.resnets.0.conv1"]) < mean_sqnr_db(
        results[8].modules["up_blocks.0.resnets.0.conv1"]
    )


def test_the_mean_over_steps_pools_the_noise():
    assert mean_sqnr_db([10.0, 20.0]) == pytest.approx(-10 * math.log10((0.1 + 0.01) / 2))
    assert mean_sqnr_db([math.inf, math.inf]) == math.inf
    table = Sensitivity([900, 500], {"a": [10.0, 10.0], "b": [30.0, 5.0]}, {})
    assert [name for name, _ in table.block_ranking()] == ["b", "a"]
    assert table.to_json()["timesteps"] == [900, 500]
