"""Attention throughput at the deployment models' shapes: bf16 SDPA against dmquant's FP8 attention on cuDNN.

Where ``speed.py`` times whole denoiser calls, this times the attention alone, so that what FP8 attention buys
a model can be read from its attention share. Shapes ``(batch, heads, tokens, head dim)`` are those of the
deployment workloads: FLUX.1-dev at 1024² (4,096 image + 512 text tokens, 24 heads of 128), SD3-medium at
1024² batch 2 (4,096 + 333 tokens, 24 × 64), SDXL's UNet at 1024² batch 2 (4,096 tokens × 10 heads, 1,024 ×
20, heads of 64), PixArt-Σ at 1024² batch 2 (4,096 tokens × 16 heads of 72) and SD-1.5's at 512² batch 8 (its
40-wide heads at 4,096 tokens and 80-wide ones at 1,024; its 160-wide heads are above what cuDNN's FP8 attention
takes, and stay in bf16). Heads whose width is not a multiple of 16 (72, 40) run zero-padded to the next one, as
the processor runs them (:func:`dmquant.kernels.fp8_attention.pad_heads`). Each shape is run as

* ``bf16``: ``F.scaled_dot_product_attention`` on bf16 ``(batch, heads, tokens, dim)`` views of
  ``(batch, tokens, heads·dim)`` projections, as diffusers calls it (torch picks its fastest backend);
* ``fp8``: :class:`dmquant.kernels.fp8_attention.Fp8AttnProcessor`'s path from the same bf16 projections:
  Q, K, V quantized by static scales (one pass each), cuDNN's FP8 SDPA, the fp8 output dequantized to bf16;
* ``fp8-kernel``: cuDNN's FP8 SDPA alone on fp8 operands (the ceiling when the quantization is fused into the
  operations producing Q, K and V, as ``torch.compile`` does).

Each is captured in a CUDA graph and replayed (median of ``--repeats`` CUDA-event timings after warm-up);
TFLOP/s = 4·B·H·S_q·S_kv·D / time. Results: ``--results`` (default ``bench/results/attention-speed``), one JSON
per device, rewritten after each shape. Needs CUDA and ``nvidia-cudnn-frontend``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

if not __package__:  # run as a file, `python bench/attention_speed.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import docstring_parser, git_commit, write_cell
from bench.speed_measure import capture_graph
from dmquant.deployment import median_call_ms
from dmquant.kernels import fp8_attention
from dmquant.provenance import environment

#: name -> (batch, heads, query tokens, key/value tokens, head dim)
SHAPES = {
    "flux-dev": (1, 24, 4608, 4608, 128),
    "sd3-medium": (2, 24, 4429, 4429, 64),
    "sdxl-unet 64x64": (2, 10, 4096, 4096, 64),
    "sdxl-unet 32x32": (2, 20, 1024, 1024, 64),
    "pixart-sigma": (2, 16, 4096, 4096, 72),
    "sd15-unet-b8 64x64": (8, 8, 4096, 4096, 40),
    "sd15-unet-b8 32x32": (8, 8, 1024, 1024, 80),
}


def _timed(call: Callable[[], Any], repeats: int) -> float:
    return median_call_ms(capture_graph(call), repeats=repeats)


def shape_rows(name: str, shape: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """The three paths of one shape, with their times, TFLOP/s and speed-up over bf16."""
    batch, heads, q_tokens, kv_tokens, dim = shape
    generator = torch.Generator(device="cuda").manual_seed(0)

    def projection(tokens: int) -> torch.Tensor:
        return torch.randn(batch, tokens, heads * dim, device="cuda", generator=generator).to(torch.bfloat16)

    query, key, value = projection(q_tokens), projection(kv_tokens), projection(kv_tokens)
    scales = [(x.float().abs().amax() / 448).reshape(1) for x in (query, key, value)]
    probs_scale = torch.full((1,), 1 / 448, device="cuda")
    attn_scale = dim**-0.5

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (heads, dim)).transpose(1, 2)

    def bf16() -> torch.Tensor:
        return F.scaled_dot_product_attention(heads_first(query), heads_first(key), heads_first(value))

    from dmquant.kernels.triton_quantize import quantize  # Triton: imported where a GPU run needs it

    padded = fp8_attention.padded_head_dim(dim)

    def quantized(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return quantize(fp8_attention.pad_heads(x, heads, padded), scale, None, "fp8")

    codes = [quantized(x, s) for x, s in zip((query, key, value), scales, strict=True)]

    def kernel(operands: list[torch.Tensor]) -> torch.Tensor:
        return torch.ops.dmquant.fp8_sdpa(*operands, *scales, probs_scale, heads, attn_scale)

    def fp8() -> torch.Tensor:
        operands = [quantized(x, s) for x, s in zip((query, key, value), scales, strict=True)]
        out = fp8_attention.unpad_heads(kernel(operands), heads, dim)
        return (out.float() * scales[2]).to(torch.bfloat16)

    flops = 4 * batch * heads * q_tokens * kv_tokens * dim
    rows = []
    for path, call in (("bf16", bf16), ("fp8", fp8), ("fp8-kernel", lambda: kernel(codes))):
        row = {"shape": name, "batch": batch, "heads": heads, "q_tokens": q_tokens, "kv_tokens": kv_tokens,
               "head_dim": dim, "path": path}  # fmt: skip
        try:
            ms = _timed(call, repeats)
        except Exception as error:  # a path cuDNN refuses here is a row with its reason
            rows.append(row | {"error": f"{type(error).__name__}: {error}"})
            continue
        rows.append(row | {"ms": ms, "tflops": flops / ms / 1e9})
    bf16_ms = rows[0].get("ms")
    for row in rows[1:]:
        if "ms" in row and bf16_ms:
            row["speedup_vs_bf16"] = bf16_ms / row["ms"]
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = docstring_parser(__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per path (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "attention-speed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (torch.cuda.is_available() and fp8_attention.CUDNN_FRONTEND_AVAILABLE):
        print("bench/attention_speed.py needs a CUDA device and nvidia-cudnn-frontend", file=sys.stderr)
        return 2
    env = environment()
    path = args.results / f"{env['device'].replace(' ', '-')}.json"
    rows: list[dict[str, Any]] = []
    for name in args.shapes:
        for row in shape_rows(name, SHAPES[name], args.repeats):
            print(f"{name} {row['path']}: {row.get('ms', row.get('error'))} ms, {row.get('speedup_vs_bf16', '')}")
            rows.append(row)
        record = {"rows": rows, "environment": env, "git_commit": git_commit(),
                  "command": "python bench/attention_speed.py"}  # fmt: skip
        write_cell(path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
