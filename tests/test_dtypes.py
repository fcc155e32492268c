"""Quantized models run in the dtypes users run diffusers in, and the shipped pipelines load in plain diffusers."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiTPipeline, StableDiffusionPipeline

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, load_recipe
from dmquant.denoiser import Denoiser
from dmquant.models import load_model
from dmquant.zoo import WEIGHTS_DIR


@pytest.fixture(scope="module")
def text_model():
    return load_model("tiny-unet-text")


@pytest.fixture(scope="module")
def quantized_text(text_model):
    calibration = record_for(text_model, CalibrationConfig(num_inference_steps=2, num_trajectories=2), progress=False)
    return api.quantize(text_model.denoiser, load_recipe("minmax"), calibration, progress=False), calibration


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_layers_and_attention_run_in_half_precision(quantized_text, dtype):
    model, calibration = quantized_text
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        reference = Denoiser(model)(x, t, cond)
        half = copy.deepcopy(model).to(dtype) if dtype == torch.bfloat16 else copy.deepcopy(model).half()
        output = Denoiser(half)(x.to(dtype), t, {k: v.to(dtype) for k, v in cond.items()})
    assert output.dtype == dtype
    scales = [q.scale for q in half.modules() if hasattr(q, "zero_point")]
    assert scales and all(scale.dtype == torch.float32 for scale in scales)  # calibrated grids kept exact
    assert (output.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


@pytest.mark.parametrize("name", ["ldm-glyphs64", "dit-glyphs"])
def test_shipped_pipelines_run_in_plain_diffusers_with_their_defaults(name):
    directory = WEIGHTS_DIR / name
    if name == "ldm-glyphs64":
        pipe = StableDiffusionPipeline.from_pretrained(directory)
        images = pipe("a red capital q on a blue background", num_inference_steps=2, output_type="pt").images
    else:
        pipe = DiTPipeline.from_pretrained(directory)
        images = pipe(class_labels=[1], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert {
        p.dtype
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
        for p in component.parameters()
    } == {torch.float32}


def test_quantized_unet_runs_in_a_bf16_pipeline():
    fp = load_model("ldm-glyphs64")
    calibration = record_for(fp, CalibrationConfig(num_inference_steps=2, num_trajectories=1), progress=False)
    unet = api.quantize(fp.denoiser, load_recipe("minmax"), calibration, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "ldm-glyphs64", torch_dtype=torch.bfloat16)
    pipe.unet = unet.to(torch.bfloat16)
    images = pipe("a red capital q on a blue background", num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(images.float()).all()
