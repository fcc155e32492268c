"""Quantizer module, QuantLinear, QuantConv2d (split input) and the quantized attention processor."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from dmquant.config import QuantizerConfig
from dmquant.core.attention import quantize_attention
from dmquant.core.layers import QuantConv2d, QuantLinear
from dmquant.core.primitives import Granularity, IntFormat, choose_qparams, expand_params, fake_quant
from dmquant.core.quantizer import Quantizer, quantizers, set_step
from dmquant.errors import CalibrationError

W8 = QuantizerConfig(bits=8, symmetric=True, granularity="channel", observer="minmax")
A8 = QuantizerConfig(bits=8, symmetric=False, granularity="tensor", observer="minmax")


def _direct_fake_quant(x, config, granularity=None):
    """Min-max fake quantization computed straight from the primitives."""
    granularity = granularity or config.granularity_spec
    lo = (
        x.amin(dim=tuple(d for d in range(x.dim()) if d != 0), keepdim=True)
        if granularity.kind == "channel"
        else x.min()
    )
    hi = (
        x.amax(dim=tuple(d for d in range(x.dim()) if d != 0), keepdim=True)
        if granularity.kind == "channel"
        else x.max()
    )
    scale, zero_point = choose_qparams(lo, hi, config.format, config.symmetric)
    return fake_quant(x, scale, zero_point, config.format)


def test_quantizer_states():
    quantizer = Quantizer(A8, name="layer.input_quantizer")
    x = torch.randn(4, 8)
    with pytest.raises(CalibrationError, match="layer.input_quantizer: used before calibration"):
        quantizer(x)
    quantizer.observing = True
    assert torch.equal(quantizer(x), x)  # observing passes through
    quantizer.finalize()
    assert quantizer.calibrated and not quantizer.observing
    y = quantizer(x)
    assert not torch.equal(y, x)
    assert torch.equal(y, _direct_fake_quant(x, A8))
    quantizer.enabled = False
    assert torch.equal(quantizer(x), x)


def test_quantizer_rejects_non_finite_naming_layer_and_step():
    quantizer = Quantizer(A8, name="down_blocks.0.conv.input_quantizer")
    quantizer.observing = True
    quantizer.step = 7
    with pytest.raises(CalibrationError, match=r"down_blocks\.0\.conv\.input_quantizer at sampling step 7"):
        quantizer(torch.tensor([1.0, float("nan")]))


def test_per_step_parameters_and_nearest_fill():
    quantizer = Quantizer(A8, num_steps=4)
    quantizer.observing = True
    quantizer.step = 0
    quantizer(torch.tensor([-1.0, 1.0]))
    quantizer.step = 3
    quantizer(torch.tensor([-10.0, 10.0]))
    quantizer.finalize()
    scales = quantizer.scale.flatten()
    assert scales[0] == pytest.approx(2 / 255) and scales[3] == pytest.approx(20 / 255)
    # unobserved steps take the nearest observed one (ties to the earlier step)
    assert scales[1] == scales[0] and scales[2] == scales[3]
    x = torch.tensor([0.5, 5.0])
    quantizer.step = 0
    fine = quantizer(x)
    quantizer.step = 3
    coarse = quantizer(x)
    assert fine[0] != coarse[0]
    assert fine[1] < 1.01  # clipped at the step-0 range (one step above 1 at most)
    assert coarse[1] == pytest.approx(5.0, abs=10 / 255)


def test_learn_scale_receives_lsq_gradient():
    quantizer = Quantizer(A8)
    quantizer.calibrate_on(torch.linspace(-1, 1, 50))
    scale = quantizer.learn_scale()
    assert isinstance(scale, nn.Parameter) and scale in list(quantizer.parameters())
    loss = (quantizer(torch.linspace(-2, 2, 101)) ** 2).sum()
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_quantizer_state_dict_adopts_calibrated_shape():
    source = Quantizer(W8)
    source.calibrate_on(torch.randn(6, 3))
    target = Quantizer(W8)
    target.load_state_dict(source.state_dict())
    assert target.scale.shape == (1, 6, 1)
    x = torch.randn(6, 3)
    assert torch.equal(target(x), source(x))


def test_quant_linear_matches_direct_computation_and_shares_parameters():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = QuantLinear(linear, W8, A8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(5, 16) * 3
    for quantizer in quantizers(layer):
        quantizer.enabled = False
    assert torch.equal(layer(x), linear(x))
    for quantizer in quantizers(layer):
        quantizer.enabled = True
    layer.weight_quantizer.calibrate_on(layer.weight)
    _calibrate_inputs_only(layer, x)
    expected = nn.functional.linear(_direct_fake_quant(x, A8), _direct_fake_quant(linear.weight, W8), linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def _calibrate_inputs_only(layer, x):
    layer.input_quantizer.observing = True
    with torch.no_grad():
        layer(x)
    layer.input_quantizer.finalize()


def test_quant_conv2d_split_quantizes_halves_separately():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 4, 3, padding=1)
    split = 8
    layer = QuantConv2d(conv, W8, A8, split=split)
    # bimodal input as in UNet skip concatenations: decoder features small, skip features large
    x = torch.cat([torch.randn(2, split, 5, 5) * 0.1, torch.randn(2, 12 - split, 5, 5) * 50], dim=1)
    for quantizer, part in layer.weight_parts():
        quantizer.calibrate_on(part)
    layer.input_quantizer.observing = layer.input_quantizer_skip.observing = True
    with torch.no_grad():
        layer(x)
    layer.input_quantizer.finalize()
    layer.input_quantizer_skip.finalize()
    x_q = torch.cat([_direct_fake_quant(x[:, :split], A8), _direct_fake_quant(x[:, split:], A8)], dim=1)
    w_q = torch.cat([_direct_fake_quant(conv.weight[:, :split], W8), _direct_fake_quant(conv.weight[:, split:], W8)], 1)
    assert torch.allclose(layer(x), nn.functional.conv2d(x_q, w_q, conv.bias, padding=1), atol=1e-5)

    unsplit = QuantConv2d(conv, W8, A8)
    unsplit.weight_quantizer.calibrate_on(conv.weight)
    _calibrate_inputs_only(unsplit, x)
    small = x[:, :split]
    split_error = (layer.quantized_input(x)[:, :split] - small).norm() / small.norm()
    unsplit_error = (unsplit.quantized_input(x)[:, :split] - small).norm() / small.norm()
    assert split_error < 0.05 < 0.5 < unsplit_error  # the small half no longer drowns in the large half's steps


def test_quant_conv2d_rejects_split_outside_input():
    with pytest.raises(ValueError, match="split=12"):
        QuantConv2d(nn.Conv2d(12, 4, 1), W8, A8, split=12)


def _attention_cases():
    torch.manual_seed(0)
    self_attention = Attention(
        32,
        heads=2,
        dim_head=16,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    cross_attention = Attention(32, cross_attention_dim=24, heads=4, dim_head=8)
    return [
        (self_attention, (torch.randn(2, 32, 4, 4),), {}),  # UNet2DModel's spatial self-attention
        (cross_attention, (torch.randn(2, 16, 32),), {"encoder_hidden_states": torch.randn(2, 7, 24)}),
    ]


@pytest.mark.parametrize("case", range(2), ids=["self-attention-4d", "cross-attention"])
def test_quant_attention_processor_equals_diffusers_when_disabled(case):
    attn, args, kwargs = _attention_cases()[case]
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        reference = attn(*args, **kwargs)
    quantize_attention(attn, A8, 8)
    for quantizer in quantizers(attn):
        quantizer.enabled = False
    with torch.no_grad():
        assert torch.allclose(attn(*args, **kwargs), reference, atol=1e-5)


def test_quant_attention_quantizes_the_four_matmul_operands():
    attn, args, kwargs = _attention_cases()[1]
    with torch.no_grad():
        reference = attn(*args, **kwargs)
    quantize_attention(attn, A8, 8)
    seen = {}
    for name in ("query", "key", "value", "probs"):
        getattr(attn.quant_matmul, name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, i[0]))
    _calibrate_attention(attn, args, kwargs)
    probs = attn.quant_matmul.probs
    assert probs.fmt == IntFormat(8, signed=False) and probs.zero_point.abs().sum() == 0
    assert seen["probs"].min() >= 0 and torch.allclose(seen["probs"].sum(-1), torch.ones(1), atol=1e-5)
    assert seen["key"].shape[1] == 7  # keys come from the encoder states
    with torch.no_grad():
        quantized = attn(*args, **kwargs)
    error = (quantized - reference).norm() / reference.norm()
    assert 0 < error < 0.05


def _calibrate_attention(attn, args, kwargs):
    for quantizer in quantizers(attn):
        if quantizer.config.granularity == "channel":
            continue
        quantizer.observing = True
    for module in attn.modules():
        if isinstance(module, QuantLinear):
            module.weight_quantizer.calibrate_on(module.weight)
    with torch.no_grad():
        attn(*args, **kwargs)
    for quantizer in quantizers(attn):
        if quantizer.observing:
            quantizer.finalize()


def test_set_step_reaches_every_quantizer():
    layer = QuantLinear(nn.Linear(4, 4), W8, A8, num_steps=3)
    set_step(layer, 2)
    assert {q.step for q in quantizers(layer)} == {2}


def test_group_granularity_weight_quantizer():
    config = QuantizerConfig(bits=4, symmetric=True, granularity="group:4", observer="minmax")
    quantizer = Quantizer(config)
    weight = torch.randn(3, 8)
    quantizer.calibrate_on(weight)
    assert quantizer.scale.shape == (1, 3, 2)
    blocks = weight.reshape(3, 2, 4)
    expected_scale = blocks.abs().amax(-1) / 7
    assert torch.allclose(quantizer.scale[0], expected_scale)
    assert torch.equal(
        quantizer(weight),
        fake_quant(
            weight, expand_params(quantizer.scale[0], weight.shape, Granularity.per_group(4)), 0.0, config.format
        ),
    )
