"""Where two speed rows' time differs, kernel by kernel: the profiled kernels of two ``bench/speed.py`` results
set side by side.

    python bench/kernel_diff.py bench/results/speed-deployment/sd15-unet/bf16-compiled-cudagraphs.json \\
        bench/results/speed-deployment/sd15-unet/dmquant-w8a8-fp8-fast.json

Prints, as Markdown, each kernel category's time in both rows (GEMM/conv, attention, "other": inductor's fused
pointwise and reduction kernels and eager copies) and the kernels whose time differs most: those one row runs and
the other does not, and those both run for a different time or number of launches. Kernels are matched by name;
inductor names a fused kernel after the ops it fuses and a number within its graph
(``triton_red_fused_native_layer_norm_3``), so the number is dropped and kernels fusing the same ops are counted as
one (``--keep-numbers`` keeps them apart). A kernel that fuses one more op (a quantization into the norm before it)
shows as one kernel gone and another come.

Older results list only their 40 slowest kernels (``top``) where newer ones list every kernel
(``by_kernel``, :func:`bench.speed_measure.kernel_summary`). With such a row the category times stay exact (they
come from the whole profile), a kernel below its list's cut reads "not listed" (unknown, not 0), and the table
says the lists are partial.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTIAL_NOTE = (
    "The kernel lists are partial (an older result lists its 40 slowest kernels only, as `top`): "
    '"not listed" is a time below that list\'s cut, unknown; the category times are whole.'
)


@dataclass(frozen=True)
class KernelList:
    """One row's profiled kernels: ``ms`` and ``calls`` by kernel name, each category's ms, and whether the list
    holds every kernel."""

    row: str
    ms: dict[str, float]
    calls: dict[str, int | None]
    categories: dict[str, float]
    category_of: dict[str, str]
    complete: bool


@dataclass(frozen=True)
class KernelDifference:
    """A kernel's time and launches in the two rows; None where a partial list leaves it out (unknown, not 0)."""

    name: str
    category: str
    ms: tuple[float | None, float | None]
    calls: tuple[int | None, int | None]

    @property
    def delta_ms(self) -> float | None:
        one, two = self.ms
        return None if one is None or two is None else two - one

    @property
    def size(self) -> float:
        """How large the change is, for ranking: the known change, else the time the row that lists it gives."""
        delta = self.delta_ms
        return abs(delta) if delta is not None else max(ms for ms in self.ms if ms is not None)


#: Inductor's generated kernels: their kind, the ops they fuse, and their number within the graph.
_INDUCTOR_NAME = re.compile(r"^(triton_(?:poi|red|per|tem)_.+)_\d+$")


def ops_name(name: str) -> str:
    """``name`` without inductor's kernel number, so that kernels fusing the same ops share one name."""
    match = _INDUCTOR_NAME.match(name)
    return match.group(1) if match else name


def kernel_list(record: dict[str, Any], keep_numbers: bool = False) -> KernelList:
    """The kernels of a ``bench/speed.py`` result, inductor's kernels fusing the same ops counted as one unless
    ``keep_numbers``; a ValueError where the row was not profiled."""
    kernels = record.get("kernels") or {}
    listed = kernels.get("by_kernel", kernels.get("top"))
    if listed is None:
        reason = kernels.get("error", "no kernel list in this result")
        raise ValueError(f"{record.get('model')} {record.get('row')}: {reason}")
    ms: dict[str, float] = {}
    calls: dict[str, int | None] = {}
    category_of: dict[str, str] = {}
    for kernel in listed:  # names cut at 160 characters may coincide too: their times add up
        name = kernel["name"] if keep_numbers else ops_name(kernel["name"])
        ms[name] = ms.get(name, 0.0) + kernel["ms"]
        count = kernel.get("calls")
        calls[name] = None if count is None or calls.get(name, 0) is None else calls.get(name, 0) + count
        category_of[name] = kernel["category"]
    total = kernels["kernel_time_ms"]
    categories = {category: share * total for category, share in kernels["time_share"].items()}
    return KernelList(record["row"], ms, calls, categories, category_of, "by_kernel" in kernels)


