"""AdaRound (Nagel et al. 2020): the relaxation's formulas against hand values, and layer reconstruction."""

import copy
import math

import pytest
import torch
from layer_reconstruction import reconstruct_layer
from torch import nn

from dmquant.calibrate import calibrate_weights
from dmquant.config import QuantizerConfig
from dmquant.core.layers import QuantConv2d, QuantLinear
from dmquant.core.primitives import (
    FP8_E4M3,
    Granularity,
    IntFormat,
    choose_qparams,
    expand_params,
    fake_quant,
    param_shape,
    to_blocks,
)
from dmquant.errors import ConfigError
from dmquant.recon.adaround import (
    AdaRoundWeights,
    BetaSchedule,
    hard_quantized,
    initial_logits,
    rectified_sigmoid,
    rounding_regularizer,
    soft_quantized,
)

W4 = QuantizerConfig(bits=4, symmetric=True, granularity="channel", observer="minmax")
W3_ASYM = QuantizerConfig(bits=3, symmetric=False, granularity="channel", observer="minmax")
A8 = QuantizerConfig(bits=8, symmetric=False, granularity="tensor", observer="minmax")
A_OFF = QuantizerConfig(bits=8, symmetric=False, granularity="tensor", observer="minmax", enabled=False)


def _qparams(weight, fmt, symmetric, granularity, shrink=1.0):
    """Min-max scale / zero point per block, expanded to broadcast against ``weight``."""
    blocks = to_blocks(weight, granularity)
    scale, zero_point = choose_qparams(blocks.amin(1), blocks.amax(1), fmt, symmetric)
    scale = scale * shrink
    return (
        expand_params(scale.reshape(param_shape(weight.shape, granularity)), weight.shape, granularity),
        expand_params(zero_point.reshape(param_shape(weight.shape, granularity)), weight.shape, granularity),
    )


CASES = [
    (IntFormat(4, signed=True), True, Granularity.per_channel(0)),
    (IntFormat(3, signed=False), False, Granularity.per_channel(0)),
    (IntFormat(4, signed=False), False, Granularity.per_group(4, axis=0, group_axis=1)),
]


# --------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------


def test_rectified_sigmoid_hand_values():
    # h(V) = clip(σ(V)·1.2 - 0.1, 0, 1): σ(0) = 1/2, σ(log 3) = 3/4, σ(-log 3) = 1/4, σ(log 11) = 11/12
    v = torch.tensor([0.0, math.log(3.0), -math.log(3.0), math.log(11.0), 10.0, -10.0, -math.log(11.0)])
    expected = torch.tensor([0.5, 0.8, 0.2, 1.0, 1.0, 0.0, 0.0])
    h = rectified_sigmoid(v)
    assert torch.allclose(h, expected, atol=1e-6)
    assert h[4] == 1.0 and h[5] == 0.0  # clipped exactly, not just close
    assert rectified_sigmoid(torch.tensor([1.0]), zeta=1.0, gamma=0.0).item() == pytest.approx(1 / (1 + math.exp(-1)))


def test_initial_logits_round_trip_to_fractional_part():
    torch.manual_seed(0)
    weight = torch.randn(16, 24)
    scale = torch.rand(16, 1) * 0.1 + 0.01
    weight[0, :4] = torch.tensor([-3.0, 0.0, 2.0, 5.0]) * scale[0]  # integer multiples of the step
    # the fractional part of w/s computed with remainder (not floor, as the code does)
    frac = torch.remainder(weight / scale, 1.0)
    h = rectified_sigmoid(initial_logits(weight, scale))
    # an integer w/s that float32 lands just below has frac ~1, whose h is ~1: same rounding point
    near_one = frac > 1 - 1e-6
    assert torch.allclose(h[~near_one], frac[~near_one], atol=1e-6)
    assert torch.all((h[near_one] - 1).abs() < 1e-5)
    integer = h[0, :4]
    assert torch.all((integer < 1e-6) | (integer > 1 - 1e-5))


