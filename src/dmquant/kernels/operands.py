"""A GEMM call's operands in the kernels' layouts: the A operand quantized by plain torch operations, the
weight parameters as (N, groups) arrays, validated once for every kernel that takes them (Triton's, cuBLASLt's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.primitives import FP8_E4M3, choose_qparams
from . import triton_quantize
from .weights import GROUP_ALIGNMENT, weight_colsums

#: Largest magnitude of float8 e4m3 (``torch.float8_e4m3fn``).
FP8_MAX = FP8_E4M3.max_value


def fp8_scales_from_absmax(absmax: Tensor) -> Tensor:
    """Dynamic fp8 scales ``max|x| / 448`` as float32, kept above zero so that all-zero rows quantize to 0."""
    return choose_qparams(-absmax, absmax, FP8_E4M3, symmetric=True, eps=torch.finfo(torch.float32).tiny)[0]


def fp8_row_scales(x: Tensor) -> Tensor:
    """Per-row (token) fp8 scales of ``x`` (..., K) flattened to (M,).

    A torch reduction, not a Triton pass: one bandwidth-bound read of ``x`` that torch already does at full
    speed, after which each row is divided by its scale exactly as by a static one.
    """
    return fp8_scales_from_absmax(x.reshape(-1, x.shape[-1]).abs().amax(dim=1))


def _scale_tensor(x_scale: float | Tensor | None, device: torch.device) -> Tensor:
    """The activation scale as float32 on ``device``; a Python float costs a small host-to-device copy per call."""
    if x_scale is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    if isinstance(x_scale, Tensor):
        return x_scale.to(device=device, dtype=torch.float32).reshape(-1)
    return torch.full((1,), float(x_scale), dtype=torch.float32, device=device)


def _zero_tensor(x_zero: int | Tensor | None, device: torch.device) -> Tensor | None:
    """The activation zero point as a (1,) int32 tensor on ``device``, None for 0.

    An int is checked against the int8 range here; a tensor is taken as it is (checking its value would wait for
    the GPU; :class:`~dmquant.kernels.layers.KernelActivation`'s are in range by construction: 8-bit zero points
    shifted into ``[-128, 127]``). A tensor keeps ``torch.compile`` from specializing a graph on the value: layers
    that differ only in their zero points then share one compiled graph.
    """
    if isinstance(x_zero, Tensor):
        return x_zero.to(device=device, dtype=torch.int32).reshape(1)
    if x_zero is None or int(x_zero) == 0:
        return None
    if not -128 <= int(x_zero) <= 127:
        raise ValueError(f"the activation zero point {x_zero} is outside the int8 range")
    return torch.full((1,), int(x_zero), dtype=torch.int32, device=device)


def _group_array(values: Tensor | None, rows: int, groups: int, dtype: torch.dtype) -> Tensor | None:
    """Per-(channel, group) parameters as a contiguous (N, groups) array of ``dtype`` (no copy when they are)."""
    return None if values is None else values.reshape(rows, groups).to(dtype).contiguous()


def _zero_point_dtype(w_zero: Tensor | None) -> torch.dtype:
    """int32 for integer zero points (exact int32 corrections), float32 for float ones."""
    return torch.float32 if w_zero is not None and w_zero.is_floating_point() else torch.int32


def correctly_rounded_quotient(x: Tensor, scale: Tensor) -> Tensor:
    """``x / s`` correctly rounded to float32 (the simulated quantizer's quotient), eager or compiled.

    Eager torch divides float32 tensors correctly rounded, but the Triton code ``torch.compile`` generates divides
    with ``div.full.f32``, which is within 2 ulp and moves codes across rounding boundaries. Compiled, the quotient
    is taken in float64 (``div.rn.f64``) and rounded once to float32, which equals the correctly rounded float32
    quotient: double rounding is innocuous for division when the wider format has at least 2p + 2 bits, 53 ≥ 50
    (S. A. Figueroa, "When is double rounding innocuous?", SIGNUM Newsletter 30(3), 1995).
    """
    if torch.compiler.is_compiling():
        return (x.double() / scale.double()).float()
    return x.float() / scale


def fp8_codes_by_reciprocal(x: Tensor, scale: Tensor) -> Tensor:
    """``clamp(x · (1/s), ±448)`` cast to e4m3: fp8 codes as compiled code computes them.

    The exact quotient (:func:`correctly_rounded_quotient`) costs a float64 division per element: the likeliest
    reason why the producer kernels with the quantization fused in ran longer than bf16's while moving fewer bytes
    (a LayerNorm quantizing for Q, K and V: 47 µs against 18 µs at 4,096 tokens × 1,152 on an H100,
    ``bench/results/block-kernels`` and its notes; not yet confirmed by a counter or a rerun). ``x · (1/s)`` is
    within 1.5 ulp of float32 of the quotient, and e4m3 keeps 3 mantissa bits: a code can differ from the simulated
    quantizer's, by one fp8 step, only where the quotient lies within 1.5 float32 ulp of a midpoint between two
    e4m3 values (none of 4M random values did in ``tests/test_kernels_quantize.py``). That is far inside the fp8
    GEMMs' own accumulation error, which the fidelity bench measures against the floor. Int8 codes, whose ties are
    common, keep the exact quotient.
    """
    return (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_activations(x: Tensor, scale: Tensor, zero: Tensor | int | None, act: str) -> Tensor:
    """The A operand of a kernel from float activations, computed as the simulated quantizer computes it.

    ``act="int8"``: codes ``clamp(round(x / s) + z, -128, 127)`` (round half to even, the division correctly
    rounded in float32); ``"fp8"``: ``clamp(x / s, ±448)`` cast to e4m3 (round to nearest even; compiled, by the
    reciprocal, :func:`fp8_codes_by_reciprocal`); ``"none"``
    (W4A16): ``x`` itself. ``scale`` broadcasts against ``x`` (one value, or one per row as an (M, 1) column),
    ``zero`` too (a one-element tensor or an int; None: 0).
    Plain torch operations, elementwise, keeping ``x``'s strides: ``torch.compile`` fuses them into the kernel
    that produces ``x`` (a GroupNorm, a SiLU), so the activations reach memory once, already 8-bit. Run eagerly on
    CUDA with one scale, ``x`` is quantized in one pass instead (:mod:`~dmquant.kernels.triton_quantize`, the same
    codes), where those operations would be five kernels; a strided ``x`` (the NHWC view a convolution takes of an
    NCHW activation, one part of a split convolution) is made contiguous first, one 16-bit copy, and its codes come
    out contiguous: the layout the kernels copy them into next anyway. Through the torch operations, SD-1.5's three
    resampling convolutions, which run outside the compiled blocks on NCHW inputs, took 0.67 ms of the UNet's
    22 ms at batch 8 on an H100 (four float32 passes and a strided copy of the codes each).
    """
    if act == "none":
        return x
    if x.is_cuda and not torch.compiler.is_compiling() and scale.numel() == 1:
        dense = x if triton_quantize.takes(x, scale) else x.contiguous()
        return triton_quantize.quantize(dense, scale, _zero_tensor(zero, x.device) if zero is not None else None, act)
    if act == "fp8" and torch.compiler.is_compiling():
        return fp8_codes_by_reciprocal(x, scale)
    scaled = correctly_rounded_quotient(x, scale)
    if act == "int8":
        codes = torch.round(scaled) if zero is None else torch.round(scaled) + zero
        return torch.clamp(codes, -128, 127).to(torch.int8)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@dataclass(frozen=True)
class GemmOperands:
    """What the Linear and Conv2d wrappers pass to their kernels, validated and in the kernels' layouts.

    ``a`` is the A operand (:func:`quantize_activations`); ``x_scale`` the (1,) or (M,) float32 activation
    scale applied in the epilogue; the weight parameters are (N, groups) arrays; ``group_size`` 0 means one
    group per row; ``x_zero`` is the (1,) int32 zero point of int8 activation codes, None for none (or 0).
    ``fast_accumulation`` (fp8 on cuBLASLt only, :mod:`~dmquant.kernels.cublas_gemm`): accumulate without
    promoting the tensor cores' partial sums to fp32; the Triton kernels promote once per K tile regardless.
    """

    a: Tensor
    x_scale: Tensor
    x_zero: Tensor | None
    w: Tensor
    w_scale: Tensor
    w_zero: Tensor | None
    w_colsum: Tensor | None
    bias: Tensor | None
    act: str
    weight: str
    group_size: int
    depth: int
    fast_accumulation: bool = False

    def op_arguments(self) -> tuple:
        """The positional arguments of the ``dmquant::`` custom ops, in order."""
        return (self.a, self.w, self.x_scale, self.w_scale, self.w_zero, self.w_colsum, self.bias, self.x_zero,
                self.act, self.weight, self.group_size, self.depth)  # fmt: skip


def gemm_operands(
    x: Tensor,
    x_scale: float | Tensor | None,
    x_zero: int | Tensor | None,
    w: Tensor,
    w_scale: Tensor,
    w_zero: Tensor | None,
    w_colsum: Tensor | None,
    bias: Tensor | None,
    *,
    act: str,
    weight: str,
    depth: int,
    group_size: int | None,
    rows: int,
    fast_accumulation: bool = False,
) -> GemmOperands:
    """Validate a call's arguments and quantize ``x`` (any view: the A operand keeps its strides).

    ``rows`` is M, for a per-row (dynamic) activation scale, which ``x`` must have as its leading dimension.
    """
    if act == "none" and x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"W4A16 keeps activations in bf16/fp16, got {x.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be float32, bf16 or fp16, got {x.dtype}")
    if x.numel() >= 2**31 or w.numel() >= 2**31:
        raise ValueError("the kernels address tensors with 32-bit offsets: fewer than 2**31 elements")
    channels = w.shape[0]
    group = group_size if group_size and group_size != depth else 0
    if group and (depth % group or group % GROUP_ALIGNMENT):
        raise ValueError(f"group size {group} must divide K={depth} and be a multiple of {GROUP_ALIGNMENT} (or be K)")
    groups = depth // group if group else 1
    scale = _scale_tensor(x_scale, x.device)
    if scale.numel() not in (1, rows):
        raise ValueError(f"the activation scale has {scale.numel()} values, expected 1 or {rows}")
    x_zero = _zero_tensor(x_zero, x.device) if act == "int8" else None
    if x_zero is not None and w_colsum is None:
        w_colsum = weight_colsums(w, group or None)
    per_row = scale.reshape(-1, *[1] * (x.dim() - 1)) if scale.numel() > 1 else scale
    return GemmOperands(
        a=quantize_activations(x, per_row, x_zero, act),
        x_scale=scale,
        x_zero=x_zero,
        w=w,
        w_scale=_group_array(w_scale, channels, groups, torch.float32),
        w_zero=_group_array(w_zero, channels, groups, _zero_point_dtype(w_zero)),
        w_colsum=None if x_zero is None else _group_array(w_colsum, channels, groups, torch.int32),
        bias=None if bias is None else bias.contiguous(),
        act=act,
        weight=weight,
        group_size=group,
        depth=depth,
        fast_accumulation=fast_accumulation,
    )
