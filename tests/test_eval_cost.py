"""Model size and BOPs against hand-computed numbers."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from dmquant.config import QuantConfig, QuantizerConfig
from dmquant.core.attach import attach_quantizers
from dmquant.core.attention import quantize_attention
from dmquant.core.quantizer import quantizers
from dmquant.eval.cost import bops, model_size


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 216 weights + 8 bias
        self.linear = nn.Linear(8, 4)  # 32 weights + 4 bias

    def forward(self, x):
        return self.linear(self.conv(x).mean((2, 3)))


def _quantized(weight_bits, activation_bits, granularity="channel"):
    model = ConvLinear()
    config = QuantConfig(
        weight=QuantizerConfig(bits=weight_bits, granularity=granularity, observer="minmax"),
        activation=QuantizerConfig(bits=activation_bits, symmetric=False, observer="minmax"),
    )
    attach_quantizers(model, config)
    for module in (model.conv, model.linear):
        module.weight_quantizer.calibrate_on(module.weight)
        module.input_quantizer.calibrate_on(
            torch.randn(2, module.weight.shape[1], 4, 4) if module is model.conv else torch.randn(2, 8)
        )
    return model


def test_fp_size_is_the_dtype_size():
    size = model_size(ConvLinear())
    assert size.total_bytes == size.fp_bytes == (216 + 8 + 32 + 4) * 4
    assert size.quantized_params == 0 and size.fp_params == 260


def test_quantized_size_counts_codes_and_scales():
    size = model_size(_quantized(4, 8))
    # codes: (216 + 32) weights x 4 bits; FP biases (8 + 4) x 4 bytes;
    # scale + zero point (4 bytes each) per block: conv 8 channels, linear 4 channels, one per input quantizer
    expected = (216 + 32) * 4 / 8 + 12 * 4 + (8 + 4) * 2 * 4 + 2 * 2 * 4
    assert size.total_bytes == pytest.approx(expected, abs=1)
    assert size.fp_bytes == 260 * 4 and size.quantized_params == 248
    assert size.compression == pytest.approx(260 * 4 / expected, rel=1e-3)


def test_bops_of_conv_and_linear():
    x = torch.randn(1, 3, 8, 8)
    conv_macs = 8 * 8 * 8 * 3 * 3 * 3  # output elements x (in_channels x kernel)
    linear_macs = 4 * 8
    fp = bops(ConvLinear(), lambda m=None: None)
    assert fp["macs"] == 0  # nothing ran
    model = _quantized(4, 8)
    result = bops(model, lambda: model(x))
    assert result["macs"] == conv_macs + linear_macs
    assert result["bops"] == (conv_macs + linear_macs) * 4 * 8
    plain = ConvLinear()
    assert bops(plain, lambda: plain(x))["bops"] == (conv_macs + linear_macs) * 32 * 32


def test_bops_of_attention_matmuls():
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8)
    hidden, context = torch.randn(1, 5, 16), torch.randn(1, 3, 12)
    quantize_attention(attn, QuantizerConfig(bits=8, symmetric=False), softmax_bits=16)
    for quantizer in quantizers(attn):
        quantizer.enabled = False
    attn.quant_matmul.query.enabled = attn.quant_matmul.key.enabled = True
    attn.quant_matmul.probs.enabled = attn.quant_matmul.value.enabled = True
    for quantizer in (attn.quant_matmul.query, attn.quant_matmul.key, attn.quant_matmul.value, attn.quant_matmul.probs):
        quantizer.calibrate_on(torch.rand(4, 4))
    result = bops(attn, lambda: attn(hidden, encoder_hidden_states=context))
    matmul = next(row for row in result["layers"] if row["name"].endswith("(matmuls)"))
    each = 1 * 5 * 3 * 16  # batch x queries x keys x inner dim (heads x dim_head)
    assert matmul["macs"] == 2 * each
    assert matmul["bops"] == each * 8 * 8 + each * 16 * 8  # Q·Kᵀ at 8x8, softmax(16) · V(8)


def _converted_pair(bits):
    """ConvLinear quantized by minmax at ``bits`` (simulated) and that model converted to low-bit layers."""
    from dmquant.api import quantize
    from dmquant.calib.record import CalibrationSet
    from dmquant.config import load_recipe
    from dmquant.kernels.convert import convert_model

    torch.manual_seed(0)
    model, x = ConvLinear(), torch.randn(2, 3, 6, 6)
    calibration = CalibrationSet(x, torch.zeros(2), torch.zeros(2, dtype=torch.long), {}, 1)

    class Called(nn.Module):  # quantize calibrates a denoiser, f(x, t)
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, t):
            return self.model(x)

    simulated = quantize(Called(), load_recipe("minmax").with_bits(bits, bits), calibration, progress=False)
    return simulated, convert_model(simulated), x


def test_op_calls_count_the_macs_of_conv_linear_and_attention_as_torch_does():
    from torch.utils.flop_counter import FlopCounterMode

    from dmquant.eval.cost import op_calls
    from dmquant.zoo import tiny

    model = tiny.tiny_dit()
    config = model.config
    x, t = torch.randn(2, config.in_channels, config.sample_size, config.sample_size), torch.tensor([1, 900])
    labels = torch.tensor([0, 1])
    calls = op_calls(model, lambda: model(x, t, class_labels=labels))
    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        with FlopCounterMode(display=False) as counted:
            model(x, t, class_labels=labels)
    assert 2 * sum(sum(call.macs) for call in calls) == counted.get_total_flops()
    assert {call.kind for call in calls} == {"linear", "conv", "attention"}


@pytest.mark.parametrize("bits", [8, 4])
def test_converted_low_bit_layers_cost_what_the_simulated_layers_they_replace_cost(bits):
    from dmquant.eval.cost import layer_kind, op_calls

    simulated, converted, x = _converted_pair(bits)
    t = torch.zeros(2)
    assert [layer_kind(m) for m in (converted.model.conv, converted.model.linear)] == ["conv", "linear"]
    assert type(converted.model.linear).__module__ == "dmquant.kernels.layers"
    assert [(c.name, c.kind, c.macs) for c in op_calls(converted, lambda: converted(x, t))] == [
        (c.name, c.kind, c.macs) for c in op_calls(simulated, lambda: simulated(x, t))
    ]
    assert bops(converted, lambda: converted(x, t)) == bops(simulated, lambda: simulated(x, t))
