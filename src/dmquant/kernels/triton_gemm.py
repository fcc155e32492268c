"""Triton GEMMs that run quantized Linear layers in real low precision on Hopper GPUs (H100/H200).

W8A8 Linears (and 1×1 convolutions) whose shapes cuBLASLt takes run on its int8 / fp8 GEMMs instead
(:mod:`~dmquant.kernels.cublas_gemm`), which are faster than these kernels at those shapes; ``backend="triton"``
keeps them here. Every kernel computes ``y = x · Wᵀ + b`` for ``x`` of shape ``(M, K)`` (any leading shape,
flattened) and a weight of logical shape ``(N, K)``. The wrappers quantize ``x`` once, elementwise, with plain torch
operations (:func:`~dmquant.kernels.operands.quantize_activations`), and the kernels read the 8-bit A operand it
gives: one byte per input, loads pipelined with ``cp.async`` and no ALU work before the tensor cores. Under
``torch.compile`` that quantization fuses into the kernel that produces ``x`` (a GroupNorm, an activation), so ``x``
reaches memory once, already 8-bit.
The launches are torch custom ops (``dmquant::quantized_linear``, ``dmquant::quantized_conv2d``), so
``torch.compile`` keeps a converted model in one graph and CUDA graphs capture them.

Modes (activation × weight):

* **W8A8-INT8** (:func:`int8_linear`): ``c_x = clamp(round_half_even(x / s_x) + z_x, -128, 127)`` (int8,
  standing for ``s_x · (c_x − z_x)``) times int8 weight codes ``c_w`` standing for ``s_w[n] · (c_w − z_w[n])``,
  int32 accumulation on the tensor cores.
* **W4A8** (:func:`int4_linear`, ``act="int8"``): the same int8 activations times int4 weights unpacked in
  registers to their unsigned nibble ``u`` in ``[0, 15]`` (an int8 operand), with group-wise parameters
  ``s_w[n, g] · (u − z_w[n, g])``; one int32 accumulator per group of ``G`` inputs, scaled into an fp32 sum at
  the end of each group.
* **W4A16** (:func:`int4_linear`, ``act="none"``): bf16/fp16 activations times int4 weights dequantized in
  registers to ``((u − z_w[n, g]) · s_w[n, g])`` in the activation dtype, fp32 accumulation.
* **W8A8-FP8** (:func:`fp8_linear`): ``x / s_x`` saturated to ±448 and cast to e4m3 times e4m3 weights with a
  per-output-channel scale, fp32 accumulation; ``s_x`` is static per tensor or dynamic per row (token).

The integer modes apply the identity of Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", eq. 7, per group ``g`` of ``G`` inputs (``G = K``: per channel)::

    y[m, n] = s_x · Σ_g s_w[n, g] · ( acc_g[m, n] − z_w[n, g] · Σ_{k∈g} c_x[m, k]
                                      − z_x · Σ_{k∈g} c_w[n, k] + G · z_x · z_w[n, g] ) + b[n],
    acc_g[m, n] = Σ_{k∈g} c_x[m, k] · c_w[n, k]   (exact in int32).

The weight column sums ``Σ_{k∈g} c_w[n, k]`` are constants (:func:`weight_colsums`, computed once at conversion);
the activation row sums are reduced in-kernel from the code tile already in registers, and only when the
weights carry zero points. fp8: ``y = acc · s_x[m] · s_w[n] + b[n]``. See ``tests/integer_reference.py`` for the
exact reference these kernels are tested against.

Operand layouts: ``x`` (M, K) with any strides, float32/bf16/fp16 (bf16/fp16 only for W4A16); int8/fp8 weights
(N, K) row-major; int4 weights packed (N, K/2) uint8, byte ``j`` of a row holding input ``2j`` in its low nibble
and ``2j + 1`` in its high nibble (``dmquant.core.packing.pack_codes(codes, 4, qmin)`` with ``u = code − qmin``);
``s_w``, ``z_w`` and the column sums (N, K/G). The output is (..., N) in the activation's dtype.

Numerics of the quantization: the codes are ``torch.round(x.float() / s_x)`` (the correctly rounded float32
quotient, ties to even) plus ``z_x``, clamped — the simulated quantizer's computation, so they are its codes
exactly; fp8 values are ``x / s_x`` saturated and cast by torch (round to nearest even).

Hopper constraints relied on: ``tl.dot`` of int8×int8→int32, e4m3×e4m3→fp32 and bf16/fp16→fp32 lowers to
``wgmma`` when ``num_warps`` is a multiple of 4, ``BLOCK_M`` a multiple of 64 and ``BLOCK_K`` ≥ 32 (8-bit) or
≥ 16 (16-bit); 8-bit wgmma needs both operands K-major, which the (N, K) weight layout gives directly (tiles are
loaded as (BLOCK_N, BLOCK_K) rows and transposed as a view). Configs with ``BLOCK_M = 16`` serve ``M ≤ 16`` (e.g.
the timestep embedding) through ``mma.sync`` (fp8 upcast exactly to fp16 there). The fp8 dot promotes its partial
sums to fp32 once per K tile (``max_num_imprecise_acc = BLOCK_K``): Hopper's fp8 accumulation keeps fewer
mantissa bits than fp32. Every config of ``_HOPPER_CONFIGS`` was compiled for sm_90a on a machine without a GPU
(``triton.compile`` with ``GPUTarget("cuda", 90, 32)``, ``ptxas -v``) in every mode, Linear and Conv2d: wgmma
for ``BLOCK_M ≥ 64``, global loads pipelined with ``cp.async``, no register spills. W4A8 with groups keeps a
second (per-group) accumulator and is limited to ``BLOCK_M = 64`` tiles, which spill at 128. Under
``TRITON_INTERPRET=1`` a single small config is used instead of autotuning; the interpreter cannot multiply bf16
operands, so W4A16 is verified there with fp16 activations.

The A-tile addressing is a parameter of :func:`quantized_gemm_tile` (a ``tl.constexpr`` function), so the
implicit-GEMM convolution of :mod:`dmquant.kernels.triton_conv` shares the main loop and epilogue.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from .cublas_gemm import vendor_gemm, vendor_takes
from .operands import GemmOperands, fp8_row_scales, gemm_operands

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def tile_starts(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of this program's output tile, programs ordered in groups of ``GROUP_M`` row tiles
    (L2 reuse)."""
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % rows_in_group
    pid_n = (pid % programs_per_group) // rows_in_group
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile (:func:`tile_starts`)."""
    m_start, n_start = tile_starts(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return m_start + tl.arange(0, BLOCK_M), n_start + tl.arange(0, BLOCK_N)


@triton.jit
def activation_scale(x_scale_ptr, offs_m, m_valid, stride_x_scale, ACT: tl.constexpr):
    """Per-row activation scale (``stride_x_scale = 0``: one per tensor); 1 for W4A16's unquantized inputs."""
    if ACT == "none":
        scale = tl.full(offs_m.shape, 1.0, tl.float32)
    else:
        scale = tl.load(x_scale_ptr + offs_m * stride_x_scale, mask=m_valid, other=1.0).to(tl.float32)
    return scale


