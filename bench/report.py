"""Turn the committed quality-benchmark JSON into BENCHMARKS.md and its plots.

Reads every ``*.json`` under ``--results`` (default ``bench/results/quality``; ``bench/quality.py``
writes one file per cell, ``<model>/<method>__<bits>.json``), and writes ``--output`` (default
``BENCHMARKS.md``) with one table per zoo model, plus two PNG plots per model under ``--plots``
(default ``docs/bench``): ``<model>-fid.png`` (FID-proxy against bit setting, one line per method)
and ``<model>-sqnr.png`` (SQNR of the noise estimate per sampling step). Sections of their own
follow for the results found next to ``--results``: calibration cost (``calibration-cost/``),
reconstruction speed (``recon-speed/``, from ``bench/recon_speed.py``), deployment fidelity
(``fidelity/``, from ``bench/fidelity.py``), speed (``speed/``, from ``bench/speed.py``) and layer
throughput (``layer-speed/``, from ``bench/layer_speed.py``). The
output depends only on the JSON, so rerunning on the same files gives the same page; every file is
written atomically.

Cell schema (version 1), one JSON object per file::

    {
      "schema": 1,                      # required; this script reads version 1 only
      "model": "ddpm-glyphs32",         # required: zoo model (ddpm-glyphs32, ldm-glyphs64, dit-glyphs)
      "model_description": "...",       # optional one-liner shown under the model's heading
      "method": "mse",                  # required: "fp"; "fp-seed1" (FP again with other seeds: the
                                        #   seed-to-seed spread); "minmax", "mse", other recipes
                                        #   ("q-diffusion", ...); peers ("torchao-int8-dynamic",
                                        #   "torchao-int4-weight-only", "torchao-fp8-dynamic",
                                        #   "quanto-w8a8", "quanto-w4a8")
      "kind": "recipe",                 # required: "fp" | "recipe" | "peer"
      "bits": "W8A8",                   # required: "FP32" for fp rows, "W8A8", "W8A8+attn8" (attention
                                        #   matmuls at 8 bits), "W4A8", "W4A16" (weight-only), "W4A4", "FP8"
      "status": "ok",                   # required: "ok" | "unsupported" | "failed"
      "reason": null,                   # text when status != "ok", e.g. "torchao int4 needs CUDA"
      "coverage": {                     # null for dmquant rows (every layer quantized); peers say
        "quantized": {"Linear": 20, "Conv2d": 0},   # what they quantized and what they left FP
        "skipped": {"Conv2d": 31}
      },
      "metrics": {
        "class_accuracy": 0.93,         # GlyphNet top-1 agreement with the conditioning class
        "colour_accuracy": 0.88,        # text-to-image model only, else absent or null
        "fid": 0.63, "fid_floor": 0.21, "sfid": 4.2, "sfid_floor": 2.0,
        "inception_score": 40.1, "kid": 0.001, "precision": 0.45, "recall": 0.95,
        "psnr": 21.8, "ssim": 0.81      # vs the FP samples with the same seeds; null for the fp row
      },
      "sqnr_per_step": [35.1, 34.9],    # dB of the noise estimate vs FP along FP trajectories, one per
                                        #   sampling step, first = noisiest; null for fp rows
      "calibration_s": 41.2,
      "peak_memory_gib": 3.1,
      "sampling": {"sampler": "DDIM", "eta": 0.0, "num_inference_steps": 50, "num_samples": 10000,
                   "seed": 0, "guidance_scale": 1.0},
      "features": "glyphnet",
      "command": "python bench/quality.py --models ddpm-glyphs32 --methods mse --bits W8A8",
      "environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "diffusers": "0.42.1",
                      "python": "3.12.3", "date": "2026-11-21"},
      "git_commit": "abc123"
    }

Everything but the required keys may be missing or null (shown as "—"). A number may be
``Infinity``/``NaN`` as Python's ``json`` writes them. Metrics of a row whose status is not
``"ok"`` are not shown; its reason is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, `python bench/report.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import markdown_table
from dmquant.atomic import write_atomically
from dmquant.catalog import REFERENCE_MODELS

SCHEMA_VERSION = 1
#: The zoo models in the order their tables appear; others follow alphabetically.
ZOO_MODELS = REFERENCE_MODELS
#: Bit settings in table and plot order; others follow alphabetically.
BITS_ORDER = (
    "FP32",
    "FP16",
    "BF16",
    "W8A8",
    "W8A8+attn8",
    "W8A8-FP8",
    "W8A8-FP8+attn-fp8",
    "W4A8",
    "W4A16",
    "W4A4",
    "FP8",
)
#: dmquant baselines first, in this order; other recipes follow alphabetically.
BASELINE_RECIPES = ("minmax", "mse")
KINDS = ("fp", "recipe", "peer")
STATUSES = ("ok", "unsupported", "failed")
REQUIRED = ("model", "method", "kind", "bits", "status")
FEATURE_NAMES = {"glyphnet": "GlyphNet", "inception": "Inception-v3"}

MISSING = "—"

DEFAULT_RESULTS = Path("bench/results/quality")
#: Where the calibration-cost, reconstruction-speed, speed, deployment-fidelity and layer-throughput
#: results are, next to the quality results by default.
COST_FOLDER = "calibration-cost"
SPEED_FOLDER = "speed"
#: The speed rows compiled as one whole-model graph (``bench/speed.py --compile-scope model``), next to ``speed/``.
SPEED_MODEL_SCOPE_FOLDER = "speed-model-scope"
#: The rows of the speed table's specification measured in one process on one H100, next to ``speed/``.
SPEED_ONE_H100_FOLDER = "speed-h100"
FIDELITY_FOLDER = "fidelity"
LAYER_SPEED_FOLDER = "layer-speed"
RECON_SPEED_FOLDER = "recon-speed"
#: The columns of the layer-throughput table, in order (``bench/layer_speed.py``'s paths); a path
#: not listed here gets a column after them.
LAYER_SPEED_PATHS = (
    "bf16", "int8", "fp8", "int8-gather", "fp8-gather", "int8-triton", "fp8-triton", "w4a8", "w4a16", "torch-int8",
    "torch-fp8",
)  # fmt: skip
DEFAULT_OUTPUT = Path("BENCHMARKS.md")
DEFAULT_PLOTS = Path("docs/bench")
#: Folder of the results holding the hand-written reading notes: ``<table>.md`` goes under that
#: table, ``all.md`` after the intro.
NOTES_FOLDER = "notes"

Cell = dict[str, Any]


class CellError(ValueError):
    """A result file that is not a valid version-1 cell (the message names the file)."""


# --- loading -------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_cell(data: object, source: str) -> Cell:
    """Check one parsed cell against the schema and return it; raise :class:`CellError` naming ``source``."""
    if not isinstance(data, dict):
        raise CellError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA_VERSION:
        raise CellError(f"{source}: schema is {data.get('schema')!r}; this script reads schema {SCHEMA_VERSION}")
    for key in REQUIRED:
        if not isinstance(data.get(key), str) or not data[key]:
            raise CellError(f"{source}: {key!r} must be a non-empty string, got {data.get(key)!r}")
    if data["kind"] not in KINDS:
        raise CellError(f"{source}: kind must be one of {', '.join(KINDS)}, got {data['kind']!r}")
    if data["status"] not in STATUSES:
        raise CellError(f"{source}: status must be one of {', '.join(STATUSES)}, got {data['status']!r}")
    for key in ("metrics", "coverage", "sampling", "environment"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise CellError(f"{source}: {key!r} must be an object or null, got {type(data[key]).__name__}")
    for name, value in (data.get("metrics") or {}).items():
        if value is not None and not _is_number(value):
            raise CellError(f"{source}: metrics.{name} must be a number or null, got {value!r}")
    for key in ("calibration_s", "peak_memory_gib"):
        if data.get(key) is not None and not _is_number(data[key]):
            raise CellError(f"{source}: {key!r} must be a number or null, got {data[key]!r}")
    steps = data.get("sqnr_per_step")
    if steps is not None and (
        not isinstance(steps, list) or not all(value is None or _is_number(value) for value in steps)
    ):
        raise CellError(f"{source}: 'sqnr_per_step' must be a list of numbers (or null), got {steps!r}")
    for part in ("quantized", "skipped"):
        counts = (data.get("coverage") or {}).get(part)
        if counts is not None and (
            not isinstance(counts, dict) or not all(isinstance(n, int) and n >= 0 for n in counts.values())
        ):
            raise CellError(f"{source}: coverage.{part} must map layer types to counts, got {counts!r}")
    for key in ("reason", "command", "features", "git_commit", "model_description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise CellError(f"{source}: {key!r} must be a string or null, got {data[key]!r}")
    return data


def read_result(path: Path) -> dict[str, Any]:
    """One result file's JSON object; :class:`CellError` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CellError(f"{path}: cannot read a JSON result: {error}") from error
    if not isinstance(data, dict):
        raise CellError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_cells(results: str | os.PathLike[str]) -> list[Cell]:
    """Every cell under ``results`` (searched recursively), validated and in table order.

    Raises:
        FileNotFoundError: ``results`` is not a directory.
        CellError: a file is not valid JSON, not a version-1 cell, or repeats another file's
            (model, method, bits).
    """
    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"no results directory {results} (bench/quality.py writes it)")
    cells: list[Cell] = []
    seen: dict[tuple[str, str, str], Path] = {}
    for path in sorted(results.rglob("*.json")):
        cell = validate_cell(read_result(path), str(path))
        key = (table_name(cell), cell["method"], cell["bits"])
        if key in seen:
            raise CellError(f"{path} and {seen[key]} are both table {key[0]}, method {key[1]}, bits {key[2]}")
        seen[key] = path
        cells.append(cell)
    return sort_cells(cells)


