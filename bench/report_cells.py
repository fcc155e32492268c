"""The benchmark page's cells: the schema's constants, reading and validating cell files, their order, the
formatting of their numbers and metrics, and the provenance texts under a table (environment, commands, FP
spread, floors). The cell schema is in :mod:`bench.report`'s docstring."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


def _spread_format(key: str, format_: Callable[[float], str]) -> Callable[[float], str]:
    if format_ is fmt_percent:
        return lambda value: f"±{100 * value:.1f} pp"
    return lambda value: f"±{format_(value)}"


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
