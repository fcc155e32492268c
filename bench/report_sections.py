"""The benchmark page's sections for the other benchmarks: speed (``bench/speed.py``), deployment fidelity
(``bench/fidelity.py``), layer throughput (``bench/layer_speed.py``) and reconstruction speed
(``bench/recon_speed.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import markdown_table
from bench.report_cells import (
    LAYER_SPEED_PATHS,
    MISSING,
    NOTES_FOLDER,
    _commits_text,
    _dates_text,
    _display,
    _environment_text,
    _is_number,
    _plain,
    fmt_duration,
    fmt_fixed,
    model_key,
    read_result,
    reproduce_lines,
)
from bench.report_tables import reading_notes

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
and PixArt-Σ (1024², batch 2), SDXL's UNet at 1024² (batch 2 and 8) and SD-1.5's at 512² (batch 2 and 8), random
weights; the table lists those measured
(`python bench/speed.py --models <model> --settings compiled+cudagraph --results
bench/results/speed-deployment`, the notes below say which are not yet): every row compiled and
captured in one CUDA graph, each against the bf16 row of its own process. `dmquant-w8a8-fp8-fast` is what
`convert_model` does by default (fast fp8 accumulation, each layer's path measured on the GPU: `kernels/paths.py`);
`dmquant-w8a8-fp8-every-layer` keeps every converted layer on its fp8 kernel; `dmquant-w8a8-fp8-any-gain` keeps a
measured path over bf16 however little it saves (the default asks 5%); `dmquant-w8a8-fp8-attention` adds FP8
attention (Q, K, V and the softmax output in fp8 e4m3 on cuDNN's fused FP8 SDPA: `kernels/fp8_attention.py`)."""

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
