"""The common calling convention over diffusers' denoisers and generic modules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dmquant.denoiser import Denoiser, as_denoiser
from dmquant.errors import ModelError
from dmquant.zoo.tiny import tiny_dit, tiny_unet2d, tiny_unet2d_condition


class Scale(nn.Module):
    """A generic denoiser: ``eps = weight * x``, optionally wrapped like a diffusers output."""

    def __init__(self, wrap: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.wrap = wrap

    def forward(self, x, t):
        out = self.weight * x
        return SimpleNamespace(sample=out) if self.wrap else out


@pytest.mark.parametrize(
    ("build", "kind", "in_channels", "sample_size"),
    [
        (lambda: tiny_unet2d(0), "unet2d", 3, 16),
        (lambda: tiny_unet2d_condition(0), "unet2d_condition", 4, 8),
        (lambda: tiny_dit(0), "dit", 4, 8),
        (lambda: Scale(), "generic", None, None),
    ],
)
def test_kind_and_shape_are_detected(build, kind, in_channels, sample_size):
    denoiser = Denoiser(build())
    assert (denoiser.kind, denoiser.in_channels, denoiser.sample_size) == (kind, in_channels, sample_size)


def test_generic_attributes_are_read_when_present():
    model = Scale()
    model.in_channels, model.sample_size = 3, (4, 6)
    denoiser = Denoiser(model)
    assert (denoiser.in_channels, denoiser.sample_size) == (3, (4, 6))


@pytest.mark.parametrize("wrap", [False, True])
def test_generic_output_is_unwrapped(wrap):
    x = torch.randn(2, 3, 4, 4)
    out = Denoiser(Scale(wrap))(x, torch.tensor([5, 5]), {})
    torch.testing.assert_close(out, 2 * x)


def test_unet_output_is_the_raw_sample():
    model = tiny_unet2d(0)
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, t, class_labels=labels).sample
        out = Denoiser(model)(x, t, {"class_labels": labels})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_learned_sigma_channels_are_dropped_only_for_learned_variance_models():
    dit = Denoiser(tiny_dit(0))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = dit(x, torch.tensor([3, 3]), {"class_labels": torch.tensor([0, 1])})
    assert out.shape[1] == 8
    torch.testing.assert_close(dit.noise_channels(out), out[:, :4])
    unet = Denoiser(tiny_unet2d(0))
    y = torch.randn(2, 3, 16, 16)
    assert unet.noise_channels(y) is y


def test_missing_conditioning_is_a_model_error():
    with pytest.raises(ModelError, match="encoder_hidden_states"):
        Denoiser(tiny_unet2d_condition(0))(torch.randn(1, 4, 8, 8), torch.tensor([1]), {})
    with pytest.raises(ModelError, match="class_labels"):
        Denoiser(tiny_unet2d(0, class_conditional=True))(torch.randn(1, 3, 16, 16), torch.tensor([1]), {})


def test_non_modules_are_rejected_and_denoisers_pass_through():
    with pytest.raises(ModelError, match="nn.Module"):
        Denoiser(lambda x, t: x)
    denoiser = Denoiser(Scale())
    assert as_denoiser(denoiser) is denoiser
    assert as_denoiser(denoiser.model).model is denoiser.model
