"""The benchmark page's plots: FID-proxy by bit setting and SQNR per sampling step, per model (matplotlib, loaded
only when a plot is drawn)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report_cells import Cell, _finite, _metric, _ok, bits_key, fp_spread, sort_cells
from dmquant.atomic import write_atomically

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
