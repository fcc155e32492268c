"""EDA-DM's fine-grained block reconstruction: the loss on a block's inner layers."""

import copy

import pytest
import torch
from torch import nn

from dmquant.calibrate import calibrate_weights
from dmquant.config import load_recipe
from dmquant.core.attach import attach_quantizers
from dmquant.core.layers import activation_quantizers
from dmquant.recon.adaround import reconstruction_loss
from dmquant.recon.brecq import reconstruct
from dmquant.recon.objectives import InnerLayerLoss


def _blocks(seed=0):
    torch.manual_seed(seed)
    fp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    quantized = copy.deepcopy(fp)
    attach_quantizers(quantized, load_recipe("minmax").with_bits(3, 8), warn=False)
    for quantizer in activation_quantizers(quantized):
        quantizer.enabled = False
    calibrate_weights(quantized, progress=False)
    return fp, quantized


def test_the_inner_term_is_the_loss_of_every_layer_but_the_last():
    fp, quantized = _blocks()
    x = torch.randn(64, 16)
    loss = InnerLayerLoss(quantized, fp, lambda index: ((x[index],), {}), weight=0.8)
    index = torch.arange(64)
    with loss.term(*loss.inputs(index)) as term:
        quantized(x)
        value = term()
    with torch.no_grad():
        fp1, q1 = fp[0](x), quantized[0](x)
        fp2, q2 = fp[2](fp[1](fp1)), quantized[2](quantized[1](q1))
    expected = 0.8 * (reconstruction_loss(q1, fp1, -1) + reconstruction_loss(q2, fp2, -1))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fine_grained_reconstruction_fits_the_inner_layers_better():
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    inner_errors = {}
    for weight in (0.0, 5.0):
        fp, quantized = _blocks()
        with torch.no_grad():
            target = fp(x)

        def sample(index, x=x, target=target):
            return (x[index],), {}, target[index]

        inner = InnerLayerLoss(quantized, fp, lambda index, x=x: ((x[index],), {}), weight) if weight else None
        reconstruct(quantized, sample, 512, iterations=300, inner_loss=inner, progress=False)
        with torch.no_grad():
            inner_errors[weight] = (quantized[0](x) - fp[0](x)).pow(2).mean().item()
    assert inner_errors[5.0] < inner_errors[0.0]


def test_the_fp_unit_must_have_the_same_layers():
    fp, quantized = _blocks()
    with pytest.raises(ValueError, match="not those of the quantized unit"):
        InnerLayerLoss(quantized, fp[:3], lambda index: ((), {}), 0.8)
