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

This module renders the page and holds the command line; the parts are in ``report_cells.py`` (reading,
validating, ordering and formatting cells; provenance texts), ``report_tables.py`` (a model's table and section,
ablation views, calibration cost), ``report_plots.py`` and ``report_sections.py`` (speed, fidelity, layer
throughput, reconstruction speed).

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
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a file, `python bench/report.py`: make the bench package importable
    import _package  # noqa: F401

from bench.report_cells import (  # noqa: F401 (re-exported)
    COST_FOLDER,
    DEFAULT_OUTPUT,
    DEFAULT_PLOTS,
    DEFAULT_RESULTS,
    FIDELITY_FOLDER,
    LAYER_SPEED_FOLDER,
    LAYER_SPEED_PATHS,
    NOTES_FOLDER,
    RECON_SPEED_FOLDER,
    SPEED_FOLDER,
    SPEED_MODEL_SCOPE_FOLDER,
    SPEED_ONE_H100_FOLDER,
    ZOO_MODELS,
    Cell,
    CellError,
    _dates_text,
    _environment_text,
    by_model,
    coverage_note,
    load_cells,
    sampler_eta,
    table_name,
    validate_cell,
)
from bench.report_sections import (
    SPEED_DEPLOYMENT_FOLDER,
    SPEED_DEPLOYMENT_INTRO,
    SPEED_DEPLOYMENT_TITLE,
    SPEED_MODEL_SCOPE_INTRO,
    SPEED_ONE_H100_INTRO,
    SPEED_ONE_H100_TITLE,
    fidelity_section,
    layer_speed_section,
    recon_speed_section,
    speed_section,
)
from bench.report_tables import (  # noqa: F401 (re-exported)
    INTRO,
    _relative_link,
    ablation_tables,
    calibration_cost_section,
    missing_text,
    model_section,
    reading_notes,
)
from dmquant.atomic import write_atomically


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
