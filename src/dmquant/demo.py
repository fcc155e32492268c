"""The demo job: quantize a shipped model at several bit settings and report what it cost and kept.

For each setting (W8A8 and W4A8 by default) the FP model is calibrated on its own trajectories
and quantized by a recipe; the checkpoint is saved and reloaded (so the report is about what a
user would deploy), then sampled from the same seeds as FP. The report compares every setting
with FP on the same samples: size, BOPs, PSNR/SSIM against the FP samples, the noise estimate's
SQNR per step, wall times — and, for the glyph models of the zoo, class accuracy and
FID/sFID-proxies next to their floors (real-vs-real at the same N) and next to FP sampled from other
seeds, the spread each setting's verdict is judged against (:mod:`dmquant.verdict`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .api import quantize, save
from .atomic import directory_written_atomically, write_atomically
from .config import QuantConfig
from .jobs import compare, generate, open_model
from .models import REFERENCE_MODELS, DiffusionModel
from .provenance import environment
from .report import comparison_grid, markdown_table, save_image_grid, sqnr_plot, write_report
from .verdict import OTHER_SEEDS, OTHER_SEEDS_OFFSET, Verdict, judge

#: Columns of the results table, in order (those a run does not measure are left out).
COLUMNS = (
    "setting",
    "size (MiB)",
    "compression",
    "GBOPs/call",
    "class accuracy",
    "FID-proxy",
    "sFID-proxy",
    "PSNR vs FP (dB)",
    "SSIM vs FP",
    "mean SQNR (dB)",
    "quantize (s)",
    "sample (s)",
)
#: Samples per grid picture and per row of the comparison picture.
GRID_SAMPLES = 64
COMPARISON_SAMPLES = 16
#: The demo's record: options, rows, environment, and the files it wrote (so a rerun knows what it may replace).
RESULTS_FILE = "results.json"


@dataclass
class DemoOptions:
    """What the demo runs: the sampling shared by every setting, and the bit settings."""

    num_samples: int = 256
    num_inference_steps: int = 20
    seed: int = 0
    batch_size: int = 64
    bit_settings: Sequence[tuple[int | str, int | str]] = ((8, 8), (4, 8))
    progress: bool = True


@dataclass
class DemoResult:
    """The table rows, per-step SQNR per setting, the FID floors, each setting's verdict, and where the report is."""

    rows: list[dict[str, Any]]
    steps: dict[str, list[dict[str, Any]]]
    output: Path
    report: Path
    floors: dict[str, float]
    total_seconds: float
    verdicts: list[Verdict]


def glyph_judge(model: DiffusionModel, num_samples: int, device: str, progress: bool):
    """GlyphNet references for the zoo's glyph models; ``None`` for other models."""
    if model.name not in REFERENCE_MODELS:
        return None
    from .zoo.quality import ReferenceSet
    from .zoo_jobs import shipped_glyphnet

    return ReferenceSet(shipped_glyphnet(device), num_samples, progress=progress)


def glyph_metrics(references: Any, images: torch.Tensor, labels: torch.Tensor | None, progress: bool) -> dict:
    """Class accuracy and FID/sFID-proxies of ``images`` asked for ``labels``, with the proxies' floors
    (``"fid_floor"``, ``"sfid_floor"``), judged by :func:`glyph_judge`'s references."""
    judged = references.judge(images, labels, progress=progress)
    return {
        "class accuracy": judged.class_accuracy,
        "FID-proxy": judged.distribution.fid,
        "sFID-proxy": judged.distribution.sfid,
        "fid_floor": judged.distribution.fid_floor,
        "sfid_floor": judged.distribution.sfid_floor,
    }


