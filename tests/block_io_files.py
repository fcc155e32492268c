"""A block cache (:class:`dmquant.recon.cache.BlockIOCache`) as one safetensors file, for the tests.

The cache's tensors are the file's tensors; its :class:`~dmquant.recon.cache.CallLayout` is JSON in the file's
metadata, tagged so that tuples and dicts round-trip. To be saved a constant argument must be ``None``, a bool,
int, float, str, or a list/tuple/dict (string keys) of those.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dmquant.errors import CalibrationError
from dmquant.recon.cache import BlockIOCache, CallLayout, Slot
from dmquant.tensor_files import write_tensors

#: ``metadata["format"]`` of a saved block cache.
BLOCK_IO_FORMAT = "dmquant.block_io/1"


def _encode_const(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode_const(item, where) for item in value]}
    if isinstance(value, list):
        return {"list": [_encode_const(item, where) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: _encode_const(item, where) for key, item in value.items()}}
    raise CalibrationError(
        f"the block's {where} is a {type(value).__name__}, which a block cache cannot save "
        "(constants must be None, bool, int, float, str or lists/tuples/dicts of those)"
    )


def _decode_const(value: Any) -> Any:
    if isinstance(value, dict):
        ((tag, inner),) = value.items()
        if tag == "tuple":
            return tuple(_decode_const(item) for item in inner)
        if tag == "list":
            return [_decode_const(item) for item in inner]
        if tag == "dict":
            return {key: _decode_const(item) for key, item in inner.items()}
        raise ValueError(f"unknown constant tag {tag!r}")
    return value


def layout_to_json(layout: CallLayout) -> dict[str, Any]:
    def slot(where: str, item: Slot) -> dict[str, Any]:
        return {"kind": item.kind, "value": _encode_const(item.value, where)}

    return {
        "args": [slot(f"positional argument {i}", item) for i, item in enumerate(layout.args)],
        "kwargs": [[name, slot(f"keyword argument {name!r}", item)] for name, item in layout.kwargs],
        "has_target": layout.has_target,
        "call_sizes": list(layout.call_sizes),
    }


def layout_from_json(data: Any) -> CallLayout:
    def slot(item: Any) -> Slot:
        if not isinstance(item, dict) or item.get("kind") not in ("batched", "shared", "const"):
            raise ValueError(f"bad slot {item!r}")
        return Slot(item["kind"], _decode_const(item.get("value")))

    sizes = data["call_sizes"]
    if not isinstance(sizes, list) or not sizes or not all(type(s) is int and s > 0 for s in sizes):
        raise ValueError(f"bad call_sizes {sizes!r}")
    if not isinstance(data["has_target"], bool):
        raise ValueError("bad has_target")
    return CallLayout(
        args=tuple(slot(item) for item in data["args"]),
        kwargs=tuple((str(name), slot(item)) for name, item in data["kwargs"]),
        has_target=data["has_target"],
        call_sizes=tuple(sizes),
    )


def save_cache(cache: BlockIOCache, path: str | os.PathLike[str]) -> None:
    """Write ``cache`` to one safetensors file (layout as JSON in its metadata), atomically."""
    metadata = {"format": BLOCK_IO_FORMAT, "layout": json.dumps(layout_to_json(cache.layout))}
    write_tensors(path, cache.tensors, metadata=metadata)


def load_cache(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu", memory_budget_bytes: int | None = None
) -> BlockIOCache:
    """Read a cache written by :func:`save_cache`, placed on ``device`` within ``memory_budget_bytes``.

    Raises:
        CalibrationError: the file is missing, unreadable, truncated, not a block cache, or
            its tensors do not match its layout.
    """
    try:
        with safe_open(os.fspath(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except FileNotFoundError:
        raise CalibrationError(f"no block cache at {path}") from None
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CalibrationError(f"{path} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != BLOCK_IO_FORMAT:
        raise CalibrationError(
            f"{path} is not a dmquant block cache (format {metadata.get('format')!r}, expected {BLOCK_IO_FORMAT!r})"
        )
    try:
        layout = layout_from_json(json.loads(metadata["layout"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CalibrationError(f"{path}: the block cache's layout is missing or malformed ({error!r})") from None
    try:
        return BlockIOCache(tensors, layout, device=device, memory_budget_bytes=memory_budget_bytes)
    except CalibrationError as error:
        raise CalibrationError(f"{path}: {error}") from None
