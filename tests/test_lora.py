"""LoRA: fused into the full-precision model before quantizing; unfused adapters and fusing into a quantized
model are refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.lora import LoRACompatibleLinear, LoRALinearLayer

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, load_recipe
from dmquant.denoiser import Denoiser
from dmquant.errors import ModelError
from dmquant.models import load_model


def _with_unfused_lora(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a random rank-4 LoRA adapter on each cross-attention query projection, not fused into
    its weight (diffusers' LoRA-compatible layer: what PEFT's tuner layers are to ``pipe.load_lora_weights``)."""
    generator = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if name.endswith("attn2.to_q"):
            adapter = LoRALinearLayer(module.in_features, module.out_features, rank=4)
            adapter.up.weight.data = 0.1 * torch.randn(adapter.up.weight.shape, generator=generator)
            layer = LoRACompatibleLinear(module.in_features, module.out_features, bias=False, lora_layer=adapter)
            layer.weight = module.weight
            model.get_submodule(name.rsplit(".", 1)[0]).to_q = layer
    return model


@pytest.fixture(scope="module")
def text_model():
    return load_model("tiny-unet-text")


@pytest.fixture(scope="module")
def calibration(text_model):
    return record_for(text_model, CalibrationConfig(num_inference_steps=2, num_trajectories=2), progress=False)


def _output(model, calibration):
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        return Denoiser(model)(x, t, cond)


def test_fused_lora_quantizes_saves_and_loads(text_model, calibration, tmp_path):
    model = _with_unfused_lora(text_model.denoiser)
    with_adapter = _output(model, calibration)
    with pytest.raises(ModelError, match="fuse them before quantizing"):
        api.quantize(model, load_recipe("minmax"), calibration, progress=False)
    for module in model.modules():  # what pipe.fuse_lora() then pipe.unload_lora_weights() leave
        if isinstance(module, LoRACompatibleLinear):
            module._fuse_lora()
    fused = _output(model, calibration)
    torch.testing.assert_close(fused, with_adapter, rtol=1e-4, atol=1e-5)
    quantized = api.quantize(model, load_recipe("minmax"), calibration, progress=False)
    error = _output(quantized, calibration) - fused
    assert error.pow(2).mean() < 1e-2 * fused.pow(2).mean()  # the LoRA's effect is in the quantized weights
    api.save(quantized, tmp_path / "q")
    assert torch.equal(_output(api.load(tmp_path / "q"), calibration), _output(quantized, calibration))


def test_adapters_on_a_quantized_model_are_refused(text_model, calibration, tmp_path):
    quantized = api.quantize(text_model.denoiser, load_recipe("minmax"), calibration, progress=False)
    with pytest.raises(ModelError, match="Fuse the LoRA into the full-precision model"):
        quantized.fuse_lora()
    with pytest.raises(ModelError, match="Fuse the LoRA into the full-precision model"):
        quantized.load_lora_adapter({"lora_A.weight": torch.zeros(1)})
    layer = next(m for n, m in quantized.named_modules() if n.endswith("attn2.to_q"))
    layer.lora_layer = LoRALinearLayer(layer.in_features, layer.out_features, rank=2)  # added behind its back
    with pytest.raises(ModelError, match="fuse them before saving"):
        api.save(quantized, tmp_path / "q")
    assert not (tmp_path / "q").exists()
