"""Quantized attention in every attention type of the three zoo families.

ddpm-glyphs32 has self-attention on feature maps, ldm-glyphs64 self- and cross-attention in
transformer blocks, dit-glyphs the DiT blocks' attention. In each, every ``Attention`` gets its
matmul quantizers (Q, K, V at the operand bits, the softmax output unsigned at its own bits), the
quantized processor equals diffusers' when its quantizers are off, and quantizing only the
attention matmuls perturbs the noise estimate a little, not a lot.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import Attention

from dmquant import api
from dmquant.config import load_recipe
from dmquant.core.attention import MATMUL_ATTRIBUTE
from dmquant.core.quantizer import Quantizer, quantizers
from dmquant.denoiser import Denoiser
from dmquant.eval.noise import sqnr_db
from dmquant.models import load_model

FAMILIES = ("ddpm-glyphs32", "ldm-glyphs64", "dit-glyphs")


@pytest.fixture(scope="module", params=FAMILIES)
def quantized(request):
    """(FP model, model quantized with 8-bit attention operands and a 16-bit softmax) on 2×2 calibration samples."""
    fp = load_model(request.param)
    config = load_recipe("minmax")
    config = dataclasses.replace(
        config,
        attention=dataclasses.replace(config.attention, enabled=True, bits=8, softmax_bits=16),
        calibration=dataclasses.replace(
            config.calibration, num_inference_steps=2, num_trajectories=2, guidance_scale=fp.guidance_scale
        ),
    )
    torch.manual_seed(0)
    return fp, api.quantize(fp, config, progress=False)


def _inputs(model):
    denoiser = Denoiser(model.denoiser)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size, generator=generator)
    t = torch.tensor([100, 700])
    cond = model.make_conditioning(2, guidance_scale=1.0).cond
    return x, t, cond


def _attention_quantizers(model) -> set[int]:
    return {
        id(q)
        for module in model.modules()
        if isinstance(module, Attention)
        for q in quantizers(getattr(module, MATMUL_ATTRIBUTE))
    }


def test_every_attention_gets_matmul_quantizers(quantized):
    fp, model = quantized
    attentions = [m for m in model.denoiser.modules() if isinstance(m, Attention)]
    assert attentions, f"{fp.name} has no attention"
    assert all(hasattr(m, MATMUL_ATTRIBUTE) for m in attentions)
    if fp.name == "ldm-glyphs64":
        cross = [m for m in attentions if m.is_cross_attention]
        assert cross and len(cross) < len(attentions)  # both self- and cross-attention are quantized


def test_softmax_output_is_unsigned_at_its_own_bits(quantized):
    _, model = quantized
    for module in model.denoiser.modules():
        if isinstance(module, Attention):
            quant = getattr(module, MATMUL_ATTRIBUTE)
            assert quant.probs.fmt.bits == 16 and not quant.probs.fmt.signed
            assert quant.query.fmt.bits == quant.key.fmt.bits == quant.value.fmt.bits == 8
            assert quant.probs.calibrated and quant.query.calibrated


@torch.no_grad()
def test_quantized_attention_is_diffusers_attention_when_off_and_close_when_on(quantized):
    fp, model = quantized
    x, t, cond = _inputs(fp)
    reference = Denoiser(fp.denoiser)(x, t, cond)
    attention = _attention_quantizers(model.denoiser)
    everything: list[Quantizer] = quantizers(model.denoiser)
    enabled = [q.enabled for q in everything]
    try:
        for q in everything:
            q.enabled = False
        torch.testing.assert_close(Denoiser(model.denoiser)(x, t, cond), reference, rtol=1e-4, atol=1e-4)
        for q in everything:
            q.enabled = id(q) in attention
        only_attention = Denoiser(model.denoiser)(x, t, cond)
    finally:
        for q, state in zip(everything, enabled, strict=True):
            q.enabled = state
    assert not torch.equal(only_attention, reference)
    assert sqnr_db(reference, only_attention) > 25
