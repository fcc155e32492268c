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
  softmax·V quantized too, softmax at 8 bits unsigned), ``W8A8-FP8`` (fp8 e4m3 weights and
  activations, attention matmuls in full precision) and ``W8A8-FP8+attn-fp8`` (FP8 attention too:
  Q, K, V and the softmax output in fp8 e4m3, as cuDNN's FP8 attention runs them). The recipe's range estimation and
  calibration set are kept; its bits and attention switch are the cell's; calibration runs at
  the model's sampling guidance scale. Recipes that quantize alike (``q-diffusion``, ``ptqd``
  and PTQD's ablation steps ``ptqd-cnc``, ``ptqd-cnc-bc``) share one quantized model per run,
  across ``--eta`` values too, so the ablation's baseline is the ``q-diffusion`` row; PTQD's
  noise statistics are measured on it when a correcting cell first needs them
  (``noise_statistics_s``).
- the calibration ablation ``calib-uniform``, ``calib-ndtc``, ``calib-tdac``,
  ``calib-single-step``: q-diffusion's ranges without reconstruction, calibrated on about
  ``CALIBRATION_SIZE`` samples chosen by the strategy of q-diffusion, ptq4dm, eda-dm and
  sqnr-hybrid respectively.
- peers (optional extras, ``pip install -e .[bench]``): torchao and optimum-quanto, see
  ``peers.py``. A peer that cannot run here (no CUDA, GPU too old, package missing) gets an
  ``unsupported`` cell saying why; what it leaves in full precision is in the cell's coverage.

``--eta`` takes several values: each is a sampler setting of its own (cells of eta > 0 are
filed apart), sharing the quantized models. ``--real-kernels`` samples the recipe cells' quantized
models converted to real low-bit layers (``dmquant.kernels``; the Triton kernels on CUDA), filed
apart (``__kernels``) and tabled as ``<model>-kernels``: the quality of the deployed model, beside
the simulated one's. Results go to ``--results`` (default
``bench/results/quality``) as ``<model>/<method>__<bits>.json`` in the schema of ``report.py``;
recipe cells also record the bit operations of a denoiser call (``compute``). The matrix resumes: a cell
whose file exists is skipped (``--force`` redoes it), and ``--max-minutes`` stops before a cell
that would not finish in time, so a long matrix splits into chunks — run the same command again;
with ``--state-dir`` even a cell killed during its reconstruction resumes from its last block, and
one killed while sampling a built model reloads it.

Launched on several processes (``accelerate launch bench/quality.py ...``, one per GPU) each cell's
sampling and calibration recording are spread over them (:mod:`dmquant.distributed`): the same numbers,
the cells written and printed by the main process, whose clock ``--max-minutes`` reads; ``--state-dir``
needs one process.

Example (one chunk on a GPU)::

    python bench/quality.py --device cuda --max-minutes 9
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if not __package__:  # run as a file, `python bench/quality.py`: make the bench package importable
    import _package  # noqa: F401

from bench import peers
from bench.common import by_model, command_line, git_commit, pending, write_cell
from bench.configs import BIT_SETTINGS, recipe_config, recipe_methods
from dmquant import distributed
from dmquant.api import info, load, measure_noise, sampling_hooks, save
from dmquant.api import quantize as quantize_model
from dmquant.atomic import write_atomically
from dmquant.calib.record import calibration_runner, record_for
from dmquant.catalog import REFERENCE_MODELS
from dmquant.config import CorrectionConfig, QuantConfig, load_recipe
from dmquant.eval.images import psnr, ssim, to_unit_range
from dmquant.eval.noise import noise_estimate_error
from dmquant.jobs import forward_cost
from dmquant.kernels.convert import REPORT_ATTRIBUTE, convert_model
from dmquant.models import DiffusionModel, load_model
from dmquant.provenance import environment
from dmquant.sampling import Conditioning
from dmquant.zoo.quality import ReferenceSet, Requests, held_out_requests
from dmquant.zoo.reference import ZOO
from dmquant.zoo_jobs import sample_requests, shipped_glyphnet

SCHEMA_VERSION = 1
MODELS = REFERENCE_MODELS
FP_METHODS = ("fp", "fp-seed1")
DEFAULT_METHODS = (*FP_METHODS, "minmax", "mse", *peers.PEERS)
DEFAULT_BITS = ("W8A8", "W4A8")
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
    real_kernels: bool = False

    @property
    def kind(self) -> str:
        if self.method in FP_METHODS:
            return "fp"
        return "peer" if self.method in peers.PEERS else "recipe"

    def path(self, results: Path) -> Path:
        sampler = f"__eta{self.eta:g}" if self.eta else ""
        kernels = "__kernels" if self.real_kernels else ""
        return results / self.model / f"{self.method}__{self.bits}{sampler}{kernels}.json"