# --- ordering ------------------------------------------------------------------------------


def _ordered(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), value)


def model_key(model: str) -> tuple[int, str]:
    return _ordered(model, ZOO_MODELS)


def bits_key(bits: str) -> tuple[int, str]:
    return _ordered(bits, BITS_ORDER)


def method_key(cell: Cell) -> tuple[int, int, str]:
    """FP, FP with other seeds, then minmax, mse, other recipes alphabetically, then peers alphabetically."""
    method, kind = cell["method"], cell["kind"]
    if kind == "fp":
        return (0, 0 if method == "fp" else 1, method)
    if kind == "recipe":
        return (1, *_ordered(method, BASELINE_RECIPES))
    return (2, 0, method)


def sampler_eta(cell: Cell) -> float:
    """DDIM's eta of the cell's sampling (0 when not recorded)."""
    eta = (cell.get("sampling") or {}).get("eta")
    return float(eta) if _is_number(eta) else 0.0


def table_name(cell: Cell) -> str:
    """The table a cell belongs to: its model, with ``-eta<η>`` for a stochastic sampler and ``-kernels`` for
    samples from real low-bit kernels."""
    eta = sampler_eta(cell)
    name = cell["model"] if eta == 0 else f"{cell['model']}-eta{eta:g}"
    return name + ("-kernels" if (cell.get("sampling") or {}).get("real_kernels") else "")


def row_key(cell: Cell) -> tuple:
    return (model_key(cell["model"]), sampler_eta(cell), method_key(cell), bits_key(cell["bits"]))


def sort_cells(cells: Iterable[Cell]) -> list[Cell]:
    return sorted(cells, key=row_key)


def by_model(cells: Iterable[Cell]) -> dict[str, list[Cell]]:
    """Cells grouped per table (:func:`table_name`: a model and its sampler), in table order."""
    groups: dict[str, list[Cell]] = {}
    for cell in sort_cells(cells):
        groups.setdefault(table_name(cell), []).append(cell)
    return groups


# --- formatting ----------------------------------------------------------------------------


def _finite(value: object) -> bool:
    return _is_number(value) and math.isfinite(value)


def _special(value: float) -> str | None:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def fmt_sig(value: float) -> str:
    """Three significant digits, no exponent below 1000 (``0.63``, ``4.2``, ``40.1``, ``1234``)."""
    special = _special(value)
    if special:
        return special
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def fmt_fixed(decimals: int) -> Callable[[float], str]:
    def format_(value: float) -> str:
        return _special(value) or f"{value:.{decimals}f}"

    return format_


def fmt_percent(value: float) -> str:
    return _special(value) or f"{100 * value:.1f}%"


def fmt_duration(seconds: float) -> str:
    """``41.2 s``, ``12.5 min``, ``1.50 h``."""
    special = _special(seconds)
    if special:
        return special
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _display(value: object, format_: Callable[[float], str]) -> str:
    return format_(float(value)) if _is_number(value) else MISSING


def mean_sqnr(cell: Cell) -> float | None:
    """Mean over sampling steps of ``sqnr_per_step`` (finite steps; ``inf`` if every step is exact)."""
    steps = [value for value in cell.get("sqnr_per_step") or [] if _is_number(value)]
    finite = [value for value in steps if math.isfinite(value)]
    if finite:
        return sum(finite) / len(finite)
    if steps and all(value == math.inf for value in steps):
        return math.inf
    return None


def method_label(cell: Cell, other_seed_methods: int = 1) -> str:
    """``FP``, ``FP (other seeds)`` (naming the method if there are several), or the method name."""
    if cell["kind"] != "fp":
        return cell["method"]
    if cell["method"] == "fp":
        return "FP"
    return "FP (other seeds)" if other_seed_methods <= 1 else f"FP (other seeds, {cell['method']})"


def coverage_note(coverage: Mapping[str, Any] | None) -> str | None:
    """``"Linear only; 31 Conv2d left FP"`` from a peer's coverage; ``None`` without coverage.

    ``unquantized_inputs`` (layers whose weights are quantized but whose inputs stay in floating
    point, e.g. quanto's Conv2d) is said too: such a layer is weight-only, whatever the bits say.
    """
    if not coverage:
        return None
    quantized = sorted(name for name, count in (coverage.get("quantized") or {}).items() if count)
    skipped = sorted((name, count) for name, count in (coverage.get("skipped") or {}).items() if count)
    float_inputs = sorted((name, count) for name, count in (coverage.get("unquantized_inputs") or {}).items() if count)
    if skipped:
        head = f"{' + '.join(quantized)} only" if quantized else "nothing quantized"
        note = head + "; " + ", ".join(f"{count} {name} left FP" for name, count in skipped)
    else:
        counts = coverage.get("quantized") or {}
        listed = ", ".join(f"{counts[name]} {name}" for name in quantized)
        note = f"all layers quantized ({listed})" if listed else None
    if float_inputs:
        inputs = ", ".join(f"{count} {name}" for name, count in float_inputs)
        note = (note + "; " if note else "") + f"inputs of {inputs} not quantized (weight-only)"
    return note