@triton.jit
def _row_sums(codes):
    """``Σ_k codes[m, k]`` in int32: what ``tl.sum`` reduces to, spelled so that Triton's interpreter recognizes a
    numpy sum (its generic reduction is slow) even when Triton was imported before ``TRITON_INTERPRET`` was set."""
    return tl.reduce(codes.to(tl.int32), 1, tl.standard._sum_combine)


@triton.jit
def activation_zero(x_zero_ptr, HAS_X_ZERO: tl.constexpr):
    """The activation zero point ``z_x`` (int32), read from its one-element tensor; 0 without one."""
    zero = 0
    if HAS_X_ZERO:
        zero = tl.load(x_zero_ptr).to(tl.int32)
    return zero


@triton.jit
def _activation_operand(loaded, a_mask, k_valid, x_zero, HAS_X_ZERO: tl.constexpr):
    """The A operand from a tile loaded with 0 outside ``a_mask``: int8 codes with a zero point get ``z_x`` there
    instead (the code of the real value 0, which a convolution's zero padding must have), except past ``K``
    (``k_valid`` false), where they stay 0 to keep out of the row sums. Other tiles are right as loaded."""
    operand = loaded
    if HAS_X_ZERO:
        operand = tl.where(a_mask | ~k_valid[None, :], loaded, x_zero.to(tl.int8))
    return operand