def plan_cells(
    models: Sequence[str],
    methods: Sequence[str],
    bits: Sequence[str],
    etas: Sequence[float] = (0.0,),
    real_kernels: bool = False,
) -> list[Cell]:
    """The matrix in run order: per model and eta, FP rows, recipes × bit settings, then peers (their own bits);
    with ``real_kernels`` the recipe cells sample converted models (FP and peer cells are unchanged)."""
    cells = []
    for model in models:
        for eta in etas:
            for method in methods:
                if method in FP_METHODS:
                    cells.append(Cell(model, method, "FP32", eta))
                elif method in peers.PEERS:
                    cells.append(Cell(model, method, peers.PEERS[method].bits, eta))
                else:
                    cells.extend(Cell(model, method, setting, eta, real_kernels) for setting in bits)
    return cells


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
    """One zoo model's shared state: the FP model, its references, its requests, its FP samples per
    sampler setting (eta) and the quantized models built so far."""

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
        self.noise_costs: dict[str, dict[str, Any]] = {}
        self.fp_gbops_per_call = forward_cost(self.model, self.model.make_conditioning(1))["bops"] / 1e9
        self._fp_images: dict[float, Tensor] = {}
        self.conditioning: Conditioning | None = None

    def sample(self, model: DiffusionModel, seed: int, eta: float) -> tuple[Tensor, Conditioning]:
        return sample_requests(
            model,
            self.requests,
            num_inference_steps=self.args.steps,
            seed=seed,
            batch_size=self.args.batch_size,
            eta=eta,
            progress=self.args.progress,
        )

    def fp_images(self, eta: float) -> Tensor:
        """The FP model's samples from the compared seeds with DDIM at ``eta`` (sampled once)."""
        if eta not in self._fp_images:
            self._fp_images[eta], self.conditioning = self.sample(self.model, self.args.seed, eta)
        return self._fp_images[eta]

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

    def against_fp(self, images: Tensor, eta: float) -> dict[str, float]:
        reference, test = to_unit_range(self.fp_images(eta)), to_unit_range(images)
        return {"psnr": float(psnr(reference, test)), "ssim": float(ssim(reference, test))}

    def sqnr_per_step(self, quantized: nn.Module, eta: float) -> list[float]:
        traced = min(SQNR_TRAJECTORIES, self.args.num_samples)
        self.fp_images(eta)  # the conditioning of the compared samples
        rows = noise_estimate_error(
            self.model.denoiser,
            quantized,
            self.model.scheduler,
            num_inference_steps=self.args.steps,
            batch_size=traced,
            conditioning=self.conditioning.slice(0, traced),
            generator=torch.Generator().manual_seed(self.args.seed),
            eta=eta,
            test_hooks=sampling_hooks(quantized),
            progress=False,
        )
        return [row["sqnr_db"] for row in rows]

    def sampling(self, seed: int, eta: float) -> dict[str, Any]:
        return {
            "sampler": "DDIM",
            "eta": eta,
            "num_inference_steps": self.args.steps,
            "num_samples": self.args.num_samples,
            "seed": seed,
            "guidance_scale": self.model.guidance_scale,
        }