# --- one model's table ---------------------------------------------------------------------

#: (header, metric key, format, spread format) of the quality columns; colour only where measured.
_ACCURACY = [
    ("class acc.", "class_accuracy", fmt_percent),
    ("colour acc.", "colour_accuracy", fmt_percent),
]
_DISTRIBUTION = [
    ("FID-proxy", "fid", fmt_sig),
    ("sFID-proxy", "sfid", fmt_sig),
    ("IS-proxy", "inception_score", fmt_sig),
    ("precision", "precision", fmt_fixed(3)),
    ("recall", "recall", fmt_fixed(3)),
]
_FIDELITY = [
    ("PSNR (dB)", "psnr", fmt_fixed(1)),
    ("SSIM", "ssim", fmt_fixed(3)),
]
_FLOORS = {"fid": "fid_floor", "sfid": "sfid_floor"}


def _ok(cell: Cell) -> bool:
    return cell["status"] == "ok"


def _metric(cell: Cell, key: str) -> object:
    return (cell.get("metrics") or {}).get(key)


def shared_floor(cells: Sequence[Cell], metric: str) -> str | None:
    """The displayed floor of ``metric`` if every ok row that has the metric shows the same one, else ``None``."""
    shown = {
        _display(_metric(cell, _FLOORS[metric]), fmt_sig)
        for cell in cells
        if _ok(cell) and _is_number(_metric(cell, metric))
    }
    if len(shown) == 1 and MISSING not in shown:
        return shown.pop()
    return None


def fp_spread(cells: Sequence[Cell]) -> dict[str, float]:
    """Largest ``|metric(fp) − metric(fp-seedN)|`` per metric over the other-seed FP rows (same bits)."""
    reference = {cell["bits"]: cell for cell in cells if cell["kind"] == "fp" and cell["method"] == "fp" and _ok(cell)}
    spread: dict[str, float] = {}
    for cell in cells:
        if cell["kind"] != "fp" or cell["method"] == "fp" or not _ok(cell) or cell["bits"] not in reference:
            continue
        fp_metrics = reference[cell["bits"]].get("metrics") or {}
        for key, value in (cell.get("metrics") or {}).items():
            other = fp_metrics.get(key)
            if _finite(value) and _finite(other) and not key.endswith("_floor"):
                spread[key] = max(spread.get(key, 0.0), abs(value - other))
    return spread


def _columns(cells: Sequence[Cell]) -> list[tuple[str, str, Callable[[float], str]]]:
    has_colour = any(_is_number(_metric(cell, "colour_accuracy")) for cell in cells)
    accuracy = [column for column in _ACCURACY if has_colour or column[1] != "colour_accuracy"]
    return [*accuracy, *_DISTRIBUTION, *_FIDELITY]


def _quality_cell(cell: Cell, key: str, format_: Callable[[float], str], floors: Mapping[str, str | None]) -> str:
    text = _display(_metric(cell, key), format_)
    if key in _FLOORS and floors[key] is None and text != MISSING:
        floor = _metric(cell, _FLOORS[key])
        if _is_number(floor):
            text += f" (floor {fmt_sig(float(floor))})"
    return text


def _notes(cell: Cell) -> str:
    notes = []
    if not _ok(cell):
        reason = (cell.get("reason") or "").strip()
        notes.append(f"**{cell['status']}**" + (f": {reason}" if reason else ""))
    coverage = coverage_note(cell.get("coverage"))
    if coverage:
        notes.append(coverage)
    return "; ".join(notes)


def _spread_format(key: str, format_: Callable[[float], str]) -> Callable[[float], str]:
    if format_ is fmt_percent:
        return lambda value: f"±{100 * value:.1f} pp"
    return lambda value: f"±{format_(value)}"


def model_table(cells: Sequence[Cell]) -> str:
    """The markdown table of one model's cells (in table order), with the FP spread row after the FP rows."""
    cells = sort_cells(cells)
    columns = _columns(cells)
    floors = {metric: shared_floor(cells, metric) for metric in _FLOORS}
    other_seeds = len({cell["method"] for cell in cells if cell["kind"] == "fp" and cell["method"] != "fp"})
    notes = [_notes(cell) for cell in cells]
    header = ["method", "bits", *(title for title, _, _ in columns)]
    header += ["mean SQNR (dB)", "calib. time", "peak mem. (GiB)"]
    if any(notes):
        header.append("notes")
    spread = fp_spread(cells)
    rows: list[list[str]] = []
    for index, (cell, note) in enumerate(zip(cells, notes, strict=True)):
        row = [method_label(cell, other_seeds), cell["bits"]]
        if _ok(cell):
            row += [_quality_cell(cell, key, format_, floors) for _, key, format_ in columns]
            row.append(_display(mean_sqnr(cell), fmt_fixed(1)))
            row.append(_display(cell.get("calibration_s"), fmt_duration))
            row.append(_display(cell.get("peak_memory_gib"), fmt_fixed(2)))
        else:
            row += [""] * (len(columns) + 3)
        if any(notes):
            row.append(note)
        rows.append(row)
        last_fp = cell["kind"] == "fp" and (index + 1 == len(cells) or cells[index + 1]["kind"] != "fp")
        if last_fp and spread:
            spread_row = ["*FP seed-to-seed spread*", ""]
            for _, key, format_ in columns:
                spread_row.append(_spread_format(key, format_)(spread[key]) if key in spread else "")
            spread_row += [""] * (len(header) - len(spread_row))
            rows.append(spread_row)
    return markdown_table(header, rows)


#: Ablation views under a model's table: title -> (method, step label) in ablation order. A view
#: is shown when at least two of its methods were measured at one bit setting.
ABLATIONS = {
    "PTQD ablation: each step adds one correction to the same quantized model": (
        ("q-diffusion", "quantized (q-diffusion)"),
        ("ptqd-cnc", "+ correlated-noise correction"),
        ("ptqd-cnc-bc", "+ bias correction"),
        ("ptqd", "+ variance-schedule calibration (ptqd)"),
        ("ptqd-mixed", "+ step-aware mixed precision (ptqd-mixed)"),
    ),
    "Calibration ablation: q-diffusion's ranges without reconstruction, about 1,024 calibration samples": (
        ("calib-uniform", "uniform steps (Q-Diffusion)"),
        ("calib-ndtc", "NDTC (PTQ4DM)"),
        ("calib-tdac", "TDAC (EDA-DM)"),
        ("calib-single-step", "noisiest step only"),
    ),
}
_ABLATION_COLUMNS = (
    ("FID-proxy", "fid", fmt_sig),
    ("sFID-proxy", "sfid", fmt_sig),
    ("class acc.", "class_accuracy", fmt_percent),
    ("PSNR (dB)", "psnr", fmt_fixed(1)),
)


