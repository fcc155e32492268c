"""Running the speed benchmark: one model's rows side by side in one process (:class:`ModelBench`), each
row built, measured in its execution settings and written as a cell; the matrix of models × rows within
``--max-minutes``; the device's peaks beside the cells."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import peers
from bench.common import by_model, git_commit, pending, synchronize, write_cell
from bench.speed_measure import (
    COMPILED_BLOCKS,
    MEMORY_FORMATS,
    capture_graph,
    compile_in_place,
    configure_compiler,
    convs_in_memory_format,
    count_flops,
    free_memory,
    measure_peaks,
    profiled_kernels,
    timed,
    uncompile,
    weight_bytes,
)
from bench.speed_rows import (
    BUILDERS,
    COMPILED,
    EAGER,
    GRAPHED,
    MEASURED_PATHS,
    REFERENCE_ROW,
    ROWS,
    SETTINGS,
    Built,
    Row,
    RowUnsupported,
)
from bench.speed_workloads import WORKLOADS
from dmquant.provenance import environment

SCHEMA_VERSION = 1
GIB, MIB = 2**30, 2**20
#: Seconds one H100 takes for a model with every row and setting: what the ten rows of the
#: specification took (commit bc1055c, each model's rows in one process) scaled to all rows. The
#: torch.compile runs (about 2-5 s per distinct block graph) and the autotuning of dmquant's Triton
#: kernels (per GEMM/conv shape) dominate. ``--max-minutes`` scales them by the pending rows and by how
#: far off the models run so far were.
ESTIMATED_SECONDS = {
    "sd15-unet": 1135,
    "sdxl-unet": 940,
    "dit-xl-2-256": 192,
    "ddpm-glyphs32": 419,
    "dit-glyphs": 146,
    "ldm-glyphs64": 584,
    # guesses, before a measured run: the new models' rows (compile of few distinct blocks; FLUX builds 12 B weights)
    "flux-dev": 900,
    "sd3-medium": 500,
    "pixart-sigma": 400,
    "sdxl-unet-b8": 1200,
    "sd15-unet-b8": 1300,
}


@dataclass(frozen=True)
class Cell:
    model: str
    row: str

    def path(self, results: Path) -> Path:
        return results / self.model / f"{self.row}.json"


def plan_cells(models: Sequence[str], rows: Sequence[str], settings: Sequence[str] = SETTINGS) -> list[Cell]:
    """The matrix in run order: per model, the rows in ``ROWS`` order; a row none of whose settings
    is among ``settings`` is left out."""
    return [
        Cell(model, row)
        for model in models
        for row in ROWS
        if row in rows and any(setting in settings for setting in ROWS[row].settings)
    ]


class ModelBench:
    """One model's shared state: the float32 master and inputs on the device, the FP FLOP count,
    the latencies measured so far (the speed-up references) and a compiled bf16 model kept for the
    CUDA-graph row."""

    def __init__(self, name: str, args: argparse.Namespace, rows: Sequence[str]):
        self.name = name
        self.args = args
        self.rows = list(rows)  # the rows this run measures
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with torch.no_grad():
            self.workload = WORKLOADS[name](args, self.device)
        master = self.workload.model
        args_, kwargs = self.workload.inputs(torch.float32)
        self.fp_flops = count_flops(master, lambda: master(*args_, **kwargs))
        if self.workload.factory is not None:  # rebuilt per row: not held beside the rows' copies
            self.workload.model = master = None
        self.medians: dict[tuple[str, str], float] = {}
        self.kept_compiled: Built | None = None
        free_memory()
        self.baseline = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def peak_memory_gib(self) -> float | None:
        """Peak allocated GPU memory since the last reset, less the master and inputs this bench holds."""
        if self.device.type != "cuda":
            return None
        return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / GIB

    def resident_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return (torch.cuda.memory_allocated(self.device) - self.baseline) / GIB

    def settings(self, row: Row) -> list[str]:
        """The row's settings that ``--settings`` selects and the device can run, headline first."""
        runnable = SETTINGS if self.device.type == "cuda" else (EAGER, COMPILED)
        return [setting for setting in row.settings if setting in self.args.settings and setting in runnable]

    def reference_ms(self, setting: str, results: Path) -> tuple[float | None, str | None]:
        """Median of the bf16 row of ``setting``: from this run, else from its stored cell."""
        row = REFERENCE_ROW[setting]
        if (row, setting) in self.medians:
            return self.medians[row, setting], "this run"
        path = Cell(self.name, row).path(results)
        if path.exists():
            stored = json.loads(path.read_text())
            median = ((stored.get("measurements") or {}).get(setting) or {}).get("median_ms")
            if stored.get("status") == "ok" and median is not None:
                return median, f"stored cell ({stored.get('environment', {}).get('date')})"
        return None, None


