"""Offloaded calibration and reconstruction: the FLUX.1-dev transformer (random weights) quantized W4A8 on one GPU.

The FLUX.1-dev architecture (``FluxTransformer2DModel``, 12 B parameters, 24 GB in bfloat16: bench/speed.py's
``flux-dev`` workload, a 1024² image's 4096 latent tokens and 512 text tokens, random weights) is quantized with
the ``q-diffusion`` recipe at 4-bit weights and 8-bit activations with its weights in host memory and one block
at a time on the GPU (``dmquant.quantize(..., offload=True)``, :mod:`dmquant.offload`). Phases, each timed with
its peak GPU memory (``torch.cuda.max_memory_allocated``, reset per phase and per unit):

- ``build``, ``cast``: the model with random weights in host memory (float32), then cast to ``--dtype``;
- ``ranges``: quantizers attached, weight ranges from the weights (on the CPU), activation ranges estimated over
  the calibration samples block by block on the GPU (``quantize`` without reconstruction);
- ``reconstruction``: ``reconstruct_model`` as ``quantize`` runs it with the recipe: AdaRound on each unit's
  weights with activations in full precision, the activation ranges estimated again on the reconstructed model,
  then the step sizes learned; each unit's inputs captured by running the FP and the quantized model block by
  block up to it. Per unit: seconds (capture and optimisation) and peak GPU memory.

FLUX's transformer blocks are no reconstruction block kind of dmquant's (their calls pass the rotary embedding
as a tuple and return two streams, which the block cache does not hold), so its reconstruction units are its
layers, each reconstructed on its own (AdaRound's layer-wise setting); ``blocks`` in the result sums the units
of each transformer block. ``--units N`` reconstructs the first N units of each pass (the full model has about
500), ``--iterations`` / ``--activation-iterations`` per unit, ``--samples`` calibration rows (random inputs
shaped like FluxPipeline's at 1024², timesteps in (0, 1)), ``--batch-size`` rows per optimisation step,
``--capture-batch-size`` rows per model call while estimating ranges and capturing a unit's inputs.

The result is one JSON file, ``--results`` (default ``bench/results/offload-calibration``) /
``flux-dev-w4a8[-tiny].json``, rewritten after every phase and unit (a killed run keeps what it measured, with
``"status": "running"``): device, versions and date, git commit (``DMQUANT_GIT_COMMIT`` when set), settings,
the weights' bytes, seconds and peak GPU memory per phase and unit, and the overall peak.

Example (one H100 or H200, about 8 minutes; host memory: the FP model and its quantized copy, 2 x 24 GB)::

    python bench/offload_calibration.py --units 12 --iterations 200 --activation-iterations 50 --samples 8

``--tiny`` shrinks the architecture (bench/speed.py's ``--tiny``) and runs on the CPU when there is no GPU, for
tests; such a result is marked ``"representative": false``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dmquant.api import quantize
from dmquant.calib.record import CalibrationSet
from dmquant.calibrate import calibrate_activations
from dmquant.config import QuantConfig, load_recipe
from dmquant.offload import Offload, running
from dmquant.provenance import environment
from dmquant.recon.model import UnitRecord, reconstruct_model

if not __package__:  # run as a file, `python bench/offload_calibration.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import docstring_parser, git_commit, write_cell
from bench.speed_measure import weight_bytes
from bench.speed_workloads import WORKLOADS

SCHEMA_VERSION = 1
GIB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = docstring_parser(__doc__)
    parser.add_argument("--units", type=int, default=12, help="units reconstructed per pass (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=200, help="AdaRound steps per unit (default: %(default)s)")
    parser.add_argument(
        "--activation-iterations", type=int, default=50, help="step-size steps per unit (default: %(default)s)"
    )
    parser.add_argument("--samples", type=int, default=8, help="calibration rows (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per optimisation step (default: %(default)s)")
    parser.add_argument("--capture-batch-size", type=int, default=4, help="rows per model call (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bfloat16 on a GPU; float32)")
    parser.add_argument("--device", help="execution device (default: cuda; with --tiny the CPU when there is none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the architecture shrunk, for tests (not representative)")
    parser.add_argument("--results", type=Path, default=Path("bench/results/offload-calibration"))
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("units", "iterations", "activation_iterations", "samples", "batch_size", "capture_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.tiny else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("the FLUX.1-dev architecture runs on a GPU and CUDA is not available here; --tiny runs on the CPU")
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    return args


def config_of(args: argparse.Namespace) -> QuantConfig:
    """The q-diffusion recipe at W4A8 with the run's reconstruction settings."""
    recipe = load_recipe("q-diffusion").with_bits(4, 8)
    reconstruction = dataclasses.replace(
        recipe.reconstruction,
        num_samples=args.samples,
        iterations=args.iterations,
        activation_iterations=args.activation_iterations,
        batch_size=args.batch_size,
    )
    return dataclasses.replace(recipe, reconstruction=reconstruction)


def calibration_in(calibration: CalibrationSet, dtype: torch.dtype) -> CalibrationSet:
    """The samples and float conditioning in the model's dtype (timesteps as they are: FLUX casts them)."""
    cond = {name: t.to(dtype) if t.is_floating_point() else t for name, t in calibration.cond.items()}
    return dataclasses.replace(calibration, samples=calibration.samples.to(dtype), cond=cond)


