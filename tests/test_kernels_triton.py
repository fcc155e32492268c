"""kernels/triton_gemm.py and triton_conv.py against the exact integer reference and plain float math.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before they are imported), with
one block config (16 x 32 x 32) and small shapes whose M, N and K are not multiples of it. The interpreter cannot
multiply bf16 operands, so W4A16 runs here with fp16 activations and with bf16 only on a GPU (tests marked ``gpu``).
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from integer_reference import Codes, integer_conv2d, integer_linear  # noqa: E402

from dmquant.core.packing import pack_codes  # noqa: E402
from dmquant.kernels import cudnn_conv, triton_conv  # noqa: E402
from dmquant.kernels.operands import quantize_activations  # noqa: E402
from dmquant.kernels.triton_conv import fp8_conv2d, int4_conv2d, int8_conv2d  # noqa: E402
from dmquant.kernels.triton_gemm import fp8_linear, int4_linear, int8_linear  # noqa: E402
from dmquant.kernels.weights import weight_colsums  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M_SIZES = [1, 2, 37]  # 1 and 2 take the small-M configs on a GPU
N, K = 45, 96  # K = 3 groups of 32; neither N nor M a multiple of a block
FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------ operands


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(shape, gen, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 2 + 0.7).to(dtype)


def _quotient(x: torch.Tensor, scale) -> torch.Tensor:
    """``x / s`` correctly rounded in float32: a tensor divisor (CUDA divides by a Python scalar by multiplying
    with its reciprocal, which is not)."""
    return x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device).expand_as(x)


def _int8_codes(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    return torch.clamp(torch.round(_quotient(x, scale)) + zero, -128, 127).long()


def _int8_weight(rows: int, depth: int, symmetric: bool, gen: torch.Generator):
    """int8 codes (rows, depth), float32 scales (rows,), int32 zero points (rows,) or None."""
    codes = torch.randint(-128, 128, (rows, depth), generator=gen, dtype=torch.int8)
    scale = torch.rand(rows, generator=gen) * 0.01 + 1e-3
    zero = None if symmetric else torch.randint(-20, 20, (rows,), generator=gen, dtype=torch.int32)
    return codes, scale, zero


def _int4_weight(rows: int, depth: int, group: int, symmetric: bool, gen: torch.Generator):
    """Nibbles ``u`` (rows, depth), their ``pack_codes`` packing, scales and nibble-domain zero points per group.

    Symmetric: signed codes in [-8, 7] packed with qmin = -8, so the nibble-domain zero point is 8.
    """
    qmin = -8 if symmetric else 0
    codes = torch.randint(qmin, qmin + 16, (rows, depth), generator=gen)
    packed = pack_codes(codes, 4, qmin).reshape(rows, depth // 2)
    scale = torch.rand(rows, depth // group, generator=gen) * 0.01 + 1e-3
    if symmetric:
        zero = torch.full((rows, depth // group), 8, dtype=torch.int32)
    else:
        zero = torch.randint(0, 16, (rows, depth // group), generator=gen, dtype=torch.int32)
    return codes - qmin, packed, scale, zero


def _dequantized(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """``scale · (values − zero)`` in float64 with per-(row, group) parameters."""
    scale = scale.double().reshape(values.shape[0], -1).repeat_interleave(group, dim=1)
    zero = 0 if zero is None else zero.double().reshape(values.shape[0], -1).repeat_interleave(group, dim=1)
    return scale * (values.double() - zero)


def _weight_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> Codes:
    """Weight codes with parameters expanded to (N, K), as :func:`integer_linear` reads group-wise ones."""
    rows = values.shape[0]
    zero = torch.zeros(rows, 1, dtype=torch.int32) if zero is None else zero
    scale, zero = (p.reshape(rows, -1).repeat_interleave(group, dim=1) for p in (scale, zero))
    return Codes(values.long(), scale, zero)


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """Equal up to ``relative`` of the largest expected magnitude (the output dtype's rounding)."""
    expected = expected.double().cpu()
    tolerance = relative * (expected.abs().max().item() + 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=relative, atol=tolerance)


OUTPUT_ROUNDING = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}
#: Hopper's fp8 tensor cores add products with about 14 mantissa bits, not float32's 24 (DeepSeek-V3 report,
#: section 3.3.2); the interpreter adds them in float32.
FP8_ACCUMULATION = 2**-12 if DEVICE == "cuda" else 1e-5


