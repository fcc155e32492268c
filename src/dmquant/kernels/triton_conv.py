"""Implicit-GEMM Triton convolutions for quantized Conv2d layers on Hopper GPUs, NHWC activations.

A Conv2d is the GEMM of :mod:`dmquant.kernels.triton_gemm` with ``M = B·Ho·Wo`` output pixels, ``N = Cout`` and
``K = KH·KW·Cin`` receptive-field inputs ordered ``(kh, kw, cin)``::

    y[b, oh, ow, n] = Σ_{kh, kw, c} x[b, oh·sh − ph + kh·dh, ow·sw − pw + kw·dw, c] · W[n, (kh·KW + kw)·Cin + c] + b[n]

The A tile of each K step is gathered straight from the NHWC input (nothing is unfolded into memory): the K
offsets split into ``(kh, kw, c)`` on a (BLOCK_K,) vector, each output pixel contributes its window origin, and
the tile's addresses are their sum. Everything else — the four modes (W8A8-INT8, W4A8, W4A16, W8A8-FP8), the
int32/fp32 accumulation and the epilogue with the zero-point corrections of Jacob et al. 2018, eq. 7 — is the
shared code of :func:`dmquant.kernels.triton_gemm.quantized_gemm_tile`.

The input is quantized once, elementwise, before the kernel (:func:`~dmquant.kernels.operands.quantize_activations`)
into an NHWC buffer of 8-bit codes with C contiguous; each input then enters up to KH·KW A tiles as one byte
instead of being requantized in each. Zero padding: taps outside the image take the code ``z_x`` in the kernel,
exactly the code of the real value 0 (``integer_conv2d`` of ``tests/integer_reference.py`` pads with it for the same
reason), and enter the activation row sums like any other input. fp8 and bf16/fp16 activations get 0.

Stride-1 W8A8 convolutions (int8 with symmetric per-channel weights, or fp8) over channels that whole K tiles
divide (multiples of 64) take a second kernel, :func:`shifted_window_conv2d`: the codes are padded once (with
``z_x``), and every A tile becomes a rectangular box of the padded (B·Hp·Wp, C) matrix shifted per tap, loaded
by TMA — no per-element address arithmetic or border masks in the main loop. The gathering kernel keeps strided
convolutions (UNet downsamplers), narrow inputs (``conv_in``), W4 and zero-point weights.

Layouts: ``x`` is an NCHW-shaped tensor, any strides; a channels_last one (NHWC in memory) needs no transpose,
an NCHW one has its 8-bit codes copied to NHWC. Weights are reordered to (Cout, KH·KW·Cin) with K ordered
``(kh, kw, cin)`` — ``w.permute(0, 2, 3, 1).reshape(Cout, -1)`` — then quantized or packed exactly as Linear
weights; group-wise int4 groups run along that K. The output is an NCHW-shaped tensor in channels_last memory
format (its NHWC buffer is the (M, N) GEMM output), dtype of ``x``. Supported: stride, padding, dilation, any
kernel size; groups = 1 only; per-tensor activation scales only (a dynamic scale per input pixel would differ
between the receptive fields that share it).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .cublas_gemm import vendor_gemm
from .cudnn_conv import cudnn_fp8_conv2d
from .triton_gemm import (
    BACKENDS,
    INTERPRETING,
    GemmOperands,
    activation_scale,
    activation_zero,
    autotune_quantized_gemm,
    check_backend,
    dot_accumulate,
    fold_group,
    fp8_arguments,
    gemm_config,
    gemm_operands,
    int4_arguments,
    int8_arguments,
    kernel_arguments,
    launch_grid,
    m_bucket,
    quantized_gemm_tile,
    quick_bench,
    store_output,
    stored_depth,
    tile_offsets,
    tile_starts,
    tile_suits,
    uses_vendor_gemm,
)

#: A convolution's backends: the GEMMs' (:data:`~dmquant.kernels.triton_gemm.BACKENDS`) and cuDNN's fp8 one.
CONV_BACKENDS = (*BACKENDS, "cudnn")


@triton.jit
def _conv_a_tile(x_ptr, a_rows, a_geometry, offs_k, k_valid):
    """Pointers and in-image mask of the A tile: output pixels (rows) × receptive-field inputs ``offs_k``."""
    window_offsets, ih0, iw0, m_valid = a_rows
    H, W, C, KW, stride_xh, stride_xw, stride_xc, dilation_h, dilation_w = a_geometry
    channel = offs_k % C
    tap = offs_k // C
    dh = (tap // KW) * dilation_h
    dw = (tap % KW) * dilation_w
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = x_ptr + window_offsets[:, None] + (dh * stride_xh + dw * stride_xw + channel * stride_xc)[None, :]
    return ptrs, inside & m_valid[:, None] & k_valid[None, :]


@autotune_quantized_gemm
@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr, x_zero_ptr,
    M, N, K, m_bucket, H, W, C, Ho, Wo, KW, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    stride_xb, stride_xh, stride_xw, stride_xc, stride_x_scale, stride_wn, stride_wk, stride_om, stride_on,
    ACT: tl.constexpr, WEIGHT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_W_ZERO: tl.constexpr, HAS_X_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_valid = offs_m < M
    n_valid = offs_n < N
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    image = offs_m // (Wo * Ho)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    window_offsets = image * stride_xb + ih0 * stride_xh + iw0 * stride_xw
    total, x_scale = quantized_gemm_tile(
        _conv_a_tile, (window_offsets, ih0, iw0, m_valid),
        (H, W, C, KW, stride_xh, stride_xw, stride_xc, dilation_h, dilation_w),
        (x_ptr, x_scale_ptr, stride_x_scale, x_zero_ptr), (w_ptr, stride_wn, stride_wk),
        (w_scale_ptr, w_zero_ptr, w_colsum_ptr), offs_m, m_valid, offs_n, n_valid, K,
        ACT, WEIGHT, GROUP_SIZE, HAS_W_ZERO, HAS_X_ZERO, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    store_output(total, x_scale, offs_m, m_valid, offs_n, n_valid, out_ptr, stride_om, stride_on, bias_ptr,
                 ACT, HAS_BIAS)  # fmt: skip


# ------------------------------------------------------------------------------ shifted-window convolution


#: The shifted-window kernel's K tiles stay inside one tap, so they must divide the input channels.
SHIFTED_WINDOW_CHANNEL_ALIGNMENT = 64


def _set_block_shapes(nargs: dict) -> None:
    """Autotuning pre-hook: the TMA descriptors load boxes of the config's tile shape."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _shifted_configs() -> list[triton.Config]:
    shapes = [(16, 32, 32, 4, 1)] if INTERPRETING else [
        # wgmma tiles (BLOCK_M ≥ 64, 4 or 8 warps); K tiles of 64 or 128 bytes, TMA-pipelined over 3-4 stages
        (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (64, 64, 64, 4, 4),
    ]  # fmt: skip
    return [gemm_config(*shape, pre_hook=_set_block_shapes) for shape in shapes]


def _shifted_configs_for(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Configs whose K tile divides the channels, narrowed to those that suit the GEMM where any do."""
    args = {**named_args, **kwargs}
    fitting = [c for c in configs if args["C"] % c.kwargs["BLOCK_K"] == 0]
    gemm = {**args, "M": args["R"], "K": args["KH"] * args["KW"] * args["C"]}  # the GEMM it computes
    return [c for c in fitting if tile_suits(c.kwargs, gemm)] or fitting


@triton.autotune(
    configs=_shifted_configs(),
    key=["m_bucket", "N", "C", "KH", "KW", "ACT", "HAS_X_ZERO"],
    prune_configs_by={"early_config_prune": _shifted_configs_for},
    do_bench=quick_bench,
    cache_results=True,
)
@triton.jit
def _shifted_window_conv2d_kernel(
    a_desc, w_desc, out_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, w_colsum_ptr, x_zero_ptr,
    R, N, C, m_bucket, Hp, Wp, Ho, Wo, KH, KW, dilation_h, dilation_w, stride_om, stride_on,
    ACT: tl.constexpr, HAS_X_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """A stride-1 convolution as a GEMM over the rows of the padded NHWC input (see :func:`shifted_window_conv2d`).

    Row ``r`` of the GEMM is the window whose top-left input is padded pixel ``r``; its tap ``(kh, kw)`` reads
    row ``r + kh·dh·Wp + kw·dw`` — the same (BLOCK_M, BLOCK_K) box of the padded input for every row of the tile,
    shifted, which one TMA load fetches (rows outside the tensor read as 0 and only reach discarded rows).
    """
    m_start, n_start = tile_starts(R, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32 if ACT == "int8" else tl.float32)
    for k_start in range(0, KH * KW * C, BLOCK_K):
        tap = k_start // C
        shift = (tap // KW) * dilation_h * Wp + (tap % KW) * dilation_w
        a = a_desc.load([m_start + shift, k_start - tap * C])
        b = w_desc.load([n_start, k_start])
        acc = dot_accumulate(a, tl.trans(b), acc, ACT, BLOCK_K)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    x_zero = activation_zero(x_zero_ptr, HAS_X_ZERO)
    total = fold_group(acc, 0, x_zero, (w_scale_ptr, None, w_colsum_ptr), 0, 1, KH * KW * C, offs_n, n_valid,
                       ACT, False, HAS_X_ZERO)  # fmt: skip
    # rows of the padded grid → output pixels; windows that start in the padding are not outputs
    offs_r = m_start + tl.arange(0, BLOCK_M)
    image = offs_r // (Hp * Wp)
    oh = (offs_r // Wp) % Hp
    ow = offs_r % Wp
    valid = (offs_r < R) & (oh < Ho) & (ow < Wo)
    offs_out = (image * Ho + oh) * Wo + ow
    x_scale = activation_scale(x_scale_ptr, offs_out, valid, 0, ACT)
    store_output(total, x_scale, offs_out, valid, offs_n, n_valid, out_ptr, stride_om, stride_on, bias_ptr,
                 ACT, HAS_BIAS)  # fmt: skip


@torch.library.custom_op("dmquant::shifted_window_conv2d", mutates_args=())
def shifted_window_conv2d(
    padded: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, w_colsum: Tensor | None, bias: Tensor | None,
    x_zero: Tensor | None, act: str, out_dtype: torch.dtype, window: list[int],
) -> Tensor:  # fmt: skip
    """A stride-1 W8A8 (int8 or fp8) convolution of the zero-padded NHWC codes ``padded`` (B, Hp, Wp, C), as a
    custom op. ``window`` is ``[kh, kw, dh, dw]``. Returns the (B, Ho, Wo, Cout) output, contiguous.

    The implicit GEMM of :func:`quantized_conv2d` gathers its A tiles element by element, with a div/mod and a
    border test per input. Padding the codes once instead (a cheap pass over 8-bit data, fused into the
    quantization under ``torch.compile``) makes every A tile a rectangular box of the (B·Hp·Wp, C) matrix, shifted
    per tap, which Hopper's TMA loads whole and the pipeliner overlaps with the tensor cores — the shifted-window
    formulation of direct convolution as a sum of KH·KW GEMMs over one shared row index. Its cost: the GEMM runs over
    all B·Hp·Wp padded positions and discards the (Hp·Wp − Ho·Wo) that are not outputs (6 % at 64×64 with padding
    1, 27 % at 16×16).
    """
    kh, kw, dh, dw = window
    batch, hp, wp, channels = padded.shape
    out_h, out_w = hp - dh * (kh - 1), wp - dw * (kw - 1)
    rows = batch * hp * wp
    out = torch.empty(batch, out_h, out_w, w.shape[0], dtype=out_dtype, device=padded.device)
    flat_out = out.view(-1, w.shape[0])
    # block shapes are placeholders: the autotuner's pre-hook sets each config's
    a_desc = TensorDescriptor.from_tensor(padded.view(rows, channels), [1, 1])
    w_desc = TensorDescriptor.from_tensor(w, [1, 1])
    _shifted_window_conv2d_kernel[launch_grid(rows, w.shape[0])](
        a_desc, w_desc, flat_out, bias, x_scale, w_scale, w_colsum, x_zero,
        rows, w.shape[0], channels, m_bucket(rows), hp, wp, out_h, out_w, kh, kw, dh, dw,
        flat_out.stride(0), flat_out.stride(1),
        ACT=act, HAS_X_ZERO=x_zero is not None, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return out


@shifted_window_conv2d.register_fake
def _(padded: Tensor, w: Tensor, *args) -> Tensor:
    *_, out_dtype, (kh, kw, dh, dw) = args
    batch, hp, wp, _ = padded.shape
    return padded.new_empty(batch, hp - dh * (kh - 1), wp - dw * (kw - 1), w.shape[0], dtype=out_dtype)


def _takes_shifted_window(operands: GemmOperands, channels: int, stride: tuple[int, int]) -> bool:
    """Whether :func:`shifted_window_conv2d` computes the call: stride 1, W8A8 with per-channel symmetric
    weights, channels that whole K tiles divide (TMA also needs 16-byte rows), on a GPU or the interpreter."""
    return (
        stride == (1, 1)
        and operands.weight in ("int8", "fp8")
        and operands.w_zero is None
        and not operands.group_size
        and channels % SHIFTED_WINDOW_CHANNEL_ALIGNMENT == 0
        and (operands.a.is_cuda or INTERPRETING)
    )


def _padded_codes(codes: Tensor, padding: tuple[int, int], x_zero: Tensor | None) -> Tensor:
    """The NHWC codes padded by ``padding`` pixels on each side with the code of 0: ``z_x`` for int8 (a tensor:
    the codes less ``z_x`` in int32, padded with 0, plus ``z_x``), +0 for fp8 (padded as bytes: e4m3's +0 is the
    byte 0)."""
    ph, pw = padding
    pads = (0, 0, pw, pw, ph, ph)
    if codes.dtype == torch.float8_e4m3fn:
        return F.pad(codes.view(torch.uint8), pads).view(torch.float8_e4m3fn)
    if x_zero is None:
        return F.pad(codes, pads)
    return (F.pad(codes.int() - x_zero, pads) + x_zero).to(torch.int8)


# ------------------------------------------------------------------------------------------------ wrappers


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("dmquant::quantized_conv2d", mutates_args=())
def quantized_conv2d(
    a: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, w_zero: Tensor | None, w_colsum: Tensor | None,
    bias: Tensor | None, x_zero: Tensor | None, act: str, weight: str, group_size: int, depth: int,
    out_dtype: torch.dtype, window: list[int],
) -> Tensor:  # fmt: skip
    """``_conv2d_kernel`` on :class:`~dmquant.kernels.operands.GemmOperands` whose ``a`` is the (B, H, W, Cin)
    input (NHWC; any strides, C contiguous reads best), as a custom op (see ``quantized_linear``). ``window`` is
    ``[kh, kw, sh, sw, ph, pw, dh, dw]``. Returns the (B, Ho, Wo, Cout) output, contiguous."""
    kh, kw, sh, sw, ph, pw, dh, dw = window
    batch, height, width, channels = a.shape
    out_h, out_w = _output_size(height, kh, sh, ph, dh), _output_size(width, kw, sw, pw, dw)
    rows = batch * out_h * out_w
    out = torch.empty(batch, out_h, out_w, w.shape[0], dtype=out_dtype, device=a.device)
    flat_out = out.view(rows, w.shape[0])
    arguments = kernel_arguments(a, w, x_scale, w_scale, w_zero, w_colsum, bias, x_zero, act, weight, group_size, depth)
    stride_xb, stride_xh, stride_xw, stride_xc = a.stride()
    _conv2d_kernel[launch_grid(rows, w.shape[0])](
        out_ptr=flat_out,
        M=rows,
        m_bucket=m_bucket(rows),
        H=height,
        W=width,
        C=channels,
        Ho=out_h,
        Wo=out_w,
        KW=kw,
        stride_h=sh,
        stride_w=sw,
        pad_h=ph,
        pad_w=pw,
        dilation_h=dh,
        dilation_w=dw,
        stride_xb=stride_xb,
        stride_xh=stride_xh,
        stride_xw=stride_xw,
        stride_xc=stride_xc,
        stride_om=flat_out.stride(0),
        stride_on=flat_out.stride(1),
        **arguments,
    )
    return out


@quantized_conv2d.register_fake
def _(a: Tensor, w: Tensor, *args) -> Tensor:
    *_, out_dtype, (kh, kw, sh, sw, ph, pw, dh, dw) = args
    batch, height, width, _ = a.shape
    out_h, out_w = _output_size(height, kh, sh, ph, dh), _output_size(width, kw, sw, pw, dw)
    return a.new_empty(batch, out_h, out_w, w.shape[0], dtype=out_dtype)


def _conv2d(x: Tensor, w: Tensor, kernel_size, stride, padding, dilation, backend: str = "auto", **arguments) -> Tensor:
    depth = stored_depth(w, arguments["weight"], arguments["act"])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    batch, channels, height, width = x.shape
    if kh * kw * channels != depth:
        raise ValueError(f"a {kh}x{kw} kernel over {channels} channels has K={kh * kw * channels}, the weight {depth}")
    check_backend(backend, CONV_BACKENDS)
    if backend == "cudnn" and arguments["act"] != "fp8":
        raise ValueError("cuDNN runs the fp8 convolutions only (dmquant.kernels.cudnn_conv)")
    pointwise = (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)
    if backend == "cublas" and not pointwise:
        raise ValueError("cuBLASLt runs only 1x1 convolutions of stride 1 without padding (a GEMM over pixels)")
    # rows=1: per-tensor activation scales only (a per-row one would belong to output pixels, not inputs)
    operands = gemm_operands(x.permute(0, 2, 3, 1), w=w, depth=depth, rows=1, **arguments)
    # the A operand in NHWC, C contiguous: a copy of the 8-bit codes unless x was channels_last already
    a = operands.a.contiguous()
    if backend == "cudnn":
        window = [kh, kw, sh, sw, ph, pw, dh, dw]
        out = cudnn_fp8_conv2d(a, w, operands.x_scale, operands.w_scale, operands.bias, x.dtype, window)
        return out.permute(0, 3, 1, 2)
    if pointwise:
        pixels = replace(operands, a=a.view(-1, channels))
        if uses_vendor_gemm(pixels, backend):
            out = vendor_gemm(pixels, x.dtype).view(batch, height, width, -1)
            return out.permute(0, 3, 1, 2)
    if _takes_shifted_window(operands, channels, (sh, sw)):
        padded = _padded_codes(a, (ph, pw), operands.x_zero)
        out = shifted_window_conv2d(padded, w, operands.x_scale, operands.w_scale, operands.w_colsum, operands.bias,
                                    operands.x_zero, operands.act, x.dtype, [kh, kw, dh, dw])  # fmt: skip
        return out.permute(0, 3, 1, 2)
    window = [kh, kw, sh, sw, ph, pw, dh, dw]
    out = quantized_conv2d(a, *operands.op_arguments()[1:], x.dtype, window)
    return out.permute(0, 3, 1, 2)


def int8_conv2d(
    x: Tensor,
    x_scale: float | Tensor,
    x_zero: int | Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    w_zero: Tensor | None = None,
    w_colsum: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    backend: str = "auto",
) -> Tensor:
    """W8A8-INT8 convolution; arguments as :func:`dmquant.kernels.triton_gemm.int8_linear`.

    ``x``: (B, Cin, H, W) float, any strides (channels_last best); ``w_codes``: (Cout, KH·KW·Cin) int8, K ordered
    ``(kh, kw, cin)``. A 1×1 convolution of stride 1 without padding is a GEMM over the pixels of the NHWC codes:
    ``backend="auto"`` runs it on cuBLASLt's ``_int_mm`` where that takes it, as a Linear. Returns
    (B, Cout, Ho, Wo) in channels_last memory format, ``x.dtype``.
    """
    arguments = int8_arguments(x_scale, x_zero, w_scale, w_zero, w_colsum, bias)
    return _conv2d(x, w_codes, kernel_size, stride, padding, dilation, backend, **arguments)


def int4_conv2d(
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
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """W4A8 / W4A16 convolution; arguments as :func:`dmquant.kernels.triton_gemm.int4_linear`.

    ``w_packed``: (Cout, KH·KW·Cin / 2) uint8 packing the (kh, kw, cin)-ordered weight; groups run along that K.
    Returns (B, Cout, Ho, Wo) in channels_last memory format, ``x.dtype``.
    """
    arguments = int4_arguments(x_scale, x_zero, w_scale, w_zero, group_size, w_colsum, bias, act)
    return _conv2d(x, w_packed, kernel_size, stride, padding, dilation, **arguments)


def fp8_conv2d(
    x: Tensor,
    x_scale: float | Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    backend: str = "auto",
    fast_accumulation: bool = False,
) -> Tensor:
    """W8A8-FP8 convolution with a static per-tensor activation scale ``x_scale``.

    ``w_fp8``: (Cout, KH·KW·Cin) ``torch.float8_e4m3fn``, K ordered ``(kh, kw, cin)``; ``w_scale``: (Cout,).
    1×1 convolutions take ``backend`` and ``fast_accumulation`` as :func:`~dmquant.kernels.triton_gemm.fp8_linear`
    does (``_scaled_mm``); ``backend="cudnn"`` runs any of them on cuDNN's FP8 convolution
    (:mod:`~dmquant.kernels.cudnn_conv`). Returns (B, Cout, Ho, Wo) in channels_last memory format, ``x.dtype``.
    """
    if x_scale is None:
        raise ValueError("fp8 convolutions take a static activation scale (a dynamic one per input would differ "
                         "between the receptive fields an input belongs to)")  # fmt: skip
    arguments = fp8_arguments(x_scale, w_scale, bias, fast_accumulation)
    return _conv2d(x, w_fp8, kernel_size, stride, padding, dilation, backend, **arguments)
