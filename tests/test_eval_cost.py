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
