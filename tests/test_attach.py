"""Attaching quantizers: shortcut-split discovery, rules, the layer report."""

import dataclasses

import pytest
import torch
from torch import nn

from dmquant.config import LayerRule, QuantConfig
from dmquant.core.attach import attach_quantizers, find_shortcut_splits
from dmquant.core.layers import QuantConv2d, QuantLinear
from dmquant.denoiser import Denoiser
from dmquant.zoo.tiny import tiny_dit, tiny_unet2d, tiny_unet2d_condition


def _splits(model, cond):
    denoiser = Denoiser(model)
    x = torch.zeros(1, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size)
    with torch.no_grad():
        return find_shortcut_splits(model, lambda: denoiser(x, torch.tensor([10]), cond))


def test_shortcut_splits_of_unet2d_match_hand_derivation():
    # block_out_channels (32, 64), layers_per_block 1 -> up blocks of 2 resnets each.
    # up_blocks.0: prev 64, out 64; resnet0 gets cat(h:64, skip:64), resnet1 cat(h:64, skip:32)
    # up_blocks.1: prev 64, out 32; resnet0 gets cat(h:64, skip:32), resnet1 cat(h:32, skip:32)
    expected_h = {
        "up_blocks.0.resnets.0": 64,
        "up_blocks.0.resnets.1": 64,
        "up_blocks.1.resnets.0": 64,
        "up_blocks.1.resnets.1": 32,
    }
    expected = {f"{resnet}.{conv}": h for resnet, h in expected_h.items() for conv in ("conv1", "conv_shortcut")}
    assert _splits(tiny_unet2d(), {"class_labels": torch.tensor([0])}) == expected


def test_shortcut_splits_of_cross_attention_unet_and_none_for_dit():
    splits = _splits(tiny_unet2d_condition(), {"encoder_hidden_states": torch.zeros(1, 3, 32)})
    assert splits and all(name.startswith("up_blocks.") for name in splits)
    assert {name.rsplit(".", 1)[1] for name in splits} == {"conv1", "conv_shortcut"}
    assert _splits(tiny_dit(), {"class_labels": torch.tensor([0])}) == {}


def test_split_matches_where_the_skip_features_start():
    model = tiny_unet2d()
    splits = _splits(model, {"class_labels": torch.tensor([0])})
    seen = {}
    block = model.up_blocks[1]

    def record(module, args, kwargs):
        seen["h"] = args[0].shape[1]

    block.register_forward_pre_hook(record, with_kwargs=True)
    _splits(model, {"class_labels": torch.tensor([0])})
    assert splits["up_blocks.1.resnets.0.conv1"] == seen["h"]


def test_attach_replaces_layers_and_reports_each():
    model = tiny_unet2d()
    config = QuantConfig(rules=[LayerRule("conv_in", keep_fp=True), LayerRule("conv_out", weight_bits=8)])
    config = config.with_bits(4, 8)
    report = attach_quantizers(model, config, splits={"up_blocks.1.resnets.1.conv1": 32})
    by_name = {layer.name: layer for layer in report.layers}
    assert type(model.conv_in) is nn.Conv2d and by_name["conv_in"].weight == "fp"
    assert isinstance(model.conv_out, QuantConv2d) and by_name["conv_out"].weight == "int8"
    assert by_name["conv_out"].rule == "conv_out"
    assert by_name["down_blocks.0.resnets.0.conv1"].weight == "int4"
    assert model.up_blocks[1].resnets[1].conv1.split == 32 and by_name["up_blocks.1.resnets.1.conv1"].split == 32
    attention = [layer for layer in report.layers if layer.kind == "Attention"]
    assert len(attention) == 4  # down_blocks.1: 1, mid_block: 1, up_blocks.0: 2
    assert all("softmax uint8" in layer.activation for layer in attention)
    linear_count = sum(isinstance(m, nn.Linear) for m in tiny_unet2d().modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == linear_count
    assert report.num_quantized == len(report.layers) - 1  # all but conv_in


def test_rule_that_matches_nothing_warns_and_is_reported():
    with pytest.warns(UserWarning, match="no_such_layer"):
        report = attach_quantizers(tiny_dit(), QuantConfig(rules=[LayerRule("no_such_layer", keep_fp=True)]))
    assert report.unmatched_rules == ["no_such_layer"]


def test_attention_can_be_left_unquantized():
    model = tiny_dit()
    config = QuantConfig()
    config = dataclasses.replace(config, attention=dataclasses.replace(config.attention, enabled=False))
    report = attach_quantizers(model, config)
    assert not any(layer.kind == "Attention" for layer in report.layers)
    assert not hasattr(model.transformer_blocks[0].attn1, "quant_matmul")