@triton.jit
def _load_weights(weight, k_start, offs_n, n_valid, K, WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight tile (BLOCK_N, BLOCK_K) as stored, K contiguous: int8 codes, e4m3 values or int4 nibbles.

    ``weight = (w_ptr, stride_wn, stride_wk)``. Packed int4 loads its (BLOCK_N, BLOCK_K / 2) bytes once and
    interleaves the low nibbles (inputs ``2j``) with the high ones (inputs ``2j + 1``) in registers.
    """
    w_ptr, stride_wn, stride_wk = weight
    if WEIGHT == "int4":
        offs_byte = k_start // 2 + tl.arange(0, BLOCK_K // 2)
        mask = n_valid[:, None] & (offs_byte < K // 2)[None, :]
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_byte[None, :] * stride_wk, mask=mask, other=0)
        tile = tl.reshape(tl.join(packed & 0xF, packed >> 4), (offs_n.shape[0], BLOCK_K))
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = n_valid[:, None] & (offs_k < K)[None, :]
        tile = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    return tile


@triton.jit
def _group_parameters(ptr, group, groups, offs_n, n_valid):
    """One group's per-output-channel parameter (scale, zero point or column sum) from an (N, groups) array."""
    return tl.load(ptr + offs_n * groups + group, mask=n_valid, other=0)


@triton.jit
def _weight_operand(tile, params, group, groups, offs_n, n_valid, operand_dtype,
                    ACT: tl.constexpr, WEIGHT: tl.constexpr, HAS_W_ZERO: tl.constexpr):  # fmt: skip
    """The B operand (BLOCK_K, BLOCK_N): int4 nibbles as int8 codes, or dequantized to ``operand_dtype`` (W4A16).

    ``params = (w_scale_ptr, w_zero_ptr, w_colsum_ptr)``.
    """
    if WEIGHT == "int4":
        if ACT == "none":
            w_scale_ptr, w_zero_ptr, _ = params
            values = tile.to(tl.float32)
            if HAS_W_ZERO:
                values -= _group_parameters(w_zero_ptr, group, groups, offs_n, n_valid).to(tl.float32)[:, None]
            scale = _group_parameters(w_scale_ptr, group, groups, offs_n, n_valid)
            operand = (values * scale[:, None]).to(operand_dtype)
        else:
            operand = tile.to(tl.int8)
    else:
        operand = tile
    return tl.trans(operand)


@triton.jit
def dot_accumulate(a, b, acc, ACT: tl.constexpr, BLOCK_K: tl.constexpr):
    if ACT == "int8":
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    elif ACT == "fp8":
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def fold_group(acc, row_sums, x_zero, params, group, groups, group_size, offs_n, n_valid,
                ACT: tl.constexpr, HAS_W_ZERO: tl.constexpr, HAS_X_ZERO: tl.constexpr):  # fmt: skip
    """One group's accumulator in fp32 with its weight scale applied, and eq. 7's corrections for int8 activations.

    W4A16 accumulators already carry the weight scales, applied while dequantizing.
    """
    w_scale_ptr, w_zero_ptr, w_colsum_ptr = params
    if ACT == "none":
        folded = acc
    elif ACT == "fp8":
        folded = acc * _group_parameters(w_scale_ptr, group, groups, offs_n, n_valid)[None, :]
    else:
        integer = acc
        zero = _group_parameters(w_zero_ptr, group, groups, offs_n, n_valid) if HAS_W_ZERO else 0
        if HAS_W_ZERO:
            integer -= zero[None, :] * row_sums[:, None]
        if HAS_X_ZERO:
            colsum = _group_parameters(w_colsum_ptr, group, groups, offs_n, n_valid)
            integer += (x_zero * (group_size * zero - colsum))[None, :]
        folded = integer.to(tl.float32) * _group_parameters(w_scale_ptr, group, groups, offs_n, n_valid)[None, :]
    return folded


@triton.jit
def quantized_gemm_tile(
    a_tile, a_rows, a_geometry, activation, weight, params, offs_m, m_valid, offs_n, n_valid, K,
    ACT: tl.constexpr, WEIGHT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_W_ZERO: tl.constexpr,
    HAS_X_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """This program's (BLOCK_M, BLOCK_N) tile of ``x · Wᵀ`` in fp32, before the activation scale and the bias.

    ``activation = (x_ptr, x_scale_ptr, stride_x_scale, x_zero_ptr)``, ``weight`` and ``params`` as in
    :func:`_load_weights` and :func:`_weight_operand`. ``a_tile(x_ptr, a_rows, a_geometry, offs_k, k_valid)``
    gives the pointers and in-bounds mask of the float A tile at inputs ``offs_k``: the only part that differs
    between a Linear and an implicit-GEMM convolution. ``GROUP_SIZE = 0``: one group over all of K (per-channel
    weight parameters). Returns the tile and the per-row activation scale.
    """
    x_ptr, x_scale_ptr, stride_x_scale, x_zero_ptr = activation
    x_scale = activation_scale(x_scale_ptr, offs_m, m_valid, stride_x_scale, ACT)
    x_zero = activation_zero(x_zero_ptr, HAS_X_ZERO)
    groups = K // GROUP_SIZE if GROUP_SIZE else 1
    group_size = GROUP_SIZE if GROUP_SIZE else K
    # int8 activations with group-wise weights: one integer accumulator per group, folded at the group's end
    FOLD_EACH_GROUP: tl.constexpr = GROUP_SIZE > 0 and ACT == "int8"
    acc_dtype = tl.int32 if ACT == "int8" else tl.float32
    acc = tl.full((BLOCK_M, BLOCK_N), 0, acc_dtype)
    row_sums = tl.full((BLOCK_M,), 0, tl.int32)
    total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        a_ptrs, a_mask = a_tile(x_ptr, a_rows, a_geometry, offs_k, k_valid)
        a = _activation_operand(tl.load(a_ptrs, mask=a_mask, other=0.0), a_mask, k_valid, x_zero, HAS_X_ZERO)
        if ACT == "int8" and HAS_W_ZERO:
            row_sums += _row_sums(a)
        group = k_start // group_size
        w_tile = _load_weights(weight, k_start, offs_n, n_valid, K, WEIGHT, BLOCK_K)
        b = _weight_operand(w_tile, params, group, groups, offs_n, n_valid, a.dtype, ACT, WEIGHT, HAS_W_ZERO)
        acc = dot_accumulate(a, b, acc, ACT, BLOCK_K)
        if FOLD_EACH_GROUP:
            if (k_start + BLOCK_K) % group_size == 0:
                total += fold_group(acc, row_sums, x_zero, params, group, groups, group_size, offs_n, n_valid,
                                     ACT, HAS_W_ZERO, HAS_X_ZERO)  # fmt: skip
                acc = tl.full((BLOCK_M, BLOCK_N), 0, acc_dtype)
                row_sums = tl.full((BLOCK_M,), 0, tl.int32)
    if not FOLD_EACH_GROUP:
        total = fold_group(acc, row_sums, x_zero, params, 0, groups, group_size, offs_n, n_valid,
                            ACT, HAS_W_ZERO, HAS_X_ZERO)  # fmt: skip
    return total, x_scale


@triton.jit
def store_output(total, x_scale, offs_m, m_valid, offs_n, n_valid, out_ptr, stride_om, stride_on, bias_ptr,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """``y = s_x[m] · total + b[n]`` in the output's dtype."""
    out = total * x_scale[:, None] if ACT != "none" else total
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


# ----------------------------------------------------------------------------------------------- autotuning


def gemm_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int, pre_hook=None) -> triton.Config:
    """A tile config of these kernels (programs grouped by 8 row tiles); ``pre_hook`` runs before each launch."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
        pre_hook=pre_hook,
    )


_HOPPER_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). M > 16: wgmma tiles, all free of register spills at sm_90
    # (ptxas -v), BLOCK_K = 32 ones for groups of 32; BLOCK_M = 64 ones also serve W4A8 with groups, whose
    # second (per-group) accumulator spills at BLOCK_M = 128
    *(gemm_config(*shape) for shape in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3)]),
    gemm_config(128, 128, 128, 8, 4),  # (128, 256, 128) would spill: 255 registers and a stack at sm_90
    *(gemm_config(*shape) for shape in [(64, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]),
    *(gemm_config(*shape) for shape in [(128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (64, 128, 32, 4, 4)]),
    # M <= 16 (timestep embeddings, single tokens): mma.sync tiles, narrow in N for more programs
    *(gemm_config(*shape) for shape in [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 64, 64, 4, 4)]),
    *(gemm_config(*shape) for shape in [(16, 64, 32, 4, 4), (16, 128, 64, 4, 3)]),
]
_INTERPRETER_CONFIGS = [gemm_config(16, 32, 32, 4, 1)]


def _tile_fits(tile: dict, args: dict) -> bool:
    """Whether a config is correct for the call (K tiles inside groups) and meant for its M."""
    group = args["GROUP_SIZE"]
    per_group_accumulator = group and args["ACT"] == "int8"
    small_m = args["M"] <= 16
    return (
        (not group or group % tile["BLOCK_K"] == 0)
        and (tile["BLOCK_M"] == 16) == small_m
        and (small_m or not per_group_accumulator or tile["BLOCK_M"] == 64)
    )


def tile_suits(tile: dict, args: dict) -> bool:
    """Whether a K tile suits the operand width (8-bit: long, 16-bit: short), and no tile dimension is wider than
    the problem's (rounded up to a power of two, at least 64 in M and N, 32 in K)."""
    eight_bit = args["ACT"] != "none"
    return (
        (tile["BLOCK_K"] >= 64 if eight_bit else tile["BLOCK_K"] <= 64)
        and tile["BLOCK_K"] <= max(32, triton.next_power_of_2(args["K"]))
        and tile["BLOCK_N"] <= max(64, triton.next_power_of_2(args["N"]))
        and tile["BLOCK_M"] <= max(64, triton.next_power_of_2(args["M"]))
    )


def _usable_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs worth benchmarking for a call: those that fit it, narrowed to those that suit it if any do."""
    args = {**named_args, **kwargs}
    fitting = [c for c in configs if _tile_fits(c.kwargs, args)]
    return [c for c in fitting if tile_suits(c.kwargs, args)] or fitting


def quick_bench(kernel_call, quantiles=None):
    """Triton's ``do_bench`` with 5 ms of warm-up and 20 ms of timing per config instead of 25 and 100: a model
    has dozens of GEMM shapes, and the default makes its first call take minutes."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


#: Autotuning shared by the Linear and Conv2d kernels: keyed on the M bucket, N, K and the operand formats; the
#: choices are kept in Triton's cache directory, so a later process skips the benchmarking.
autotune_quantized_gemm = triton.autotune(
    configs=_INTERPRETER_CONFIGS if INTERPRETING else _HOPPER_CONFIGS,
    key=["m_bucket", "N", "K", "ACT", "WEIGHT", "GROUP_SIZE", "HAS_W_ZERO", "HAS_X_ZERO"],
    prune_configs_by={"early_config_prune": _usable_configs},
    do_bench=quick_bench,
    cache_results=True,
)


# ----------------------------------------------------------------------------------------------- Linear kernel


@triton.jit
def _linear_a_tile(x_ptr, a_rows, a_geometry, offs_k, k_valid):
    """Pointers and mask of the A tile of a Linear: rows ``m`` of ``x`` at inputs ``offs_k``."""
    row_offsets, m_valid = a_rows
    (stride_xk,) = a_geometry
    ptrs = x_ptr + row_offsets[:, None] + offs_k[None, :] * stride_xk
    return ptrs, m_valid[:, None] & k_valid[None, :]


@autotune_quantized_gemm
@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr, x_zero_ptr,
    M, N, K, m_bucket, stride_xm, stride_xk, stride_x_scale, stride_wn, stride_wk, stride_om, stride_on,
    ACT: tl.constexpr, WEIGHT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_W_ZERO: tl.constexpr, HAS_X_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_valid = offs_m < M
    n_valid = offs_n < N
    total, x_scale = quantized_gemm_tile(
        _linear_a_tile, (offs_m * stride_xm, m_valid), (stride_xk,), (x_ptr, x_scale_ptr, stride_x_scale, x_zero_ptr),
        (w_ptr, stride_wn, stride_wk), (w_scale_ptr, w_zero_ptr, w_colsum_ptr), offs_m, m_valid, offs_n, n_valid, K,
        ACT, WEIGHT, GROUP_SIZE, HAS_W_ZERO, HAS_X_ZERO, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    store_output(total, x_scale, offs_m, m_valid, offs_n, n_valid, out_ptr, stride_om, stride_on, bias_ptr,
                 ACT, HAS_BIAS)  # fmt: skip


# ----------------------------------------------------------------------------------------------- Python side


def kernel_arguments(
    a: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, w_zero: Tensor | None, w_colsum: Tensor | None,
    bias: Tensor | None, x_zero: Tensor | None, act: str, weight: str, group_size: int, depth: int,
) -> dict:  # fmt: skip
    """The keyword arguments shared by the Linear and Conv2d kernels (everything but the A geometry)."""
    return {
        "x_ptr": a,
        "w_ptr": w,
        "bias_ptr": bias,
        "x_scale_ptr": x_scale,
        "w_scale_ptr": w_scale,
        "w_zero_ptr": w_zero,
        "w_colsum_ptr": w_colsum,
        "x_zero_ptr": x_zero,
        "N": w.shape[0],
        "K": depth,
        "stride_x_scale": 1 if x_scale.numel() > 1 else 0,
        "stride_wn": w.stride(0),
        "stride_wk": w.stride(1),
        "ACT": act,
        "WEIGHT": weight,
        "GROUP_SIZE": group_size,
        "HAS_W_ZERO": w_zero is not None,
        "HAS_X_ZERO": x_zero is not None,
        "HAS_BIAS": bias is not None,
    }


def launch_grid(rows: int, channels: int):
    """The 1-D launch grid over output tiles for a config's block sizes."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(channels, meta["BLOCK_N"]),)


def m_bucket(rows: int) -> int:
    """The autotuning bucket of M: its next power of two, capped (large M all tune alike)."""
    return min(triton.next_power_of_2(rows), 16384)


@torch.library.custom_op("dmquant::quantized_linear", mutates_args=())
def quantized_linear(
    a: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, w_zero: Tensor | None, w_colsum: Tensor | None,
    bias: Tensor | None, x_zero: Tensor | None, act: str, weight: str, group_size: int, depth: int,
    out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """``_linear_kernel`` on :class:`GemmOperands` (``a``: (M, K)), as a custom op: ``torch.compile`` keeps it
    whole in its graph (no graph break at the Triton launch) and CUDA graphs capture it. Returns (M, N)."""
    rows = a.shape[0]
    out = torch.empty(rows, w.shape[0], dtype=out_dtype, device=a.device)
    arguments = kernel_arguments(a, w, x_scale, w_scale, w_zero, w_colsum, bias, x_zero, act, weight, group_size, depth)
    _linear_kernel[launch_grid(rows, w.shape[0])](
        out_ptr=out,
        M=rows,
        m_bucket=m_bucket(rows),
        stride_xm=a.stride(0),
        stride_xk=a.stride(1),
        stride_om=out.stride(0),
        stride_on=out.stride(1),
        **arguments,
    )
    return out


@quantized_linear.register_fake
def _(a: Tensor, w: Tensor, *args) -> Tensor:
    return a.new_empty(a.shape[0], w.shape[0], dtype=args[-1])


#: Per weight layout: its storage dtype, the inputs one stored element holds, and its name in errors.
_WEIGHT_STORAGE = {
    "int8": (torch.int8, 1, "int8 weights"),
    "int4": (torch.uint8, 2, "packed int4 weights (uint8)"),
    "fp8": (torch.float8_e4m3fn, 1, "float8_e4m3fn weights"),
}


def stored_depth(w: Tensor, weight: str, act: str) -> int:
    """K of a weight stored in layout ``weight``, once its dtype (and, for int4, the activation mode) is checked."""
    dtype, inputs_per_element, name = _WEIGHT_STORAGE[weight]
    if w.dtype != dtype:
        raise TypeError(f"{name} expected, got {w.dtype}")
    if weight == "int4" and act not in ("int8", "none"):
        raise ValueError(f"int4 weights run with act='int8' (W4A8) or act='none' (W4A16), got {act!r}")
    return inputs_per_element * w.shape[1]


#: Where a Linear GEMM runs: ``"auto"`` on cuBLASLt where it takes the call (:mod:`~dmquant.kernels.cublas_gemm`),
#: else the Triton kernel; ``"triton"`` always on the Triton kernel; ``"cublas"`` on cuBLASLt or an error.
BACKENDS = ("auto", "triton", "cublas")


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


def uses_vendor_gemm(operands: GemmOperands, backend: str) -> bool:
    """Whether a (M, K) GEMM call goes to cuBLASLt under ``backend`` (one of :data:`BACKENDS`)."""
    check_backend(backend)
    takes = backend != "triton" and vendor_takes(operands)
    if backend == "cublas" and not takes:
        raise ValueError(
            "cuBLASLt does not take this call: it needs CUDA, W8A8 with per-channel weights, and for int8 M > 16 "
            "with K, N multiples of 8, for fp8 K, N multiples of 16"
        )
    return takes


def linear_gemm(operands: GemmOperands, out_dtype: torch.dtype, backend: str) -> Tensor:
    """The (M, N) output of a Linear's GEMM (``operands.a``: (M, K)) on the path ``backend`` chooses."""
    if uses_vendor_gemm(operands, backend):
        return vendor_gemm(operands, out_dtype)
    return quantized_linear(*operands.op_arguments(), out_dtype)


def _linear(x: Tensor, w: Tensor, backend: str = "auto", **arguments) -> Tensor:
    depth = stored_depth(w, arguments["weight"], arguments["act"])
    if x.shape[-1] != depth:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {depth}")
    flat = x.reshape(-1, depth)
    operands = gemm_operands(flat, w=w, depth=depth, rows=flat.shape[0], **arguments)
    return linear_gemm(operands, x.dtype, backend).reshape(*x.shape[:-1], w.shape[0])


def int8_arguments(
    x_scale: float | Tensor | None, x_zero: int | Tensor | None, w_scale: Tensor, w_zero: Tensor | None,
    w_colsum: Tensor | None, bias: Tensor | None,
) -> dict:  # fmt: skip
    """The keyword arguments of a W8A8-INT8 call (Linear or Conv2d) for :func:`gemm_operands`."""
    return {"x_scale": x_scale, "x_zero": x_zero, "w_scale": w_scale, "w_zero": w_zero, "w_colsum": w_colsum,
            "bias": bias, "act": "int8", "weight": "int8", "group_size": None}  # fmt: skip


def int4_arguments(
    x_scale: float | Tensor | None, x_zero: int | Tensor | None, w_scale: Tensor, w_zero: Tensor | None,
    group_size: int | None, w_colsum: Tensor | None, bias: Tensor | None, act: str,
) -> dict:  # fmt: skip
    """The keyword arguments of a W4A8 / W4A16 call (Linear or Conv2d) for :func:`gemm_operands`."""
    return {"x_scale": x_scale, "x_zero": x_zero, "w_scale": w_scale, "w_zero": w_zero, "w_colsum": w_colsum,
            "bias": bias, "act": act, "weight": "int4", "group_size": group_size}  # fmt: skip


def fp8_arguments(
    x_scale: float | Tensor | None, w_scale: Tensor, bias: Tensor | None, fast_accumulation: bool
) -> dict:
    """The keyword arguments of a W8A8-FP8 call (Linear or Conv2d) for :func:`gemm_operands`."""
    return {"x_scale": x_scale, "x_zero": None, "w_scale": w_scale, "w_zero": None, "w_colsum": None, "bias": bias,
            "act": "fp8", "weight": "fp8", "group_size": None, "fast_accumulation": fast_accumulation}  # fmt: skip


def int8_linear(
    x: Tensor,
    x_scale: float | Tensor,
    x_zero: int | Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    w_zero: Tensor | None = None,
    w_colsum: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """W8A8-INT8 ``y = x · Wᵀ + b`` with ``x`` quantized per tensor
    (:func:`~dmquant.kernels.operands.quantize_activations`).

    Args:
        x: (..., K) float32/bf16/fp16, any strides.
        x_scale, x_zero: the activation quantizer's scale (float or one-element float32 tensor; a tensor avoids
            a host-to-device copy) and int8-range zero point (int or one-element integer tensor; a tensor also
            keeps ``torch.compile`` from specializing on its value): ``x ≈ x_scale · (c_x − x_zero)``.
        w_codes: (N, K) int8. ``w_scale``: (N,) float32. ``w_zero``: (N,) int32 or None (symmetric).
        w_colsum: :func:`weight_colsums` of ``w_codes``; computed per call when needed and not given.
        bias: (N,) or None.
        backend: ``"auto"`` (cuBLASLt's ``_int_mm`` where it takes the call, else Triton), ``"triton"`` or
            ``"cublas"`` (:data:`BACKENDS`).

    Returns: (..., N) in ``x.dtype``.
    """
    return _linear(x, w_codes, backend, **int8_arguments(x_scale, x_zero, w_scale, w_zero, w_colsum, bias))


def int4_linear(
    x: Tensor,
    x_scale: float | Tensor | None,
    x_zero: int | Tensor | None,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor | None,
    group_size: int | None,
    w_colsum: Tensor | None = None,
    bias: Tensor | None = None,
    act: str = "int8",
) -> Tensor:
    """W4A8 (``act="int8"``) or W4A16 (``act="none"``) ``y = x · Wᵀ + b`` with packed int4 weights.

    Args:
        x: (..., K); float32/bf16/fp16 for W4A8, bf16/fp16 for W4A16.
        x_scale, x_zero: as in :func:`int8_linear` for W4A8; ignored for W4A16 (pass None, 0).
        w_packed: (N, K/2) uint8, inputs ``2j`` / ``2j + 1`` in the low / high nibble of byte ``j``.
        w_scale: (N, K/G) float32; ``w_zero``: (N, K/G) int32 or float32 in the nibble domain ``[0, 15]``
            (``value = w_scale · (u − w_zero)``), or None for zero.
        group_size: ``G``, dividing K and a multiple of 32; None or K for per-channel parameters.
        w_colsum: :func:`weight_colsums` ``(w_packed, group_size)``; computed per call when needed and not given.

    Returns: (..., N) in ``x.dtype``.
    """
    return _linear(x, w_packed, **int4_arguments(x_scale, x_zero, w_scale, w_zero, group_size, w_colsum, bias, act))


def fp8_linear(
    x: Tensor,
    x_scale: float | Tensor | None,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    backend: str = "auto",
    fast_accumulation: bool = False,
) -> Tensor:
    """W8A8-FP8 ``y = x · Wᵀ + b`` with ``x`` scaled and cast to e4m3
    (:func:`~dmquant.kernels.operands.quantize_activations`).

    Args:
        x: (..., K) float32/bf16/fp16.
        x_scale: static per-tensor scale (float or one-element tensor), a per-row (M,) tensor, or None for dynamic
            per-row scales ``max|x[m]| / 448`` (:func:`fp8_row_scales`, one torch reduction per call).
        w_fp8: (N, K) ``torch.float8_e4m3fn``; ``w_scale``: (N,) float32.
        backend: ``"auto"`` (cuBLASLt's ``_scaled_mm`` where it takes the call, else Triton), ``"triton"`` or
            ``"cublas"`` (:data:`BACKENDS`).
        fast_accumulation: on cuBLASLt, accumulate in the tensor cores' reduced precision
            (``use_fast_accum=True``; :mod:`~dmquant.kernels.cublas_gemm`); the Triton kernel ignores it.

    Returns: (..., N) in ``x.dtype``.
    """
    scale = fp8_row_scales(x) if x_scale is None else x_scale
    return _linear(x, w_fp8, backend, **fp8_arguments(scale, w_scale, bias, fast_accumulation))
