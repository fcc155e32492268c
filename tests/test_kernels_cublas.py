"""kernels/cublas_gemm.py: the W8A8 GEMMs on ``torch._int_mm`` / ``torch._scaled_mm`` against the Triton kernels.

PyTorch implements both ops on CPU, so the vendor path runs here on the same operands as the Triton kernels (in
Triton's interpreter without CUDA) and must give their outputs: bit for bit for int8, whose sums are exact and whose
epilogues apply the same float32 operations in the same order.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dmquant.kernels import triton_gemm  # noqa: E402
from dmquant.kernels.cublas_gemm import vendor_gemm, vendor_shapes_fit  # noqa: E402
from dmquant.kernels.triton_conv import fp8_conv2d, int8_conv2d  # noqa: E402
from dmquant.kernels.triton_gemm import fp8_linear, gemm_operands, int8_linear, quantized_linear  # noqa: E402
from dmquant.kernels.weights import weight_colsums  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


def _int8_operands(rows: int, depth: int, channels: int, *, symmetric: bool, x_zero: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows * 7 + depth + int(symmetric))
    x = (torch.randn(rows, depth, generator=gen) * 2 + 0.5).to(dtype)
    w = torch.randint(-128, 128, (channels, depth), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(channels, generator=gen) * 0.01 + 1e-3
    w_zero = None if symmetric else torch.randint(-20, 20, (channels,), generator=gen, dtype=torch.int32)
    bias = torch.randn(channels, generator=gen).to(dtype)
    tensors = [t if t is None else t.to(DEVICE) for t in (x, w, w_scale, w_zero, bias)]
    x, w, w_scale, w_zero, bias = tensors
    return gemm_operands(
        x, 0.05, x_zero, w, w_scale, w_zero, weight_colsums(w), bias,
        act="int8", weight="int8", depth=depth, group_size=None, rows=rows,
    )  # fmt: skip


@pytest.mark.parametrize("rows", [17, 64])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-point"])
@pytest.mark.parametrize("x_zero", [0, -37])
def test_int8_gemm_gives_the_triton_kernels_bits(rows, symmetric, x_zero):
    """Bit for bit where both epilogues round every operation (Triton's interpreter on CPU); on a GPU
    Triton contracts the epilogue's multiply-adds into FMAs, which round once: a few ulp apart there."""
    operands = _int8_operands(rows, 64, 48, symmetric=symmetric, x_zero=x_zero)
    expected = quantized_linear(*operands.op_arguments(), torch.float32)
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if DEVICE == "cuda" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(vendor_gemm(operands, torch.float32), expected, **tolerance)


def test_int8_gemm_is_eq_7_of_the_codes():
    """Against the dequantized product in float64: ``s_x (c_x − z_x) · s_w (c_w − z_w)ᵀ + b``."""
    operands = _int8_operands(40, 96, 32, symmetric=False, x_zero=-11)
    x_values = operands.x_scale.double() * (operands.a.double() - operands.x_zero)
    w_values = operands.w_scale.double() * (operands.w.double() - operands.w_zero.double())
    expected = x_values @ w_values.T + operands.bias.double()
    torch.testing.assert_close(vendor_gemm(operands, torch.float32).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32-epilogue", "row-wise-scales"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "per-row"])
def test_fp8_gemm_matches_the_triton_kernel(out_dtype, dynamic):
    gen = torch.Generator().manual_seed(3)
    rows, depth, channels = 24, 64, 32
    x = (torch.randn(rows, depth, generator=gen) * 3).to(out_dtype).to(DEVICE)
    w = torch.randn(channels, depth, generator=gen).to(FP8).to(DEVICE)
    w_scale = (torch.rand(channels, generator=gen) * 0.1 + 0.01).to(DEVICE)
    bias = torch.randn(channels, generator=gen).to(out_dtype).to(DEVICE)
    x_scale = triton_gemm.fp8_row_scales(x) if dynamic else 0.02
    operands = gemm_operands(
        x, x_scale, 0, w, w_scale, None, None, bias, act="fp8", weight="fp8", depth=depth, group_size=None, rows=rows
    )
    expected = quantized_linear(*operands.op_arguments(), out_dtype).double()
    rounding = 1e-6 if out_dtype == torch.float32 else 8e-3
    tolerance = rounding * (expected.abs().max().item() + 1)
    torch.testing.assert_close(vendor_gemm(operands, out_dtype).double(), expected, rtol=rounding, atol=tolerance)


@pytest.mark.parametrize(
    ("act", "rows", "depth", "channels", "fits"),
    [
        ("int8", 17, 64, 48, True),
        ("int8", 16, 64, 48, False),  # _int_mm needs M > 16
        ("int8", 64, 60, 48, False),  # K a multiple of 8
        ("int8", 64, 64, 44, False),  # N a multiple of 8
        ("fp8", 1, 64, 48, True),
        ("fp8", 64, 72, 48, False),  # K a multiple of 16
        ("fp8", 64, 64, 40, False),  # N a multiple of 16
    ],
)
def test_vendor_shapes(act, rows, depth, channels, fits):
    weight = torch.zeros(channels, depth, dtype=torch.int8 if act == "int8" else FP8)
    operands = gemm_operands(
        torch.zeros(rows, depth), 0.1, 0, weight, torch.ones(channels), None, None, None,
        act=act, weight=act, depth=depth, group_size=None, rows=rows,
    )  # fmt: skip
    assert vendor_shapes_fit(operands) is fits


def test_float_zero_points_and_int4_weights_stay_on_triton():
    float_zero = _int8_operands(32, 64, 48, symmetric=False, x_zero=0)
    object.__setattr__(float_zero, "w_zero", float_zero.w_zero.float())
    assert not vendor_shapes_fit(float_zero)
    int4 = gemm_operands(
        torch.zeros(32, 64), 0.1, 0, torch.zeros(48, 32, dtype=torch.uint8), torch.ones(48), None, None, None,
        act="int8", weight="int4", depth=64, group_size=None, rows=32,
    )  # fmt: skip
    assert not vendor_shapes_fit(int4)


def test_backend_choice_is_checked():
    x = torch.randn(32, 64, device=DEVICE)
    w = torch.zeros(48, 64, dtype=torch.int8, device=DEVICE)
    scale = torch.ones(48, device=DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        int8_linear(x, 0.1, 0, w, scale, backend="cudnn")
    with pytest.raises(ValueError, match="only 1x1 convolutions"):
        int8_conv2d(x.reshape(2, 64, 4, 4), 0.1, 0, w.repeat(1, 9), scale, kernel_size=3, backend="cublas")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cuBLASLt does not take this call"):
            int8_linear(x, 0.1, 0, w, scale, backend="cublas")


@pytest.fixture
def vendor_on_any_device(monkeypatch):
    """Route calls to the vendor GEMMs on CPU too, as on a GPU (PyTorch runs both ops on CPU)."""
    monkeypatch.setattr(triton_gemm, "vendor_takes", vendor_shapes_fit)


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_pointwise_convolutions_run_as_a_gemm_over_pixels(act, vendor_on_any_device):
    """A 1x1 convolution on the vendor GEMM equals the implicit-GEMM convolution kernel, layout included."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 32, 5, 3, generator=gen) + 0.3).to(DEVICE).contiguous(memory_format=torch.channels_last)
    scale = (torch.rand(16, generator=gen) * 0.01 + 1e-3).to(DEVICE)
    bias = torch.randn(16, generator=gen).to(DEVICE)
    if act == "int8":
        w = torch.randint(-128, 128, (16, 32), generator=gen, dtype=torch.int8).to(DEVICE)
        run = lambda backend: int8_conv2d(x, 0.04, -9, w, scale, None, None, bias, kernel_size=1, backend=backend)  # noqa: E731
    else:
        w = torch.randn(16, 32, generator=gen).to(FP8).to(DEVICE)
        run = lambda backend: fp8_conv2d(x, 0.01, w, scale, bias, kernel_size=1, backend=backend)  # noqa: E731
    vendor, triton_kernel = run("cublas"), run("triton")
    assert vendor.shape == (2, 16, 5, 3) and vendor.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(vendor, triton_kernel, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True], ids=["fp32-accumulation", "fast-accumulation"])
def test_fp8_fast_accumulation_is_asked_of_cublaslt(fast, vendor_on_any_device, monkeypatch):
    """``fast_accumulation`` reaches ``_scaled_mm`` as ``use_fast_accum`` on both epilogues and through a 1x1 conv."""
    asked, scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: asked.append(kwargs) or scaled_mm(*args, **kwargs))
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(16, 32, generator=gen).to(FP8).to(DEVICE)
    scale = (torch.rand(16, generator=gen) * 0.01 + 1e-3).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(24, 32, generator=gen).to(dtype).to(DEVICE)
        fp8_linear(x, 0.02, w, scale, backend="cublas", fast_accumulation=fast)
    pixels = torch.randn(2, 32, 3, 3, generator=gen).to(DEVICE)
    fp8_conv2d(pixels, 0.02, w, scale, kernel_size=1, backend="cublas", fast_accumulation=fast)
    assert [kwargs["use_fast_accum"] for kwargs in asked] == [fast] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vendor_and_triton_linears_agree_at_unet_shapes(dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(8192, 1280, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    w = torch.randint(-128, 128, (640, 1280), device="cuda", dtype=torch.int8, generator=gen)
    scale = torch.rand(640, device="cuda", generator=gen) * 0.01 + 1e-3
    zero = torch.randint(-20, 20, (640,), device="cuda", dtype=torch.int32, generator=gen)
    # exact integer sums; the epilogues may differ in the last bit (Triton contracts multiply-adds into FMAs)
    int8 = [int8_linear(x, 0.04, -13, w, scale, zero, backend=backend).double() for backend in ("cublas", "triton")]
    rounding = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(*int8, rtol=rounding, atol=rounding * int8[1].abs().max().item())
    w8 = torch.randn(640, 1280, device="cuda", generator=gen).to(FP8)
    fp8 = [fp8_linear(x, None, w8, scale, backend=backend).double() for backend in ("cublas", "triton")]
    rounding = 2**-12 if dtype == torch.float32 else 8e-3  # Hopper's fp8 accumulation; bf16 outputs
    torch.testing.assert_close(*fp8, rtol=rounding, atol=rounding * fp8[1].abs().max().item())
    # fast accumulation: the tensor cores' reduced-precision sums, not promoted to fp32 (K = 1280 products)
    fast = fp8_linear(x, None, w8, scale, backend="cublas", fast_accumulation=True).double()
    torch.testing.assert_close(fast, fp8[0], rtol=2**-7, atol=2**-7 * fp8[0].abs().max().item())


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_vendor_gemms_compile_into_one_graph_with_the_eager_result(act, vendor_on_any_device):
    """The vendor path with its quantization and epilogue under ``torch.compile(fullgraph=True)``."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(40, 64, generator=gen) * 2).to(DEVICE)
    scale = (torch.rand(48, generator=gen) * 0.01 + 1e-3).to(DEVICE)
    bias = torch.randn(48, generator=gen).to(DEVICE)
    if act == "int8":
        w = torch.randint(-128, 128, (48, 64), generator=gen, dtype=torch.int8).to(DEVICE)
        zero = torch.randint(-20, 20, (48,), generator=gen, dtype=torch.int32).to(DEVICE)
        x_scale = torch.tensor([0.03], device=DEVICE)
        layer = lambda x: int8_linear(x, x_scale, -5, w, scale, zero, weight_colsums(w), bias, backend="cublas")  # noqa: E731
    else:
        w = torch.randn(48, 64, generator=gen).to(FP8).to(DEVICE)
        layer = lambda x: fp8_linear(x, None, w, scale, bias, backend="cublas")  # noqa: E731
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