@pytest.mark.parametrize("fmt,symmetric,granularity", CASES)
def test_soft_weight_at_init_is_the_clamped_weight(fmt, symmetric, granularity):
    torch.manual_seed(1)
    weight = torch.randn(8, 16)
    scale, zero_point = _qparams(weight, fmt, symmetric, granularity, shrink=0.6)  # shrunk: some weights clip
    soft = soft_quantized(weight, scale, zero_point, initial_logits(weight, scale), fmt)
    low, high = (fmt.qmin - zero_point) * scale, (fmt.qmax - zero_point) * scale
    inside = (weight >= low) & (weight <= high)
    assert 0 < inside.sum() < weight.numel()
    assert torch.allclose(soft[inside], weight[inside], atol=1e-6)
    clamped = torch.minimum(torch.maximum(weight, low), high)
    assert torch.allclose(soft, clamped, atol=1e-6)


@pytest.mark.parametrize("fmt,symmetric,granularity", CASES)
def test_hard_rounding_with_nearest_decisions_is_fake_quant(fmt, symmetric, granularity):
    torch.manual_seed(2)
    weight = torch.randn(8, 16)
    scale, zero_point = _qparams(weight, fmt, symmetric, granularity, shrink=0.8)
    ratio = weight / scale
    frac = ratio - ratio.floor()
    assert not torch.any(frac == 0.5)  # no ties (round() is half-to-even)
    nearest_logits = torch.where(frac >= 0.5, torch.tensor(50.0), torch.tensor(-50.0))
    reference = fake_quant(weight, scale, zero_point, fmt)
    assert torch.equal(hard_quantized(weight, scale, zero_point, nearest_logits, fmt), reference)
    # the initial logits make the same decisions, and at ±50 the soft relaxation is already hard
    assert torch.equal(hard_quantized(weight, scale, zero_point, initial_logits(weight, scale), fmt), reference)
    assert torch.equal(soft_quantized(weight, scale, zero_point, nearest_logits, fmt), reference)
    # the opposite decisions move every unclipped weight by exactly one step
    flipped = hard_quantized(weight, scale, zero_point, -nearest_logits, fmt)
    ratio_q = (flipped - reference) / scale
    unclipped = (ratio.floor() + zero_point >= fmt.qmin) & (ratio.floor() + 1 + zero_point <= fmt.qmax)
    assert torch.allclose(ratio_q[unclipped].abs(), torch.ones(int(unclipped.sum())), atol=1e-5)


def test_rounding_regularizer_hand_values():
    hard = torch.tensor([[50.0, -50.0], [20.0, -20.0]])
    assert rounding_regularizer(hard, beta=2.0).item() == 0.0
    assert rounding_regularizer(torch.zeros(3, 5), beta=7.0).item() == pytest.approx(15.0)
    # h = [0.5, 0.8, 0.2, 1]: 1 - |2h - 1|^β = [1, 1 - 0.6^β, 1 - 0.6^β, 0]
    mixed = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 50.0])
    assert rounding_regularizer(mixed, beta=2.0).item() == pytest.approx(1 + 2 * 0.64, abs=1e-5)
    assert rounding_regularizer(mixed, beta=3.0).item() == pytest.approx(1 + 2 * (1 - 0.216), abs=1e-5)


def test_beta_schedule_hand_values():
    schedule = BetaSchedule(1000)  # warm-up 200 iterations, then β from 20 down to 2 over 800
    assert (schedule.beta(0), schedule.regularizer_weight(0)) == (20.0, 0.0)
    assert (schedule.beta(199), schedule.regularizer_weight(199)) == (20.0, 0.0)
    assert (schedule.beta(200), schedule.regularizer_weight(200)) == (20.0, 1.0)
    assert schedule.beta(600) == pytest.approx(11.0)  # midway through the decay: 2 + 18 · 0.5
    assert schedule.beta(800) == pytest.approx(6.5)  # 2 + 18 · 0.25
    assert schedule.beta(1000) == pytest.approx(2.0) and schedule.regularizer_weight(999) == 1.0
    assert schedule.beta(1500) == pytest.approx(2.0)  # floored at the end value
    other = BetaSchedule(10, warmup=0.0, start=10.0, end=2.0)
    assert other.regularizer_weight(0) == 1.0 and other.beta(0) == 10.0 and other.beta(5) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="warmup"):
        BetaSchedule(10, warmup=1.0)


