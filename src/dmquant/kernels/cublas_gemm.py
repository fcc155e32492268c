"""W8A8 GEMMs on PyTorch's vendor matmuls: cuBLASLt's fp8 ``torch._scaled_mm`` and int8 ``torch._int_mm``.

Where one of them takes a call, it is the fastest Linear path we have on Hopper: at 8192³ on an H100,
``_scaled_mm`` ran 2.5× and ``_int_mm`` 2.2× faster than the Triton kernels of
:mod:`~dmquant.kernels.triton_gemm` (``bench/results/layer-speed/NVIDIA-H100-80GB-HBM3.json``). They take the
A operand those kernels take (:func:`~dmquant.kernels.operands.quantize_activations`), so a layer computes
the same function on either path; the Triton kernels keep the calls the vendor GEMMs refuse (``M ≤ 16`` for int8,
widths that are not multiples of 8 or 16) and the formats they lack (packed int4, W4A16).

* **INT8**: ``acc = _int_mm(c_x, c_wᵀ)`` (int32, exact), then the epilogue of Jacob et al. 2018, eq. 7 with one
  group per row, in int32 before the conversion to float, in the Triton kernels' order::

      y[m, n] = s_x[m] · s_w[n] · (acc[m, n] − z_w[n] · Σ_k c_x[m, k] + z_x · (K · z_w[n] − Σ_k c_w[n, k])) + b[n]

  plain torch operations after the GEMM, which ``torch.compile`` fuses into one pass over the output.
* **FP8**: ``acc = _scaled_mm(a, wᵀ)``; for bf16 outputs the scales ``s_x[m]`` (a static one repeated per row)
  and ``s_w[n]`` and the bias are applied in cuBLASLt's epilogue (row-wise scaling), otherwise the fp32 product is
  scaled as above. Hopper's fp8 tensor cores add into an accumulator with fewer mantissa bits than fp32; by
  default cuBLASLt promotes the partial sums into fp32 as it goes (``use_fast_accum=False``), the accuracy the
  simulated model assumes. ``GemmOperands.fast_accumulation`` lets the tensor cores accumulate without that
  promotion (``use_fast_accum=True``, torchao's default for its fp8 rows): cuBLASLt then picks other kernels, at a
  cost in fidelity that ``bench/fidelity.py`` measures; at UNet and DiT shapes on an H200 they took within 3 % of
  the default's time (``bench/results/speed``).

Requirements checked by :func:`vendor_takes`: CUDA tensors, per-channel weight parameters (integer zero points),
and the shapes cuBLASLt accepts — int8: ``M > 16``, ``K`` and ``N`` multiples of 8; fp8: ``K`` and ``N``
multiples of 16. The functions run on CPU too (PyTorch has CPU implementations of both ops), which is how they
are tested without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .operands import GemmOperands


def vendor_takes(operands: GemmOperands) -> bool:
    """Whether ``_int_mm`` (W8A8-INT8) or ``_scaled_mm`` (W8A8-FP8) computes this call on its device."""
    return operands.a.is_cuda and vendor_shapes_fit(operands)


def vendor_shapes_fit(operands: GemmOperands) -> bool:
    """Whether a call's formats and shapes are ones cuBLASLt's int8 or fp8 GEMM accepts (any device)."""
    a, w = operands.a, operands.w
    if operands.group_size or a.dim() != 2:
        return False
    rows, depth, channels = a.shape[0], operands.depth, w.shape[0]
    if operands.act == "int8" and operands.weight == "int8":
        integer_zero = operands.w_zero is None or not operands.w_zero.is_floating_point()
        return integer_zero and rows > 16 and depth % 8 == 0 and channels % 8 == 0
    if operands.act == "fp8" and operands.weight == "fp8":
        return depth % 16 == 0 and channels % 16 == 0
    return False


def vendor_gemm(operands: GemmOperands, out_dtype: torch.dtype) -> Tensor:
    """``y = x · Wᵀ + b`` (M, N) in ``out_dtype`` for a call :func:`vendor_takes` accepts (``a``: (M, K))."""
    gemm = {"int8": int8_gemm, "fp8": fp8_gemm}[operands.act]
    return gemm(operands, out_dtype)


def _scaled(product: Tensor, operands: GemmOperands, out_dtype: torch.dtype) -> Tensor:
    """``s_x[m] · (product[m, n] · s_w[n]) + b[n]`` in fp32, then ``out_dtype``: the Triton kernels' epilogue."""
    out = product * operands.w_scale[:, 0] * operands.x_scale[:, None]
    if operands.bias is not None:
        out = out + operands.bias.float()
    return out.to(out_dtype)


def int8_gemm(operands: GemmOperands, out_dtype: torch.dtype) -> Tensor:
    """W8A8-INT8 on ``torch._int_mm`` with eq. 7's zero-point corrections (see the module docstring)."""
    a = operands.a.contiguous()
    acc = torch._int_mm(a, operands.w.t())
    zero = None if operands.w_zero is None else operands.w_zero[:, 0]
    if zero is not None:
        acc = acc - zero * a.sum(dim=1, dtype=torch.int32)[:, None]
    if operands.x_zero is not None:
        folded_zero = 0 if zero is None else operands.depth * zero
        acc = acc + operands.x_zero * (folded_zero - operands.w_colsum[:, 0])
    return _scaled(acc.float(), operands, out_dtype)


def fp8_gemm(operands: GemmOperands, out_dtype: torch.dtype) -> Tensor:
    """W8A8-FP8 on ``torch._scaled_mm``: row-wise scales in cuBLASLt's epilogue for bf16 outputs (see the module
    docstring), an fp32 product scaled by torch operations otherwise."""
    a, w_t = operands.a.contiguous(), operands.w.t()
    rows = a.shape[0]
    if out_dtype == torch.bfloat16:
        x_scale = operands.x_scale.reshape(-1, 1).expand(rows, 1).contiguous()
        bias = None if operands.bias is None else operands.bias.to(torch.bfloat16)
        return torch._scaled_mm(
            a, w_t, scale_a=x_scale, scale_b=operands.w_scale.reshape(1, -1), bias=bias, out_dtype=torch.bfloat16,
            use_fast_accum=operands.fast_accumulation,
        )  # fmt: skip
    one = torch.ones((), dtype=torch.float32, device=a.device)
    product = torch._scaled_mm(
        a, w_t, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=operands.fast_accumulation
    )
    return _scaled(product, operands, out_dtype)