def gbops(cell: Cell, key: str = "gbops_per_call") -> float | None:
    """Giga bit-operations of a denoiser call (mean over the trajectory) the bench recorded, if any."""
    value = (cell.get("compute") or {}).get(key)
    return float(value) if _is_number(value) else None


def ablation_tables(cells: Sequence[Cell]) -> list[str]:
    """The ablation views of one table's cells: per bit setting, the steps measured, next to FP."""
    measured = {(cell["method"], cell["bits"]): cell for cell in cells if _ok(cell)}
    fp_gbops = next((gbops(cell, "fp_gbops_per_call") for cell in cells if gbops(cell, "fp_gbops_per_call")), None)
    fp = measured.get(("fp", "FP32"))
    spread = fp_spread(cells)
    texts = []
    for title, steps in ABLATIONS.items():
        settings = sorted({bits for method, bits in measured if method in dict(steps)}, key=bits_key)
        rows = []
        for bits in settings:
            present = [(label, measured[method, bits]) for method, label in steps if (method, bits) in measured]
            if len(present) < 2:
                continue
            for label, cell in present:
                values = [_display(_metric(cell, key), format_) for _, key, format_ in _ABLATION_COLUMNS]
                rows.append(
                    [bits, label, *values, _display(mean_sqnr(cell), fmt_fixed(1)), _display(gbops(cell), fmt_sig)]
                )
        if not rows:
            continue
        if fp is not None:
            values = []
            for _, key, format_ in _ABLATION_COLUMNS:
                value = _display(_metric(fp, key), format_)
                values.append(value + (f" ({_spread_format(key, format_)(spread[key])})" if key in spread else ""))
            rows.insert(0, ["FP32", "FP (± seed-to-seed spread)", *values, MISSING, _display(fp_gbops, fmt_sig)])
        header = ["bits", "step", *(name for name, _, _ in _ABLATION_COLUMNS), "mean SQNR (dB)", "GBOPs/call"]
        texts.append(f"**{title}.**\n\n{markdown_table(header, rows)}")
    return texts


# --- provenance ----------------------------------------------------------------------------


def _plain(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _environment_text(environment: Mapping[str, Any] | None) -> str:
    environment = environment or {}
    parts = [str(environment["device"])] if environment.get("device") else []
    for key, name in (("torch", "torch"), ("diffusers", "diffusers"), ("python", "Python")):
        if environment.get(key):
            parts.append(f"{name} {environment[key]}")
    return ", ".join(parts) or "an unrecorded environment"


def _dates_text(cells: Sequence[Cell]) -> str:
    dates = sorted({str((cell.get("environment") or {}).get("date")) for cell in cells} - {"None"})
    if not dates:
        return "on an unrecorded date"
    return f"on {dates[0]}" if len(dates) == 1 else f"between {dates[0]} and {dates[-1]}"


def _commits_text(cells: Sequence[Cell]) -> str:
    commits = sorted({cell["git_commit"] for cell in cells if cell.get("git_commit")})
    if not commits:
        return ""
    return f", at commit {commits[0]}" if len(commits) == 1 else f", at commits {', '.join(commits)}"


def _row_name(cell: Cell) -> str:
    return f"{method_label(cell)} {cell['bits']}"


def provenance_text(cells: Sequence[Cell]) -> str:
    """Where and when ``cells`` were measured: one sentence, or a list when environments differ."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_environment_text(cell.get("environment")), []).append(cell)
    if len(groups) == 1:
        (environment,) = groups
        return f"Measured on {environment}, {_dates_text(cells)}{_commits_text(cells)}."
    lines = ["Rows of this table were measured in different environments:", ""]
    for environment, members in sorted(groups.items()):
        names = ", ".join(_row_name(cell) for cell in members)
        lines.append(f"- {environment}, {_dates_text(members)}{_commits_text(members)}: {names}")
    return "\n".join(lines)


def _sampling_text(cell: Cell) -> str:
    sampling = dict(cell.get("sampling") or {})
    sampling.pop("seed", None)  # FP with other seeds differs here by design
    parts = []
    if "sampler" in sampling:
        parts.append(str(sampling.pop("sampler")))
    if "eta" in sampling:
        parts.append(f"η = {_plain(sampling.pop('eta'))}")
    if "num_inference_steps" in sampling:
        parts.append(f"{_plain(sampling.pop('num_inference_steps'))} steps")
    if "guidance_scale" in sampling:
        parts.append(f"guidance scale {_plain(sampling.pop('guidance_scale'))}")
    if "num_samples" in sampling:
        parts.append(f"N = {_plain(sampling.pop('num_samples'))} samples")
    if sampling.pop("real_kernels", False):
        parts.append("quantized models on real low-bit kernels")
    parts += [f"{key} = {_plain(value)}" for key, value in sorted(sampling.items())]
    features = cell.get("features")
    if features:
        parts.append(f"features: {FEATURE_NAMES.get(features.lower(), features)}")
    return ", ".join(parts) or "not recorded"


def sampling_text(cells: Sequence[Cell]) -> str:
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        if _ok(cell):
            groups.setdefault(_sampling_text(cell), []).append(cell)
    if not groups:
        return ""
    if len(groups) == 1:
        return f"Sampling: {next(iter(groups))}."
    lines = ["Sampling differs between rows:", ""]
    for text, members in sorted(groups.items()):
        lines.append(f"- {text}: {', '.join(_row_name(cell) for cell in members)}")
    return "\n".join(lines)


def commands(cells: Sequence[Cell]) -> list[str]:
    """The cells' commands, deduplicated, in row order."""
    return list(dict.fromkeys(cell["command"].strip() for cell in cells if (cell.get("command") or "").strip()))


def reproduce_lines(cells: Sequence[Cell]) -> list[str]:
    """A "Reproduce:" block of the cells' :func:`commands` as page lines (none without commands)."""
    reproduce = commands(cells)
    return ["Reproduce:", "", "```sh", *reproduce, "```", ""] if reproduce else []


def spread_text(cells: Sequence[Cell]) -> str:
    if not any(cell["kind"] == "fp" and cell["method"] != "fp" for cell in cells):
        return "No FP run with other seeds was measured for this model, so its seed-to-seed spread is not known."
    spread = fp_spread(cells)
    if not spread:
        return "The FP runs with other seeds have no metric in common with FP, so the spread is not known."
    parts = []
    for title, key, format_ in _columns(cells):
        if key in spread:
            parts.append(f"{title} {_spread_format(key, format_)(spread[key])}")
    return (
        "FP seed-to-seed spread, |FP − FP (other seeds)|: "
        + ", ".join(parts)
        + ". A quantized row closer to FP than this is indistinguishable from it at this N."
    )


def floors_text(cells: Sequence[Cell]) -> str:
    shared = {metric: shared_floor(cells, metric) for metric in _FLOORS}
    titles = {"fid": "FID-proxy", "sfid": "sFID-proxy"}
    parts = [f"{titles[metric]} {floor}" for metric, floor in shared.items() if floor is not None]
    if not parts:
        return "Each FID/sFID-proxy is followed by its floor at that row's N."
    return f"Floors (real vs real at the same N, the same for every row): {', '.join(parts)}."


# --- plots ---------------------------------------------------------------------------------

_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))


