"""One-pass activation quantization for eager CUDA calls: a float tensor to the 8-bit A operand of a kernel.

:func:`~dmquant.kernels.operands.quantize_activations` is written as plain torch operations so that
``torch.compile`` fuses it into the kernel that produces the activation. Run eagerly, those operations are five
kernels (upcast, divide, round, clamp, cast), each a pass over the tensor in float32: for an 8192×1280 input they
took 0.12 ms on an H100 where the FP8 GEMM after them took 0.016 ms (``bench/results/layer-speed``). No library
offers a static-scale quantize with the simulated quantizer's exact rounding, so this module is that one pass by
hand: read ``x`` once, write one byte per element.

It computes exactly what the torch operations compute:

* ``"int8"``: ``clamp(round_half_even(x / s) + z, -128, 127)``. The quotient is the correctly rounded float32
  ``x / s`` (``div_rn``); rounding to the nearest integer, ties to even, is ``(q + 1.5·2²³) − 1.5·2²³`` in float32
  for ``|q| ≤ 2²²`` (the sum's unit in the last place is 1, so the addition rounds ``q`` to an integer in the
  current mode, round-to-nearest-even), with ``q`` first clamped to ``±2²²``, which changes no clamped code.
* ``"fp8"``: ``clamp(x / s, ±448)`` cast to e4m3 with round-to-nearest-even (``cvt.rn.satfinite`` on the GPU).

Dense tensors of any layout (contiguous, channels-last) are read in storage order, one scale (and zero point) per
tensor; :func:`~dmquant.kernels.operands.quantize_activations` makes a strided view contiguous before calling it.
Per-row scales and CPU tensors take the torch operations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.primitives import FP8_E4M3

#: 1.5 · 2²³: adding it to a float32 ``|q| ≤ 2²²`` rounds ``q`` to an integer (ties to even).
_ROUNDING_MAGIC = tl.constexpr(12582912.0)
_ROUNDING_RANGE = tl.constexpr(4194304.0)
_FP8_MAX = tl.constexpr(FP8_E4M3.max_value)
_BLOCK = 4096

OUTPUT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, scale_ptr, zero_ptr, numel,
                     ACT: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    quotient = tl.div_rn(x, tl.load(scale_ptr))
    if ACT == "int8":
        bounded = tl.minimum(tl.maximum(quotient, -_ROUNDING_RANGE), _ROUNDING_RANGE)
        codes = (bounded + _ROUNDING_MAGIC) - _ROUNDING_MAGIC
        if HAS_ZERO:
            codes += tl.load(zero_ptr).to(tl.float32)
        out = tl.minimum(tl.maximum(codes, -128.0), 127.0).to(tl.int8)
    else:
        out = tl.minimum(tl.maximum(quotient, -_FP8_MAX), _FP8_MAX).to(tl.float8e4nv)
    tl.store(out_ptr + offsets, out, mask=mask)


def takes(x: Tensor, scale: Tensor) -> bool:
    """Whether :func:`quantize` computes this call: a dense tensor (contiguous or channels-last) and one scale."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return dense and scale.numel() == 1


def quantize(x: Tensor, scale: Tensor, zero: Tensor | None, act: str) -> Tensor:
    """``x`` as ``act`` codes (``"int8"`` or ``"fp8"``) in one pass, with ``x``'s layout; see the module docstring.

    ``scale`` is a one-element float32 tensor, ``zero`` a one-element integer tensor or None (int8 only).
    """
    out = torch.empty_like(x, dtype=OUTPUT_DTYPES[act])
    numel = x.numel()
    if numel:
        zero_arg = zero if zero is not None else scale
        _quantize_kernel[(triton.cdiv(numel, _BLOCK),)](
            x, out, scale, zero_arg, numel, ACT=act, HAS_ZERO=zero is not None, BLOCK=_BLOCK
        )
    return out