def test_float_formats_are_rejected():
    weight = torch.randn(4, 4)
    with pytest.raises(ConfigError, match="fp8_e4m3.*float format"):
        soft_quantized(weight, torch.ones(4, 1), 0.0, torch.zeros(4, 4), FP8_E4M3)
    with pytest.raises(ConfigError, match="float format"):
        hard_quantized(weight, torch.ones(4, 1), 0.0, torch.zeros(4, 4), FP8_E4M3)
    layer = QuantLinear(nn.Linear(4, 4), QuantizerConfig(bits="fp8_e4m3", granularity="channel"), A_OFF)
    layer.weight_quantizer.calibrate_on(layer.weight)
    with pytest.raises(ConfigError, match="AdaRound.*float format"):
        AdaRoundWeights(layer)


# --------------------------------------------------------------------------------------
# AdaRoundWeights on layers
# --------------------------------------------------------------------------------------


def _split_conv(weight_config=W3_ASYM, activation=A_OFF):
    torch.manual_seed(3)
    layer = QuantConv2d(nn.Conv2d(8, 6, 3, padding=1), weight_config, activation, split=3)
    calibrate_weights(layer, progress=False)
    return layer


def test_soft_weight_assembles_split_parts_and_patches_forward():
    layer = _split_conv()
    rounding = AdaRoundWeights(layer)
    assert sorted(rounding.logits) == ["0", "1"] and [p.shape for p in rounding.parameters()] == [
        (6, 3, 3, 3),
        (6, 5, 3, 3),
    ]
    soft = rounding.soft_weight()
    clamped = []
    for quantizer, part in layer.weight_parts():
        scale, zero_point = quantizer.qparams(part.shape)
        low, high = (quantizer.fmt.qmin - zero_point) * scale, (quantizer.fmt.qmax - zero_point) * scale
        clamped.append(torch.minimum(torch.maximum(part.detach(), low), high))
    assert torch.allclose(soft, torch.cat(clamped, dim=1), atol=1e-6)  # min-max ranges: nothing clips
    assert torch.equal(rounding.hard_weight(), layer.quantized_weight())  # hard starts at round-to-nearest

    x = torch.randn(2, 8, 5, 5)
    with rounding.use_soft_weight():
        out = layer(x)
        assert torch.allclose(out, layer._conv_forward(x, soft, layer.bias), atol=1e-5)
        out.pow(2).sum().backward()
    assert "quantized_weight" not in vars(layer)  # the patch is gone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rounding.parameters())
    assert torch.equal(layer(x), layer._conv_forward(x, layer.quantized_weight(), layer.bias))


def test_rounding_loss_of_a_split_conv_covers_both_halves():
    layer = _split_conv()
    rounding = AdaRoundWeights(layer)
    with torch.no_grad():  # V = 0: h = σ(0)(ζ − γ) + γ = 0.5 · 1.2 − 0.1 = 1/2, one unit of loss per weight
        for logits in rounding.logits.values():
            logits.zero_()
    assert rounding.regularizer(beta=2.0).item() == pytest.approx(6 * 3 * 9 + 6 * 5 * 9, rel=1e-5)  # both halves


@pytest.mark.parametrize("kind", ["linear", "split_conv"])
def test_harden_makes_the_ordinary_quantizer_reproduce_the_learned_codes(kind):
    if kind == "linear":
        torch.manual_seed(4)
        layer = QuantLinear(nn.Linear(24, 10), W4, A_OFF)
        calibrate_weights(layer, progress=False)
    else:
        layer = _split_conv()
    nearest = layer.quantized_weight().detach().clone()
    rounding = AdaRoundWeights(layer)
    with torch.no_grad():
        for logits in rounding.parameters():
            logits.copy_(torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)))
    expected = rounding.hard_weight()
    changed = rounding.changed_fraction()
    assert 0.2 < changed < 0.8  # random decisions differ from round-to-nearest for about half the weights
    assert (expected != nearest).float().mean().item() == pytest.approx(changed)
    rounding.harden()
    assert torch.equal(layer.quantized_weight(), expected)  # bit for bit
    assert torch.equal(layer.weight.detach(), expected)  # the weight sits on the grid: a quantizer fixed point
    with pytest.raises(RuntimeError, match="hardened"):
        rounding.soft_weight()


