"""deployment.py: the denoiser call a converted model is measured on is shaped as sampling makes it."""

from __future__ import annotations

import torch

from dmquant.deployment import representative_call
from dmquant.models import load_model


def test_a_representative_call_doubles_the_batch_under_guidance():
    model = load_model("ddpm-glyphs32")
    seen = []
    handle = model.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape),
                                                      with_kwargs=True)  # fmt: skip
    try:
        with torch.no_grad():
            representative_call(model, 3, guidance_scale=1.0)()
            representative_call(model, 3, guidance_scale=4.0)()
    finally:
        handle.remove()
    size = model.denoiser.config.sample_size
    assert seen == [
        (3, model.denoiser.config.in_channels, size, size),
        (6, model.denoiser.config.in_channels, size, size),
    ]
