"""Reconstruction speed: each unit's optimisation step replayed from a CUDA graph against the eager loop.

For each model the W4A8 ``q-diffusion`` recipe's calibration set is recorded once; then the recipe's
quantization (ranges, BRECQ/AdaRound block reconstruction, activation recalibration, LSQ step sizes)
runs twice from it on the same GPU, with ``reconstruction.cuda_graphs`` on and off, in the order
``--order`` gives. Reconstruction runs ``--iterations`` / ``--activation-iterations`` per unit (the
recipe's are 2000 / 500; fewer keep the eager runs short, and the per-unit costs that do not scale
with iterations — capturing block inputs, the graph capture — weigh more at fewer iterations, so the
ratio is a lower bound of the recipe's). Recorded per mode: the reconstruction time (the units'
seconds summed) by unit kind, the whole quantization's wall time, and the relative difference of the
two quantized models' noise estimates on a calibration batch (they differ only by floating-point
order: capturable Adam, cuBLAS / cuDNN algorithms). Results: ``--results`` (default
``bench/results/recon-speed``), one JSON per device. Needs CUDA.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmquant import api
from dmquant.config import load_recipe
from dmquant.denoiser import Denoiser
from dmquant.jobs import record_for
from dmquant.models import REFERENCE_MODELS, load_model
from dmquant.provenance import environment

sys.path.insert(0, str(Path(__file__).parent))
from quality import docstring_parser, git_commit, write_cell  # noqa: E402

MODES = {"graphed": True, "eager": False}


def _reconstruction_seconds(quantized: torch.nn.Module) -> dict[str, Any]:
    by_kind: dict[str, float] = defaultdict(float)
    for record in api.info(quantized).extra["reconstruction"]:
        by_kind[f"{record['pass_name']}/{record['kind']}"] += record["seconds"]
    return {
        "reconstruction_s": round(sum(by_kind.values()), 2),
        "by_kind_s": {k: round(v, 2) for k, v in by_kind.items()},
    }


def model_row(name: str, iterations: int, activation_iterations: int, order: Sequence[str]) -> dict[str, Any]:
    model = load_model(name)
    model.denoiser.to("cuda")
    recipe = load_recipe("q-diffusion").with_bits(4, 8)
    recipe = dataclasses.replace(
        recipe, calibration=dataclasses.replace(recipe.calibration, guidance_scale=model.guidance_scale)
    )
    calibration = record_for(model, recipe.calibration, progress=False)
    x, t, cond, _ = next(calibration.to("cuda").batches(64))
    row: dict[str, Any] = {"model": name, "iterations": iterations, "activation_iterations": activation_iterations}
    outputs = {}
    for mode in order:
        reconstruction = dataclasses.replace(
            recipe.reconstruction,
            iterations=iterations,
            activation_iterations=activation_iterations,
            cuda_graphs=MODES[mode],
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        quantized = api.quantize(
            model.denoiser, dataclasses.replace(recipe, reconstruction=reconstruction), calibration, progress=False
        )
        torch.cuda.synchronize()
        row[mode] = {"quantize_s": round(time.perf_counter() - started, 2), **_reconstruction_seconds(quantized)}
        with torch.no_grad():
            outputs[mode] = Denoiser(quantized)(x, t, cond).float()
        print(f"{name} {mode}: {row[mode]}", flush=True)
        del quantized
    row["speedup"] = round(row["eager"]["reconstruction_s"] / row["graphed"]["reconstruction_s"], 2)
    difference = (outputs["graphed"] - outputs["eager"]).pow(2).mean() / outputs["eager"].pow(2).mean()
    row["output_relative_mse"] = float(difference)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS), help="zoo models (default: all)")
    parser.add_argument("--iterations", type=int, default=200, help="rounding steps per unit (default: %(default)s)")
    parser.add_argument(
        "--activation-iterations", type=int, default=50, help="step-size steps per unit (default: %(default)s)"
    )
    parser.add_argument("--order", nargs=2, choices=sorted(MODES), default=["eager", "graphed"], help="run order")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "recon-speed")
    args = parser.parse_args(argv)
    if set(args.order) != set(MODES):
        parser.error("--order names both modes")
    if not torch.cuda.is_available():
        print("bench/recon_speed.py needs a CUDA device", file=sys.stderr)
        return 2
    env = environment()
    command = "python bench/recon_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for name in args.models:  # written after each model: a run cut short keeps what it measured
        rows.append(model_row(name, args.iterations, args.activation_iterations, args.order))
        record = {"rows": rows, "environment": env, "git_commit": git_commit(), "command": command.strip()}
        write_cell(args.results / f"{env['device'].replace(' ', '-')}.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
