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
attention module as ``quant_matmul`` (so they are in its state dict), and a stateless processor
runs the attention with them: :class:`QuantAttnProcessor` for diffusers' ``Attention``,
:class:`QuantJointAttnProcessor` for the joint text-image attention of SD3 and FLUX.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

try:  # FLUX's attention module (diffusers ≥ 0.35)
    from diffusers.models.transformers.transformer_flux import FluxAttention
except ImportError:
    FluxAttention = None

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
        attn: nn.Module,
        quant: AttentionQuantizers,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``softmax(Q·Kᵀ·scale)·V`` on the quantized operands, from and to ``(batch, tokens, heads·dim)``."""
        dtype, heads = query.dtype, attn.heads  # the quantizers answer in float32: back to the model's dtype
        query = quant.query(_heads_to_batch(query, heads)).to(dtype)
        key = quant.key(_heads_to_batch(key, heads)).to(dtype)
        value = quant.value(_heads_to_batch(value, heads)).to(dtype)
        probs = quant.probs(_attention_probs(attn, query, key, attention_mask)).to(dtype)
        return _batch_to_heads(quant.round_output(torch.bmm(probs, value)).to(dtype), heads)


class QuantJointAttnProcessor(QuantAttnProcessor):
    """Joint text-image attention with quantized Q·Kᵀ and softmax·V, one processor for the two families diffusers
    writes separately: FLUX's ``FluxAttnProcessor`` (``FluxAttention``: per-head RMSNorm, text tokens first, rotary
    embedding; single-stream blocks return the attention without an output projection) and SD3's
    ``JointAttnProcessor2_0`` (an ``Attention`` with added key/value projections: image tokens first, the text's
    output projection unless ``context_pre_only``). Projections, norms, token order and output projections are
    computed as diffusers computes them; the attention itself by :meth:`QuantAttnProcessor.attend`, in place of the
    fused SDPA call diffusers makes, which cannot quantize its operands."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        def heads(x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
            x = x.unflatten(-1, (attn.heads, -1))
            return x if norm is None else norm(x)

        text_first = FluxAttention is not None and isinstance(attn, FluxAttention)
        image_tokens = hidden_states.shape[1]
        query, key = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k)
        value = heads(attn.to_v(hidden_states))
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            text = (
                heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
                heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
                heads(attn.add_v_proj(encoder_hidden_states)),
            )
            query, key, value = (
                torch.cat([joined, own] if text_first else [own, joined], dim=1)
                for joined, own in zip(text, (query, key, value), strict=True)
            )
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        quant: AttentionQuantizers = getattr(attn, MATMUL_ATTRIBUTE)
        output = self.attend(attn, quant, query.flatten(2), key.flatten(2), value.flatten(2), attention_mask)
        output = output.to(query.dtype)
        if encoder_hidden_states is None:
            return output if getattr(attn, "pre_only", False) else attn.to_out[1](attn.to_out[0](output))
        if text_first:
            text, image = output.split_with_sizes([output.shape[1] - image_tokens, image_tokens], dim=1)
        else:
            image, text = output.split_with_sizes([image_tokens, output.shape[1] - image_tokens], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, text if getattr(attn, "context_pre_only", False) else attn.to_add_out(text.contiguous())


def softmax_scale(attn: nn.Module) -> float:
    """The factor of Q·Kᵀ: ``Attention.scale``; ``1/√head_dim`` for FLUX's attention (``dispatch_attention_fn``'s)."""
    return attn.scale if isinstance(attn, Attention) else attn.head_dim**-0.5


def _heads_to_batch(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(batch, tokens, heads·dim)`` to ``(batch·heads, tokens, dim)``, as ``Attention.head_to_batch_dim``."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).permute(0, 2, 1, 3).reshape(batch * heads, tokens, -1)


def _batch_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_heads_to_batch`, as ``Attention.batch_to_head_dim``."""
    batch_heads, tokens, dim = x.shape
    return x.reshape(batch_heads // heads, heads, tokens, dim).permute(0, 2, 1, 3).reshape(-1, tokens, heads * dim)


def _attention_probs(
    attn: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``softmax(Q·Kᵀ·scale + mask)``: ``Attention.get_attention_scores`` where ``attn`` has it, else the same in
    float32 (FLUX's attention, computed by a fused kernel in diffusers)."""
    if isinstance(attn, Attention):
        return attn.get_attention_scores(query, key, attention_mask)
    scores = torch.bmm(query.float(), key.float().transpose(-1, -2)) * softmax_scale(attn)
    if attention_mask is not None:
        scores = scores + attention_mask
    return scores.softmax(dim=-1).to(query.dtype)


def quantize_attention(
    attn: nn.Module, operand: QuantizerConfig, softmax_bits: int | str, *, num_steps: int = 1
) -> None:
    """Give ``attn`` matmul quantizers and the processor of its family that uses them."""
    setattr(attn, MATMUL_ATTRIBUTE, AttentionQuantizers(operand, softmax_bits, num_steps=num_steps))
    plain = isinstance(attn, Attention) and getattr(attn, "added_kv_proj_dim", None) is None
    attn.set_processor(QuantAttnProcessor() if plain else QuantJointAttnProcessor())


def is_quantizable_attention(module: nn.Module) -> bool:
    """Diffusers attention modules whose computation a quantized processor reproduces: ``Attention`` without added
    key/value projections (UNets, DiT, PixArt), SD3's joint ``Attention`` (``JointAttnProcessor2_0``), and FLUX's
    ``FluxAttention``, each with unfused projections."""
    if getattr(module, "fused_projections", False):
        return False
    if FluxAttention is not None and isinstance(module, FluxAttention):
        return True
    if not isinstance(module, Attention) or getattr(module, "is_cross_attention_with_added_kv", False):
        return False
    return module.added_kv_proj_dim is None or isinstance(module.processor, JointAttnProcessor2_0)