def _figure(width: float = 7.0, height: float = 4.0):
    # The object-oriented API with an explicit Agg canvas: no pyplot state, no backend switching.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _finish_plot(figure, axis, title: str, path: str | os.PathLike[str]) -> Path:
    """Title, grid and legend (outside, right) as every plot of the page has them; then saved."""
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save_png(figure, Path(path))


def _save_png(figure, path: Path) -> Path:
    # No software version in the PNG metadata: the same JSON gives byte-identical plots.
    return write_atomically(
        path, lambda file: figure.savefig(file, format="png", bbox_inches="tight", metadata={"Software": None})
    )


def _method_colours(cells: Sequence[Cell]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    methods = list(dict.fromkeys(cell["method"] for cell in sort_cells(cells) if cell["kind"] != "fp"))
    return {method: palette[index % len(palette)] for index, method in enumerate(methods)}


def fid_plot(model: str, cells: Sequence[Cell], path: str | os.PathLike[str]) -> Path | None:
    """FID-proxy against bit setting, one line per method; FP, its spread and the floor as horizontals.

    Returns ``None`` (and writes nothing) when no quantized row has an FID-proxy.
    """
    cells = sort_cells(cells)
    quantized = [cell for cell in cells if cell["kind"] != "fp" and _ok(cell) and _finite(_metric(cell, "fid"))]
    if not quantized:
        return None
    settings = sorted({cell["bits"] for cell in quantized}, key=bits_key)
    position = {bits: index for index, bits in enumerate(settings)}
    colours = _method_colours(cells)
    figure, axis = _figure()
    values: list[float] = []
    for method in dict.fromkeys(cell["method"] for cell in quantized):
        points = [
            (position[cell["bits"]], float(_metric(cell, "fid"))) for cell in quantized if cell["method"] == method
        ]
        kind = next(cell["kind"] for cell in quantized if cell["method"] == method)
        axis.plot(
            *zip(*points, strict=True),
            marker="o" if kind == "recipe" else "s",
            linestyle="-" if kind == "recipe" else "--",
            color=colours[method],
            label=method if kind == "recipe" else f"{method} (peer)",
        )
        values += [value for _, value in points]
    fp = next((cell for cell in cells if cell["kind"] == "fp" and cell["method"] == "fp" and _ok(cell)), None)
    if fp is not None and _finite(_metric(fp, "fid")):
        fp_fid = float(_metric(fp, "fid"))
        axis.axhline(fp_fid, color="black", linewidth=1.2, label="FP")
        values.append(fp_fid)
        spread = fp_spread(cells).get("fid")
        if spread:
            axis.axhspan(
                fp_fid - spread, fp_fid + spread, color="black", alpha=0.12, linewidth=0, label="FP ± seed spread"
            )
    floor_source = fp if fp is not None and _finite(_metric(fp, "fid_floor")) else None
    if floor_source is None:
        floor_source = next((cell for cell in quantized if _finite(_metric(cell, "fid_floor"))), None)
    if floor_source is not None:
        floor = float(_metric(floor_source, "fid_floor"))
        axis.axhline(floor, color="grey", linestyle="--", linewidth=1.0, label="floor (real vs real)")
        values.append(floor)
    positive = [value for value in values if value > 0]
    if len(positive) == len(values) and max(positive) / min(positive) > 30:
        axis.set_yscale("log")
    axis.set_xticks(range(len(settings)), settings)
    axis.set_xlim(-0.4, len(settings) - 0.6)
    axis.set_xlabel("bit setting")
    axis.set_ylabel("FID-proxy (GlyphNet features; lower is better)")
    return _finish_plot(figure, axis, f"{model}: FID-proxy by bit setting", path)


def sqnr_plot(model: str, cells: Sequence[Cell], path: str | os.PathLike[str]) -> Path | None:
    """SQNR of the noise estimate per sampling step, one curve per (method, bits).

    Colour says the method, line style the bit setting. Non-finite steps are left as gaps.
    Returns ``None`` (and writes nothing) when no row has ``sqnr_per_step``.
    """
    cells = sort_cells(cells)
    curves = [cell for cell in cells if cell["kind"] != "fp" and _ok(cell) and cell.get("sqnr_per_step")]
    if not curves:
        return None
    colours = _method_colours(cells)
    settings = sorted({cell["bits"] for cell in curves}, key=bits_key)
    styles = {bits: _LINESTYLES[index % len(_LINESTYLES)] for index, bits in enumerate(settings)}
    figure, axis = _figure()
    for cell in curves:
        steps = [float(value) if _finite(value) else math.nan for value in cell["sqnr_per_step"]]
        axis.plot(
            range(1, len(steps) + 1),
            steps,
            color=colours[cell["method"]],
            linestyle=styles[cell["bits"]],
            linewidth=1.3,
            label=f"{cell['method']} {cell['bits']}",
        )
    axis.set_xlabel("sampling step (1 = noisiest)")
    axis.set_ylabel("SQNR of the noise estimate vs FP (dB)")
    return _finish_plot(figure, axis, f"{model}: SQNR per sampling step", path)


# --- the page ------------------------------------------------------------------------------

INTRO = """\
# Benchmarks

Quality of dmquant's post-training quantization on the reference zoo models, next to the
floating-point (FP) model and to other quantization libraries (*peers*) run on the same models.
Every number is read from the JSON files under `{results}` (one per table row); the commands
under each table reproduce them.

How to read the tables:

- **class acc.**: share of samples that GlyphNet, the project's glyph classifier, assigns to the
  class they were conditioned on; **colour acc.** the same for the colour asked for in the
  prompt (text-to-image model only).
- **FID-proxy, sFID-proxy, IS-proxy**: FID (pooled features), sFID (spatial features) and
  Inception Score computed with GlyphNet's features instead of Inception-v3's, against held-out
  real glyphs; **precision** and **recall** use the same features. They compare rows with one
  another; they are not comparable with published FID numbers.
- **floor**: the same metric between two disjoint sets of real glyphs of the same size N, the
  score of a perfect generator at that N (FID is biased upward at small N, so a number means
  something only next to its floor).
- **FP seed-to-seed spread**: |metric(FP) − metric(FP with other seeds)|, how much a metric
  moves through sampling noise alone.
- **PSNR, SSIM**: each sample against the FP sample from the same seed, so they measure how far
  quantization moved the individual images.
- **mean SQNR**: signal-to-quantization-noise ratio of the noise estimate against FP along FP
  trajectories, in dB, averaged over the sampling steps (the plots show it per step).
- **calib. time**: wall time to calibrate the quantized model; **peak mem.**: peak memory of the
  run.
- Peers quantize with their own library; the notes say which layers they left in floating point.
  A row that could not run gives its reason instead of numbers; "—" marks a value not measured.
"""


def _relative_link(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()


def missing_text(cells: Sequence[Cell], everywhere: Sequence[Cell]) -> str | None:
    """The rows other models have and this one lacks, so that an unmeasured row is said, not hidden."""
    have = {(cell["method"], cell["bits"]) for cell in cells}
    missing = sorted({(cell["method"], cell["bits"]) for cell in everywhere} - have)
    if not missing:
        return None
    rows = ", ".join(f"{method} {bits}" for method, bits in missing)
    return f"Not measured on this model yet (other models have these rows): {rows}."


def reading_notes(notes: Path | None, name: str) -> str | None:
    """The hand-written notes ``<notes>/<name>.md``, if there are any."""
    path = None if notes is None else notes / f"{name}.md"
    return path.read_text(encoding="utf-8").strip() if path is not None and path.is_file() else None


def model_section(
    model: str,
    cells: Sequence[Cell],
    plots: Path,
    output: Path,
    everywhere: Sequence[Cell] = (),
    notes: Path | None = None,
) -> tuple[str, list[Path]]:
    """One table's section of the page and the plots it wrote (``everywhere``: the cells of the same
    sampler on every model, for missing rows; ``notes``: the folder of reading notes)."""
    lines = [f"## {model}", ""]
    descriptions = sorted({cell["model_description"] for cell in cells if cell.get("model_description")})
    if descriptions:
        lines += ["; ".join(descriptions).rstrip(".") + ".", ""]
    for text in (sampling_text(cells), floors_text(cells)):
        if text:
            lines += [text, ""]
    lines += [model_table(cells), "", spread_text(cells), ""]
    for ablation in ablation_tables(cells):
        lines += [ablation, ""]
    reading = reading_notes(notes, model)
    if reading:
        lines += [reading, ""]
    missing = missing_text(cells, everywhere)
    if missing:
        lines += [missing, ""]
    lines += reproduce_lines(cells)
    lines += [provenance_text(cells), ""]
    written = []
    for suffix, plot, caption in (
        ("fid", fid_plot, "FID-proxy by bit setting"),
        ("sqnr", sqnr_plot, "SQNR of the noise estimate per sampling step"),
    ):
        path = plot(model, cells, plots / f"{model}-{suffix}.png")
        if path is not None:
            written.append(path)
            lines += [f"![{model}: {caption}]({_relative_link(path, output)})", ""]
    return "\n".join(lines), written


def _calibration_total(cell: Cell) -> float | None:
    """``calibration_s`` plus what an earlier, killed run spent on the reconstruction blocks this run restored."""
    seconds = cell.get("calibration_s")
    resumed = cell.get("resumed_reconstruction_s")
    return seconds + resumed if _is_number(seconds) and _is_number(resumed) else seconds


def _reconstruction_steps(cell: Cell) -> str:
    """How the cell's reconstruction ran its optimisation steps: replayed from CUDA graphs, or eagerly
    (also every cell from before ``cuda_graphs`` existed)."""
    reconstruction = (cell.get("recipe") or {}).get("reconstruction") or {}
    if not reconstruction.get("enabled"):
        return MISSING
    return "CUDA graphs" if reconstruction.get("cuda_graphs") else "eager"


def calibration_cost_section(cells: Sequence[Cell], notes: Path | None = None) -> str:
    """What calibrating costs with a GPU to itself: wall time and peak memory per model and recipe,
    from cells measured one process at a time without resuming (``bench/results/calibration-cost``)."""
    header = ["model", "recipe", "bits", "calibration wall time", "of it in a resumed run", "peak GPU memory (GiB)"]
    header += ["reconstruction steps", "measured on"]
    rows = [
        [
            cell["model"],
            method_label(cell),
            cell["bits"],
            _display(_calibration_total(cell), fmt_duration),
            _display(cell.get("resumed_reconstruction_s"), fmt_duration),
            _display(cell.get("peak_memory_gib"), fmt_fixed(2)),
            _reconstruction_steps(cell),
            f"{_environment_text(cell.get('environment'))}, {_dates_text([cell])}{_commits_text([cell])}",
        ]
        for cell in cells
        if _ok(cell)
    ]
    lines = ["## Calibration cost", "", markdown_table(header, rows), ""]
    unmeasured = [model for model in ZOO_MODELS if model not in {cell["model"] for cell in cells if _ok(cell)}]
    if unmeasured:
        lines += [f"Not measured: {', '.join(unmeasured)}.", ""]
    reading = reading_notes(notes, "all")
    if reading:
        lines += [reading, ""]
    return "\n".join(lines + reproduce_lines(cells))


SPEED_MODEL_SCOPE_INTRO = """\
The same rows with `torch.compile` over the whole model instead of its outermost blocks, each against a
bf16 row compiled the same way in the same run (`python bench/speed.py --compile-scope model --results
bench/results/speed-model-scope`): the layers between the blocks (conv_in/conv_out, down- and upsamplers,
the transformers' projections, the time embedding) are then compiled too."""


#: The architectures at the shapes users run them (``bench/speed.py --models <DEPLOYMENT_MODELS>``), next to ``speed/``.
SPEED_DEPLOYMENT_FOLDER = "speed-deployment"
SPEED_DEPLOYMENT_TITLE = "Deployment shapes"
SPEED_DEPLOYMENT_INTRO = """\
FLUX.1-dev's transformer (1024², 4,096 image + 512 text tokens, batch 1, with its guidance embedding), SD3-medium
and PixArt-Σ (1024², batch 2), SDXL's and SD-1.5's UNets at batch 8, random weights; the table lists those measured
(`python bench/speed.py --models <model> --settings compiled+cudagraph --results
bench/results/speed-deployment`, the notes below say which are not yet): every row compiled and
captured in one CUDA graph, each against the bf16 row of its own process. `dmquant-w8a8-fp8-fast` is what
`convert_model` does by default (fast fp8 accumulation, each layer's path measured on the GPU: `kernels/paths.py`);
`dmquant-w8a8-fp8-every-layer` keeps every converted layer on its fp8 kernel."""

SPEED_ONE_H100_TITLE = "The specification's rows on one H100"
SPEED_ONE_H100_INTRO = """\
The ten rows of the benchmark's specification on one H100 (`python bench/speed.py --rows <the ten rows>
--results bench/results/speed-h100`), all rows of a model in one process, each quantized row against the bf16
row of that process."""


def speed_section(results: Path, subtables: Sequence[tuple[Path, str, str]] = ()) -> str | None:
    """The speed benchmark's table (``bench/speed.py``) with its reading notes, then each of ``subtables``
    (folder, title, introduction) that has cells, with its own notes."""
    if not any(results.glob("*/*.json")):
        return None
    from bench import speed_table as speed  # torch and dmquant load only when there are speed cells to show

    lines = ["## Speed", "", speed.speed_table(results), ""]
    reading = reading_notes(results / NOTES_FOLDER, "all")
    lines += [reading, ""] if reading else []
    for folder, title, intro in subtables:
        if any(folder.glob("*/*.json")):
            lines += [f"### {title}", "", intro, "", speed.speed_table(folder), ""]
            reading = reading_notes(folder / NOTES_FOLDER, "all")
            lines += [reading, ""] if reading else []
    return "\n".join(lines)


FIDELITY_INTRO = """\
Each zoo model is quantized at the formats of the speed benchmark's dmquant rows (minmax, attention
matmuls off) and sampled twice from the same seeds (`bench/fidelity.py`): simulated (fake-quantized,
as in the tables above) and converted to real low-bit layers. A PSNR of the converted samples
against the simulated ones at or above the bound ({bounds}) means that the quality measured on the
simulated model holds for the deployed one; "identical" marks bit-identical samples. The PSNR of the
simulated samples against FP gives the size of the quantization error itself, for scale. The floor is
the PSNR of the simulated model sampled on the CPU against itself sampled on the GPU — two float32
computations of one quantized model that differ in rounding order only — and the relative error is
that of one denoiser call, converted against simulated (both recorded since the kernels' second
version; a blank where a cell predates them)."""


def _bounds_text(cells: Sequence[Mapping[str, Any]]) -> str:
    bounds = sorted({float(cell["bound_db"]) for cell in cells if _is_number(cell.get("bound_db"))})
    return ", ".join(f"{bound:g} dB" for bound in bounds) or "not recorded"


def _psnr_converted_text(cell: Mapping[str, Any]) -> str:
    """The converted-vs-simulated PSNR; ``None`` recorded means identical samples."""
    key = "psnr_converted_vs_simulated_db"
    if key in cell and cell[key] is None:
        return "identical"
    return _display(cell.get(key), fmt_fixed(1))


def _yes_no(value: object) -> str:
    return MISSING if value is None else ("yes" if value else "**no**")


def _sampling_seconds_text(cell: Mapping[str, Any]) -> str:
    seconds = cell.get("sampling_s") or {}
    return " / ".join(_display(seconds.get(model), fmt_duration) for model in ("simulated", "converted"))


def fidelity_section(results: Path) -> str | None:
    """The deployment-fidelity table (``bench/fidelity.py``, ``<model>/<format>.json``) with its
    reading notes, if there are cells."""
    cells = [read_result(path) for path in sorted(results.glob("*/*.json"))]
    if not cells:
        return None
    cells.sort(key=lambda cell: (model_key(str(cell.get("model"))), str(cell.get("format"))))
    header = ["model", "format", "PSNR converted vs simulated (dB)", "meets the bound", "floor (dB)"]
    header += ["one call's relative error", "PSNR simulated vs FP (dB)", "samples × steps"]
    header += ["sampling simulated / converted", "device"]
    rows = [
        [
            str(cell.get("model")),
            str(cell.get("format")),
            _psnr_converted_text(cell),
            _yes_no(cell.get("meets_bound")),
            _display(cell.get("floor_psnr_db"), fmt_fixed(1)),
            _display(cell.get("denoiser_relative_error"), "{:.1e}".format),
            _display(cell.get("psnr_simulated_vs_fp_db"), fmt_fixed(1)),
            f"{_display(cell.get('num_samples'), _plain)} × {_display(cell.get('steps'), _plain)}",
            _sampling_seconds_text(cell),
            str((cell.get("environment") or {}).get("device") or MISSING),
        ]
        for cell in cells
    ]
    lines = ["## Deployment fidelity", "", FIDELITY_INTRO.format(bounds=_bounds_text(cells)), ""]
    lines += [markdown_table(header, rows), "", f"Measured {_dates_text(cells)}{_commits_text(cells)}.", ""]
    reading = reading_notes(results / NOTES_FOLDER, "all")
    if reading:
        lines += [reading, ""]
    return "\n".join(lines + reproduce_lines(cells))


LAYER_SPEED_INTRO = """\
Single layers at SD-1.5 shapes (batch 2, 64×64 latents; `bench/layer_speed.py`), milliseconds per
call (median of CUDA-event timings after warm-up, timed as each table says): **bf16** is cuDNN /
cuBLAS; **int8**, **fp8**, **w4a8** and **w4a16** are dmquant's layers, activation quantization
included (W8A8 Linears and 1×1 convs on cuBLASLt where it takes the call, since the results that
show **int8-triton** / **fp8-triton** columns — the Triton kernels on the same calls — and on the
Triton kernels before); stride-1 W8A8 convs on the shifted-window kernel since the results that
show **int8-gather** / **fp8-gather** columns — the gathering implicit GEMM on the same calls;
**torch-int8** and **torch-fp8** are `torch._int_mm` and
`torch._scaled_mm` (row-wise scales) on operands quantized beforehand, the matrix product alone.
Shapes: convs N×C×H×W (C output channels), Linears M×K×N. A blank is a path not run on that
layer; "—" one that raised."""


def _layer_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    shape = "×".join(str(size) for size in row.get("shape") or [])
    return str(row.get("op")), shape, str(row.get("layout") or "")


#: The timing of layer-throughput results that do not say (the first ones).
EAGER_LAYER_TIMING = "each call launched from Python and timed alone, host overhead included"


def layer_speed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (op, shape, layout), in the order measured, with the ms of each path as columns."""
    paths = [
        *LAYER_SPEED_PATHS,
        *dict.fromkeys(row.get("path") for row in rows if row.get("path") not in LAYER_SPEED_PATHS),
    ]
    timings: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        shown = MISSING if "error" in row else _display(row.get("ms"), fmt_fixed(3))
        timings.setdefault(_layer_key(row), {})[row.get("path")] = shown
    lines = [[*layer, *(measured.get(path, "") for path in paths)] for layer, measured in timings.items()]
    return markdown_table(["op", "shape", "layout", *(str(path) for path in paths)], lines)


def _layer_errors_text(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The errors of the paths that raised, one line each."""
    errors = [
        f"- {row.get('path')} on {' '.join(filter(None, _layer_key(row)))}: {row['error']}"
        for row in rows
        if "error" in row
    ]
    return "\n".join(["Paths that raised:", "", *errors]) if errors else None


def layer_speed_section(results: Path) -> str | None:
    """The layer-throughput tables (``bench/layer_speed.py``, one JSON per device) with their reading
    notes, if there are any."""
    records = [read_result(path) for path in sorted(results.glob("*.json"))]
    if not records:
        return None
    lines = ["## Layer throughput", "", LAYER_SPEED_INTRO, ""]
    for record in records:
        rows = record.get("rows") or []
        where = f"{_environment_text(record.get('environment'))}, {_dates_text([record])}{_commits_text([record])}"
        timing = record.get("timing", EAGER_LAYER_TIMING)
        lines += [f"Measured on {where} (ms per call; {timing}):", "", layer_speed_table(rows), ""]
        errors = _layer_errors_text(rows)
        if errors:
            lines += [errors, ""]
    reading = reading_notes(results / NOTES_FOLDER, "all")
    if reading:
        lines += [reading, ""]
    return "\n".join(lines + reproduce_lines(records))


RECON_SPEED_INTRO = """\
The optimisation step of block reconstruction (AdaRound on a unit's weights, the recipe's first pass)
replayed from a CUDA graph against the same step run eagerly, on the same captured block inputs, side by
side in one process (`bench/recon_speed.py`): milliseconds per iteration, the first unit of each kind per
model. Equal final errors mean the two optimisations ended at the same rounding."""


def recon_speed_section(results: Path) -> str | None:
    """The reconstruction-step timings (``bench/recon_speed.py``, one JSON per device), if there are any."""
    records = [read_result(path) for path in sorted(results.glob("*.json"))]
    if not records:
        return None
    header = ["model", "unit", "kind", "eager ms/it", "graphed ms/it", "speed-up", "final error eager", "graphed"]
    lines = ["## Reconstruction speed", "", RECON_SPEED_INTRO, ""]
    for record in records:
        rows = [
            [
                row.get("model"),
                row.get("unit"),
                row.get("kind"),
                _display(row["eager"].get("ms_per_iteration"), fmt_fixed(2)),
                _display(row["graphed"].get("ms_per_iteration"), fmt_fixed(2)),
                _display(row.get("speedup"), lambda value: f"{value:.1f}×"),
                _display(row["eager"].get("final_mse"), lambda value: f"{value:.3g}"),
                _display(row["graphed"].get("final_mse"), lambda value: f"{value:.3g}"),
            ]
            for row in record.get("rows") or []
        ]
        where = f"{_environment_text(record.get('environment'))}, {_dates_text([record])}{_commits_text([record])}"
        lines += [f"Measured on {where}:", "", markdown_table(header, rows), ""]
    reading = reading_notes(results / NOTES_FOLDER, "all")
    if reading:
        lines += [reading, ""]
    return "\n".join(lines + reproduce_lines(records))


def render(
    cells: Sequence[Cell],
    *,
    output: Path,
    plots: Path,
    results: Path,
    notes: Path | None = None,
    cost_cells: Sequence[Cell] = (),
    cost_notes: Path | None = None,
    fidelity: str | None = None,
    speed: str | None = None,
    layer_speed: str | None = None,
    recon_speed: str | None = None,
) -> tuple[str, list[Path]]:
    """The whole page for ``cells`` (plots are written under ``plots``; the page is returned, not
    written), ending with the calibration cost of ``cost_cells`` (if any), ``recon_speed`` and the
    ``fidelity``, ``speed`` and ``layer_speed`` sections (each if given)."""
    groups = by_model(cells)
    sections = [INTRO.format(results=_relative_link(results, output)).rstrip("\n"), ""]
    reading = reading_notes(notes, "all")
    if reading:
        sections += [reading, ""]
    environments = {_environment_text(cell.get("environment")) for cell in cells}
    if len(environments) == 1:
        sections += [f"All numbers were measured on {environments.pop()}, {_dates_text(cells)}.", ""]
    else:
        sections += ["The numbers come from more than one environment; each table says which.", ""]
    sections += ["Models: " + ", ".join(f"[{model}](#{model})" for model in groups) + ".", ""]
    written: list[Path] = []
    for model, members in groups.items():
        same_sampler = [cell for cell in cells if sampler_eta(cell) == sampler_eta(members[0])]
        text, paths = model_section(model, members, plots, output, same_sampler, notes)
        sections.append(text)
        written += paths
    if cost_cells:
        sections.append(calibration_cost_section(cost_cells, cost_notes))
    sections += [section for section in (recon_speed, fidelity, speed, layer_speed) if section]
    return "\n".join(sections).rstrip("\n") + "\n", written


def write_page(output: Path, text: str) -> Path:
    return write_atomically(output, lambda file: file.write(text.encode("utf-8")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/report.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write the benchmark page from the quality-benchmark JSON.\n\n"
            "Reads every *.json under --results (one cell per file, as bench/quality.py writes them:\n"
            "<model>/<method>__<bits>.json; the schema is in this script's docstring) and writes\n"
            "--output, a markdown page with one table per model (FP, FP with other seeds, dmquant\n"
            "recipes, peers), and two PNG plots per model under --plots: <model>-fid.png (FID-proxy\n"
            "by bit setting) and <model>-sqnr.png (SQNR per sampling step), linked from the page.\n"
            "Same JSON, same files; each is written atomically. Nothing is written if a cell is invalid."
        ),
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help=f"directory of cell JSON files (default {DEFAULT_RESULTS})",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"markdown page (default {DEFAULT_OUTPUT})")
    parser.add_argument(
        "--plots", type=Path, default=DEFAULT_PLOTS, help=f"directory for PNGs (default {DEFAULT_PLOTS})"
    )
    parser.add_argument(
        "--notes",
        type=Path,
        help="folder of hand-written reading notes: <table>.md under that table, all.md after the intro"
        f" (default: RESULTS/{NOTES_FOLDER})",
    )
    parser.add_argument(
        "--cost-results",
        type=Path,
        help="cells measuring calibration cost with a GPU to itself, shown in a section of their own, with"
        f" their notes from COST_RESULTS/{NOTES_FOLDER} (default: RESULTS/../{COST_FOLDER}; skipped if absent)",
    )
    parser.add_argument(
        "--fidelity-results",
        type=Path,
        help="deployment-fidelity cells of bench/fidelity.py (<model>/<format>.json), with their notes from"
        f" FIDELITY_RESULTS/{NOTES_FOLDER} (default: RESULTS/../{FIDELITY_FOLDER}; skipped if absent)",
    )
    parser.add_argument(
        "--layer-speed-results",
        type=Path,
        help="layer timings of bench/layer_speed.py (one JSON per device), with their notes from"
        f" LAYER_SPEED_RESULTS/{NOTES_FOLDER} (default: RESULTS/../{LAYER_SPEED_FOLDER}; skipped if absent)",
    )
    parser.add_argument(
        "--recon-speed-results",
        type=Path,
        help="reconstruction-step timings of bench/recon_speed.py (one JSON per device), with their notes from"
        f" RECON_SPEED_RESULTS/{NOTES_FOLDER} (default: RESULTS/../{RECON_SPEED_FOLDER}; skipped if absent)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cells = load_cells(args.results)
    except (FileNotFoundError, CellError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not cells:
        print(f"error: no result cells (*.json) under {args.results}; run bench/quality.py first", file=sys.stderr)
        return 2
    notes = args.notes or args.results / NOTES_FOLDER
    cost_results = args.cost_results or args.results.parent / COST_FOLDER
    speed_results = args.results.parent / SPEED_FOLDER
    fidelity_results = args.fidelity_results or args.results.parent / FIDELITY_FOLDER
    layer_speed_results = args.layer_speed_results or args.results.parent / LAYER_SPEED_FOLDER
    recon_speed_results = args.recon_speed_results or args.results.parent / RECON_SPEED_FOLDER
    try:
        cost_cells = load_cells(cost_results) if cost_results.is_dir() else []
        fidelity = fidelity_section(fidelity_results)
        layer_speed = layer_speed_section(layer_speed_results)
        recon_speed = recon_speed_section(recon_speed_results)
    except CellError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text, plots = render(
        cells,
        output=args.output,
        plots=args.plots,
        results=args.results,
        notes=notes,
        cost_cells=cost_cells,
        cost_notes=cost_results / NOTES_FOLDER,
        fidelity=fidelity,
        speed=speed_section(
            speed_results,
            [
                (args.results.parent / SPEED_DEPLOYMENT_FOLDER, SPEED_DEPLOYMENT_TITLE, SPEED_DEPLOYMENT_INTRO),
                (args.results.parent / SPEED_MODEL_SCOPE_FOLDER, "Whole-model compile", SPEED_MODEL_SCOPE_INTRO),
                (args.results.parent / SPEED_ONE_H100_FOLDER, SPEED_ONE_H100_TITLE, SPEED_ONE_H100_INTRO),
            ],
        ),
        layer_speed=layer_speed,
        recon_speed=recon_speed,
    )
    write_page(args.output, text)
    tables = len(by_model(cells))
    print(f"wrote {args.output} ({tables} table(s), {len(cells)} cells) and {len(plots)} plot(s) under {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
