"""Quality benchmark: zoo models × methods × bit settings, one JSON file per cell.

Every cell samples ``--num-samples`` images with DDIM (eta 0, ``--steps`` steps, the model's own
guidance scale), asking for the held-out glyphs' classes (or, for the text-to-image model, their
prompts), and judges them with GlyphNet against those held-out glyphs: class accuracy,
foreground-colour accuracy (text model), FID/sFID/KID/IS-proxies with real-vs-real floors,
precision/recall; against the FP samples from the same seeds: PSNR and SSIM; along FP
trajectories: the per-step SQNR of the noise estimate. Quantized cells also record calibration
wall time and peak GPU memory.

Methods:

- ``fp`` and ``fp-seed1`` — the FP model, and the FP model again from other seeds: the
  seed-to-seed spread against which every difference is read.
- dmquant recipes (``minmax``, ``mse``, any other shipped recipe; ``q-diffusion-no-recon``:
  a reconstructing recipe with its reconstruction off) at each bit setting:
  ``W8A8``, ``W4A8``, ``W4A4`` (attention matmuls in full precision), ``W8A8+attn8`` (Q·Kᵀ and
  softmax·V quantized too, softmax at 8 bits unsigned). The recipe's range estimation and
  calibration set are kept; its bits and attention switch are the cell's; calibration runs at
  the model's sampling guidance scale.
- peers (optional extras, ``pip install -e .[bench]``): torchao and optimum-quanto, see
  ``peers.py``. A peer that cannot run here (no CUDA, GPU too old, package missing) gets an
  ``unsupported`` cell saying why; what it leaves in full precision is in the cell's coverage.

Results go to ``--results`` (default ``bench/results/quality``) as
``<model>/<method>__<bits>.json`` in the schema of ``report.py``. The matrix resumes: a cell
whose file exists is skipped (``--force`` redoes it), and ``--max-minutes`` stops before a cell
that would not finish in time, so a long matrix splits into chunks — run the same command again.

Example (one chunk on a GPU)::

    python bench/quality.py --device cuda --max-minutes 9
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmquant.api import info, sampling_hooks
from dmquant.atomic import write_atomically
from dmquant.config import QuantConfig, available_recipes, load_recipe
from dmquant.eval.images import psnr, ssim, to_unit_range
from dmquant.eval.noise import noise_estimate_error
from dmquant.jobs import quantize_model, record_for
from dmquant.models import DiffusionModel, load_model
from dmquant.provenance import environment
from dmquant.sampling import Conditioning
from dmquant.zoo.jobs import sample_requests, shipped_glyphnet
from dmquant.zoo.quality import ReferenceSet, Requests, held_out_requests
from dmquant.zoo.reference import ZOO

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/ is a folder of scripts, not a package)

SCHEMA_VERSION = 1
MODELS = ("ddpm-glyphs32", "ldm-glyphs64", "dit-glyphs")
FP_METHODS = ("fp", "fp-seed1")
#: Bit settings of recipe cells: (weight bits, activation bits, attention matmuls quantized).
BIT_SETTINGS = {
    "W8A8": (8, 8, False),
    "W8A8+attn8": (8, 8, True),
    "W4A8": (4, 8, False),
    "W4A4": (4, 4, False),
}
DEFAULT_METHODS = (*FP_METHODS, "minmax", "mse", *peers.PEERS)
DEFAULT_BITS = ("W8A8", "W4A8")
#: Suffix of a reconstructing recipe run without its reconstruction (what reconstruction buys).
NO_RECONSTRUCTION = "-no-recon"
#: PTQD's ablation: suffix of a correcting recipe -> (CNC, BC, VSC); the recipe itself has all three
#: and the same recipe without correction is its ``base`` (q-diffusion for ptqd).
CORRECTION_STEPS = {"-none": (False, False, False), "-cnc": (True, False, False), "-cnc-bc": (True, True, False)}
#: Seed of the ``fp-seed1`` samples (far from the ``seed + batch index`` seeds of the others).
OTHER_SEED = 1_000_000
#: FP trajectories along which the per-step SQNR of the noise estimate is measured.
SQNR_TRAJECTORIES = 32


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    bits: str
    eta: float = 0.0

    @property
    def kind(self) -> str:
        if self.method in FP_METHODS:
            return "fp"
        return "peer" if self.method in peers.PEERS else "recipe"

    def path(self, results: Path) -> Path:
        sampler = f"__eta{self.eta:g}" if self.eta else ""
        return results / self.model / f"{self.method}__{self.bits}{sampler}.json"


def plan_cells(models: Sequence[str], methods: Sequence[str], bits: Sequence[str], eta: float = 0.0) -> list[Cell]:
    """The matrix in run order: per model, FP rows, recipes × bit settings, then peers (their own bits)."""
    cells = []
    for model in models:
        for method in methods:
            if method in FP_METHODS:
                cells.append(Cell(model, method, "FP32", eta))
            elif method in peers.PEERS:
                cells.append(Cell(model, method, peers.PEERS[method].bits, eta))
            else:
                cells.extend(Cell(model, method, setting, eta) for setting in bits)
    return cells


def git_commit() -> str | None:
    """``DMQUANT_GIT_COMMIT`` when set (a copied tree whose ``.git`` may be stale), else the checked-out commit."""
    if os.environ.get("DMQUANT_GIT_COMMIT"):
        return os.environ["DMQUANT_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


class PeerDenoiser(nn.Module):
    """A peer-quantized denoiser called in its compute dtype, answering in float32 like the FP model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.dtype = peers.model_dtype(model)

    def forward(self, sample: Tensor, timestep: Tensor, **cond: Tensor) -> Tensor:
        output = self.model(sample.to(self.dtype), timestep, **peers.cast_floating(cond, self.dtype))
        return (output if isinstance(output, Tensor) else output.sample).float()