@torch.no_grad()
def measure(bench: ModelBench, row: Row, built: Built) -> dict[str, Any]:
    """Every selected setting of ``row`` on ``built``: latency, memory, compile time, kernels."""
    settings = bench.settings(row)
    memory_format = MEMORY_FORMATS[bench.args.memory_format]
    args_, kwargs = bench.workload.inputs(bench.dtype, memory_format)
    model = convs_in_memory_format(built.model, memory_format)

    def call() -> Any:
        return model(*args_, **kwargs)

    out: dict[str, Any] = {"measurements": {}, "resident_gib": bench.resident_gib()}
    began = time.perf_counter()  # the first call also autotunes kernels (cuDNN, dmquant's Triton GEMMs)
    out["flops"] = flops = bench.fp_flops if built.compiled else count_flops(model, call)
    out["first_call_s"] = None if built.compiled else time.perf_counter() - began
    if EAGER in settings:
        out["measurements"][EAGER] = timed(bench, call)
    if {COMPILED, GRAPHED} & set(settings):
        _measure_compiled(bench, built, call, settings, out)
    # compiled unless compiling failed or the row runs eager only: the kernels of the headline setting
    out["kernels"] = profiled_kernels(call, bench.device, flops)
    return out


def _measure_compiled(bench: ModelBench, built: Built, call: Callable[[], Any], settings: list[str], out: dict) -> None:
    """Compile (unless ``built`` is compiled already), time the compiled and the graphed settings."""
    if not built.compiled:
        began = time.perf_counter()
        try:
            out["compile_regions"] = compile_in_place(built.model, bench.args.compile_scope)
            call()
            synchronize(bench.device)
        except Exception as error:  # a model torch.compile cannot take still has its eager numbers
            uncompile(built.model)
            reason = f"torch.compile failed: {type(error).__name__}: {error}"
            out["measurements"] |= {setting: {"error": reason} for setting in settings if setting != EAGER}
            return
        out["compile_s"] = time.perf_counter() - began
        built.compiled = True
    if COMPILED in settings:
        out["measurements"][COMPILED] = timed(bench, call)
    if GRAPHED in settings:
        out["measurements"][GRAPHED] = _timed_graph(bench, call)


def _timed_graph(bench: ModelBench, call: Callable[[], Any]) -> dict[str, Any]:
    try:
        replay = capture_graph(call)
    except Exception as error:  # capture refuses some ops (CPU syncs); the other settings stand
        return {"error": f"CUDA graph capture failed: {type(error).__name__}: {error}"}
    result = timed(bench, replay)
    del replay
    return result


def _headline(settings: list[str], measurements: dict[str, dict]) -> str | None:
    """The first of the row's selected settings that measured a latency."""
    return next((s for s in settings if "median_ms" in measurements.get(s, {})), None)


def metrics_of(bench: ModelBench, row: Row, measured: dict[str, Any], results: Path) -> tuple[dict[str, Any], str]:
    """The cell's flat numbers (the headline setting's latency and memory, speed-ups, FLOPs, TFLOP/s) and
    which setting is the headline; each measurement gets its speed-up over the bf16 row of its setting."""
    measurements = measured["measurements"]
    headline = _headline(bench.settings(row), measurements)
    if headline is None:
        raise RuntimeError("no setting measured a latency: " + json.dumps(measurements))
    for setting, result in measurements.items():
        if "median_ms" in result:
            bench.medians[row.name, setting] = result["median_ms"]
            reference, source = bench.reference_ms(setting, results)
            result["speedup_vs_bf16_same_setting"] = reference / result["median_ms"] if reference else None
            result["reference"] = f"{REFERENCE_ROW[setting]} ({source})" if source else None
    main = measurements[headline]
    eager_reference, _ = bench.reference_ms(EAGER, results)
    flops, kernels = measured["flops"].summary(), measured.get("kernels") or {}
    share = kernels.get("time_share", {})
    return {
        "median_ms": main["median_ms"],
        "iqr_ms": main["iqr_ms"],
        "eager_ms": measurements.get(EAGER, {}).get("median_ms"),
        "compiled_ms": measurements.get(COMPILED, {}).get("median_ms"),
        "cuda_graph_ms": measurements.get(GRAPHED, {}).get("median_ms"),
        "speedup_vs_bf16_eager": eager_reference / main["median_ms"] if eager_reference else None,
        "speedup_vs_bf16_same_compile": main["speedup_vs_bf16_same_setting"],
        "peak_memory_gib": main["peak_memory_gib"],
        "resident_gib": measured["resident_gib"],
        "compile_s": measured.get("compile_s"),
        "first_call_s": measured["first_call_s"],
        "gflops_per_call": flops["total"] / 1e9,
        "tflops": flops["total"] / (main["median_ms"] * 1e-3) / 1e12,
        "gemm_conv_tflops": kernels.get("gemm_conv_tflops"),
        "attention_tflops": kernels.get("attention_tflops"),
        "gemm_conv_time_share": share.get("gemm/conv"),
        "attention_time_share": share.get("attention"),
        "full_precision_flop_fraction": flops["full_precision_fraction"],
        "full_precision_layer_flop_fraction": flops["full_precision_layer_fraction"],
    }, headline