# ------------------------------------------------------------------------------------------------ Linear


def test_activation_codes_are_torchs_ties_to_even():
    """An identity weight returns ``s_x · (c_x − z_x)``: the codes multiplied equal ``round(x / s) + z`` exactly."""
    gen = _generator(0)
    depth = 64
    identity = torch.eye(depth, dtype=torch.int8)
    ties = (torch.arange(-depth, depth).float() + 0.5) * 0.25  # exact halves at the scale 0.25
    special = torch.tensor([1e4, -1e4, 40.0, -40.0, 1e-30, -1e-30, 0.0, -0.0])  # saturation, tiny, zeros
    for scale, zero in [(0.0371, -17), (0.25, 3)]:
        x = torch.randn(48, depth, generator=gen) * 3
        x[:2] = ties.reshape(2, depth)
        x[2, : special.numel()] = special
        y = int8_linear(*_on_device(x), scale, zero, *_on_device(identity, torch.ones(depth)))
        expected = (_int8_codes(x, scale, zero) - zero).float() * scale
        assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("rows", M_SIZES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-point"])
@pytest.mark.parametrize(("dtype", "x_zero"), [(torch.float32, -37), (torch.bfloat16, 0)])
def test_int8_linear(rows, symmetric, dtype, x_zero):
    gen = _generator(rows)
    x = _activations((rows, K), gen, dtype)
    w, w_scale, w_zero = _int8_weight(N, K, symmetric, gen)
    bias = torch.randn(N, generator=gen)
    x_scale = 0.043
    y = int8_linear(*_on_device(x), x_scale, x_zero, *_on_device(w, w_scale, w_zero), None, *_on_device(bias))
    assert y.dtype == dtype and y.shape == (rows, N)
    x_codes = Codes(_int8_codes(x, x_scale, x_zero), torch.tensor(x_scale), torch.tensor(x_zero))
    exact = integer_linear(x_codes, _weight_codes(w, w_scale, w_zero, K), bias)
    _assert_matches(y, exact, OUTPUT_ROUNDING[dtype])
    dequantized_x = x_scale * (x_codes.codes.double() - x_zero)
    _assert_matches(y, F.linear(dequantized_x, _dequantized(w, w_scale, w_zero, K), bias.double()), 1e-2)


def test_int8_linear_keeps_leading_dimensions_and_reads_strided_inputs():
    gen = _generator(5)
    x = _activations((3, 2 * K, 5), gen).transpose(1, 2)[:, :, ::2]  # (3, 5, K), strided along K
    w, w_scale, w_zero = _int8_weight(N, K, False, gen)
    colsum = weight_colsums(w)
    y = int8_linear(*_on_device(x), torch.tensor(0.05), 11, *_on_device(w, w_scale, w_zero, colsum))
    flat = int8_linear(*_on_device(x.reshape(-1, K).contiguous()), 0.05, 11, *_on_device(w, w_scale, w_zero))
    assert y.shape == (3, 5, N)
    assert torch.equal(y.reshape(-1, N), flat)


@pytest.mark.parametrize("rows", M_SIZES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-point"])
@pytest.mark.parametrize("group", [32, None], ids=["group32", "per-channel"])
def test_w4a8_linear(rows, symmetric, group):
    gen = _generator(10 + rows)
    x = _activations((rows, K), gen, torch.bfloat16)
    u, packed, w_scale, w_zero = _int4_weight(N, K, group or K, symmetric, gen)
    bias = torch.randn(N, generator=gen)
    x_scale, x_zero = 0.05, -21
    y = int4_linear(*_on_device(x), x_scale, x_zero, *_on_device(packed, w_scale, w_zero), group, None,
                    *_on_device(bias))  # fmt: skip
    x_codes = Codes(_int8_codes(x, x_scale, x_zero), torch.tensor(x_scale), torch.tensor(x_zero))
    exact = integer_linear(x_codes, _weight_codes(u, w_scale, w_zero, group or K), bias, group_size=group)
    _assert_matches(y, exact, OUTPUT_ROUNDING[torch.bfloat16])
    dequantized_x = x_scale * (x_codes.codes.double() - x_zero)
    _assert_matches(y, F.linear(dequantized_x, _dequantized(u, w_scale, w_zero, group or K), bias.double()), 1e-2)


def test_w4a8_linear_with_float_zero_points_and_precomputed_colsums():
    gen = _generator(20)
    x = _activations((37, K), gen)
    u, packed, w_scale, _ = _int4_weight(N, K, 32, False, gen)
    w_zero = torch.rand(N, K // 32, generator=gen) * 15
    colsum = weight_colsums(packed, 32)
    assert torch.equal(colsum, u.reshape(N, K // 32, 32).sum(-1).int())
    y = int4_linear(*_on_device(x), 0.05, 9, *_on_device(packed, w_scale, w_zero), 32, *_on_device(colsum))
    dequantized_x = 0.05 * (_int8_codes(x, 0.05, 9).double() - 9)
    _assert_matches(y, F.linear(dequantized_x, _dequantized(u, w_scale, w_zero, 32)), 1e-5)


@pytest.mark.parametrize("rows", M_SIZES)
@pytest.mark.parametrize("group", [32, None], ids=["group32", "per-channel"])
def test_w4a16_linear(rows, group):
    gen = _generator(30 + rows)
    x = _activations((rows, K), gen, torch.float16)
    u, packed, w_scale, w_zero = _int4_weight(N, K, group or K, False, gen)
    bias = torch.randn(N, generator=gen)
    y = int4_linear(*_on_device(x), None, 0, *_on_device(packed, w_scale, w_zero), group, None, *_on_device(bias),
                    act="none")  # fmt: skip
    assert y.dtype == torch.float16
    weight = _dequantized(u, w_scale, w_zero, group or K)
    # the kernel rounds each dequantized weight to the activation dtype, then accumulates in fp32
    _assert_matches(y, F.linear(x.double(), weight.half().double(), bias.double()), OUTPUT_ROUNDING[torch.float16])
    _assert_matches(y, F.linear(x.double(), weight, bias.double()), 1e-2)


def _fp8_values(x: torch.Tensor, scale) -> torch.Tensor:
    """What e4m3 activations stand for: ``x / s`` saturated and cast by torch, times ``s``, in float64."""
    return _quotient(x, scale).clamp(-448, 448).to(FP8).double() * torch.as_tensor(scale).double()


def _fp8_weight(rows: int, depth: int, gen: torch.Generator):
    return torch.randn(rows, depth, generator=gen).to(FP8), torch.rand(rows, generator=gen) * 0.1 + 0.01


@pytest.mark.parametrize("rows", M_SIZES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "per-row"])
def test_fp8_linear(rows, dynamic):
    gen = _generator(40 + rows)
    x = _activations((rows, K), gen)
    scale = x.abs().amax(1, keepdim=True) / 448 if dynamic else 0.03
    w, w_scale = _fp8_weight(N, K, gen)
    bias = torch.randn(N, generator=gen)
    y = fp8_linear(*_on_device(x), None if dynamic else scale, *_on_device(w, w_scale, bias))
    weight = w.double() * w_scale.double()[:, None]
    _assert_matches(y, F.linear(_fp8_values(x, scale), weight, bias.double()), FP8_ACCUMULATION)


def test_invalid_operands_are_refused():
    x = torch.randn(4, K, device=DEVICE)
    _, packed, w_scale, w_zero = _int4_weight(N, K, 48, False, _generator(0))
    with pytest.raises(ValueError, match="multiple of 32"):
        int4_linear(x, 0.1, 0, *_on_device(packed, w_scale, w_zero), 48)
    with pytest.raises(TypeError, match="bf16/fp16"):
        int4_linear(x, None, 0, *_on_device(packed, w_scale, w_zero), 48, act="none")
    with pytest.raises(TypeError, match="int8 weights"):
        int8_linear(x, 0.1, 0, packed.to(DEVICE), w_scale[:, 0].to(DEVICE))
    with pytest.raises(ValueError, match="int8 range"):
        int8_linear(x, 0.1, 200, torch.zeros(N, K, dtype=torch.int8, device=DEVICE), torch.ones(N, device=DEVICE))


# ------------------------------------------------------------------------------------------------ Conv2d

WINDOWS = [  # (kernel, stride, padding, dilation)
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (1, 1, 0, 1),
    ((3, 2), (1, 2), (2, 1), (2, 1)),
]


def _window_id(window) -> str:
    return "k{}-s{}-p{}-d{}".format(*window)


def _conv(in_channels: int, out_channels: int, window) -> nn.Conv2d:
    kernel, stride, padding, dilation = window
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation)


def _window_args(window) -> dict:
    kernel, stride, padding, dilation = window
    return {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation}


def _gemm_order(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> (Cout, KH·KW·Cin) with K ordered (kh, kw, cin)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def _nchw_order(weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(Cout, KH·KW·Cin) -> (Cout, Cin, KH, KW)."""
    kh, kw = conv.kernel_size
    return weight.reshape(weight.shape[0], kh, kw, conv.in_channels).permute(0, 3, 1, 2)


def _image(gen, channels=8, dtype=torch.float32) -> torch.Tensor:
    """(2, C, 7, 9) NCHW-shaped, channels_last in memory, mostly positive (z_x far from the code 0)."""
    x = torch.randn(2, channels, 7, 9, generator=gen) + 1.5
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("window", WINDOWS, ids=_window_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-point"])
def test_int8_conv2d_pads_with_the_zero_point(window, symmetric):
    gen = _generator(50)
    conv = _conv(8, 12, window)
    x = _image(gen)
    w, w_scale, w_zero = _int8_weight(12, conv.weight[0].numel(), symmetric, gen)
    bias = torch.randn(12, generator=gen)
    x_scale, x_zero = 0.03, -100
    y = int8_conv2d(*_on_device(x), x_scale, x_zero, *_on_device(w, w_scale, w_zero), None, *_on_device(bias),
                    **_window_args(window))  # fmt: skip
    assert y.shape == conv(x).shape and y.is_contiguous(memory_format=torch.channels_last)
    x_codes = Codes(_int8_codes(x, x_scale, x_zero), torch.tensor(x_scale), torch.tensor(x_zero))
    w_zero_col = torch.zeros(12, dtype=torch.int32) if w_zero is None else w_zero
    w_codes = Codes(_nchw_order(w, conv).long(), w_scale.reshape(-1, 1, 1, 1), w_zero_col.reshape(-1, 1, 1, 1))
    exact = integer_conv2d(x_codes, w_codes, conv) + bias.reshape(1, -1, 1, 1)
    _assert_matches(y, exact, OUTPUT_ROUNDING[torch.float32])
    weight = _nchw_order(_dequantized(w, w_scale, w_zero, w.shape[1]), conv)
    dequantized_x = x_scale * (x_codes.codes.double() - x_zero)
    expected = F.conv2d(dequantized_x, weight, bias.double(), conv.stride, conv.padding, conv.dilation)
    _assert_matches(y, expected, 1e-5)


@pytest.mark.parametrize("layout", ["channel-slice", "nchw-contiguous"])
def test_conv2d_reads_any_input_strides(layout):
    gen = _generator(55)
    wide = _image(gen, channels=16)
    x = wide[:, 5:13] if layout == "channel-slice" else wide[:, 5:13].contiguous()
    w, w_scale, w_zero = _int8_weight(12, 72, False, gen)
    args = (0.03, -7, *_on_device(w, w_scale, w_zero))
    y = int8_conv2d(*_on_device(x), *args, kernel_size=3, padding=1)
    dense = int8_conv2d(*_on_device(x.contiguous(memory_format=torch.channels_last)), *args, kernel_size=3, padding=1)
    assert torch.equal(y, dense)


def _unfolded_codes(codes: torch.Tensor, zero: int, conv: nn.Conv2d) -> torch.Tensor:
    """im2col of activation codes padded with the zero point, rows (b, oh, ow) and K ordered (kh, kw, cin)."""
    window = {"kernel_size": conv.kernel_size, "dilation": conv.dilation, "padding": conv.padding}
    columns = F.unfold((codes - zero).double(), stride=conv.stride, **window) + zero  # (B, C·KH·KW, L)
    kh, kw = conv.kernel_size
    columns = columns.reshape(codes.shape[0], conv.in_channels, kh * kw, -1).permute(0, 3, 2, 1)
    return columns.reshape(-1, kh * kw * conv.in_channels).long()


@pytest.mark.parametrize("window", WINDOWS[:2], ids=_window_id)
def test_w4a8_conv2d_with_groups_along_the_receptive_field(window):
    gen = _generator(60)
    conv = _conv(32, 12, window)
    x = _image(gen, channels=32, dtype=torch.bfloat16)
    group = 96
    u, packed, w_scale, w_zero = _int4_weight(12, 288, group, False, gen)
    x_scale, x_zero = 0.03, -90
    y = int4_conv2d(*_on_device(x), x_scale, x_zero, *_on_device(packed, w_scale, w_zero), group,
                    **_window_args(window))  # fmt: skip
    columns = _unfolded_codes(_int8_codes(x, x_scale, x_zero), x_zero, conv)
    exact = integer_linear(
        Codes(columns, torch.tensor(x_scale), torch.tensor(x_zero)),
        _weight_codes(u, w_scale, w_zero, group),
        None,
        group_size=group,
    )
    expected = exact.reshape(2, *y.shape[2:], 12).permute(0, 3, 1, 2)
    _assert_matches(y, expected, OUTPUT_ROUNDING[torch.bfloat16])


def test_w4a16_conv2d():
    gen = _generator(65)
    window = WINDOWS[0]
    conv = _conv(8, 12, window)
    x = _image(gen, dtype=torch.float16)
    u, packed, w_scale, w_zero = _int4_weight(12, 72, 72, False, gen)
    bias = torch.randn(12, generator=gen)
    y = int4_conv2d(*_on_device(x), None, 0, *_on_device(packed, w_scale, w_zero), None, None, *_on_device(bias),
                    act="none", **_window_args(window))  # fmt: skip
    weight = _nchw_order(_dequantized(u, w_scale, w_zero, 72).half().double(), conv)
    expected = F.conv2d(x.double(), weight, bias.double(), conv.stride, conv.padding, conv.dilation)
    _assert_matches(y, expected, OUTPUT_ROUNDING[torch.float16])


def test_fp8_conv2d():
    gen = _generator(70)
    window = WINDOWS[1]
    conv = _conv(8, 12, window)
    x = _activations((2, 8, 7, 9), gen).contiguous(memory_format=torch.channels_last)
    w, w_scale = _fp8_weight(12, 72, gen)
    y = fp8_conv2d(*_on_device(x), 0.03, *_on_device(w, w_scale), **_window_args(window))
    weight = _nchw_order(w.double() * w_scale.double()[:, None], conv)
    expected = F.conv2d(_fp8_values(x, 0.03), weight, None, conv.stride, conv.padding, conv.dilation)
    _assert_matches(y, expected, FP8_ACCUMULATION)


def test_fp8_conv2d_refuses_a_dynamic_scale():
    w, w_scale = _fp8_weight(4, 18, _generator(71))
    with pytest.raises(ValueError, match="static activation scale"):
        fp8_conv2d(torch.randn(1, 2, 5, 5), None, w, w_scale, kernel_size=3)


# ------------------------------------------------------------------------------------------------ GPU only


#: Stride-1 windows of the shifted-window kernel: 3x3 "same", 1x1, dilated, unpadded ("valid"), non-square
SHIFTED_WINDOWS = [(3, 1, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2), (3, 1, 0, 1), ((3, 1), 1, (1, 0), 1)]


@pytest.mark.parametrize("window", SHIFTED_WINDOWS, ids=_window_id)
@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_stride_one_conv2d_over_whole_k_tiles_runs_the_shifted_window_kernel(window, act, monkeypatch):
    """64 channels (whole K tiles): the shifted-window kernel, checked against the convolution of the values the
    codes stand for, padding included (int8 pads with the code z_x, which stands for 0)."""
    launch = mock.Mock(wraps=triton_conv.shifted_window_conv2d)
    monkeypatch.setattr(triton_conv, "shifted_window_conv2d", launch)
    gen = _generator(75)
    conv = _conv(64, 12, window)
    x = _image(gen, channels=64)
    bias = torch.randn(12, generator=gen)
    if act == "int8":
        w, w_scale, _ = _int8_weight(12, conv.weight[0].numel(), True, gen)
        x_scale, x_zero = 0.03, -100
        y = int8_conv2d(x.to(DEVICE), x_scale, x_zero, *_on_device(w, w_scale), None, None, bias.to(DEVICE),
                        **_window_args(window))  # fmt: skip
        x_values = x_scale * (_int8_codes(x, x_scale, x_zero).double() - x_zero)
        weight, tolerance = _dequantized(w, w_scale, None, w.shape[1]), OUTPUT_ROUNDING[torch.float32]
    else:
        w, w_scale = _fp8_weight(12, conv.weight[0].numel(), gen)
        y = fp8_conv2d(*_on_device(x), 0.03, *_on_device(w, w_scale), bias.to(DEVICE), **_window_args(window))
        x_values, weight, tolerance = _fp8_values(x, 0.03), w.double() * w_scale.double()[:, None], FP8_ACCUMULATION
    assert launch.call_count == 1
    assert y.shape == conv(x).shape and y.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x_values, _nchw_order(weight, conv), bias.double(), 1, conv.padding, conv.dilation)
    _assert_matches(y, expected, tolerance)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def test_cudnn_runs_fp8_convolutions_only():
    w, w_scale, _ = _int8_weight(4, 18, True, _generator(72))
    with pytest.raises(ValueError, match="fp8 convolutions only"):
        int8_conv2d(torch.randn(1, 2, 5, 5), 0.03, 0, w, w_scale, kernel_size=3, backend="cudnn")


needs_cudnn_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and cudnn_conv.CUDNN_FRONTEND_AVAILABLE)
    or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a Hopper GPU and nvidia-cudnn-frontend",
)


@pytest.mark.gpu
@needs_cudnn_fp8
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_cudnn_fp8_conv2d_is_the_float_convolution_of_the_codes(stride):
    conv = nn.Conv2d(320, 320, 3, stride=stride, padding=1)
    x = (torch.randn(2, 320, 32, 32, device="cuda") + 0.5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w8, w8_scale = _on_device(*_fp8_weight(320, 2880, _generator(9)))
    bias = torch.randn(320, device="cuda").to(torch.bfloat16)
    window = {"kernel_size": 3, "stride": stride, "padding": 1}
    y = fp8_conv2d(x, 0.03, w8, w8_scale, bias, backend="cudnn", **window)
    weight = _nchw_order(w8.double() * w8_scale.double()[:, None], conv)
    values = F.pad(_fp8_values(x, 0.03), (1, 1, 1, 1))
    assert _relative_error(y, F.conv2d(values, weight, bias.double(), stride=stride)) < 1e-2
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    triton = fp8_conv2d(x, 0.03, w8, w8_scale, bias, backend="triton", **window)
    assert _relative_error(y, triton) < 1e-2


@pytest.mark.gpu
@needs_cudnn_fp8
def test_gpu_cudnn_fp8_conv2d_compiles_and_replays_in_a_cuda_graph():
    x = torch.randn(2, 64, 16, 16, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w8, w8_scale = _on_device(*_fp8_weight(64, 576, _generator(10)))

    def conv(x):
        return fp8_conv2d(torch.nn.functional.silu(x), 0.03, w8, w8_scale, backend="cudnn", kernel_size=3, padding=1)

    eager = conv(x)
    compiled = torch.compile(conv, mode="reduce-overhead")
    for _ in range(3):
        graphed = compiled(x)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_int8_and_w4a8_linear_at_unet_shapes(dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    rows, depth, channels = 8192, 1280, 1280
    x = (torch.randn(rows, depth, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    x_scale, x_zero = 0.04, -13
    x_values = x_scale * (_int8_codes(x, x_scale, x_zero).double() - x_zero)
    w, w_scale, w_zero = _on_device(*_int8_weight(channels, depth, False, _generator(1)))
    y = int8_linear(x, x_scale, x_zero, w, w_scale, w_zero, weight_colsums(w))
    assert _relative_error(y, x_values @ _dequantized(w, w_scale, w_zero, depth).T) < OUTPUT_ROUNDING[dtype]
    u, packed, w4_scale, w4_zero = _on_device(*_int4_weight(channels, depth, 128, False, _generator(2)))
    y = int4_linear(x, x_scale, x_zero, packed, w4_scale, w4_zero, 128, weight_colsums(packed, 128))
    assert _relative_error(y, x_values @ _dequantized(u, w4_scale, w4_zero, 128).T) < OUTPUT_ROUNDING[dtype]


@pytest.mark.gpu
def test_gpu_w4a16_and_fp8_linear_with_bf16_activations():
    x = torch.randn(8192, 1280, device="cuda", dtype=torch.bfloat16)
    u, packed, w_scale, w_zero = _on_device(*_int4_weight(1280, 1280, 64, False, _generator(3)))
    weight = _dequantized(u, w_scale, w_zero, 64)
    y = int4_linear(x, None, 0, packed, w_scale, w_zero, 64, act="none")
    assert _relative_error(y, x.double() @ weight.T) < 1e-2
    w8, w8_scale = _on_device(*_fp8_weight(1280, 1280, _generator(4)))
    for x_scale in [x.abs().max().float() / 448, None]:
        scale = x_scale if x_scale is not None else (x.abs().amax(1, keepdim=True).float() / 448)
        x_values = _fp8_values(x, scale)
        y = fp8_linear(x, x_scale, w8, w8_scale)
        assert _relative_error(y, x_values @ (w8.double() * w8_scale.double()[:, None]).T) < 1e-2


@pytest.mark.parametrize(("act", "zero"), [("int8", -17), ("fp8", 0)])
def test_compiled_activation_quantization_gives_the_eager_codes(act, zero):
    """Under torch.compile the quantization runs in inductor's code: it must divide as torch does (correctly
    rounded), or codes would differ from the simulated quantizer's near rounding boundaries (on a GPU, inductor's
    Triton code divides float32 within 2 ulp unless told otherwise)."""
    x = torch.randn(1 << 20, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)) * 3
    scale = torch.tensor([0.0371], device=DEVICE)
    eager = quantize_activations(x, scale, zero, act)
    compiled = torch.compile(quantize_activations)(x, scale, zero, act)
    assert torch.equal(compiled.view(torch.int8), eager.view(torch.int8))


@pytest.mark.gpu
def test_gpu_small_m_timestep_embedding():
    x = torch.randn(2, 320, device="cuda", dtype=torch.bfloat16)
    w, w_scale, w_zero = _on_device(*_int8_weight(1280, 320, False, _generator(5)))
    y = int8_linear(x, 0.02, 4, w, w_scale, w_zero)
    x_values = 0.02 * (_int8_codes(x, 0.02, 4).double() - 4)
    assert _relative_error(y, x_values @ _dequantized(w, w_scale, w_zero, 320).T) < OUTPUT_ROUNDING[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_conv2d_at_unet_shapes(stride):
    conv = nn.Conv2d(320, 320, 3, stride=stride, padding=1)
    x = (torch.randn(2, 320, 64, 64, device="cuda") + 0.5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    window = {"kernel_size": 3, "stride": stride, "padding": 1}
    x_scale, x_zero = 0.03, -40
    x_values = x_scale * (_int8_codes(x, x_scale, x_zero).double() - x_zero)
    x_values = F.pad(x_values, (1, 1, 1, 1))  # the real-valued zero padding
    w, w_scale, w_zero = _on_device(*_int8_weight(320, 2880, False, _generator(6)))
    weight = _nchw_order(_dequantized(w, w_scale, w_zero, 2880), conv)
    y = int8_conv2d(x, x_scale, x_zero, w, w_scale, w_zero, weight_colsums(w), **window)
    assert _relative_error(y, F.conv2d(x_values, weight, stride=stride)) < OUTPUT_ROUNDING[torch.bfloat16]
    # symmetric weights: the shifted-window kernel at stride 1, the gathering one at stride 2
    y = int8_conv2d(x, x_scale, x_zero, w, w_scale, None, weight_colsums(w), **window)
    weight = _nchw_order(_dequantized(w, w_scale, None, 2880), conv)
    assert _relative_error(y, F.conv2d(x_values, weight, stride=stride)) < OUTPUT_ROUNDING[torch.bfloat16]
    u, packed, w4_scale, w4_zero = _on_device(*_int4_weight(320, 2880, 64, True, _generator(7)))
    weight = _nchw_order(_dequantized(u, w4_scale, w4_zero, 64), conv)
    y = int4_conv2d(x, x_scale, x_zero, packed, w4_scale, w4_zero, 64, **window)
    assert _relative_error(y, F.conv2d(x_values, weight, stride=stride)) < OUTPUT_ROUNDING[torch.bfloat16]
    y = int4_conv2d(x, None, 0, packed, w4_scale, w4_zero, 64, act="none", **window)
    assert _relative_error(y, F.conv2d(F.pad(x.double(), (1, 1, 1, 1)), weight, stride=stride)) < 1e-2
    w8, w8_scale = _on_device(*_fp8_weight(320, 2880, _generator(8)))
    y = fp8_conv2d(x, 0.03, w8, w8_scale, **window)
    weight = _nchw_order(w8.double() * w8_scale.double()[:, None], conv)
    assert _relative_error(y, F.conv2d(F.pad(_fp8_values(x, 0.03), (1, 1, 1, 1)), weight, stride=stride)) < 1e-2


# ------------------------------------------------------------------------------------------------ autotuning


@pytest.mark.parametrize(
    ("act", "group", "m", "n", "k"),
    [("int8", 0, 8192, 320, 2880), ("int8", 0, 2, 1280, 320), ("int8", 32, 512, 64, 256), ("none", 64, 4096, 4, 288),
     ("fp8", 0, 37, 96, 96), ("int8", 128, 20, 48, 1024)],
)  # fmt: skip
def test_autotuning_benchmarks_only_configs_that_fit_the_call(act, group, m, n, k):
    from dmquant.kernels import triton_gemm

    args = {"ACT": act, "GROUP_SIZE": group, "M": m, "N": n, "K": k}
    usable = triton_gemm._usable_configs(triton_gemm._HOPPER_CONFIGS, args)
    assert usable
    for config in usable:
        tile = config.kwargs
        assert (tile["BLOCK_M"] == 16) == (m <= 16)
        assert not group or group % tile["BLOCK_K"] == 0