def _timed(bench: ModelBench, work: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """``work()``, its wall time in seconds and its peak GPU memory in GiB (None off CUDA)."""
    cuda = torch.device(bench.args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = work()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return result, round(time.perf_counter() - started, 2), None if peak is None else round(peak, 3)


@torch.no_grad()
def _built(bench: ModelBench, build: Callable[[], nn.Module], key: str | None = None) -> tuple[nn.Module, dict]:
    """``build()`` timed with its peak GPU memory; with ``key``, built once per model bench and reused."""
    if key is not None and key in bench.quantized:
        return bench.quantized[key]
    quantized, seconds, peak = _timed(bench, build)
    cost = {"calibration_s": seconds, "peak_memory_gib": peak}
    if key is not None:
        bench.quantized[key] = (quantized, cost)
    return quantized, cost


@torch.no_grad()
def _measured(bench: ModelBench, quantized: nn.Module, cost: dict[str, Any], eta: float) -> dict[str, Any]:
    """Sample the quantized model, judge, compare with FP and trace SQNR; ``cost`` is what building it took."""
    images, _ = bench.sample(bench.model.with_denoiser(quantized), bench.args.seed, eta)
    return {
        "metrics": bench.judge(images) | bench.against_fp(images, eta),
        "sqnr_per_step": bench.sqnr_per_step(quantized, eta),
    } | cost


def _compute(bench: ModelBench, quantized: nn.Module) -> dict[str, Any]:
    """Bit operations of a denoiser call of a dmquant model, mean over the trajectory, next to FP's;
    the switch step and promoted blocks its recipe chose."""
    model = bench.model.with_denoiser(quantized)
    conditioning = bench.conditioning or bench.model.make_conditioning(1)
    quant = info(quantized)
    return {
        "gbops_per_call": forward_cost(model, conditioning, bench.args.steps)["bops"] / 1e9,
        "fp_gbops_per_call": bench.fp_gbops_per_call,
        "switch_step": quant.config.step_precision.switch_step if quant.config.step_precision.enabled else None,
        "promoted": (quant.extra.get("hybrid") or {}).get("promoted"),
    }


def run_fp(bench: ModelBench, cell: Cell) -> dict[str, Any]:
    seed = bench.args.seed if cell.method == "fp" else OTHER_SEED
    images = bench.fp_images(cell.eta) if cell.method == "fp" else bench.sample(bench.model, seed, cell.eta)[0]
    return {"metrics": bench.judge(images), "sampling": bench.sampling(seed, cell.eta)}


def _recipe_config(bench: ModelBench, cell: Cell) -> QuantConfig:
    """The cell's recipe at its bit setting, with its variant applied, at the model's guidance and the bench's steps."""
    return recipe_config(cell.method, cell.bits, bench.model.guidance_scale, bench.args.steps)


def quantization_key(config: QuantConfig) -> str:
    """What the quantized model depends on: the recipe less its name and its correction.

    PTQD corrects while sampling, with statistics measured after quantizing, so recipes that
    differ only in their correction (q-diffusion, ptqd and its ablation steps) share one model.
    """
    quantizing = dataclasses.replace(config, name="", correction=CorrectionConfig())
    return json.dumps(quantizing.to_dict(), sort_keys=True)


def quantization_state_dir(bench: ModelBench, key: str) -> Path | None:
    """Where a quantization keeps its progress under ``--state-dir`` (None: nowhere)."""
    if bench.args.state_dir is None:
        return None
    return Path(bench.args.state_dir) / bench.name / hashlib.sha256(key.encode()).hexdigest()[:16]


#: Under a quantization's state dir: its reconstruction's progress, then the built model.
RECONSTRUCTION, BUILT, BUILD_COST = "reconstruction", "built", "cost.json"


def _built_resumably(bench: ModelBench, build: Callable[[Path | None], nn.Module], key: str) -> tuple[nn.Module, dict]:
    """:func:`_built`, keeping its progress under ``--state-dir``: the reconstruction's after every
    block, then the built model and what building it cost, so a run killed while sampling it resumes
    without building it again (and reports the cost of the original build)."""
    state_dir = quantization_state_dir(bench, key)
    if state_dir is None:
        return _built(bench, lambda: build(None), key)
    built, cost_file = state_dir / BUILT, state_dir / BUILT / BUILD_COST
    if key not in bench.quantized and cost_file.is_file():
        quantized = load(built, model=bench.model.denoiser).to(bench.args.device)
        bench.quantized[key] = (quantized, json.loads(cost_file.read_text()))
    quantized, cost = _built(bench, lambda: build(state_dir / RECONSTRUCTION), key)
    if not cost_file.is_file():
        cost.update(_resumed_reconstruction(quantized))  # in the record _built keeps for this model
        save(quantized, built, overwrite=True)
        write_atomically(cost_file, lambda f: f.write(json.dumps(cost).encode()))
        shutil.rmtree(state_dir / RECONSTRUCTION, ignore_errors=True)  # built: the progress is no longer needed
    return quantized, cost


def _resumed_reconstruction(quantized: nn.Module) -> dict[str, float]:
    """``resumed_reconstruction_s``: the reconstruction time an earlier, killed run spent on the blocks
    this one restored, which its ``calibration_s`` does not include (nothing when none was restored)."""
    records = info(quantized).extra.get("reconstruction") or []
    seconds = sum(record["seconds"] for record in records if record.get("restored"))
    return {"resumed_reconstruction_s": round(seconds, 2)} if seconds else {}


def run_recipe(bench: ModelBench, cell: Cell) -> dict[str, Any]:
    config = _recipe_config(bench, cell)
    key = quantization_key(config)

    def build(state_dir: Path | None) -> nn.Module:
        quantizing = dataclasses.replace(config, correction=CorrectionConfig())
        return quantize_model(bench.model, quantizing, progress=bench.args.progress, state_dir=state_dir).denoiser

    quantized, cost = _built_resumably(bench, build, key)
    info(quantized).config = dataclasses.replace(info(quantized).config, correction=config.correction)
    if config.correction.enabled:
        cost = cost | _noise_statistics(bench, key, quantized, config.correction)
    sampled = convert_model(quantized) if cell.real_kernels else quantized
    measured = _measured(bench, sampled, cost, cell.eta)
    conversion = {"conversion": getattr(sampled, REPORT_ATTRIBUTE).summary()} if cell.real_kernels else {}
    return measured | conversion | {"compute": _compute(bench, quantized), "recipe": config.to_dict()}


def _noise_statistics(bench: ModelBench, key: str, quantized: nn.Module, correction: CorrectionConfig) -> dict:
    """PTQD's statistics measured on ``quantized`` (once per model and measurement); their cost."""
    measurement = dataclasses.replace(correction, correlation=True, bias=True, variance=True)
    key += json.dumps(dataclasses.asdict(measurement), sort_keys=True)
    if key not in bench.noise_costs:
        model = bench.model

        def conditioning(n: int) -> Conditioning:  # at the guidance scale sampling uses
            return model.make_conditioning(n, guidance_scale=model.guidance_scale)

        def measure() -> None:
            measure_noise(
                quantized,
                model.denoiser,
                model.scheduler,
                conditioning,
                config=measurement,
                progress=bench.args.progress,
            )

        _, seconds, peak = _timed(bench, measure)
        bench.noise_costs[key] = {"noise_statistics_s": seconds, "noise_statistics_peak_memory_gib": peak}
    return bench.noise_costs[key]


def run_peer(bench: ModelBench, cell: Cell) -> dict[str, Any]:
    spec = peers.check_available(cell.method, bench.args.device)
    config = load_recipe("minmax").calibration
    config = dataclasses.replace(config, guidance_scale=bench.model.guidance_scale)
    result: list[peers.PeerResult] = []

    def calibrate(model: nn.Module) -> None:
        calibration = record_for(bench.model, config, progress=False).to(bench.args.device)
        calibration_runner(PeerDenoiser(model), calibration, batch_size=config.batch_size)()

    def build() -> nn.Module:
        result.append(peers.apply_peer(cell.method, bench.model.denoiser, calibrate if spec.calibrates else None))
        return PeerDenoiser(result[0].model)

    measured = _measured(bench, *_built(bench, build), cell.eta)
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
        "sampling": bench.sampling(bench.args.seed, cell.eta) | ({"real_kernels": True} if cell.real_kernels else {}),
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


def run_matrix(args: argparse.Namespace, command: str) -> int:
    """Run the pending cells, model by model, within ``--max-minutes``; returns how many are left."""
    results = Path(args.results)
    cells = plan_cells(args.models, args.methods, args.bits, args.eta, args.real_kernels)
    todo = distributed.broadcast(pending(cells, results, args.force))  # launched on several: the main one's
    started, longest = time.monotonic(), 0.0
    main_process = distributed.is_main_process()

    def out_of_time() -> bool:
        """Whether a cell as long as the longest so far would end past ``--max-minutes`` (the main process's
        clock decides for every process)."""
        elapsed = time.monotonic() - started
        return distributed.broadcast(args.max_minutes is not None and elapsed + longest > 60 * args.max_minutes)

    for model, cells in by_model(todo):
        if out_of_time():
            break
        bench = ModelBench(model, args)
        for cell in cells:
            if out_of_time():
                break
            began = time.monotonic()
            record = run_cell(bench, cell, command)
            if main_process:
                write_cell(cell.path(results), record)
            longest = max(longest, time.monotonic() - began)
            sampler = f" eta {cell.eta:g}" if cell.eta else ""
            seconds = time.monotonic() - began
            if main_process:
                print(f"{cell.model} {cell.method} {cell.bits}{sampler}: {record['status']} ({seconds:.0f} s)")
            todo.remove(cell)
        del bench
    if todo and main_process:
        print(f"{len(todo)} cells left (time limit); run the same command again to resume")
    return len(todo)


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
        nargs="+",
        default=[0.0],
        help="DDIM eta, one or more: 0 deterministic (default), 1 as stochastic as DDPM; cells of eta > 0"
        " are filed apart and share the quantized models",
    )
    parser.add_argument(
        "--real-kernels",
        action="store_true",
        help="recipe cells sample their quantized model converted to real low-bit layers (dmquant.kernels: the "
        "Triton kernels on CUDA); filed apart (__kernels) and tabled as <model>-kernels, against the same FP cells",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="sampling batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compared samples (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", default="bench/results/quality", help="where cell JSON goes")
    parser.add_argument("--max-minutes", type=float, help="stop before a cell that would not end in time")
    parser.add_argument("--force", action="store_true", help="rerun cells whose results exist")
    parser.add_argument(
        "--state-dir",
        help="keep each quantization's progress here (its reconstruction after every block, then the built"
        " model), so a killed cell resumes where it stopped when the same command runs again",
    )
    parser.add_argument("-q", "--quiet", dest="progress", action="store_false", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if distributed.num_processes() > 1:  # `accelerate launch bench/quality.py ...`: each samples a share
        if args.state_dir is not None:
            raise SystemExit("--state-dir: kept by one process; run without it on several, or on one")
        args.device = str(distributed.device(args.device))
        args.progress = args.progress and distributed.is_main_process()
    command = command_line("quality", argv)
    run_matrix(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