#: How the ``compiled+cudagraph`` setting runs.
CUDA_GRAPH_SETTING = (
    "explicit torch.cuda.CUDAGraph capture of one whole call after compile and warm-up (3 calls on a side "
    "stream), static inputs, replayed per call; not torch.compile(mode='reduce-overhead')"
)


def _row_settings(bench: ModelBench, row: Row, headline: str, compile_settings: dict) -> dict[str, Any]:
    """How the row ran: dtype, settings measured, compile and CUDA-graph settings, warm-up and repeats."""
    settings = bench.settings(row)
    scope = bench.args.compile_scope
    compile_setting = {
        "api": "torch.compile",
        "mode": "default",
        "dynamic": False,
        "fullgraph": False,
        "scope": scope,
        "regions": f"outermost {', '.join(COMPILED_BLOCKS)} modules" if scope == "blocks" else "the whole model",
    }
    return {
        "dtype": str(bench.dtype).removeprefix("torch."),
        "memory_format": bench.args.memory_format,
        "measured": settings,
        "headline": headline,
        "warmup": bench.args.warmup,
        "repeats": bench.args.repeats,
        "compile": compile_setting | compile_settings if {COMPILED, GRAPHED} & set(settings) else None,
        "cuda_graph": CUDA_GRAPH_SETTING if GRAPHED in settings else None,
    }


def run_row(bench: ModelBench, row: Row, results: Path, compile_settings: dict) -> dict[str, Any]:
    """Build and measure one row; its cell's body (status, metrics, details)."""
    if not bench.settings(row):
        raise RowUnsupported("CUDA graphs need a CUDA device")
    began = time.perf_counter()
    built = BUILDERS[row.kind](bench, row)
    build_s = time.perf_counter() - began
    measured = measure(bench, row, built)
    metrics, headline = metrics_of(bench, row, measured, results)
    if row.name == "bf16-compiled" and built.compiled and "bf16-compiled-cudagraphs" in bench.rows:
        bench.kept_compiled = built  # the CUDA-graph row replays this very compiled model
    notes = list(built.details.pop("notes", []))
    first = bench.settings(row)[0]
    if headline != first:
        notes.append(f"headline setting is {headline}: {first} failed (see measurements)")
    return {
        "metrics": metrics | {"build_s": build_s},
        "settings": _row_settings(bench, row, headline, compile_settings),
        "measurements": measured["measurements"],
        "flops": measured["flops"].summary() | {"fp_model_total": bench.fp_flops.total},
        "kernels": measured.get("kernels"),
        "weight_bytes": weight_bytes(built.model),
        "notes": notes,
        **built.details,
    }