class ModelBench:
    """One zoo model's shared state: the FP model, its references, its requests and its FP samples."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        self.args = args
        self.model = load_model(name).to(args.device)
        self.resolution = ZOO[name].plan.resolution
        text = self.model.conditioning == "text"
        self.requests: Requests = held_out_requests(args.num_samples, resolution=self.resolution, text=text)
        self.references = ReferenceSet(
            shipped_glyphnet(args.device), args.num_samples, resolution=self.resolution, progress=args.progress
        )
        self.quantized: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
        self.fp_images, self.conditioning = self.sample(self.model, args.seed)

    def sample(self, model: DiffusionModel, seed: int) -> tuple[Tensor, Conditioning]:
        return sample_requests(
            model,
            self.requests,
            num_inference_steps=self.args.steps,
            seed=seed,
            batch_size=self.args.batch_size,
            eta=self.args.eta,
            progress=self.args.progress,
        )

    def judge(self, images: Tensor) -> dict[str, Any]:
        requests = self.requests
        quality = self.references.judge(images, requests.labels, colours=requests.colours, progress=self.args.progress)
        row = quality.as_dict()
        numbers = ("class_accuracy", "colour_accuracy", "fid", "fid_floor", "sfid", "sfid_floor", "inception_score")
        return {name: row.get(name) for name in numbers} | {
            "kid": row["kid_mean"],
            "precision": row["precision"],
            "recall": row["recall"],
        }

    def against_fp(self, images: Tensor) -> dict[str, float]:
        reference, test = to_unit_range(self.fp_images), to_unit_range(images)
        return {"psnr": float(psnr(reference, test)), "ssim": float(ssim(reference, test))}

    def sqnr_per_step(self, quantized: nn.Module) -> list[float]:
        traced = min(SQNR_TRAJECTORIES, self.args.num_samples)
        rows = noise_estimate_error(
            self.model.denoiser,
            quantized,
            self.model.scheduler,
            num_inference_steps=self.args.steps,
            batch_size=traced,
            conditioning=self.conditioning.slice(0, traced),
            generator=torch.Generator().manual_seed(self.args.seed),
            eta=self.args.eta,
            test_hooks=sampling_hooks(quantized),
            progress=False,
        )
        return [row["sqnr_db"] for row in rows]

    def sampling(self, seed: int) -> dict[str, Any]:
        return {
            "sampler": "DDIM",
            "eta": self.args.eta,
            "num_inference_steps": self.args.steps,
            "num_samples": self.args.num_samples,
            "seed": seed,
            "guidance_scale": self.model.guidance_scale,
        }


@torch.no_grad()
def _built(bench: ModelBench, build: Callable[[], nn.Module], key: str | None = None) -> tuple[nn.Module, dict]:
    """``build()`` timed with its peak GPU memory; with ``key``, built once per model bench and reused."""
    if key is not None and key in bench.quantized:
        return bench.quantized[key]
    cuda = torch.device(bench.args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    quantized = build()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    cost = {
        "calibration_s": round(time.perf_counter() - started, 2),
        "peak_memory_gib": None if peak is None else round(peak, 3),
    }
    if key is not None:
        bench.quantized[key] = (quantized, cost)
    return quantized, cost


@torch.no_grad()
def _measured(bench: ModelBench, quantized: nn.Module, cost: dict[str, Any]) -> dict[str, Any]:
    """Sample the quantized model, judge, compare with FP and trace SQNR; ``cost`` is what building it took."""
    images, _ = bench.sample(bench.model.with_denoiser(quantized), bench.args.seed)
    return {
        "metrics": bench.judge(images) | bench.against_fp(images),
        "sqnr_per_step": bench.sqnr_per_step(quantized),
    } | cost


def run_fp(bench: ModelBench, cell: Cell) -> dict[str, Any]:
    seed = bench.args.seed if cell.method == "fp" else OTHER_SEED
    images = bench.fp_images if cell.method == "fp" else bench.sample(bench.model, seed)[0]
    return {"metrics": bench.judge(images), "sampling": bench.sampling(seed)}


def recipe_methods() -> list[str]:
    """Shipped recipes; ``<recipe>-no-recon`` for each that reconstructs; the PTQD ablation steps."""
    names = available_recipes()
    variants = [name + NO_RECONSTRUCTION for name in names if load_recipe(name).reconstruction.enabled]
    ablation = [name + step for name in names if load_recipe(name).correction.enabled for step in CORRECTION_STEPS]
    return names + variants + ablation


def _recipe_config(bench: ModelBench, cell: Cell) -> QuantConfig:
    """The cell's recipe at its bit setting, with its variant (``-no-recon``, an ablation step) applied."""
    weight_bits, activation_bits, attention = BIT_SETTINGS[cell.bits]
    name, step = cell.method, None
    for suffix in (NO_RECONSTRUCTION, *CORRECTION_STEPS):
        if cell.method.endswith(suffix):
            name, step = cell.method.removesuffix(suffix), suffix
    config = load_recipe(name).with_bits(weight_bits, activation_bits)
    if step == NO_RECONSTRUCTION:
        config.reconstruction.enabled = False
    elif step is not None:
        correlation, bias, variance = CORRECTION_STEPS[step]
        config.correction = dataclasses.replace(
            config.correction, correlation=correlation, bias=bias, variance=variance
        )
    return dataclasses.replace(
        config,
        attention=dataclasses.replace(config.attention, enabled=attention, bits=None, softmax_bits=8),
        calibration=dataclasses.replace(config.calibration, guidance_scale=bench.model.guidance_scale),
        correction=dataclasses.replace(config.correction, num_inference_steps=bench.args.steps),
        step_precision=dataclasses.replace(config.step_precision, num_inference_steps=bench.args.steps),
    )


