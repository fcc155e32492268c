"""The schema of a checkpoint's ``dmquant.json``, checked before anything is built from it.

A checkpoint is data, never instructions: every key must have the type and range that
:func:`dmquant.api.save` writes, sizes must fit in what the tensor file holds, and the base
model must be a denoiser class dmquant supports, described by a mapping (a string there would
make diffusers look it up on the hub or read another local file). The source model is recorded
as given (an absolute path for a directory) and, optionally, relative to the checkpoint: that
one must be a relative path. A violation is a :class:`~dmquant.errors.CheckpointError` naming
the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from .denoiser import DENOISER_CLASSES, is_denoiser_class
from .errors import CheckpointError

#: The trajectory lengths a checkpoint's per-step parameters may be made for.
MAX_STEPS = 10_000
#: Most dimensions of a stored weight's shape.
MAX_RANK = 8
#: Codes per stored byte at the densest packing (2-bit integers).
CODES_PER_BYTE = 4

Check = Callable[[Any, str], None]


def _fail(path: str, expected: str, value: Any) -> None:
    shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
    raise CheckpointError(f"dmquant.json: {path}: expected {expected}, got {shown}")


def _string(value: Any, path: str) -> None:
    if not isinstance(value, str):
        _fail(path, "a string", value)


def _integer(low: int, high: int) -> Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            _fail(path, f"an integer in [{low}, {high}]", value)

    return check


def _optional(check: Check) -> Check:
    def optional(value: Any, path: str) -> None:
        if value is not None:
            check(value, path)

    return optional


def _mapping(value: Any, path: str) -> None:
    if not isinstance(value, Mapping):
        _fail(path, "a mapping", value)


def _mapping_of(check: Check) -> Check:
    def mapping_of(value: Any, path: str) -> None:
        _mapping(value, path)
        for key, item in value.items():
            check(item, f"{path}.{key}")

    return mapping_of


def _list_of(check: Check, *, length: tuple[int, int] = (0, 1 << 20)) -> Check:
    def list_of(value: Any, path: str) -> None:
        if not isinstance(value, list) or not length[0] <= len(value) <= length[1]:
            _fail(path, f"a list of {length[0]} to {length[1]} items", value)
        for index, item in enumerate(value):
            check(item, f"{path}[{index}]")

    return list_of


def _record(fields: Mapping[str, Check], optional: frozenset[str] = frozenset()) -> Check:
    def record(value: Any, path: str) -> None:
        _mapping(value, path)
        for key, check in fields.items():
            key_path = f"{path}.{key}" if path else key
            if key in value:
                check(value[key], key_path)
            elif key not in optional:
                raise CheckpointError(f"dmquant.json: {key_path}: required key missing")

    return record


def _sha256(value: Any, path: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        _fail(path, "a SHA-256 in hex", value)


def _relative_path(value: Any, path: str) -> None:
    """A path relative to the checkpoint (where its source model lies when the two move together)."""
    if not isinstance(value, str) or not value or "\0" in value or PurePosixPath(value).is_absolute():
        _fail(path, "a relative path", value)
    if PureWindowsPath(value).drive or PureWindowsPath(value).is_absolute():
        _fail(path, "a relative path", value)


def _base(value: Any, path: str) -> None:
    _record({"library": _optional(_string), "class": _string, "config": _optional(_mapping)})(value, path)
    if value["library"] is None:
        return
    if value["library"] != "diffusers":
        _fail(f"{path}.library", "diffusers or null", value["library"])
    if not is_denoiser_class(value["class"]):
        supported = f"{', '.join(DENOISER_CLASSES)} or another diffusers UNet or transformer"
        _fail(f"{path}.class", f"a denoiser class dmquant supports ({supported})", value["class"])
    _mapping(value["config"], f"{path}.config")


_INDEX = _integer(0, 1 << 31)
_WEIGHT_CODES = _record(
    {
        "weight": _string,
        "format": _string,
        "shape": _list_of(_integer(1, 1 << 31), length=(1, MAX_RANK)),
        "channels": _list_of(_INDEX, length=(2, 2)),
    }
)

_LAYER_ROW = _record(
    {
        "name": _string,
        "kind": _string,
        "weight": _string,
        "activation": _string,
        "granularity": _string,
        "split": _INDEX,
        "rule": _optional(_string),
    }
)

_MANIFEST = _record(
    {
        "format_version": _integer(0, 1 << 31),
        "sha256": _sha256,
        "tensors_bytes": _integer(0, 1 << 62),
        "dmquant_version": _string,
        "torch_version": _string,
        "base": _base,
        "recipe": _mapping,
        "splits": _mapping_of(_integer(1, 1 << 31)),
        "num_steps": _integer(1, MAX_STEPS),
        "report": _list_of(_LAYER_ROW),
        "unmatched_rules": _list_of(_string),
        "weight_codes": _mapping_of(_WEIGHT_CODES),
        "source": _optional(_string),
        "source_relative": _optional(_relative_path),
        "extra": _mapping,
    },
    optional=frozenset({"tensors_bytes", "unmatched_rules", "source", "source_relative", "extra"}),
)


def validate_manifest(manifest: Any, tensors_bytes: int) -> dict[str, Any]:
    """``manifest`` if it follows the schema and its sizes fit a tensor file of ``tensors_bytes``."""
    _MANIFEST(manifest, "")
    if manifest.get("tensors_bytes", tensors_bytes) != tensors_bytes:
        raise CheckpointError(
            f"dmquant.json: tensors_bytes: the tensor file has {tensors_bytes} bytes, "
            f"the manifest says {manifest['tensors_bytes']} — the file is truncated or was modified"
        )
    for key, entry in manifest["weight_codes"].items():
        size = 1
        for dimension in entry["shape"]:
            size *= dimension
        if size > CODES_PER_BYTE * tensors_bytes:
            raise CheckpointError(
                f"dmquant.json: weight_codes.{key}.shape: {entry['shape']} holds more codes than the tensor file"
            )
    return {**manifest, "tensors_bytes": tensors_bytes}
