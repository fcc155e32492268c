"""The same jobs on a CUDA device (skipped without one)."""

import dataclasses

import pytest
import torch

from dmquant import api
from dmquant.config import CalibrationConfig, load_recipe
from dmquant.jobs import compare, open_model
from dmquant.models import load_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-unet-text", "tiny-dit"])
def test_quantize_sample_and_reload_on_cuda(name, tmp_path):
    fp = load_model(name).to("cuda")
    config = load_recipe("mse").with_bits(4, 8)
    config = dataclasses.replace(
        config,
        calibration=CalibrationConfig(
            num_inference_steps=4, num_trajectories=4, batch_size=4, guidance_scale=fp.guidance_scale
        ),
    )
    quantized = api.quantize(fp, config, progress=False)
    assert next(quantized.denoiser.parameters()).device.type == "cuda"
    results = compare(fp, quantized, num_samples=4, num_inference_steps=4, batch_size=4, progress=False)
    assert results["images"]["quantized"].device.type == "cuda"
    assert 0 < results["sqnr_db_mean"] < float("inf")

    api.save(quantized.denoiser, tmp_path / "q")
    reloaded = open_model(str(tmp_path / "q")).to("cuda")
    again = compare(fp, reloaded, num_samples=4, num_inference_steps=4, batch_size=4, progress=False)
    assert torch.equal(again["images"]["quantized"], results["images"]["quantized"])
