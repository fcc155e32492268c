"""Block reconstruction (BRECQ): AdaRound on every weight of a block, fitted to the FP block's output."""

from __future__ import annotations

import copy

import pytest
import torch

from dmquant.calibrate import calibrate_weights
from dmquant.config import load_recipe
from dmquant.core.attach import attach_quantizers
from dmquant.core.layers import QUANT_LAYERS
from dmquant.core.quantizer import quantizers
from dmquant.denoiser import Denoiser
from dmquant.errors import ConfigError
from dmquant.recon.brecq import reconstruct
from dmquant.recon.capture import capture_block_io
from dmquant.zoo import tiny


def _weight_only_4bit(model):
    """``model`` with 4-bit weights (calibrated) and every activation quantizer off."""
    attach_quantizers(model, load_recipe("minmax").with_bits(4, 8), warn=False)
    weights = {id(q) for m in model.modules() if isinstance(m, QUANT_LAYERS) for q, _ in m.weight_parts()}
    for quantizer in quantizers(model):
        quantizer.enabled = id(quantizer) in weights
    calibrate_weights(model, progress=False)
    return model


def _runner(model, conditioning):
    denoiser = Denoiser(model)
    generator = torch.Generator().manual_seed(3)

    def run():
        for size in (24, 24, 16):
            x = torch.randn(size, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size, generator=generator)
            t = torch.randint(0, 1000, (size,), generator=generator)
            denoiser(x, t, conditioning(size, generator))

    return run


def _tiny_dit():
    return tiny.tiny_dit(num_embeds_ada_norm=tiny.TINY_NUM_CLASSES)


#: A block of each kind: (model builder, the block in it).
CASES = {
    "resnet": (tiny.tiny_unet2d, lambda m: m.down_blocks[0].resnets[0]),
    "dit-block": (_tiny_dit, lambda m: m.transformer_blocks[0]),
}


@pytest.fixture(params=sorted(CASES))
def block_case(request):
    build, pick = CASES[request.param]
    fp = build()
    labels = lambda size, g: {"class_labels": torch.randint(0, tiny.TINY_NUM_CLASSES, (size,), generator=g)}  # noqa: E731
    cache = capture_block_io(fp, pick(fp), _runner(fp, labels))
    quantized = _weight_only_4bit(copy.deepcopy(fp))
    return pick(quantized), cache


def test_block_reconstruction_beats_round_to_nearest_and_hardens_every_layer(block_case):
    block, cache = block_case
    result = reconstruct(block, cache.batch, len(cache), iterations=300, learning_rate=1e-2, progress=False)
    assert result.final_mse < 0.9 * result.initial_mse
    assert 0 < result.changed_fraction < 0.5
    for layer in (m for m in block.modules() if isinstance(m, QUANT_LAYERS)):
        weight = layer.quantized_weight()
        torch.testing.assert_close(layer.weight_quantizer(weight), weight, rtol=0, atol=0)  # on the grid
        assert "quantized_weight" not in vars(layer)  # the soft-weight patch is gone


def test_block_reconstruction_is_deterministic_for_a_seed(block_case):
    block, cache = block_case
    twin = copy.deepcopy(block)
    options = dict(iterations=40, learning_rate=1e-2, progress=False)
    first = reconstruct(block, cache.batch, len(cache), generator=torch.Generator().manual_seed(5), **options)
    second = reconstruct(twin, cache.batch, len(cache), generator=torch.Generator().manual_seed(5), **options)
    assert first == second
    for a, b in zip(block.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_block_without_quantized_weights_is_refused():
    fp = tiny.tiny_unet2d()
    block = fp.down_blocks[0].resnets[0]
    sample = lambda index: ((torch.zeros(1),), {}, torch.zeros(1))  # noqa: E731
    with pytest.raises(ConfigError, match="no quantized weights"):
        reconstruct(block, sample, 1, iterations=1, progress=False)