# --------------------------------------------------------------------------------------
# Layer reconstruction
# --------------------------------------------------------------------------------------


def _correlated_inputs(count, features, generator):
    """Inputs with a low-rank correlated part: off-diagonal Hessian, where rounding to nearest is not optimal."""
    low_rank = torch.randn(count, 8, generator=generator) @ torch.randn(8, features, generator=generator)
    return low_rank + 0.3 * torch.randn(count, features, generator=generator)


def _linear_problem():
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=generator) * 0.1)
    inputs = _correlated_inputs(512, 64, generator)
    with torch.no_grad():
        targets = linear(inputs)
    layer = QuantLinear(linear, W4, A_OFF)
    calibrate_weights(layer, progress=False)
    return layer, inputs, targets


def test_reconstruct_linear_beats_round_to_nearest_and_is_deterministic():
    layer, inputs, targets = _linear_problem()
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        nearest_mse = (layer(inputs) - targets).pow(2).mean().item()
    result = reconstruct_layer(layer, inputs, targets, iterations=500, generator=torch.Generator().manual_seed(7))
    assert result.initial_mse == pytest.approx(nearest_mse, rel=1e-5)
    assert result.final_mse < 0.8 * result.initial_mse
    assert 0 < result.changed_fraction < 0.3
    with torch.no_grad():
        assert (layer(inputs) - targets).pow(2).mean().item() == pytest.approx(result.final_mse, rel=1e-5)
    # the hardened weight is what the ordinary quantizer produces, and nothing was left behind
    assert torch.equal(layer.quantized_weight(), layer.weight.detach())
    assert "quantized_weight" not in vars(layer)
    assert layer.weight.requires_grad and layer.bias.requires_grad and layer.bias.grad is None

    again = reconstruct_layer(
        twin, inputs, targets, iterations=500, generator=torch.Generator().manual_seed(7), progress=False
    )
    assert again == result
    assert torch.equal(twin.weight, layer.weight)


def _smooth_images(count, channels, size, generator, rank=3):
    """Spatially smooth images whose channels mix a few latent maps: neighbouring taps and channels correlate."""
    latent = torch.randn(count, rank, size // 2, size // 2, generator=generator)
    latent = nn.functional.interpolate(latent, size=(size, size), mode="bilinear", align_corners=False)
    mix = torch.randn(channels, rank, generator=generator)
    noise = torch.randn(count, channels, size, size, generator=generator)
    return torch.einsum("cr,nrhw->nchw", mix, latent) + 0.2 * noise


def test_reconstruct_split_conv_with_input_quantizer():
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
    inputs = _smooth_images(128, 16, 8, generator)
    inputs[:, 8:] *= 4.0  # the skip half of the split on another scale
    with torch.no_grad():
        targets = conv(inputs)
    layer = QuantConv2d(conv, W3_ASYM, A8, split=8)
    calibrate_weights(layer, progress=False)
    input_quantizers = (layer.input_quantizer, layer.input_quantizer_skip)
    for quantizer in input_quantizers:
        quantizer.observing = True
    with torch.no_grad():
        layer(inputs)
    for quantizer in input_quantizers:
        quantizer.finalize()
    # a short run needs a larger step than the default 1e-3 for the logits to settle at 0 / 1
    result = reconstruct_layer(
        layer,
        inputs,
        targets,
        iterations=400,
        learning_rate=1e-2,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert result.final_mse < 0.8 * result.initial_mse
    assert 0 < result.changed_fraction < 0.3
    assert torch.equal(layer.quantized_weight(), layer.weight.detach())


def test_reconstruct_layer_rejects_mismatched_data():
    layer, inputs, targets = _linear_problem()
    with pytest.raises(ValueError, match="as many targets as inputs"):
        reconstruct_layer(layer, inputs, targets[:10], iterations=1, progress=False)
