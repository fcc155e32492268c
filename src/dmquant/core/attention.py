"""Quantized activation-activation matmuls of diffusers ``Attention`` (Q·Kᵀ and softmax·V).

The projections ``to_q/to_k/to_v/to_out`` are Linear layers and are quantized like any other;
what this module adds is quantization of the two matmuls whose *both* operands are
activations, as Q-Diffusion (Li et al. 2023, Sec. 4.3) does: the inputs Q, K, V of the
matmuls, and the softmax output — non-negative, so it gets an unsigned quantizer, at 8 or 16
bits.

The quantizers live in an :class:`AttentionQuantizers` submodule registered on the
``Attention`` module as ``quant_matmul`` (so they are in its state dict), and a stateless
:class:`QuantAttnProcessor` runs the attention with them.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..config import QuantizerConfig
from .quantizer import Quantizer

MATMUL_ATTRIBUTE = "quant_matmul"


class AttentionQuantizers(nn.Module):
    """Quantizers of the attention matmul operands: ``query``, ``key``, ``value``, ``probs``."""

    def __init__(self, operand: QuantizerConfig, softmax_bits: int | str, *, num_steps: int = 1):
        super().__init__()
        self.query = Quantizer(operand, num_steps=num_steps)
        self.key = Quantizer(operand, num_steps=num_steps)
        self.value = Quantizer(operand, num_steps=num_steps)
        probs = dataclasses.replace(operand, bits=softmax_bits, symmetric=True, unsigned=True, granularity="tensor")
        self.probs = Quantizer(probs, num_steps=num_steps)


class QuantAttnProcessor:
    """Diffusers' classic ``AttnProcessor`` with quantized Q·Kᵀ and softmax·V.

    Numerically it is ``Attention.get_attention_scores`` followed by ``bmm`` with the
    quantizers of ``attn.quant_matmul`` applied to the four operands; with them disabled it
    equals diffusers' own processors.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        quant: AttentionQuantizers = getattr(attn, MATMUL_ATTRIBUTE)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        dtype = query.dtype  # the quantizers answer in float32: back to the model's dtype
        query = quant.query(attn.head_to_batch_dim(query)).to(dtype)
        key = quant.key(attn.head_to_batch_dim(key)).to(dtype)
        value = quant.value(attn.head_to_batch_dim(value)).to(dtype)

        probs = quant.probs(attn.get_attention_scores(query, key, attention_mask)).to(dtype)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def quantize_attention(
    attn: Attention, operand: QuantizerConfig, softmax_bits: int | str, *, num_steps: int = 1
) -> None:
    """Give ``attn`` matmul quantizers and the processor that uses them."""
    setattr(attn, MATMUL_ATTRIBUTE, AttentionQuantizers(operand, softmax_bits, num_steps=num_steps))
    attn.set_processor(QuantAttnProcessor())


def is_quantizable_attention(module: nn.Module) -> bool:
    """Diffusers attention modules whose computation the quantized processor reproduces."""
    return (
        isinstance(module, Attention)
        and not getattr(module, "is_cross_attention_with_added_kv", False)
        and (getattr(module, "added_kv_proj_dim", None) is None)
    )