def run_recipe(bench: ModelBench, cell: Cell) -> dict[str, Any]:
    config = _recipe_config(bench, cell)
    switches = config.correction
    # the correction's switches act only while sampling: the ablation steps share one quantized model
    every = dataclasses.replace(switches, correlation=True, bias=True, variance=True)
    shared = dataclasses.replace(config, correction=every)
    key = json.dumps(dataclasses.replace(shared, name="").to_dict(), sort_keys=True)

    def build() -> nn.Module:
        return quantize_model(bench.model, shared, progress=bench.args.progress).denoiser

    quantized, cost = _built(bench, build, key)
    info(quantized).config.correction = switches
    return _measured(bench, quantized, cost) | {"recipe": config.to_dict()}


def run_peer(bench: ModelBench, cell: Cell) -> dict[str, Any]:
    spec = peers.check_available(cell.method, bench.args.device)
    config = load_recipe("minmax").calibration
    config = dataclasses.replace(config, guidance_scale=bench.model.guidance_scale)
    result: list[peers.PeerResult] = []

    def calibrate(model: nn.Module) -> None:
        calibration = record_for(bench.model, config, progress=False).to(bench.args.device)
        denoiser = PeerDenoiser(model)
        for x, t, cond, _ in calibration.batches(config.batch_size):
            denoiser(x, t, **cond)

    def build() -> nn.Module:
        result.append(peers.apply_peer(cell.method, bench.model.denoiser, calibrate if spec.calibrates else None))
        return PeerDenoiser(result[0].model)

    measured = _measured(bench, *_built(bench, build))
    peer = result[0]
    coverage = {"quantized": peer.quantized, "skipped": peer.skipped, "unquantized_inputs": peer.unquantized_inputs}
    return measured | {
        "coverage": coverage,
        "notes": peer.notes,
        "compute_dtype": peer.compute_dtype,
        "peer_versions": peers.peer_versions(),
    }


