"""Kernel throughput at SD-1.5 UNet shapes: dmquant's Triton GEMM/conv kernels against torch's own paths.

Where ``speed.py`` times whole denoiser calls, this times single layers, so a slow model can be traced to
the kernel that makes it slow. Shapes are SD-1.5's at batch 2 with 64×64×4 latents (tokens = 2·H·W):
the 3×3 convs of each resolution, 1×1 convs (transformer projections, resnet shortcuts) and the attention /
feed-forward Linears. Each shape is run as

* ``bf16``: ``F.conv2d`` / ``F.linear`` on bfloat16 (cuDNN / cuBLAS), NCHW and channels-last inputs;
* ``int8``, ``fp8``, ``w4a8``: dmquant's layers' paths (activation quantization included): cuBLASLt for W8A8
  Linears and 1×1 convs where it takes the call, the Triton kernels otherwise; on NCHW and channels-last inputs
  for convs; ``int8-triton``, ``fp8-triton``: the Triton kernels where cuBLASLt would be chosen;
  ``int8-gather``, ``fp8-gather``: 3×3 convs on the implicit GEMM that gathers its A tiles, where dmquant runs
  stride-1 convolutions on the shifted-window kernel (TMA-loaded boxes of the padded input) since it exists;
* ``torch-int8`` (``torch._int_mm`` on pre-quantized int8 operands) and ``torch-fp8``
  (``torch._scaled_mm`` with row-wise scales on pre-quantized fp8 operands) for Linears: the GEMM alone,
  the ceiling of a library path.

Each path is timed two ways, medians of CUDA-event timings after warm-up (which includes Triton's autotuning):
``ms``, one call captured in a CUDA graph and replayed — the GPU's time alone, as inside a graphed model — and
``eager_ms``, one call launched from Python, host overhead included. TFLOP/s = 2·M·N·K / ``ms``.
Results: ``--results`` (default ``bench/results/layer-speed``) as one JSON per device. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.nn import functional as F

if not __package__:  # run as a file, `python bench/layer_speed.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import docstring_parser, git_commit, write_cell
from bench.speed_measure import capture_graph
from dmquant.deployment import median_call_ms
from dmquant.provenance import environment

#: ((batch, channels, height, width), kernel size) of SD-1.5's 3×3 convs at each resolution and of its 1×1
#: convs at the largest and smallest transformer resolutions; output channels = input.
CONVS = [((2, 320, 64, 64), 3), ((2, 640, 32, 32), 3), ((2, 1280, 16, 16), 3), ((2, 1280, 8, 8), 3),
         ((2, 320, 64, 64), 1), ((2, 1280, 16, 16), 1)]  # fmt: skip
#: (M, K, N) of SD-1.5 Linears: attention projections, feed-forward in/out, cross-attention K/V, time embedding;
#: then 8192³, where each path reaches its peak rate (does an int8 kernel beat bf16 where cuBLAS's does not?).
LINEARS = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 640), (512, 1280, 1280),
           (154, 768, 320), (2, 320, 1280), (8192, 8192, 8192)]  # fmt: skip


#: How ``ms`` is measured, kept in the results (the first results, without it, timed eager calls).
TIMING = "ms: one call captured in a CUDA graph and replayed (GPU time); eager_ms: the call launched from Python"


def _median_ms(call: Callable[[], Any], repeats: int) -> float:
    return median_call_ms(call, warmup=0, repeats=repeats)


def _timed(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    """``ms``: a CUDA graph of one call, replayed; ``eager_ms``: the call itself (after the graph's warm-up)."""
    replay = capture_graph(call)
    return {"ms": _median_ms(replay, repeats), "eager_ms": _median_ms(call, repeats)}


def _int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8), torch.rand(n, device="cuda") * 1e-3