def run_cell(bench: ModelBench, cell: Cell, command: str, compile_settings: dict) -> dict[str, Any]:
    """One cell's JSON: what ran, its status and numbers, and where and when it ran."""
    row = ROWS[cell.row]
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "benchmark": "speed",
        "model": cell.model,
        "model_description": bench.workload.description,
        "row": cell.row,
        "kind": row.kind,
        "description": row.description + (MEASURED_PATHS if row.kind == "dmquant" and row.measured_paths else ""),
        "status": "ok",
        "reason": None,
        "representative": bench.device.type == "cuda" and not bench.args.tiny,
        "inputs": {"batch": bench.workload.batch, "shapes": bench.workload.shapes()},
    }
    try:
        record |= run_row(bench, row, Path(bench.args.results), compile_settings)
    except (RowUnsupported, peers.PeerUnavailable) as error:
        record |= {"status": "unsupported", "reason": str(error)}
    except Exception as error:  # a cell that breaks is recorded, and the matrix goes on
        record |= {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    finally:
        free_memory()
    record["metrics"] = record.get("metrics") or {}
    if "weight_bytes" in record:
        record["metrics"]["weight_mib"] = record["weight_bytes"] / MIB
    return record | {"command": command, "environment": run_environment(), "git_commit": git_commit()}


def run_environment() -> dict[str, Any]:
    """dmquant's provenance plus the GPU's compute capability and the compiler/peer versions."""
    versions = {}
    for distribution in ("triton", "torchao"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    cuda = torch.cuda.is_available()
    return (
        environment()
        | versions
        | {
            "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        }
    )


def write_peaks(args: argparse.Namespace, command: str) -> dict[str, Any]:
    device = torch.device(args.device)
    size = 8192 if device.type == "cuda" and not args.tiny else 256
    record = {"schema": SCHEMA_VERSION, "representative": device.type == "cuda" and not args.tiny}
    record |= measure_peaks(device, size)
    record |= {"command": command, "environment": run_environment(), "git_commit": git_commit()}
    write_cell(Path(args.results) / "peaks.json", record)
    return record


def estimated_seconds(model: str, cells: int) -> float:
    """A guess of an H100's time for ``cells`` rows of ``model`` (``ESTIMATED_SECONDS`` covers all)."""
    return ESTIMATED_SECONDS[model] * cells / len(ROWS)


@dataclass
class TimeBudget:
    """``--max-minutes`` (None: no limit), and how long the models run so far took against their estimates."""

    seconds: float | None
    started: float = field(default_factory=time.monotonic)
    spent: float = 0.0
    estimated: float = 0.0

    def guess(self, model: str, cells: int) -> float:
        """The estimate of ``cells`` rows of ``model``, scaled by how far off the estimates so far were."""
        factor = self.spent / self.estimated if self.estimated else 1.0
        return estimated_seconds(model, cells) * factor

    def allows(self, seconds: float) -> bool:
        return self.seconds is None or time.monotonic() - self.started + seconds <= self.seconds

    def record(self, model: str, cells: int, seconds: float) -> None:
        self.spent += seconds
        self.estimated += estimated_seconds(model, cells)


def run_matrix(args: argparse.Namespace, command: str) -> int:
    """Run the pending cells model by model within ``--max-minutes``; returns how many are left.

    A model whose estimate (scaled by how long the models so far took against theirs) would end
    past the limit is left whole for the next run, and smaller models after it may still run; the
    first model of a run starts anyway, and if even it does not fit, its rows are split over runs
    (the rows left compare with the stored bf16 cells).
    """
    todo = pending(plan_cells(args.models, args.rows, args.settings), Path(args.results), args.force)
    budget = TimeBudget(None if args.max_minutes is None else 60 * args.max_minutes)
    compile_settings = configure_compiler()
    if todo:
        write_peaks(args, command)
    left = 0
    for model, cells in by_model(todo):
        guess = budget.guess(model, len(cells))
        if budget.estimated and not budget.allows(guess):
            print(f"{model}: left for the next run (about {guess:.0f} s, over --max-minutes)")
            left += len(cells)
            continue
        began = time.monotonic()
        done = _run_model(model, cells, args, command, compile_settings, budget)
        budget.record(model, done, time.monotonic() - began)
        left += len(cells) - done
    if left:
        print(f"{left} cells left (time limit); run the same command again to resume")
    return left


def _run_model(
    model: str, cells: list[Cell], args: argparse.Namespace, command: str, compile_settings: dict, budget: TimeBudget
) -> int:
    """Run ``model``'s cells in one process, stopping before a row that would end past the budget
    (the first always runs); returns how many ran."""
    results = Path(args.results)
    bench = ModelBench(model, args, [cell.row for cell in cells])
    longest, done = 0.0, 0
    for cell in cells:
        if done and not budget.allows(max(longest, budget.guess(model, 1))):
            print(f"{model}: {len(cells) - done} rows left for the next run (--max-minutes)")
            break
        began = time.monotonic()
        record = run_cell(bench, cell, command, compile_settings)
        write_cell(cell.path(results), record)
        seconds = time.monotonic() - began
        longest = max(longest, seconds)
        summary = record["reason"] or f"{record['metrics'].get('median_ms', float('nan')):.3f} ms"
        print(f"{cell.model} {cell.row}: {record['status']}, {summary} ({seconds:.0f} s)")
        done += 1
    del bench
    free_memory()
    return done
