"""Reconstruction speed: a unit's optimisation step replayed from a CUDA graph against the eager step.

For each model, the W4A8 ``q-diffusion`` recipe's ranges are set on a calibration set of its own
trajectories (``--trajectories`` of them), and the first unit of each kind (a lone layer, a residual
block, a transformer / DiT block) is reconstructed as the recipe's first pass does — AdaRound on its
weights, activations in full precision — from the same captured block inputs, ``--iterations`` steps
with ``cuda_graph`` on and off, side by side. Only the optimisation loop is timed (CUDA-synchronised
wall time of :func:`dmquant.recon.brecq.reconstruct`, which also measures the block's error before and
after on all samples and, graphed, captures the step once); what a unit costs besides (capturing the
block's inputs) is the same either way. The result per unit: ms per iteration both ways and their
ratio, and both runs' final reconstruction error (they differ only by floating-point order). Results:
``--results`` (default ``bench/results/recon-speed``), one JSON per device. Needs CUDA.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as a file, `python bench/recon_speed.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import command_line, docstring_parser, git_commit, write_cell
from dmquant import api
from dmquant.calib.record import calibration_runner, record_for
from dmquant.catalog import REFERENCE_MODELS
from dmquant.config import load_recipe
from dmquant.core.layers import activation_quantizers
from dmquant.models import load_model
from dmquant.provenance import environment
from dmquant.recon.blocks import reconstruction_units
from dmquant.recon.brecq import reconstruct
from dmquant.recon.cache import PairedBlockIO
from dmquant.recon.capture import capture_paired_io


def _timed_reconstruction(unit: torch.nn.Module, pairs: PairedBlockIO, iterations: int, graphed: bool) -> dict:
    twin = copy.deepcopy(unit)
    for quantizer in activation_quantizers(twin):  # the first pass: weights only
        quantizer.enabled = False
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = reconstruct(
        twin, pairs.quantized_batch, len(pairs), iterations=iterations, cuda_graph=graphed, progress=False
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"ms_per_iteration": round(1e3 * seconds / iterations, 3), "final_mse": result.final_mse}


def model_rows(name: str, trajectories: int, iterations: int) -> list[dict[str, Any]]:
    model = load_model(name)
    fp = model.denoiser.to("cuda").eval()
    recipe = load_recipe("q-diffusion").with_bits(4, 8)
    calibration = dataclasses.replace(
        recipe.calibration, guidance_scale=model.guidance_scale, num_trajectories=trajectories
    )
    started = time.perf_counter()
    data = record_for(model, calibration, progress=False)
    print(f"{name}: calibration set of {len(data)} rows recorded ({time.perf_counter() - started:.0f} s)", flush=True)
    quantized = api.quantize(fp, recipe.ranges_only(), data, progress=False)
    print(f"{name}: ranges set ({time.perf_counter() - started:.0f} s)", flush=True)
    units = reconstruction_units(quantized, calibration_runner(quantized, data.rows(torch.arange(2)), batch_size=2))
    firsts = {unit.kind: unit for unit in reversed(units)}  # the first unit of each kind
    rows = []
    for kind, unit in sorted(firsts.items()):
        pairs = capture_paired_io(fp, quantized, unit.name, data, batch_size=64)
        row = {"model": name, "unit": unit.name, "kind": kind, "samples": len(pairs), "iterations": iterations}
        row["eager"] = _timed_reconstruction(unit.module, pairs, iterations, graphed=False)
        row["graphed"] = _timed_reconstruction(unit.module, pairs, iterations, graphed=True)
        row["speedup"] = round(row["eager"]["ms_per_iteration"] / row["graphed"]["ms_per_iteration"], 2)
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS), help="zoo models (default: all)")
    parser.add_argument("--trajectories", type=int, default=16, help="calibration trajectories (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=300, help="steps per unit and way (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "recon-speed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/recon_speed.py needs a CUDA device", file=sys.stderr)
        return 2
    env = environment()
    command = command_line("recon_speed", argv)
    rows: list[dict[str, Any]] = []
    for name in args.models:  # written after each model: a run cut short keeps what it measured
        rows += model_rows(name, args.trajectories, args.iterations)
        record = {"rows": rows, "environment": env, "git_commit": git_commit(), "command": command}
        write_cell(args.results / f"{env['device'].replace(' ', '-')}.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
