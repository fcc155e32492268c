"""tests/integer_reference.py: the integer-domain product of codes equals the simulated layer."""

from __future__ import annotations

import pytest
import torch
from integer_reference import Codes, integer_linear, layer_reference
from torch import nn

from dmquant.config import QuantizerConfig
from dmquant.core.layers import QuantConv2d, QuantLinear


def _config(bits: int, symmetric: bool, granularity: str) -> QuantizerConfig:
    return QuantizerConfig(bits=bits, symmetric=symmetric, granularity=granularity, observer="minmax")


def _calibrate(layer: nn.Module, x: torch.Tensor) -> None:
    for quantizer, part in layer.weight_parts():
        quantizer.calibrate_on(part)
    inputs = [layer.input_quantizer] + ([layer.input_quantizer_skip] if getattr(layer, "split", 0) else [])
    for quantizer in inputs:
        quantizer.observing = True
    with torch.no_grad():
        layer(x)
    for quantizer in inputs:
        quantizer.finalize()


def test_hand_example_with_zero_points_on_both_sides():
    # x = 0.5 · ([3, 5] − 1) = [1, 2];  w = 0.25 · ([[2, 6]] − 2) = [[0, 1]]  ->  y = 2 + bias 1
    x = Codes(torch.tensor([[3, 5]]), torch.tensor(0.5), torch.tensor(1))
    w = Codes(torch.tensor([[2, 6]]), torch.tensor([[0.25]]), torch.tensor([[2]]))
    assert integer_linear(x, w, torch.tensor([1.0])).item() == 3.0


@pytest.mark.parametrize("weight_bits", [8, 4])
@pytest.mark.parametrize("symmetric_weight", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "group:8"])
def test_linear_matches_the_simulated_layer(weight_bits, symmetric_weight, granularity):
    torch.manual_seed(0)
    layer = QuantLinear(
        nn.Linear(32, 12), _config(weight_bits, symmetric_weight, granularity), _config(8, False, "tensor")
    )
    x = torch.randn(3, 5, 32) * 2 + 0.7
    _calibrate(layer, x)
    with torch.no_grad():
        expected = layer(x)
    assert torch.allclose(layer_reference(layer, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("symmetric_weight", [True, False])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "split"), [(3, 1, 1, 0), (3, 2, 1, 0), (1, 1, 0, 0), (3, 1, 1, 5)]
)
def test_conv_matches_the_simulated_layer_padding_included(symmetric_weight, kernel, stride, padding, split):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 6, kernel, stride=stride, padding=padding)
    layer = QuantConv2d(conv, _config(4, symmetric_weight, "channel"), _config(8, False, "tensor"), split=split)
    x = torch.randn(2, 8, 7, 9) + 1.5  # all positive: z_x far from 0, so padding with 0 codes would show
    _calibrate(layer, x)
    with torch.no_grad():
        expected = layer(x)
    assert torch.allclose(layer_reference(layer, x), expected, atol=1e-4, rtol=1e-5)


def test_parameters_that_vary_along_the_summed_dimension_are_refused():
    x = Codes(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1.0, 1.0, 2.0, 2.0]]), torch.tensor(0))
    w = Codes(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="vary along"):
        integer_linear(x, w, None)