def differences(before: KernelList, after: KernelList) -> list[KernelDifference]:
    """Every kernel of either list whose time or launch count differs, largest change in time first."""

    def of(kernels: KernelList, name: str) -> tuple[float | None, int | None]:
        if name in kernels.ms:
            return kernels.ms[name], kernels.calls[name]
        return (0.0, 0) if kernels.complete else (None, None)  # below a partial list's cut: unknown

    found = []
    for name in before.ms.keys() | after.ms.keys():
        (ms_before, calls_before), (ms_after, calls_after) = of(before, name), of(after, name)
        if ms_before != ms_after or calls_before != calls_after:
            category = after.category_of.get(name) or before.category_of[name]
            found.append(KernelDifference(name, category, (ms_before, ms_after), (calls_before, calls_after)))
    return sorted(found, key=lambda difference: (-difference.size, difference.name))


def _cell(ms: float | None, calls: int | None) -> str:
    if ms is None:
        return "not listed"
    return f"{ms:.3f}" + ("" if calls is None else f" ({calls})")


def render(before: KernelList, after: KernelList, rows: int = 25) -> str:
    """The category table and the ``rows`` largest kernel differences, as Markdown."""
    lines = [
        f"| category | {before.row} ms | {after.row} ms | change ms |",
        "|---|---:|---:|---:|",
    ]
    for category in sorted(before.categories.keys() | after.categories.keys()):
        one, two = before.categories.get(category, 0.0), after.categories.get(category, 0.0)
        lines.append(f"| {category} | {one:.3f} | {two:.3f} | {two - one:+.3f} |")
    one, two = sum(before.categories.values()), sum(after.categories.values())
    lines.append(f"| all kernels | {one:.3f} | {two:.3f} | {two - one:+.3f} |")
    found = differences(before, after)
    lines += [
        "",
        f"| kernel | category | {before.row} ms (launches) | {after.row} ms (launches) | change ms |",
        "|---|---|---:|---:|---:|",
    ]
    for difference in found[:rows]:
        delta = difference.delta_ms
        cells = [_cell(ms, calls) for ms, calls in zip(difference.ms, difference.calls, strict=True)]
        change = "—" if delta is None else f"{delta:+.3f}"
        lines.append(f"| `{difference.name}` | {difference.category} | {cells[0]} | {cells[1]} | {change} |")
    rest = [difference.delta_ms for difference in found[rows:]]
    if rest:
        known = " + ?" if None in rest else ""
        lines.append(f"| {len(rest)} more kernels | | | | {sum(d for d in rest if d is not None):+.3f}{known} |")
    if not (before.complete and after.complete):
        lines += ["", PARTIAL_NOTE]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Set two bench/speed.py results' profiled kernels side by side: each category's time and the "
        "kernels whose time differs most (the second row against the first).",
        epilog="Example: python bench/kernel_diff.py bench/results/speed-deployment/sd15-unet/"
        "bf16-compiled-cudagraphs.json bench/results/speed-deployment/sd15-unet/dmquant-w8a8-fp8-fast.json",
    )
    parser.add_argument("before", type=Path, help="the reference row's result JSON (usually the bf16 row)")
    parser.add_argument("after", type=Path, help="the row to set against it")
    parser.add_argument("--rows", type=int, default=25, help="how many kernels to list (default 25)")
    parser.add_argument(
        "--keep-numbers", action="store_true",
        help="keep inductor's kernel numbers (triton_..._3), listing each generated kernel apart; by default kernels "
        "fusing the same ops are counted as one",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lists = []
    for path in (args.before, args.after):
        try:
            lists.append(kernel_list(json.loads(path.read_text()), args.keep_numbers))
        except (OSError, ValueError, KeyError) as error:  # JSONDecodeError is a ValueError
            print(f"bench/kernel_diff.py: {path}: not a profiled bench/speed.py result ({error})", file=sys.stderr)
            return 2
    before, after = lists
    print(render(before, after, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