def _gathering(call: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``call`` with the shifted-window kernel switched off: its convolution gathers its A tiles instead."""
    from dmquant.kernels import triton_conv

    def gathering(x: torch.Tensor) -> Any:
        with mock.patch.object(triton_conv, "_takes_shifted_window", return_value=False):
            return call(x)

    return gathering


def conv_rows(shape: tuple[int, ...], size: int, repeats: int) -> list[dict[str, Any]]:
    from dmquant.core.packing import pack_codes
    from dmquant.kernels.triton_conv import fp8_conv2d, int4_conv2d, int8_conv2d
    from dmquant.kernels.weights import weight_colsums

    batch, channels, height, width = shape
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    layouts = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    weight = torch.randn(channels, channels, size, size, device="cuda", dtype=torch.bfloat16) * 0.02
    depth = size * size * channels
    w8, w8_scale = _int8_weight(channels, depth)
    colsum = weight_colsums(w8)
    w_fp8 = torch.randn(channels, depth, device="cuda").to(torch.float8_e4m3fn)
    packed = pack_codes(torch.randint(-8, 8, (channels, depth), device="cuda"), 4, -8).reshape(channels, -1)
    w4_scale, w4_zero = torch.rand(channels, 1, device="cuda") * 1e-3, torch.full((channels, 1), 8, device="cuda")
    window = {"kernel_size": size, "padding": size // 2}
    x_scale = torch.tensor([0.03], device="cuda")
    calls = {
        "bf16": lambda x: F.conv2d(x, weight, padding=size // 2),
        "int8": lambda x: int8_conv2d(x, x_scale, -3, w8, w8_scale, None, colsum, **window),
        "fp8": lambda x: fp8_conv2d(x, x_scale, w_fp8, w8_scale, **window),
        "w4a8": lambda x: int4_conv2d(x, x_scale, -3, packed, w4_scale, w4_zero.int(), None, **window),
    }
    if size == 3:
        calls["int8-gather"] = _gathering(calls["int8"])
        calls["fp8-gather"] = _gathering(calls["fp8"])
    if size == 1:
        calls["int8-triton"] = lambda x: int8_conv2d(x, x_scale, -3, w8, w8_scale, None, colsum, **window,
                                                     backend="triton")  # fmt: skip
        calls["fp8-triton"] = lambda x: fp8_conv2d(x, x_scale, w_fp8, w8_scale, **window, backend="triton")
    flops = 2 * batch * height * width * channels * depth
    rows = []
    for layout, tensor in layouts.items():
        for name, call in calls.items():
            times = _timed(lambda call=call, tensor=tensor: call(tensor), repeats)
            rows.append({"op": f"conv{size}x{size}", "shape": list(shape), "layout": layout, "path": name, **times,
                         "tflops": flops / times["ms"] / 1e9})  # fmt: skip
    return rows


def linear_rows(shape: tuple[int, int, int], repeats: int) -> list[dict[str, Any]]:
    from dmquant.core.packing import pack_codes
    from dmquant.kernels.triton_gemm import fp8_linear, int4_linear, int8_linear
    from dmquant.kernels.weights import weight_colsums

    m, k, n = shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w8, w8_scale = _int8_weight(n, k)
    colsum = weight_colsums(w8)
    w_fp8 = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    packed = pack_codes(torch.randint(-8, 8, (n, k), device="cuda"), 4, -8).reshape(n, -1)
    w4_scale, w4_zero = torch.rand(n, 1, device="cuda") * 1e-3, torch.full((n, 1), 8, device="cuda").int()
    x_scale = torch.tensor([0.03], device="cuda")
    x8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    x_fp8 = x.to(torch.float8_e4m3fn)
    row_scale, col_scale = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    calls = {
        "bf16": lambda: F.linear(x, weight),
        "int8": lambda: int8_linear(x, x_scale, -3, w8, w8_scale, None, colsum),
        "fp8": lambda: fp8_linear(x, x_scale, w_fp8, w8_scale),
        "int8-triton": lambda: int8_linear(x, x_scale, -3, w8, w8_scale, None, colsum, backend="triton"),
        "fp8-triton": lambda: fp8_linear(x, x_scale, w_fp8, w8_scale, backend="triton"),
        "w4a8": lambda: int4_linear(x, x_scale, -3, packed, w4_scale, w4_zero, None),
        "w4a16": lambda: int4_linear(x, None, 0, packed, w4_scale, w4_zero, None, act="none"),
        "torch-int8": lambda: torch._int_mm(x8, w8.T),
        "torch-fp8": lambda: torch._scaled_mm(x_fp8, w_fp8.T, row_scale, col_scale, out_dtype=torch.bfloat16),
    }
    rows = []
    for name, call in calls.items():
        try:
            times = _timed(call, repeats)
        except RuntimeError as error:  # torch._int_mm refuses M <= 16
            rows.append({"op": "linear", "shape": list(shape), "path": name, "error": str(error).splitlines()[0]})
            continue
        rows.append({"op": "linear", "shape": list(shape), "path": name, **times,
                     "tflops": 2 * m * n * k / times["ms"] / 1e9})  # fmt: skip
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = docstring_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per kernel (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "layer-speed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/layer_speed.py needs a CUDA device", file=sys.stderr)
        return 2
    env = environment()
    path = args.results / f"{env['device'].replace(' ', '-')}.json"
    rows = []

    def add(new: list[dict[str, Any]]) -> None:
        """Print a shape's rows and rewrite the results with them, so a run cut short keeps what it measured."""
        for r in new:
            layout = f" {r['layout']}" if "layout" in r else ""
            print(f"{r['op']} {r['shape']}{layout} {r['path']}: {r.get('ms', r.get('error'))}")
        rows.extend(new)
        record = {"rows": rows, "timing": TIMING, "environment": env, "git_commit": git_commit(),
                  "command": "python bench/layer_speed.py"}  # fmt: skip
        write_cell(path, record)

    for shape, size in CONVS:
        add(conv_rows(shape, size, args.repeats))
    for shape in LINEARS:
        add(linear_rows(shape, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