def _timed(run: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def run_demo(
    source: str,
    recipe: Callable[[int | str, int | str], QuantConfig],
    output: str | Path,
    *,
    options: DemoOptions | None = None,
    device: str = "cpu",
    recipe_name: str = "",
    overwrite: bool = False,
) -> DemoResult:
    """Run the demo on model ``source``; ``recipe(w_bits, a_bits)`` gives each setting's config.

    The report is written beside ``output`` and swapped in whole at the end; an existing
    ``output`` is refused unless ``overwrite`` and it holds only what an earlier demo wrote.
    """
    target = Path(output)
    with directory_written_atomically(
        target, overwrite=overwrite, ours=_is_demo_output, complete=_is_demo_output, what="a demo report"
    ) as staging:
        result = _run(source, recipe, staging, options or DemoOptions(), device, recipe_name)
    result.output, result.report = target, target / result.report.name
    return result


def _is_demo_output(directory: Path) -> bool:
    """Every entry of ``directory`` is one its ``results.json`` lists as written by the demo."""
    try:
        written = json.loads((directory / RESULTS_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(written, list) and all(path.name in written for path in directory.iterdir())


def _run(
    source: str,
    recipe: Callable[[int | str, int | str], QuantConfig],
    output: Path,
    options: DemoOptions,
    device: str,
    recipe_name: str,
) -> DemoResult:
    started = time.perf_counter()
    fp = open_model(source).to(device)
    sampling = {
        "num_inference_steps": options.num_inference_steps,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "progress": options.progress,
    }
    references = glyph_judge(fp, options.num_samples, device, options.progress)
    fp_samples, fp_seconds = _timed(lambda: generate(fp, options.num_samples, desc="FP", **sampling))
    fp_images, conditioning = fp_samples
    labels = conditioning.cond.get("class_labels")

    def quality(images: torch.Tensor) -> dict[str, Any]:
        if references is None:
            return {}
        metrics = glyph_metrics(references, images, labels, options.progress)
        floors.update(fid=metrics.pop("fid_floor"), sfid=metrics.pop("sfid_floor"))
        return metrics

    floors: dict[str, float] = {}
    rows = [{"setting": "FP", "sample (s)": fp_seconds, **quality(fp_images)}]
    other_seeds = None
    if references is not None:  # the metrics' own seed-to-seed spread, which every verdict is judged against
        shifted = {**sampling, "seed": options.seed + OTHER_SEEDS_OFFSET}
        (other_images, _), other_seconds = _timed(
            lambda: generate(fp, options.num_samples, desc=OTHER_SEEDS, **shifted)
        )
        other_seeds = {"setting": OTHER_SEEDS, "sample (s)": other_seconds, **quality(other_images)}
        rows.append(other_seeds)
    images = {"FP": fp_images}
    verdicts = []
    steps: dict[str, list[dict[str, Any]]] = {}
    for w_bits, a_bits in options.bit_settings:
        label = f"W{w_bits}A{a_bits}"
        quantized, quantize_seconds = _timed(
            lambda w=w_bits, a=a_bits: quantize(fp, recipe(w, a), progress=options.progress)
        )
        checkpoint = save(quantized.denoiser, output / label.lower())
        reloaded = open_model(str(checkpoint)).to(device)
        results = compare(fp, reloaded, num_samples=options.num_samples, fp_samples=fp_samples, label=label, **sampling)
        images[label] = results["images"]["quantized"]
        steps[label] = results["steps"]
        rows[0].update({"size (MiB)": results["fp_size_bytes"] / 2**20, "compression": 1.0})
        rows[0]["GBOPs/call"] = results["fp_gbops_per_call"]
        rows.append(
            {
                "setting": label,
                "size (MiB)": results["size_bytes"] / 2**20,
                "compression": results["compression"],
                "GBOPs/call": results["gbops_per_call"],
                "PSNR vs FP (dB)": results["psnr_db"],
                "SSIM vs FP": results["ssim"],
                "mean SQNR (dB)": results["sqnr_db_mean"],
                **quality(images[label]),
                "quantize (s)": quantize_seconds,
                "sample (s)": results["sample_seconds"],
            }
        )
        verdicts.append(judge(label, rows[-1], rows[0], other_seeds, recipe=recipe_name))
    columns = [column for column in COLUMNS if any(column in row for row in rows)]
    rows = [{column: row.get(column) for column in columns} for row in rows]
    result = DemoResult(rows, steps, output, output / "report.md", floors, time.perf_counter() - started, verdicts)
    _write_report(result, fp.name, images, options, recipe_name)
    return result


def _write_report(
    result: DemoResult, model_name: str, images: dict[str, torch.Tensor], options: DemoOptions, recipe_name: str
) -> None:
    output = result.output
    comparison_grid(images, output / "comparison.png", count=COMPARISON_SAMPLES)  # rows labelled by setting
    figures = [("comparison.png", f"first {COMPARISON_SAMPLES} samples, one row per setting (FP on top), same seeds")]
    if result.steps:
        sqnr_plot(result.steps, output / "sqnr.png")
        figures.append(("sqnr.png", "SQNR of the noise estimate against FP at every sampling step"))
    for name, batch in images.items():
        save_image_grid(batch[:GRID_SAMPLES].cpu(), output / f"{name.lower()}.png", nrow=8, title=name)
        figures.append((f"{name.lower()}.png", f"{name}: first {GRID_SAMPLES} samples"))
    summary = (
        f"{model_name}, recipe {recipe_name or 'custom'}: {options.num_samples} samples per setting, "
        f"{options.num_inference_steps} sampling steps, seeds from {options.seed}; every quantized model was "
        f"saved, reloaded and sampled from the same noise as FP. Total wall time {result.total_seconds:.0f} s."
    )
    notes = ["PSNR/SSIM compare each quantized sample with the FP sample from the same noise."]
    if result.floors:
        notes = [
            f"FID-proxy floor (two disjoint sets of {options.num_samples} real held-out glyphs, GlyphNet features): "
            f"{result.floors['fid']:.3g}; sFID-proxy floor {result.floors['sfid']:.3g}. A FID-proxy means "
            "something only next to this floor and the FP row.",
            "Class accuracy: GlyphNet's top-1 agreement with the class each sample was asked for.",
            *notes,
        ]
    notes += ["Verdict: " + verdict.line() for verdict in result.verdicts]
    write_report(
        output, title=f"dmquant demo — {model_name}", summary=summary, table=result.rows, figures=figures, notes=notes
    )
    record = {
        "model": model_name,
        "recipe": recipe_name,
        "options": {k: v for k, v in vars(options).items() if k != "progress"},
        "rows": result.rows,
        "floors": result.floors,
        "steps": result.steps,
        "verdicts": [vars(verdict) for verdict in result.verdicts],
        "total_seconds": result.total_seconds,
        **environment(),
    }
    record["files"] = sorted([*(path.name for path in output.iterdir()), RESULTS_FILE])
    write_atomically(output / RESULTS_FILE, lambda f: f.write(json.dumps(record, indent=2).encode()))


def demo_table(result: DemoResult) -> str:
    return markdown_table(result.rows, float_format="{:.3g}")