RUNNERS = {"fp": run_fp, "recipe": run_recipe, "peer": run_peer}


def run_cell(bench: ModelBench, cell: Cell, command: str) -> dict[str, Any]:
    """One cell's JSON: what ran, its status and numbers, and where and when it ran."""
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "model": cell.model,
        "model_description": ZOO[cell.model].description,
        "method": cell.method,
        "kind": cell.kind,
        "bits": cell.bits,
        "status": "ok",
        "reason": None,
        "coverage": None,
        "sampling": bench.sampling(bench.args.seed),
        "features": "glyphnet",
    }
    try:
        record |= RUNNERS[cell.kind](bench, cell)
    except peers.PeerUnavailable as error:
        record |= {"status": "unsupported", "reason": str(error)}
    except Exception as error:  # a cell that breaks is recorded, and the matrix goes on
        record |= {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    record |= {"command": command, "environment": environment(), "git_commit": git_commit()}
    return record


def write_cell(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2)  # an SQNR of inf (identical estimates) is written as Infinity
    write_atomically(path, lambda f: f.write(text.encode()))


def pending(cells: Sequence[Cell], results: Path, force: bool) -> list[Cell]:
    """Cells still to run: missing, failed, or all of them with ``force``."""

    def done(cell: Cell) -> bool:
        path = cell.path(results)
        return path.exists() and json.loads(path.read_text()).get("status") in ("ok", "unsupported")

    return [cell for cell in cells if force or not done(cell)]


def run_matrix(args: argparse.Namespace, command: str) -> int:
    """Run the pending cells, model by model, within ``--max-minutes``; returns how many are left."""
    results = Path(args.results)
    todo = pending(plan_cells(args.models, args.methods, args.bits, args.eta), results, args.force)
    started, longest = time.monotonic(), 0.0

    def out_of_time() -> bool:
        """Whether a cell as long as the longest so far would end past ``--max-minutes``."""
        elapsed = time.monotonic() - started
        return args.max_minutes is not None and elapsed + longest > 60 * args.max_minutes

    for model, cells in _by_model(todo):
        if out_of_time():
            break
        bench = ModelBench(model, args)
        for cell in cells:
            if out_of_time():
                break
            began = time.monotonic()
            record = run_cell(bench, cell, command)
            write_cell(cell.path(results), record)
            longest = max(longest, time.monotonic() - began)
            print(f"{cell.model} {cell.method} {cell.bits}: {record['status']} ({time.monotonic() - began:.0f} s)")
            todo.remove(cell)
        del bench
    if todo:
        print(f"{len(todo)} cells left (time limit); run the same command again to resume")
    return len(todo)


def _by_model(cells: list[Cell]) -> Iterator[tuple[str, list[Cell]]]:
    for model in dict.fromkeys(cell.model for cell in cells):
        yield model, [cell for cell in cells if cell.model == model]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See the module docstring for the metrics.",
        epilog="example: python bench/quality.py --device cuda --max-minutes 9   (rerun to resume)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="zoo models")
    methods = [*FP_METHODS, *recipe_methods(), *peers.PEERS]
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=methods, help="fp rows, recipes, peers"
    )
    parser.add_argument(
        "--bits", nargs="+", default=list(DEFAULT_BITS), choices=list(BIT_SETTINGS), help="recipe bit settings"
    )
    parser.add_argument("--num-samples", type=int, default=10_000, help="samples per cell (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    parser.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="DDIM eta: 0 deterministic (default), 1 as stochastic as DDPM; cells of eta > 0 are filed apart",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="sampling batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compared samples (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", default="bench/results/quality", help="where cell JSON goes")
    parser.add_argument("--max-minutes", type=float, help="stop before a cell that would not end in time")
    parser.add_argument("--force", action="store_true", help="rerun cells whose results exist")
    parser.add_argument("-q", "--quiet", dest="progress", action="store_false", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/quality.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    run_matrix(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
