"""What a quantized configuration costs: storage size and bit operations (BOPs).

BOPs count each multiply-accumulate of a layer as ``weight bits × activation bits`` (the
convention of the quantization literature, e.g. van Baalen et al. 2020, "Bayesian Bits",
and the LDM quantization strategies paper): a Linear/Conv2d contributes
``MACs × b_w × b_a``, an attention module ``MACs(Q·Kᵀ) × b_q × b_k + MACs(P·V) × b_p × b_v``.
Full-precision operands count with their dtype's bit width. Converted low-bit layers
(:mod:`dmquant.kernels`) count as the layers they replace, at their storage's bits.

:func:`op_calls` is the one walk over a forward pass that finds the layer and attention calls;
BOPs here and the FLOPs of the speed benchmark (``2 × MACs``) are both read from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..core.attention import MATMUL_ATTRIBUTE
from ..core.layers import QUANT_LAYERS
from ..core.quantizer import Quantizer
from ..kernels.layers import LowBitConv2d, LowBitLinear


def _bits(quantizer: Quantizer | None, dtype: torch.dtype) -> int:
    if quantizer is not None and quantizer.enabled:
        return quantizer.bits
    return torch.finfo(dtype).bits


@dataclass
class SizeReport:
    total_bytes: int
    fp_bytes: int  # the same model with every tensor in its FP dtype
    quantized_params: int
    fp_params: int

    @property
    def compression(self) -> float:
        return self.fp_bytes / max(self.total_bytes, 1)


def model_size(model: nn.Module) -> SizeReport:
    """Bytes of the model's parameters and buffers at their configured precision.

    A quantized weight costs ``numel × bits / 8``, its quantizer's scales and zero points
    4 bytes each; every other tensor its dtype's size. ``fp_bytes`` is the model without
    quantization (no quantizer buffers, every tensor in its dtype).
    """
    quantized_bits: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS) and all(q.enabled for q, _ in module.weight_parts()):
            quantized_bits[id(module.weight)] = sum(part.numel() * q.bits for q, part in module.weight_parts())
    overhead = {id(t) for m in model.modules() if isinstance(m, Quantizer) for t in (m.scale, m.zero_point)}
    total_bits = fp_bits = quantized_params = fp_params = 0
    for tensor in model.state_dict(keep_vars=True).values():
        dtype_bits = tensor.numel() * tensor.element_size() * 8
        if id(tensor) in overhead:
            total_bits += tensor.numel() * 32
            continue
        fp_bits += dtype_bits
        if id(tensor) in quantized_bits:
            total_bits += quantized_bits[id(tensor)]
            quantized_params += tensor.numel()
        else:
            total_bits += dtype_bits
            fp_params += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
    return SizeReport(-(-total_bits // 8), fp_bits // 8, quantized_params, fp_params)


#: Weight bits of each storage layout of :mod:`dmquant.kernels`' low-bit layers.
LAYOUT_BITS = {"fp8": 8, "int8": 8, "int4": 4}


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` or ``"linear"`` for a Conv2d or Linear layer (dmquant's simulated ones included) or a
    converted low-bit layer of :mod:`dmquant.kernels`; None for any other module."""
    if isinstance(module, (nn.Conv2d, LowBitConv2d)):
        return "conv"
    if isinstance(module, (nn.Linear, LowBitLinear)):
        return "linear"
    return None


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Linear or Conv2d layer (or a converted low-bit one):
    ``outputs · in_features`` and ``outputs · (in_channels / groups) · kh · kw``."""
    if hasattr(module, "in_channels"):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features


def attention_macs(module: Attention, args: tuple, kwargs: dict) -> tuple[int, int]:
    """Multiply-accumulates of one diffusers ``Attention`` call's two matmuls, ``Q·Kᵀ`` and ``P·V``:
    ``B · Lq · Lk`` times the query and the value widths."""
    hidden = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states") if len(args) < 2 else args[1]

    def tokens(x: torch.Tensor) -> int:
        return x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[1]

    length_q = tokens(hidden)
    length_k = length_q if context is None else tokens(context)
    pairs = hidden.shape[0] * length_q * length_k
    return pairs * module.inner_dim, pairs * module.inner_kv_dim


@dataclass(frozen=True)
class OpCall:
    """One call of a layer (:func:`layer_kind`) or of an attention module's matmuls in a forward pass.

    ``kind`` is ``"linear"``, ``"conv"`` or ``"attention"``; ``macs`` the layer's multiply-accumulates, or the
    attention's ``(Q·Kᵀ, P·V)``; ``dtype`` that of the call's input (its hidden states for attention).
    """

    name: str
    module: nn.Module
    kind: str
    macs: tuple[int, ...]
    dtype: torch.dtype


@torch.no_grad()
def op_calls(model: nn.Module, run_forward: Callable[[], Any]) -> list[OpCall]:
    """The layer and attention calls of one forward pass (``run_forward`` calls ``model`` once), in call order."""
    calls: list[OpCall] = []
    handles = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None:

            def layer_hook(m, inputs, output, name=name, kind=kind):
                calls.append(OpCall(name, m, kind, (layer_macs(m, output),), inputs[0].dtype))

            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, Attention):

            def attention_hook(m, args, kwargs, output, name=name):
                dtype = (args[0] if args else kwargs["hidden_states"]).dtype
                calls.append(OpCall(name, m, "attention", attention_macs(m, args, kwargs), dtype))

            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _layer_bits(module: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Weight and activation bits of a layer: its quantizers' (simulated), its storage layout's and activation
    quantizer's (converted; a convolution's first input part stands for all), else the dtypes' widths."""
    if isinstance(module, (LowBitLinear, LowBitConv2d)):
        part = module.parts[0] if isinstance(module, LowBitConv2d) else module
        return LAYOUT_BITS[part.weight.layout], _bits(part.input_quantizer, dtype)
    quantized = isinstance(module, QUANT_LAYERS)
    w_bits = _bits(module.weight_quantizer if quantized else None, module.weight.dtype)
    return w_bits, _bits(module.input_quantizer if quantized else None, dtype)


def _attention_bits(module: Attention, dtype: torch.dtype) -> tuple[int, int]:
    """``b_q · b_k`` and ``b_p · b_v`` of an attention module's two matmuls."""
    quant = getattr(module, MATMUL_ATTRIBUTE, None)
    return (
        _bits(quant and quant.query, dtype) * _bits(quant and quant.key, dtype),
        _bits(quant and quant.probs, dtype) * _bits(quant and quant.value, dtype),
    )


def bops(model: nn.Module, run_forward: Callable[[], Any]) -> dict[str, Any]:
    """BOPs and MACs of one forward pass (``run_forward`` calls the model once), per layer and total."""
    rows: list[dict[str, Any]] = []
    for call in op_calls(model, run_forward):
        if call.kind == "attention":
            (macs_qk, macs_pv), (bits_qk, bits_pv) = call.macs, _attention_bits(call.module, call.dtype)
            name, macs, w_bits, a_bits = f"{call.name} (matmuls)", macs_qk + macs_pv, None, None
            bit_ops = bits_qk * macs_qk + bits_pv * macs_pv
        else:
            (macs,), (w_bits, a_bits) = call.macs, _layer_bits(call.module, call.dtype)
            name, bit_ops = call.name, macs * w_bits * a_bits
        rows.append({"name": name, "macs": macs, "bops": bit_ops, "w_bits": w_bits, "a_bits": a_bits})
    return {"macs": sum(r["macs"] for r in rows), "bops": sum(r["bops"] for r in rows), "layers": rows}
