"""One-pass dequantization of a packed int4 weight for eager CUDA calls: the W4A16 ``"dequant"`` path's first step.

That path (:mod:`~dmquant.kernels.paths`) turns the 4-bit codes into a 16-bit weight per call and runs the vendor
GEMM on it. Written as torch operations (:meth:`~dmquant.kernels.weights.LowBitWeight.dequantize`), the
dequantization is one kernel under ``torch.compile``; run eagerly it is a chain of passes over the ``N·K`` weight
(unpack the nibbles, subtract the zero point, scale, cast). Measured eagerly that way, the path took 0.12 ms for a
1536×1536 weight and 0.69 ms for 9216×1536 on an H100, against 0.012–0.017 ms for the Triton W4A16 GEMM on the same
layers at one row (SD3's architecture at batch 1, ``bench/results/speed-deployment`` notes), so the path
measurement never kept it. No library dequantizes this packing (two codes per byte, the even element in the low
nibble, float32 scales and zero points per group of columns), so this module is that one pass by hand: read each
byte once, write its two values in the compute dtype.

It computes exactly what the torch operations compute: ``(u − z) · s`` in float32 for the nibble ``u`` and its
group's zero point ``z`` and scale ``s``, rounded once to the output dtype (round to nearest even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 2048  # bytes per program: 4,096 weights


@triton.jit
def _dequantize_int4_kernel(stored_ptr, scale_ptr, zero_ptr, out_ptr, num_bytes, bytes_per_row, groups,
                            GROUP_BYTES: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_bytes
    packed = tl.load(stored_ptr + offsets, mask=mask, other=0).to(tl.int32)
    row = offsets // bytes_per_row
    parameter = row * groups + (offsets % bytes_per_row) // GROUP_BYTES  # both nibbles lie in one group
    scale = tl.load(scale_ptr + parameter, mask=mask, other=1.0)
    zero = tl.load(zero_ptr + parameter, mask=mask, other=0.0)
    low = ((packed & 15).to(tl.float32) - zero) * scale
    high = ((packed >> 4).to(tl.float32) - zero) * scale
    tl.store(out_ptr + 2 * offsets, low.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + 2 * offsets + 1, high.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int4(stored: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """The ``(N, K)`` weight in ``dtype`` from its packed codes ``stored`` (``(N, K // 2)`` uint8) and its
    ``(N, K // group_size)`` float32 ``scale`` and ``zero``; ``group_size`` is even (as int4 packing requires)."""
    rows, bytes_per_row = stored.shape
    out = torch.empty(rows, 2 * bytes_per_row, dtype=dtype, device=stored.device)
    num_bytes = stored.numel()
    if num_bytes:
        _dequantize_int4_kernel[(triton.cdiv(num_bytes, _BLOCK),)](
            stored.contiguous(), scale.contiguous(), zero.contiguous(), out, num_bytes, bytes_per_row,
            scale.shape[1], GROUP_BYTES=group_size // 2, BLOCK=_BLOCK,
        )  # fmt: skip
    return out
