"""The benchmark page's quality sections: one model's table with its ablation views, the page's introduction,
a model's section (table, plots, notes, provenance) and the calibration cost section."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench.common import markdown_table
from bench.report_cells import (
    _FLOORS,
    MISSING,
    ZOO_MODELS,
    Cell,
    _columns,
    _commits_text,
    _dates_text,
    _display,
    _environment_text,
    _is_number,
    _metric,
    _ok,
    _spread_format,
    bits_key,
    coverage_note,
    floors_text,
    fmt_duration,
    fmt_fixed,
    fmt_percent,
    fmt_sig,
    fp_spread,
    mean_sqnr,
    method_label,
    provenance_text,
    reproduce_lines,
    sampling_text,
    shared_floor,
    sort_cells,
    spread_text,
)
from bench.report_plots import fid_plot, sqnr_plot

# --- one model's table ---------------------------------------------------------------------


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
