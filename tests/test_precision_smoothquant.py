"""SmoothQuant: the scales, the FP function unchanged, outliers flattened, saved and selected by SQNR."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, QuantizerConfig, SmoothingConfig, load_recipe
from dmquant.core.layers import QuantLinear
from dmquant.core.quantizer import quantizers
from dmquant.denoiser import Denoiser
from dmquant.models import load_model
from dmquant.precision.smoothquant import smooth, smoothing_scales


def test_scales_follow_the_formula_and_leave_empty_channels_alone():
    act = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([[0.5, -2.0, 1.0], [-1.0, 0.25, 3.0]])  # (out, in): max|W_j| = 1, 2, 3
    scales = smoothing_scales(act, weight, alpha=0.5)
    assert scales.tolist() == pytest.approx([math.sqrt(4) / math.sqrt(1), math.sqrt(1) / math.sqrt(2), 1.0])
    assert smoothing_scales(act, weight, alpha=1.0)[:2].tolist() == pytest.approx([4.0, 1.0])


def test_smoothing_balances_the_ranges_and_keeps_the_fp_function():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    layer = QuantLinear(linear, QuantizerConfig(bits=8, granularity="channel"), QuantizerConfig(bits=8))
    for quantizer in quantizers(layer):
        quantizer.enabled = False
    x = torch.randn(64, 8) * torch.tensor([1, 1, 30, 1, 1, 1, 0.1, 1.0])
    before = layer(x)
    act_max, weight_max = x.abs().amax(dim=0), layer.weight.detach().abs().amax(dim=0)
    smooth(layer, act_max, alpha=0.5)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    balanced = (act_max * weight_max).sqrt()  # with alpha 0.5 both sides end at sqrt(max|X| max|W|)
    torch.testing.assert_close((x / layer.smoothing).abs().amax(dim=0), balanced)
    torch.testing.assert_close(layer.weight.detach().abs().amax(dim=0), balanced)


def test_an_outlier_channel_costs_less_after_smoothing():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] *= 40.0
    errors = {}
    for smoothed in (False, True):
        layer = QuantLinear(nn.Linear(16, 16), QuantizerConfig(bits=8, granularity="channel"), QuantizerConfig(bits=8))
        torch.manual_seed(1)
        layer.weight.data = torch.randn(16, 16) * 0.1
        reference = x @ layer.weight.detach().T + layer.bias.detach()
        if smoothed:
            smooth(layer, x.abs().amax(dim=0), alpha=0.5)
        layer.weight_quantizer.calibrate_on(layer.weight)
        layer.input_quantizer.calibrate_on(x / (layer.smoothing if smoothed else 1.0))
        errors[smoothed] = (layer(x) - reference).pow(2).mean().item()
    assert errors[True] < 0.5 * errors[False]


@pytest.fixture(scope="module")
def unet():
    return load_model("tiny-unet")


def test_smoothed_model_is_the_fp_model_with_quantizers_off_and_round_trips(unet, tmp_path):
    calibration = record_for(unet, CalibrationConfig(num_inference_steps=3, num_trajectories=2), progress=False)
    config = load_recipe("minmax").with_bits(8, 8)
    config = dataclasses.replace(
        config, smoothing=SmoothingConfig(enabled=True, patterns=["*attentions*.to_*", "*resnets.0.conv1"])
    )
    quantized = api.quantize(unet.denoiser, config, calibration, progress=False)
    smoothed = [m for m in quantized.modules() if getattr(m, "smoothing", None) is not None]
    assert len(smoothed) > 4 and any(not torch.all(m.smoothing == 1) for m in smoothed)
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        quantized_out = Denoiser(quantized)(x, t, cond)
        states = [(q, q.enabled) for q in quantizers(quantized)]
        for q, _ in states:
            q.enabled = False
        torch.testing.assert_close(
            Denoiser(quantized)(x, t, cond), Denoiser(unet.denoiser)(x, t, cond), rtol=1e-4, atol=1e-4
        )
        for q, enabled in states:
            q.enabled = enabled
    api.save(quantized, tmp_path / "smooth")
    loaded = api.load(tmp_path / "smooth")
    with torch.no_grad():
        assert torch.equal(Denoiser(loaded)(x, t, cond), quantized_out)


def test_the_most_sensitive_modules_are_chosen_by_their_sqnr(unet):
    config = load_recipe("minmax").with_bits(8, 4)
    config = dataclasses.replace(config, calibration=CalibrationConfig(num_inference_steps=3, num_trajectories=2))
    config = dataclasses.replace(
        config, smoothing=SmoothingConfig(enabled=True, most_sensitive=3, num_inference_steps=2, num_samples=2)
    )
    quantized = api.quantize(unet, config, progress=False)
    saved = api.info(quantized.denoiser).config.smoothing
    assert len(saved.patterns) == 3 and saved.most_sensitive == 0
    assert all(quantized.denoiser.get_submodule(name).smoothing is not None for name in saved.patterns)
