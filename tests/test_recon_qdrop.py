"""QDrop's mixing of quantized and FP activations, and learned activation step sizes (LSQ) in reconstruction."""

import pytest
import torch
from torch import nn

from dmquant.config import QuantizerConfig
from dmquant.core.layers import QuantLinear
from dmquant.core.primitives import IntFormat, fake_quant
from dmquant.core.quantizer import Quantizer
from dmquant.recon.brecq import reconstruct
from dmquant.recon.qdrop import dropped_activations, mix_inputs

A4 = QuantizerConfig(bits=4, symmetric=False, granularity="tensor", observer="minmax")


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("probability", [0.0, 0.3, 0.5])
def test_mixed_inputs_take_the_fp_element_with_the_given_probability(probability):
    quantized, fp = torch.zeros(200_000), torch.ones(200_000)
    mixed = mix_inputs(quantized, fp, probability, _generator())
    assert set(mixed.unique().tolist()) <= {0.0, 1.0}
    assert mixed.mean().item() == pytest.approx(probability, abs=0.005)


def test_mixing_recurses_into_containers_and_leaves_integers_and_constants_alone():
    steps = torch.arange(8)
    quantized = ((torch.zeros(8, 4), steps), {"temb": torch.zeros(8, 2), "scale": 1.0})
    fp = ((torch.ones(8, 4), steps + 100), {"temb": torch.ones(8, 2), "scale": 1.0})
    (x, t), kwargs = mix_inputs(quantized, fp, 0.5, _generator())
    assert torch.equal(t, steps) and kwargs["scale"] == 1.0
    assert 0 < x.mean() < 1 and 0 < kwargs["temb"].mean() < 1


def test_mixing_is_reproducible_for_a_seed():
    a, b = torch.zeros(1000), torch.ones(1000)
    assert torch.equal(mix_inputs(a, b, 0.5, _generator(1)), mix_inputs(a, b, 0.5, _generator(1)))
    assert not torch.equal(mix_inputs(a, b, 0.5, _generator(1)), mix_inputs(a, b, 0.5, _generator(2)))


def test_dropped_activations_keep_fp_elements_with_the_probability_and_unhook_on_exit():
    quantizer = Quantizer(A4)
    x = torch.randn(100_000)
    quantizer.calibrate_on(x)
    scale, zero_point = quantizer.qparams(x.shape)
    quantized = fake_quant(x, scale, zero_point, IntFormat(4, signed=False))
    with dropped_activations([quantizer], 0.25, _generator()):
        out = quantizer(x)
    kept_fp = out == x
    differs = quantized != x  # elements where the two choices can be told apart
    assert torch.equal(out[~kept_fp], quantized[~kept_fp])
    assert kept_fp[differs].float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(quantizer(x), quantized)


def test_learning_step_sizes_repairs_a_bad_activation_range():
    """LSQ stage alone (rounding not learned): an input range 4x too wide shrinks towards the data's."""
    torch.manual_seed(0)
    fp = nn.Linear(32, 16)
    layer = QuantLinear(nn.Linear(32, 16), QuantizerConfig(bits=8, granularity="channel"), A4)
    layer.load_state_dict(fp.state_dict(), strict=False)
    layer.weight_quantizer.enabled = False
    inputs = torch.randn(512, 32)
    layer.input_quantizer.calibrate_on(inputs)
    with torch.no_grad():
        layer.input_quantizer.scale.mul_(4.0)
        targets = fp(inputs)
    wide = layer.input_quantizer.scale.clone()

    def sample(index):
        return (inputs[index],), {}, targets[index]

    result = reconstruct(
        layer,
        sample,
        512,
        iterations=300,
        learn_rounding=False,
        learn_activation_scales=True,
        activation_learning_rate=5e-3,
        progress=False,
    )
    assert result.changed_fraction is None and result.learned_scales == 1
    assert result.final_mse < 0.5 * result.initial_mse
    assert (layer.input_quantizer.scale < 0.7 * wide).all()
    assert not isinstance(layer.input_quantizer.scale, nn.Parameter)
    assert torch.equal(layer.weight, fp.weight)


def test_nothing_to_learn_is_refused():
    layer = QuantLinear(nn.Linear(4, 4), QuantizerConfig(bits=8), A4)
    with pytest.raises(ValueError, match="nothing to learn"):
        reconstruct(layer, lambda i: ((torch.zeros(1, 4),), {}, torch.zeros(1, 4)), 1, learn_rounding=False)
