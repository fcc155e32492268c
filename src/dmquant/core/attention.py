"""Quantized activation-activation matmuls of diffusers ``Attention`` (Q·Kᵀ and softmax·V).

The projections ``to_q/to_k/to_v/to_out`` are Linear layers and are quantized like any other;
what this module adds is quantization of the two matmuls whose *both* operands are
activations, as Q-Diffusion (Li et al. 2023, Sec. 4.3) does: the inputs Q, K, V of the
matmuls, and the softmax output — non-negative, so it gets an unsigned quantizer, at 8 or 16
bits.

With ``softmax_bits: fp8_e4m3`` (and Q, K, V in fp8 e4m3: FP8 attention) the computation is the one
FP8 flash-attention kernels perform, so that a converted model can run on them and still match this
simulated one: the softmax output is quantized on the fixed range [0, 1] (``unit`` observer: the
kernel quantizes it before the final normalisation, where it reaches 1), and the output ``P·V`` is
rounded to fp8 on V's scale, as Hopper's kernels write it (each row of the output is a convex
combination of V's rows, so V's scale never clips it).

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
from .primitives import fake_quant
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
        if probs.format.is_float:
            probs = dataclasses.replace(probs, unsigned=False, observer="unit")
        self.probs = Quantizer(probs, num_steps=num_steps)

    @property
    def fp8_attention(self) -> bool:
        """Whether the softmax output is in a float format: FP8 attention, whose output is rounded too."""
        return self.probs.enabled and self.probs.fmt.is_float

    def round_output(self, output: torch.Tensor) -> torch.Tensor:
        """``P·V`` as an FP8 attention kernel writes it: rounded to V's format on V's scale (``output`` itself
        unless :attr:`fp8_attention`, and while V is being calibrated)."""
        value = self.value
        if not (self.fp8_attention and value.enabled and value.calibrated) or value.observing:
            return output
        scale, zero_point = value.qparams(output.shape)
        return fake_quant(output, scale, zero_point, value.fmt)


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

        hidden_states = self.attend(attn, quant, query, key, value, attention_mask)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(
        self,
        attn: Attention,
        quant: AttentionQuantizers,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``softmax(Q·Kᵀ·scale)·V`` on the quantized operands, from and to ``(batch, tokens, heads·dim)``."""
        dtype = query.dtype  # the quantizers answer in float32: back to the model's dtype
        query = quant.query(attn.head_to_batch_dim(query)).to(dtype)
        key = quant.key(attn.head_to_batch_dim(key)).to(dtype)
        value = quant.value(attn.head_to_batch_dim(value)).to(dtype)
        probs = quant.probs(attn.get_attention_scores(query, key, attention_mask)).to(dtype)
        return attn.batch_to_head_dim(quant.round_output(torch.bmm(probs, value)).to(dtype))


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
