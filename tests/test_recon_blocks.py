"""Reconstruction units (BRECQ blocks and lone layers) of the three zoo families, in execution order."""

from __future__ import annotations

import pytest
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from dmquant.catalog import REFERENCE_MODELS
from dmquant.config import load_recipe
from dmquant.core.attach import attach_quantizers
from dmquant.core.layers import QUANT_LAYERS
from dmquant.core.quantizer import quantizers
from dmquant.errors import ModelError
from dmquant.models import load_model
from dmquant.recon.blocks import reconstruction_units
from dmquant.sampling import probe_call


def _units(name: str):
    model = load_model(name)
    attach_quantizers(model.denoiser, load_recipe("minmax"), warn=False)
    for quantizer in quantizers(model.denoiser):  # uncalibrated: trace the order in full precision
        quantizer.enabled = False
    units = reconstruction_units(
        model.denoiser, probe_call(model.denoiser, model.make_conditioning(1, guidance_scale=1.0))
    )
    return model.denoiser, units


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_every_quantized_layer_belongs_to_exactly_one_unit(name):
    model, units = _units(name)
    owners: dict[int, str] = {}
    for unit in units:
        for module in unit.module.modules():
            if isinstance(module, QUANT_LAYERS):
                assert id(module) not in owners, f"{unit.name} and {owners[id(module)]} share a layer"
                owners[id(module)] = unit.name
    assert len(owners) == sum(isinstance(m, QUANT_LAYERS) for m in model.modules())


def test_unet_units_are_resnets_attention_and_lone_layers_in_running_order():
    model, units = _units("ddpm-glyphs32")
    kinds = [unit.kind for unit in units]
    assert kinds.count("resnet") == sum(isinstance(m, ResnetBlock2D) for m in model.modules())
    assert kinds.count("attention") == sum(isinstance(m, Attention) for m in model.modules())
    assert "transformer" not in kinds
    names = [unit.name for unit in units]
    assert names[-1] == "conv_out"
    assert names.index("conv_in") < names.index("down_blocks.0.resnets.0")
    assert (
        names.index("mid_block.resnets.0")
        < names.index("mid_block.attentions.0")
        < names.index("up_blocks.0.resnets.0")
    )


def test_cross_attention_unet_units_are_whole_transformer_blocks():
    model, units = _units("ldm-glyphs64")
    transformers = [unit for unit in units if unit.kind == "transformer"]
    assert len(transformers) == sum(isinstance(m, BasicTransformerBlock) for m in model.modules())
    assert all(unit.kind != "attention" for unit in units)  # attn1 and attn2 live inside the blocks
    layers = {unit.name for unit in units if unit.kind == "layer"}
    assert "down_blocks.0.attentions.0.proj_in" in layers and "down_blocks.0.attentions.0.proj_out" in layers


def test_dit_units_are_its_blocks_between_patch_embedding_and_output():
    model, units = _units("dit-glyphs")
    names = [unit.name for unit in units]
    blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    assert names == ["pos_embed.proj", *blocks, "proj_out_1", "proj_out_2"]


def test_units_need_attached_quantizers_and_a_forward_that_reaches_them():
    model = load_model("dit-glyphs").denoiser
    with pytest.raises(ModelError, match="attach quantizers first"):
        reconstruction_units(model, lambda: None)
    attach_quantizers(model, load_recipe("minmax"), warn=False)
    with pytest.raises(ModelError, match="never ran"):
        reconstruction_units(model, lambda: None)
