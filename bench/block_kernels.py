"""The kernels of one compiled DiT-XL/2 block, bf16 against W8A8-FP8: where a converted block's time goes.

Builds block 0 of DiT-XL/2 (``DIT_XL_2_256``, random weights) at ``--batches`` (256 tokens per image),
compiles it with ``torch.compile`` (default mode, ``dynamic=False``) in three forms — bf16; dmquant W8A8-FP8 as
``speed.py``'s ``dmquant-w8a8-fp8-fast`` row converts it (minmax, attention matmuls in bf16, fast accumulation)
with every converted layer on its fp8 kernel; and that with each layer's path measured
(``dmquant.kernels.paths``) — and records for each: the number of Triton kernels inductor generated (a standalone
activation-quantize pass would add one per quantized input), the profiled kernels of one call (name, µs,
category) and the median time of CUDA-graph replays of the call. One JSON file, ``--output``.

    python bench/block_kernels.py --output bench/results/block-kernels/NVIDIA-H100-80GB-HBM3.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import triton.testing
from diffusers import DiTTransformer2DModel

if not __package__:  # run as a file, `python bench/block_kernels.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import command_line, git_commit, write_cell
from bench.configs import dmquant_config
from bench.speed_measure import configure_compiler, kernel_category, kernel_times_us
from bench.speed_rows import ROWS, convert_for
from bench.speed_run import run_environment
from bench.speed_workloads import DIT_XL_2_256
from dmquant import api
from dmquant.calib.record import CalibrationSet
from dmquant.kernels.dispatch import load_kernels
from dmquant.kernels.paths import select_paths


class FirstBlock(torch.nn.Module):
    """DiT-XL/2's first transformer block, called on the patch tokens with the timestep and class labels."""

    def __init__(self, model: DiTTransformer2DModel) -> None:
        super().__init__()
        self.block = model.transformer_blocks[0]

    def forward(self, tokens, timestep, class_labels):
        return self.block(tokens, timestep=timestep, class_labels=class_labels)


def _inductor_kernels(model, *args) -> int:
    from torch._inductor.utils import run_and_get_code

    _, sources = run_and_get_code(model, *args)
    return sum(source.count("@triton.jit") for source in sources)


def _profile(model, args: tuple) -> dict:
    with torch.no_grad():
        kernels = _inductor_kernels(model, *args)
        model(*args)
        times = kernel_times_us(lambda: model(*args), torch.device("cuda"))
        median = triton.testing.do_bench_cudagraph(lambda: model(*args), rep=50, return_mode="median")
    listed = sorted(times.items(), key=lambda item: -item[1].us)
    return {
        "inductor_triton_kernels": kernels,
        "cuda_graph_median_ms": median,
        "kernel_time_ms": sum(time.us for time in times.values()) / 1000,
        "kernels": [
            {"name": name[:160], "us": time.us, "calls": time.calls, "category": kernel_category(name)}
            for name, time in listed
        ],
    }


def run(batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        dit = DiTTransformer2DModel(**DIT_XL_2_256).eval()
    block = FirstBlock(dit)
    del dit
    tokens = torch.randn(batch, 256, 1152, device="cuda")
    timestep = torch.randint(0, 1000, (batch,), device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    rows = min(batch, 2)
    calibration = CalibrationSet(
        samples=tokens[:rows],
        timesteps=timestep[:rows],
        step_indices=torch.zeros(rows, dtype=torch.long, device="cuda"),
        cond={"class_labels": labels[:rows]},
        num_inference_steps=1,
    )
    row = ROWS["dmquant-w8a8-fp8-fast"]  # the default conversion: fast accumulation, attention matmuls in bf16
    quantized = api.quantize(copy.deepcopy(block), dmquant_config(row, block), calibration, progress=False)
    args = (tokens.to(torch.bfloat16), timestep, labels)
    forms = {
        "bf16": block.to(torch.bfloat16),
        "fp8-every-layer": convert_for(row, quantized).to(torch.bfloat16),
    }
    measured = convert_for(row, quantized).to(torch.bfloat16)
    with torch.no_grad():
        report = select_paths(measured, lambda: measured(*args))
    forms["fp8-measured-paths"] = measured
    out = {"batch": batch, "tokens_per_call": batch * 256, "paths": report.to_dict()}
    for name, model in forms.items():
        torch._dynamo.reset()
        out[name] = _profile(torch.compile(model, dynamic=False), args)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    load_kernels()
    configure_compiler()
    record = {"benchmark": "block-kernels", "model": "dit-xl-2-256, transformer_blocks[0], random weights"}
    record["runs"] = [run(batch, args.seed) for batch in args.batches]
    record |= {"command": command_line("block_kernels", argv),
               "environment": run_environment(), "git_commit": git_commit()}  # fmt: skip
    write_cell(Path(args.output), record)
    for run_ in record["runs"]:
        cells = ", ".join(
            f"{form} {run_[form]['cuda_graph_median_ms']:.4f} ms / {run_[form]['inductor_triton_kernels']} kernels"
            for form in ("bf16", "fp8-every-layer", "fp8-measured-paths")
        )
        print(f"batch {run_['batch']}: {cells}; paths {run_['paths']['counts']}")
    print(json.dumps({"written": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
