"""The speed cells as a markdown table (``bench/speed.py --table``, and BENCHMARKS.md's speed section)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import markdown_table
from bench.speed_measure import PEAK_KEYS, PEAK_LABELS
from bench.speed_rows import ROWS
from bench.speed_workloads import MODELS


def _number(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table_notes(cell: dict[str, Any]) -> str:
    """The notes column: the headline setting, the other settings' speed-ups, what stayed in bf16."""
    if cell.get("status") != "ok":
        reason = (cell.get("reason") or "").replace("\n", " ")
        return f"{cell.get('status')}: {reason[:140]}"
    notes = [(cell.get("settings") or {}).get("headline") or ""]
    for setting, result in (cell.get("measurements") or {}).items():
        speedup = result.get("speedup_vs_bf16_same_setting")
        if "error" in result:
            notes.append(f"{setting} failed")
        elif setting != notes[0] and speedup is not None:
            notes.append(f"{setting} {speedup:.2f}x")
    fraction = (cell.get("metrics") or {}).get("full_precision_layer_flop_fraction")
    if cell.get("kind") != "bf16" and fraction is not None:
        notes.append(f"{100 * fraction:.0f}% of Linear/Conv FLOPs in full precision")
    if not cell.get("representative", True):
        notes.append("not representative (CPU or --tiny)")
    return "; ".join(note for note in notes if note)


def _model_label(cell: dict[str, Any], batches: dict[str, set]) -> str:
    """The model's name, with its batch where the table holds that model at several batches."""
    model = cell.get("model")
    if len(batches.get(model, ())) < 2:
        return str(model)
    return f"{model} (batch {(cell.get('inputs') or {}).get('batch')})"


def _row_order(cell: dict[str, Any]) -> tuple[int, int, int, str]:
    model, row = cell.get("model", ""), cell.get("row", "")
    model_rank = MODELS.index(model) if model in MODELS else len(MODELS)
    row_rank = list(ROWS).index(row) if row in ROWS else len(ROWS)
    batch = (cell.get("inputs") or {}).get("batch") or 0
    return model_rank, -batch, row_rank, f"{model}/{row}"


def _gemm_conv_throughput(metrics: dict[str, Any], row: str, peaks: dict[str, Any]) -> str:
    """The GEMM/conv kernels' TFLOP/s, with its share of the measured peak of the row's compute format."""
    tflops = metrics.get("gemm_conv_tflops")
    compute = ROWS[row].compute_format if row in ROWS else None
    peak = peaks.get(PEAK_KEYS[compute]) if compute else None
    if tflops is None or not peak:
        return _number(tflops, ".0f")
    return f"{tflops:.0f} ({100 * tflops / peak:.0f}% of {compute})"


def speed_table(results_dir: str | Path) -> str:
    """The speed cells under ``results_dir`` as a markdown table (plus the device peaks, when measured)."""
    results = Path(results_dir)
    cells = [json.loads(path.read_text()) for path in results.glob("*/*.json")]
    peaks_file = results / "peaks.json"
    peaks = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
    header = ["model", "row", "median ms", "speed-up vs bf16 (same compile)", "peak GiB", "weight MiB", "TFLOP/s",
              "GEMM/conv TFLOP/s (of peak)", "notes"]  # fmt: skip
    batches: dict[str, set] = {}
    for cell in cells:
        batches.setdefault(cell.get("model"), set()).add((cell.get("inputs") or {}).get("batch"))
    rows = []
    for cell in sorted(cells, key=_row_order):
        metrics = (cell.get("metrics") or {}) if cell.get("status") == "ok" else {}
        speedup = metrics.get("speedup_vs_bf16_same_compile")
        values = [
            _model_label(cell, batches),
            cell.get("row"),
            _number(metrics.get("median_ms"), ".2f"),
            "—" if speedup is None else f"{speedup:.2f}x",
            _number(metrics.get("peak_memory_gib"), ".2f"),
            _number(metrics.get("weight_mib"), ".1f"),
            _number(metrics.get("tflops"), ".3g"),
            _gemm_conv_throughput(metrics, cell.get("row", ""), peaks),
            _table_notes(cell).replace("|", "/"),
        ]
        rows.append([str(value) for value in values])
    lines = [markdown_table(header, rows, align=["---", "---", *["---:"] * 6, "---"])]
    if peaks:
        size = peaks.get("size")
        measured = ", ".join(
            f"{PEAK_LABELS[compute]} {_number(peaks.get(key), '.3g')}" for compute, key in PEAK_KEYS.items()
        )
        device = (peaks.get("environment") or {}).get("device")
        lines.append(
            f"\nDevice peaks on {device} ({size}³ products, TFLOP/s; int8 in TOPS): {measured}. GEMM/conv TFLOP/s:"
            " the FLOPs of the Linear and Conv2d layers over the time of the GEMM and convolution kernels in one"
            " profiled call, against the peak of the format its low-bit layers compute in (a row that leaves layers"
            " in bf16, as torchao's leave the convolutions, mixes formats)."
        )
    return "\n".join(lines) + "\n"
