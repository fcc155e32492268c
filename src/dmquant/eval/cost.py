"""What a quantized configuration costs: storage size and bit operations (BOPs).

BOPs count each multiply-accumulate of a layer as ``weight bits × activation bits`` (the
convention of the quantization literature, e.g. van Baalen et al. 2020, "Bayesian Bits",
and the LDM quantization strategies paper): a Linear/Conv2d contributes
``MACs × b_w × b_a``, an attention module ``MACs(Q·Kᵀ) × b_q × b_k + MACs(P·V) × b_p × b_v``.
Full-precision operands count with their dtype's bit width.
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


def _layer_bops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> tuple[int, int, int]:
    quantized = isinstance(module, QUANT_LAYERS)
    w_bits = _bits(module.weight_quantizer if quantized else None, module.weight.dtype)
    a_bits = _bits(module.input_quantizer if quantized else None, inputs[0].dtype)
    return layer_macs(module, output), w_bits, a_bits


def _attention_bops(module: Attention, args: tuple, kwargs: dict) -> tuple[int, int]:
    macs_qk, macs_pv = attention_macs(module, args, kwargs)
    quant = getattr(module, MATMUL_ATTRIBUTE, None)
    dtype = (args[0] if args else kwargs["hidden_states"]).dtype
    bits_qk = _bits(quant and quant.query, dtype) * _bits(quant and quant.key, dtype)
    bits_pv = _bits(quant and quant.probs, dtype) * _bits(quant and quant.value, dtype)
    return macs_qk + macs_pv, bits_qk * macs_qk + bits_pv * macs_pv


@torch.no_grad()
def bops(model: nn.Module, run_forward: Callable[[], Any]) -> dict[str, Any]:
    """BOPs and MACs of one forward pass (``run_forward`` calls the model once), per layer and total."""
    rows: list[dict[str, Any]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):

            def layer_hook(m, inputs, output, name=name):
                macs, w_bits, a_bits = _layer_bops(m, inputs, output)
                rows.append(
                    {"name": name, "macs": macs, "bops": macs * w_bits * a_bits, "w_bits": w_bits, "a_bits": a_bits}
                )

            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, Attention):

            def attention_hook(m, args, kwargs, output, name=name):
                macs, bit_ops = _attention_bops(m, args, kwargs)
                rows.append(
                    {"name": f"{name} (matmuls)", "macs": macs, "bops": bit_ops, "w_bits": None, "a_bits": None}
                )

            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return {"macs": sum(r["macs"] for r in rows), "bops": sum(r["bops"] for r in rows), "layers": rows}
