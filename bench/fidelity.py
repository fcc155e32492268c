"""Deployment fidelity: zoo models sampled with real low-bit kernels against their simulated twins.

For each zoo model and each dmquant format of ``speed.py`` (the same ``dmquant_config``: minmax, first
and last layer at 8 bits, attention matmuls off), the model is calibrated on its own FP trajectories
and quantized (simulated), then converted to real low-bit layers (``convert_model``). Both sample
``--num-samples`` images with DDIM from the same seeds; the cell records their PSNR (the deployment
bound is 35 dB: the quality numbers of BENCHMARKS.md, measured on simulated models, hold for the
converted one above it), the largest pixel difference, the simulated model's PSNR against FP (the
size of the quantization error itself, for scale), what each layer became, and the sampling time of
each. On CUDA the converted layers run on the Triton kernels; on CPU they take the reference path and
must match bit for bit (PSNR inf), a smoke test of the conversion.

Two more numbers say how to read the PSNR. ``denoiser_relative_error``: ``‖ε_converted − ε_simulated‖ /
‖ε_simulated‖`` of one denoiser call on calibration inputs, the kernels' own error. ``floor_psnr_db`` (on
CUDA): the simulated model sampled on the CPU against the same model sampled on the GPU — two equally valid
float32 computations of one quantized model that differ only in rounding order. 8-bit activation codes are
a step function of their input, so a last-bit difference that moves an input across a rounding boundary
changes a code, and the sampler carries that on; where the floor itself is under the bound, no
implementation that does not reproduce the simulation's rounding order can meet it, and the converted
model is as faithful as the simulation is reproducible when its PSNR is at the floor.

Rounding learned by reconstruction (AdaRound) or LSQ step sizes change the codes and scales a kernel
receives, not the kernel; a minmax model exercises every kernel path the recipes' checkpoints do.

Results: ``--results`` (default ``bench/results/fidelity``) as ``<model>/<format>.json``; a cell whose
file exists is skipped unless ``--force``. Example::

    python bench/fidelity.py --device cuda --num-samples 64
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if not __package__:  # run as a file, `python bench/fidelity.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import command_line, docstring_parser, git_commit, write_cell
from bench.configs import dmquant_config
from bench.speed_rows import ROWS, conversion_summary, convert_for
from bench.speed_workloads import ZOO_MODELS
from dmquant.api import quantize
from dmquant.calib.record import CalibrationSet, record_for
from dmquant.core.quantizer import set_step
from dmquant.denoiser import Denoiser
from dmquant.eval.images import psnr, to_unit_range
from dmquant.jobs import generate
from dmquant.kernels.convert import REPORT_ATTRIBUTE
from dmquant.models import DiffusionModel, load_model
from dmquant.provenance import environment

#: The formats: speed.py's dmquant rows (without their ``dmquant-`` prefix), and fp8 with per-token scales.
FORMATS = {row.removeprefix("dmquant-"): (row, False) for row in ROWS if row.startswith("dmquant-")}
FORMATS["w8a8-fp8-dynamic"] = ("dmquant-w8a8-fp8", True)
#: The PSNR (dB) above which converted and simulated samples count as the same model.
PSNR_BOUND = 35.0
#: Calibration rows of the single-call error (those of one step among the first this many).
CALL_ROWS = 64


def _timed_samples(model: DiffusionModel, args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    began = time.perf_counter()
    images, _ = generate(
        model, args.num_samples, num_inference_steps=args.steps, batch_size=args.batch_size, progress=False
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return to_unit_range(images), time.perf_counter() - began


@torch.no_grad()
def denoiser_relative_error(simulated: nn.Module, converted: nn.Module, calibration: CalibrationSet) -> float:
    """``‖ε_converted − ε_simulated‖ / ‖ε_simulated‖`` of one call on the calibration inputs of one step."""
    x, t, cond, steps = next(calibration.batches(CALL_ROWS))
    step = int(steps[0])
    rows = steps == step
    outputs = []
    for model in (simulated, converted):
        set_step(model, step)
        outputs.append(Denoiser(model)(x[rows], t[rows], {name: c[rows] for name, c in cond.items()}).float())
    expected, got = outputs
    return ((got - expected).norm() / expected.norm()).item()


def _floor_psnr(name: str, simulated: DiffusionModel, expected: torch.Tensor, args: argparse.Namespace) -> float:
    """PSNR of the simulated model's samples on the CPU against ``expected``, its samples here."""
    on_cpu = load_model(name).with_denoiser(copy.deepcopy(simulated.denoiser).cpu())
    images, _ = _timed_samples(on_cpu, args)
    return psnr(expected.cpu(), images).item()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # None: identical


