"""kernels/triton_dequantize.py: the one-pass dequantization of a packed int4 weight gives the torch operations'
weight exactly (``(u − z) · s`` in float32, rounded once to the output dtype).

Without CUDA the kernel runs in Triton's interpreter, with float32 and float16 outputs (numpy, which the interpreter
computes with, has no bfloat16); on a GPU bfloat16 too.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dmquant.core.packing import pack_codes  # noqa: E402
from dmquant.kernels import triton_dequantize  # noqa: E402
from dmquant.kernels.weights import LowBitWeight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _weight(rows: int, cols: int, group: int, seed: int):
    """Random nibbles packed as :class:`LowBitWeight` stores them, with per-group scales and zero points (some of
    them fractional, as an asymmetric quantizer's zero point shifted by ``qmin`` can be)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=generator)
    stored = pack_codes(codes, 4, qmin=0).reshape(rows, cols // 2)
    scale = torch.rand(rows, cols // group, generator=generator) * 0.1 + 1e-3
    zero = torch.randint(0, 16, (rows, cols // group), generator=generator).float()
    zero[:, ::2] += 0.25
    return codes, stored, scale, zero


def _written_out(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The dequantization with every code's parameters repeated to its position (float32)."""
    return (codes.float() - zero.repeat_interleave(group, dim=1)) * scale.repeat_interleave(group, dim=1)


# (rows, columns, group size): one group per row, several, a group boundary inside a row's bytes, several programs
SHAPES = [(3, 8, 8), (5, 64, 16), (17, 260, 130), (9, 512, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "group"), SHAPES)
def test_one_pass_dequantization_equals_the_written_out_formula(rows, cols, group, dtype):
    codes, stored, scale, zero = _weight(rows, cols, group, seed=rows + cols)
    weight = triton_dequantize.dequantize_int4(stored.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), group, dtype)
    assert weight.dtype == dtype and weight.shape == (rows, cols)
    assert torch.equal(weight.cpu(), _written_out(codes, scale, zero, group).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_stored_weight_dequantizes_into_the_asked_dtype_as_the_formula_rounds_it(dtype):
    codes, stored, scale, zero = _weight(6, 256, 64, seed=1)
    weight = LowBitWeight("int4", stored, scale, zero, codes.shape).to(DEVICE)
    assert torch.equal(weight.codes().cpu(), codes.to(torch.int32))
    assert torch.equal(weight.dequantize(dtype).cpu(), _written_out(codes, scale, zero, 64).to(dtype))
