"""End to end on CPU for each model family: calibrate → quantize → save/load → sample → compare with FP."""

import dataclasses
import math

import pytest
import torch

from dmquant import api
from dmquant.config import CalibrationConfig, load_recipe
from dmquant.jobs import compare, generate, open_model
from dmquant.models import load_model

STEPS = 5
FAMILIES = {
    "tiny-unet": "UNet2DModel, class-conditional, self-attention",
    "tiny-unet-text": "UNet2DConditionModel, cross-attention, classifier-free guidance",
    "tiny-dit": "DiTTransformer2DModel, class-conditional, classifier-free guidance",
}


def _quantize(fp, weight_bits, activation_bits):
    config = load_recipe("mse").with_bits(weight_bits, activation_bits)
    config = dataclasses.replace(
        config,
        calibration=CalibrationConfig(
            num_inference_steps=STEPS, num_trajectories=4, batch_size=4, guidance_scale=fp.guidance_scale
        ),
    )
    return api.quantize(fp, config, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES), ids=list(FAMILIES))
def test_quantize_sample_compare(name, tmp_path):
    fp = load_model(name)
    assert (fp.guidance_scale > 1) == (name != "tiny-unet")
    results = {}
    for bits in ((8, 8), (4, 8), (4, 4)):
        quantized = _quantize(fp, *bits)
        results[bits] = compare(fp, quantized, num_samples=4, num_inference_steps=STEPS, batch_size=4, progress=False)
    w8a8, w4a8, w4a4 = results[(8, 8)], results[(4, 8)], results[(4, 4)]
    assert len(w8a8["steps"]) == STEPS
    # fewer bits, more error: on the noise estimate of every step, and on the final samples
    assert w8a8["sqnr_db_mean"] > w4a8["sqnr_db_mean"] > w4a4["sqnr_db_mean"]
    assert w8a8["sqnr_db_min"] > 15
    assert w8a8["psnr_db"] > w4a8["psnr_db"] and math.isfinite(w8a8["psnr_db"])
    assert w4a8["compression"] > w8a8["compression"] > 3

    # the saved checkpoint samples exactly what the in-memory model samples
    api.save(quantized.denoiser, tmp_path / "q")
    reloaded = open_model(str(tmp_path / "q"))
    assert reloaded.name == fp.name
    images, _ = generate(quantized, 2, num_inference_steps=STEPS, batch_size=2, progress=False)
    images_reloaded, _ = generate(reloaded, 2, num_inference_steps=STEPS, batch_size=2, progress=False)
    assert torch.equal(images, images_reloaded)
    assert images.shape[1] == 3 and images.shape[-1] == 16  # decoded to 16x16 RGB (latent models via the VAE)


def test_fp_comparison_with_itself_is_exact():
    fp = load_model("tiny-dit")
    results = compare(fp, fp, num_samples=2, num_inference_steps=3, batch_size=2, progress=False)
    assert results["psnr_db"] == math.inf and results["ssim"] == pytest.approx(1.0)
    assert all(row["sqnr_db"] == math.inf for row in results["steps"])