class Recorder:
    """The result file: settings and measurements, rewritten atomically after each phase and unit."""

    def __init__(self, path: Path, record: dict[str, Any], device: torch.device):
        self.path, self.record, self.cuda = path, record, device.type == "cuda"
        self.peaks: list[int] = []  # bytes, one per measured stretch (a phase's start, each unit, a phase's end)
        self.started = time.perf_counter()
        self.write()

    def peak_gib(self) -> float | None:
        """The peak GPU memory since the last call (then reset), in GiB; None on the CPU."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        self.peaks.append(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        self.record["peak_gpu_memory_gib"] = round(max(self.peaks) / GIB, 3)
        return round(self.peaks[-1] / GIB, 3)

    def phase(self, name: str, run: Callable[[], Any]) -> Any:
        """``run()`` timed, with its peak GPU memory (the units' peaks included)."""
        print(f"{name} ...", flush=True)
        self.peak_gib()  # what came before is not this phase's
        first = len(self.peaks)
        started = time.perf_counter()
        result = run()
        seconds = round(time.perf_counter() - started, 2)
        self.peak_gib()
        peak = round(max(self.peaks[first:]) / GIB, 3) if self.cuda else None
        self.record["phases"][name] = {"seconds": seconds, "peak_gpu_memory_gib": peak}
        print(f"{name}: {seconds} s, peak GPU memory {peak} GiB", flush=True)
        self.write()
        return result

    def unit(self, record: UnitRecord) -> None:
        row = {**dataclasses.asdict(record), "peak_gpu_memory_gib": self.peak_gib()}
        self.record["units"].append(row)
        self.record["blocks"] = blocks_of(self.record["units"])
        self.write()

    def write(self) -> None:
        self.record["elapsed_seconds"] = round(time.perf_counter() - self.started, 2)
        write_cell(self.path, self.record)


def block_of(unit: str) -> str:
    """The transformer block a unit lies in (``single_transformer_blocks.3``), else the unit itself."""
    parts = unit.split(".")
    return ".".join(parts[:2]) if parts[0] in ("transformer_blocks", "single_transformer_blocks") else unit


def blocks_of(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pass and transformer block: its units, their seconds summed and their peak GPU memory."""
    blocks: dict[tuple[str, str], dict[str, Any]] = {}
    for row in units:
        block = blocks.setdefault(
            (row["pass_name"], block_of(row["unit"])),
            {"pass_name": row["pass_name"], "block": block_of(row["unit"]), "units": 0, "seconds": 0.0},
        )
        block["units"] += 1
        block["seconds"] = round(block["seconds"] + row["seconds"], 2)
        peak = row["peak_gpu_memory_gib"]
        if peak is not None:
            block["peak_gpu_memory_gib"] = max(block.get("peak_gpu_memory_gib", 0.0), peak)
    return list(blocks.values())


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    offload = Offload(device)
    config = config_of(args)
    name = "flux-dev-w4a8" + ("-tiny" if args.tiny else "")
    recorder = Recorder(
        args.results / f"{name}.json",
        {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "command": command,
            "environment": environment(),
            "git_commit": git_commit(),
            "representative": not args.tiny and device.type == "cuda",
            "settings": {**{k: v for k, v in vars(args).items() if k != "results"}, "recipe": config.to_dict()},
            "phases": {},
            "units": [],
            "blocks": [],
        },
        device,
    )
    try:
        measure(args, recorder, config, offload, dtype)
    except BaseException as error:
        recorder.record |= {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        recorder.write()
        raise
    recorder.record["status"] = "ok"
    recorder.write()
    return recorder.record


def measure(args: argparse.Namespace, recorder: Recorder, config: QuantConfig, offload: Offload, dtype: torch.dtype):
    """The phases of the module's docstring, each recorded as it ends."""
    device = offload.device
    workload_args = argparse.Namespace(tiny=args.tiny, batch_size=args.samples, seed=args.seed)
    workload = recorder.phase("build", lambda: WORKLOADS["flux-dev"](workload_args, torch.device("cpu")))
    model = recorder.phase("cast", lambda: workload.model.to(dtype))
    recorder.record |= {"model": workload.description, "weight_bytes": weight_bytes(model)}
    calibration = calibration_in(workload.calibration(args.samples), dtype)
    progress = not args.quiet
    ranges_only = dataclasses.replace(config, reconstruction=dataclasses.replace(config.reconstruction, enabled=False))
    quantized = recorder.phase(
        "ranges",
        lambda: quantize(
            model, ranges_only, calibration, batch_size=args.capture_batch_size, progress=progress, offload=device
        ),
    )

    def recalibrate() -> None:
        with running(offload, quantized):
            calibrate_activations(quantized, calibration, batch_size=args.capture_batch_size, progress=progress)

    recorder.phase(
        "reconstruction",
        lambda: reconstruct_model(
            model,
            quantized,
            calibration,
            config.reconstruction,
            recalibrate=recalibrate,
            capture_batch_size=args.capture_batch_size,
            progress=progress,
            offload=offload,
            max_units=args.units,
            on_unit=recorder.unit,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", "bench/offload_calibration.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        record = run(args, command)
    except torch.cuda.OutOfMemoryError as error:
        print(f"out of GPU memory ({error}); fewer --capture-batch-size / --batch-size rows need less", file=sys.stderr)
        return 1
    print(
        f"{len(record['units'])} units reconstructed; peak GPU memory {record.get('peak_gpu_memory_gib')} GiB "
        f"with {record['weight_bytes'] / GIB:.2f} GiB of weights; wrote {args.results}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
