"""Outputs people look at: sample grids, sample archives, tables, plots and the markdown/HTML report."""

from __future__ import annotations

import html
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from dmquant.atomic import write_atomically
from dmquant.eval.images import to_unit_range

#: Cell text for a missing value in :func:`markdown_table`.
MISSING = "—"


def _display_rgb(images: Tensor, value_range: tuple[float, float]) -> Tensor:
    """``(N, C, H, W)`` images or latents -> ``(N, 3, H, W)`` float in ``[0, 1]``."""
    channels = images.shape[1]
    if channels == 1:
        return to_unit_range(images, value_range).expand(-1, 3, -1, -1)
    if channels == 3:
        return to_unit_range(images, value_range)
    if channels == 4:
        rgb = images[:, :3]
        low = rgb.amin(dim=(0, 2, 3), keepdim=True)
        span = rgb.amax(dim=(0, 2, 3), keepdim=True) - low
        return (rgb - low) / torch.where(span > 0, span, torch.ones_like(span))
    raise ValueError(f"cannot show {channels}-channel images; expected 1 (grey), 3 (RGB) or 4 (latents)")


def _to_uint8(unit: Tensor) -> Tensor:
    return (unit * 255).round().to(torch.uint8)


def image_grid(
    images: Tensor,
    nrow: int | None = None,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile a batch of images into one ``(H, W, 3)`` ``uint8`` picture.

    Args:
        images: ``(N, C, H, W)``. With ``C == 3`` the images are RGB in ``value_range``;
            ``C == 1`` images (in ``value_range``) are shown grey; ``C == 4`` is taken to be
            latents: their first 3 channels are shown as RGB, each channel normalised to
            ``[0, 1]`` by its own min/max over the whole batch (so tiles stay comparable)
            and ``value_range`` is not used.
        nrow: images per row, as in ``torchvision.utils.make_grid``; defaults to
            ``ceil(sqrt(N))`` and is capped at ``N``.
        padding: black pixels between tiles and around the border.
        value_range: range of pixel values mapped to black..white; values outside are clamped.

    Returns:
        ``(rows * (H + padding) + padding, nrow * (W + padding) + padding, 3)`` ``uint8``
        array; cells after the last image are black.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if nrow is not None and nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    rgb = _display_rgb(images.detach().float().cpu(), value_range)
    count, _, height, width = rgb.shape
    columns = min(nrow or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    tiles = torch.zeros(rows * columns, 3, height + padding, width + padding)
    tiles[:count, :, :height, :width] = rgb
    # (rows, columns, 3, h, w) -> (rows, h, columns, w, 3), then the top and left border.
    grid = tiles.view(rows, columns, 3, height + padding, width + padding).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * (height + padding), columns * (width + padding), 3)
    grid = torch.nn.functional.pad(grid, (0, 0, padding, 0, padding, 0))
    return _to_uint8(grid).numpy()


def _write_atomically(path: str | os.PathLike[str], suffix: str, write: Callable[[BinaryIO], None]) -> Path:
    """Check that ``path`` ends in ``suffix``, then write it atomically."""
    if Path(path).suffix.lower() != suffix:
        raise ValueError(f"{path} must have the {suffix} suffix")
    return write_atomically(path, write)


#: Pixels of the strip or column that holds a grid's labels.
LABEL_SIZE = 14


def _labelled(grid: np.ndarray, *, title: str | None = None, rows: Mapping[str, int] | None = None) -> Image.Image:
    """``grid`` with ``title`` written in a strip above it and each of ``rows`` (label: the pixel row of its
    centre) in a column on its left, in PIL's default font."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 6 + max((measure.textlength(label, font=font) for label in rows or {}), default=-6)
    top = LABEL_SIZE if title else 0
    picture = Image.new("RGB", (grid.shape[1] + int(left), grid.shape[0] + top))
    picture.paste(Image.fromarray(grid), (int(left), top))
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((int(left) + 2, 1), title, fill="white", font=font)
    for label, centre in (rows or {}).items():
        draw.text((2, top + centre), label, fill="white", font=font, anchor="lm")
    return picture


def save_image_grid(images: Tensor, path: str | os.PathLike[str], *, title: str | None = None, **kwargs: Any) -> Path:
    """Save :func:`image_grid` of ``images`` as a PNG at ``path`` (atomically) and return it.

    ``title`` is written in a strip above the grid; ``kwargs`` go to :func:`image_grid`. ``path`` must end in
    ``.png``.
    """
    grid = image_grid(images, **kwargs)
    picture = _labelled(grid, title=title) if title else Image.fromarray(grid)
    return _write_atomically(path, ".png", lambda file: picture.save(file, format="PNG"))


def save_samples_npz(
    path: str | os.PathLike[str],
    images: Tensor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    **arrays: Tensor | np.ndarray | Sequence,
) -> Path:
    """Save samples as an ``.npz`` archive (atomically) and return its path.

    Args:
        path: destination, ending in ``.npz``.
        images: ``(N, C, H, W)`` samples, stored under ``"images"`` as ``uint8`` NHWC in
            ``[0, 255]``: ``uint8`` tensors are stored as they are, any other dtype is
            mapped from ``value_range`` (and clamped).
        value_range: range of non-``uint8`` ``images``.
        arrays: further arrays stored under their keyword (labels, seeds, ...); tensors are
            moved to the CPU. Object arrays are refused, so the archive loads without pickle.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = _to_uint8(to_unit_range(images.float(), value_range))
    contents = {"images": images.permute(0, 2, 3, 1).numpy()}
    for name, array in arrays.items():
        array = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
        if array.dtype == object:
            raise ValueError(f"array {name!r} has dtype object, which .npz can only store by pickling")
        contents[name] = array
    return _write_atomically(path, ".npz", lambda file: np.savez(file, **contents))


def _cell(value: object, float_format: str) -> str:
    if isinstance(value, Tensor):
        value = value.item()
    if value is None:
        return MISSING
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return float_format.format(value)
    return str(value).replace("|", r"\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    float_format: str = "{:.4g}",
) -> str:
    """Render ``rows`` as a GitHub markdown table.

    Args:
        rows: one mapping per table row, column name -> value.
        columns: column order; defaults to every key of ``rows`` in order of first appearance.
        float_format: ``str.format`` pattern for non-integer numbers (Python, numpy and
            one-element tensor values); infinities are shown as ``inf``/``-inf`` and NaN as
            ``nan`` whatever the format.

    Returns:
        The table without a trailing newline; ``None`` and missing keys show as ``—``, and
        ``|`` in text is escaped.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("a markdown table needs at least one column")
    header = [_cell(column, float_format) for column in columns]
    body = [[_cell(row.get(column), float_format) for column in columns] for row in rows]
    table = [header, ["---"] * len(columns), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in table)


def comparison_grid(images: Mapping[str, Tensor], path: str | os.PathLike[str], *, count: int = 16) -> Path:
    """One PNG with a row per setting (e.g. FP, W8A8, W4A8) of the first ``count`` samples, each row
    labelled with its setting on the left.

    Samples of one column share their seed, so the rows show what each setting changed.
    """
    rows = [batch[:count].detach().cpu() for batch in images.values()]
    if len({tuple(row.shape) for row in rows}) != 1:
        raise ValueError(f"every setting needs the same sample shape, got {[tuple(r.shape) for r in rows]}")
    padding, height = 2, rows[0].shape[2]
    grid = image_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=padding)
    centres = {name: padding + index * (height + padding) + height // 2 for index, name in enumerate(images)}
    picture = _labelled(grid, rows=centres)
    return _write_atomically(path, ".png", lambda file: picture.save(file, format="PNG"))


def sqnr_plot(steps: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str]) -> Path:
    """Line plot of the noise estimate's SQNR per sampling step, one line per setting.

    ``steps`` maps a setting name to the rows of :func:`dmquant.eval.noise.noise_estimate_error`
    (``timestep`` and ``sqnr_db`` are used). The x axis runs from the noisiest step to the last,
    as sampling does. Written atomically as a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for name, rows in steps.items():
        finite = [(row["timestep"], row["sqnr_db"]) for row in rows if math.isfinite(row["sqnr_db"])]
        if finite:
            axis.plot(*zip(*finite, strict=True), marker="o", markersize=3, label=name)
    axis.invert_xaxis()
    axis.set_xlabel("timestep t (sampling runs left to right)")
    axis.set_ylabel("SQNR of the noise estimate (dB)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save_figure(figure, path)


def _save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    from matplotlib import pyplot as plt

    figure.tight_layout()
    try:
        return _write_atomically(path, ".png", lambda file: figure.savefig(file, format="png"))
    finally:
        plt.close(figure)


def sensitivity_heatmap(
    blocks: Mapping[str, Sequence[float]], timesteps: Sequence[int], path: str | os.PathLike[str]
) -> Path:
    """Heatmap of each block's SQNR (dB, rows) at each sampling step (columns, noisiest first)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(blocks)
    values = [[v if math.isfinite(v) else math.nan for v in blocks[name]] for name in names]
    figure, axis = plt.subplots(figsize=(7.5, 0.28 * len(names) + 1.6), dpi=120)
    image = axis.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_yticks(range(len(names)), names, fontsize=7)
    ticks = list(range(0, len(timesteps), max(1, len(timesteps) // 10)))
    axis.set_xticks(ticks, [str(timesteps[i]) for i in ticks], fontsize=7)
    axis.set_xlabel("timestep t (sampling runs left to right)")
    figure.colorbar(image, ax=axis, label="SQNR of the block's output (dB)")
    axis.set_title("blocks quantized one at a time")
    return _save_figure(figure, path)


def sensitivity_bars(ranking: Sequence[tuple[str, float]], path: str | os.PathLike[str], *, top: int = 30) -> Path:
    """Horizontal bars of the ``top`` most sensitive modules' SQNR (dB, lowest first)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [(name, value) for name, value in ranking if math.isfinite(value)][:top]
    figure, axis = plt.subplots(figsize=(7.5, 0.22 * len(shown) + 1.4), dpi=120)
    axis.barh(range(len(shown)), [value for _, value in shown], color="tab:orange")
    axis.set_yticks(range(len(shown)), [name for name, _ in shown], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("SQNR of the module's output on its own input (dB, mean over steps)")
    axis.grid(axis="x", alpha=0.3)
    return _save_figure(figure, path)


def _html_table(rows: Sequence[Mapping[str, object]], float_format: str) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c), float_format))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
    "img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}figure{margin:1.5rem 0}"
    "figcaption{color:#555;font-size:.9rem}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}"
)


def write_report(
    directory: str | os.PathLike[str],
    *,
    title: str,
    summary: str,
    table: Sequence[Mapping[str, object]],
    figures: Sequence[tuple[str, str]],
    notes: Sequence[str] = (),
    float_format: str = "{:.4g}",
) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained-looking ``report.html`` into ``directory``.

    Args:
        title: the heading.
        summary: a paragraph under the heading (plain text).
        table: result rows, shown as a table.
        figures: ``(file name in directory, caption)`` pairs, shown in order.
        notes: closing bullet points (plain text).

    Returns:
        The paths of the markdown and the HTML report.
    """
    directory = Path(directory)
    md = [f"# {title}", "", summary, "", markdown_table(table, float_format=float_format), ""]
    for name, caption in figures:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    md += [f"- {note}" for note in notes]
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>",
        _html_table(table, float_format),
    ]
    for name, caption in figures:
        page.append(
            f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if notes:
        page.append("<ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>")
    page.append("</body></html>")
    markdown = write_atomically(directory / "report.md", lambda f: f.write("\n".join(md).encode()))
    page_path = write_atomically(directory / "report.html", lambda f: f.write("\n".join(page).encode()))
    return markdown, page_path