def run_cell(
    name: str, fp: DiffusionModel, fp_images: torch.Tensor, fmt: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Quantize ``fp`` at ``fmt``, convert it, and compare the two models' samples."""
    row, dynamic_fp8 = FORMATS[fmt]
    config = dmquant_config(ROWS[row], fp.denoiser)
    calibration = record_for(fp, config.calibration, progress=False)
    simulated = fp.with_denoiser(quantize(fp.denoiser, config, calibration, progress=False))
    converted = simulated.with_denoiser(convert_for(ROWS[row], simulated.denoiser, dynamic_fp8=dynamic_fp8))
    expected, simulated_s = _timed_samples(simulated, args)
    got, converted_s = _timed_samples(converted, args)
    value = psnr(expected, got).item()
    floor = _floor_psnr(name, simulated, expected, args) if expected.is_cuda else None
    return {
        "format": fmt,
        "row": row,
        "dynamic_fp8": dynamic_fp8,
        "psnr_converted_vs_simulated_db": _finite(value),
        "meets_bound": value >= PSNR_BOUND,
        "floor_psnr_db": None if floor is None else _finite(floor),
        "denoiser_relative_error": denoiser_relative_error(
            simulated.denoiser, converted.denoiser, calibration.to(args.device)
        ),
        "max_abs_pixel_difference": (expected - got).abs().max().item(),
        "psnr_simulated_vs_fp_db": psnr(fp_images, expected).item(),
        "sampling_s": {"simulated": simulated_s, "converted": converted_s},
        "conversion": conversion_summary(converted.denoiser),
        "layers": getattr(converted.denoiser, REPORT_ATTRIBUTE).layers,
        "recipe": config.to_dict(),
    }


def run(args: argparse.Namespace, command: str) -> int:
    """Every pending (model, format) cell; returns the number of cells below the bound."""
    below = 0
    for name in args.models:
        cells = [f for f in args.formats if args.force or not (args.results / name / f"{f}.json").exists()]
        if not cells:
            continue
        fp = load_model(name).to(args.device)
        fp_images, _ = _timed_samples(fp, args)
        for fmt in cells:
            record = run_cell(name, fp, fp_images, fmt, args)
            record |= {
                "model": name,
                "num_samples": args.num_samples,
                "steps": args.steps,
                "bound_db": PSNR_BOUND,
                "command": command,
                "environment": environment(),
                "git_commit": git_commit(),
            }
            write_cell(args.results / name / f"{fmt}.json", record)
            below += not record["meets_bound"]
            value = record["psnr_converted_vs_simulated_db"]
            print(f"{name} {fmt}: PSNR converted vs simulated {'identical' if value is None else f'{value:.1f} dB'} "
                  f"(simulated vs FP {record['psnr_simulated_vs_fp_db']:.1f} dB)", flush=True)  # fmt: skip
    return below


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = docstring_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=list(ZOO_MODELS), choices=ZOO_MODELS, metavar="MODEL",
                        help=f"zoo models (default: all): {', '.join(ZOO_MODELS)}")  # fmt: skip
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), metavar="FORMAT",
                        help=f"formats (default: all): {', '.join(FORMATS)}")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=64, help="images per model (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when a GPU is visible) or cpu (reference path)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "fidelity")
    parser.add_argument("--force", action="store_true", help="redo cells whose file exists")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("fidelity", argv)
    return 1 if run(args, command) else 0


if __name__ == "__main__":
    sys.exit(main())
