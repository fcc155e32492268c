"""What the benchmarks share: result cells (written atomically, resumed), the git commit, the recorded command
line, argument parsers from a script's docstring, CUDA-event timing and markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from dmquant.atomic import write_atomically


class ResultCell(Protocol):
    """A cell of a benchmark matrix: the model it runs and the file its result goes to."""

    model: str

    def path(self, results: Path) -> Path: ...


CellT = TypeVar("CellT", bound=ResultCell)


def git_commit() -> str | None:
    """``DMQUANT_GIT_COMMIT`` when set (a copied tree whose ``.git`` may be stale), else the checked-out commit."""
    if os.environ.get("DMQUANT_GIT_COMMIT"):
        return os.environ["DMQUANT_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How a result was produced: ``python bench/<script>.py`` and its arguments (``sys.argv``'s when None)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"bench/{script}.py", *(shlex.quote(argument) for argument in arguments)])


def write_cell(path: Path, record: dict[str, Any]) -> None:
    """Write one result as indented JSON, atomically (an SQNR of inf, identical estimates, is written as Infinity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2)
    write_atomically(path, lambda f: f.write(text.encode()))


def pending(cells: Sequence[CellT], results: Path, force: bool) -> list[CellT]:
    """Cells still to run: missing, failed, or all of them with ``force``."""

    def done(cell: CellT) -> bool:
        path = cell.path(results)
        return path.exists() and json.loads(path.read_text()).get("status") in ("ok", "unsupported")

    return [cell for cell in cells if force or not done(cell)]


def by_model(cells: Sequence[CellT]) -> list[tuple[str, list[CellT]]]:
    """``cells`` grouped by model, the models in the order they first appear."""
    return [(model, [cell for cell in cells if cell.model == model]) for model in dict.fromkeys(c.model for c in cells)]


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of a bench script's docstring and whose
    epilog is the rest, as written."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times_ms(call: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` calls: on CUDA, CUDA events recorded around each call back to back
    and read after one synchronize (the GPU's time); elsewhere the wall clock."""
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - began))
        return times
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A markdown table, ``|`` in a cell escaped and line breaks made spaces; ``align``: the delimiter row's cells
    (``"---"``, ``"---:"``), written unpadded (default: ``---`` for every column, padded like the rows)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", r"\|").replace("\n", " ") for cell in cells) + " |"

    delimiter = line(["---"] * len(header)) if align is None else "|" + "|".join(align) + "|"
    return "\n".join([line(header), delimiter, *(line(row) for row in rows)])
