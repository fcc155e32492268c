"""kernels/triton_quantize.py: the one-pass activation quantization gives the torch operations' codes exactly.

Without CUDA the kernel runs in Triton's interpreter (int8 only: the interpreter's float32 → e4m3 conversion rounds
some values near a binade's top down, e.g. -127.24 to -64, so the fp8 kernel is checked on a GPU only).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dmquant.kernels import triton_quantize  # noqa: E402
from dmquant.kernels.operands import quantize_activations  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _torch_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, act: str) -> torch.Tensor:
    """The torch operations of quantize_activations, written out (the simulated quantizer's computation)."""
    scaled = x.float() / scale
    if act == "int8":
        codes = torch.round(scaled) if zero is None else torch.round(scaled) + zero
        return torch.clamp(codes, -128, 127).to(torch.int8)
    return scaled.clamp(-448, 448).to(torch.float8_e4m3fn)


def _inputs(shape, dtype, seed: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 60 * scale
    flat = x.view(-1)
    # exact ties of x / s (k + 0.5) · s, both signs, and values far outside the code range
    flat[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1e9, -1e9]) * scale
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [None, 3, -128], ids=["no-zero", "zero3", "zero-128"])
def test_int8_codes_equal_the_torch_operations(dtype, zero):
    scale = torch.tensor([0.37], device=DEVICE)
    zero_tensor = None if zero is None else torch.tensor([zero], dtype=torch.int32, device=DEVICE)
    x = _inputs((5, 37), dtype, seed=1, scale=0.37)
    got = triton_quantize.quantize(x, scale, zero_tensor, "int8")
    assert got.dtype == torch.int8
    assert torch.equal(got, _torch_codes(x, scale, zero_tensor, "int8"))


def test_ties_round_to_even():
    scale = torch.tensor([1.0], device=DEVICE)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5], device=DEVICE)
    got = triton_quantize.quantize(x, scale, None, "int8")
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 126, -128]


def test_a_channels_last_input_keeps_its_layout():
    scale = torch.tensor([0.5], device=DEVICE)
    x = _inputs((2, 6, 5, 3), torch.float32, seed=2, scale=0.5).contiguous(memory_format=torch.channels_last)
    assert triton_quantize.takes(x, scale)
    got = triton_quantize.quantize(x, scale, None, "int8")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, _torch_codes(x, scale, None, "int8"))


def test_strided_views_and_per_row_scales_are_not_taken():
    x = torch.randn(4, 8, device=DEVICE)
    assert not triton_quantize.takes(x[:, ::2], torch.ones(1, device=DEVICE))
    assert not triton_quantize.takes(x, torch.ones(4, 1, device=DEVICE))
    assert triton_quantize.takes(x, torch.ones(1, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_codes_equal_the_torch_operations(dtype):
    scale = torch.tensor([0.011], device=DEVICE)
    x = _inputs((64, 1000), dtype, seed=3, scale=0.011)
    got = triton_quantize.quantize(x, scale, None, "fp8")
    assert torch.equal(got.view(torch.uint8), _torch_codes(x, scale, None, "fp8").view(torch.uint8))


@pytest.mark.gpu
def test_eager_cuda_calls_take_one_kernel_with_the_same_codes():
    """quantize_activations on CUDA, eager: the one-pass kernel, codes as the torch operations give them."""
    x = torch.randn(256, 320, device=DEVICE, dtype=torch.bfloat16) * 3
    scale, zero = torch.tensor([0.05], device=DEVICE), torch.tensor([-7], dtype=torch.int32, device=DEVICE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        codes = quantize_activations(x, scale, zero, "int8")
        torch.cuda.synchronize()
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "_quantize_kernel" in kernels[0].name
    assert torch.equal(codes, _torch_codes(x, scale, zero, "int8"))


@pytest.mark.gpu
def test_a_strided_eager_input_is_copied_once_then_quantized_in_one_pass():
    """The NHWC view a convolution takes of an NCHW activation: one 16-bit copy and the one-pass kernel, not the
    torch operations' float32 passes; the same codes, contiguous in the view's order (NHWC in memory)."""
    x = torch.randn(2, 48, 6, 5, device=DEVICE, dtype=torch.bfloat16) * 3
    view = x.permute(0, 2, 3, 1)
    scale = torch.tensor([0.02], device=DEVICE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        codes = quantize_activations(view, scale, None, "fp8")
        torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2 and "_quantize_kernel" in kernels[1], kernels
    assert codes.is_contiguous()
    assert torch.equal(codes.view(torch.uint8), _torch_codes(view, scale, None, "fp8").view(torch.uint8))


def test_compiled_fp8_codes_by_the_reciprocal_differ_from_the_quotients_rarely_and_by_one_step():
    """fp8_codes_by_reciprocal against the correctly rounded quotient's codes on 4M random values and 4 scales: at
    most one element in 100,000 differs, and then by one e4m3 step."""
    from dmquant.kernels.operands import fp8_codes_by_reciprocal

    generator = torch.Generator().manual_seed(4)
    differing = total = 0
    for scale_value in (0.0137, 0.3, 1.7, 23.1):
        x = torch.randn(1 << 20, generator=generator) * 100 * scale_value
        scale = torch.tensor([scale_value])
        fast = fp8_codes_by_reciprocal(x, scale).float()
        exact = _torch_codes(x, scale, None, "fp8").float()
        mismatch = fast != exact
        differing += int(mismatch.sum())
        total += x.numel()
        if mismatch.any():  # neighbours in e4m3: no value strictly between them
            low, high = torch.minimum(fast, exact)[mismatch], torch.maximum(fast, exact)[mismatch]
            middle = ((low + high) / 2).to(torch.float8_e4m3fn).float()
            assert torch.all((middle == low) | (middle == high))
    assert differing <= total // 100_000, differing
