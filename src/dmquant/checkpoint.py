"""The on-disk format of a quantized model: safetensors + a JSON manifest, written atomically.

A checkpoint directory holds

* ``quantized_model.safetensors`` — every quantized weight as its integer codes (bit-packed
  below 8 bits; FP8 as float8 tensors, FP4 as packed e2m1 codes) instead of the FP tensor,
  the quantizers' scales and zero points, and every other parameter/buffer in its FP dtype;
* ``dmquant.json`` — format version, dmquant version, the base architecture (class and
  diffusers config), the recipe, the shortcut splits, the layer report, the per-weight code
  layout, the source model (absolute path, and relative to the checkpoint) and the SHA-256
  of the tensor file;
* ``config.json`` (a diffusers model only) — the base model's diffusers config with a
  ``quantization_config`` naming dmquant, for tools that read a model folder's config;
  :func:`read_checkpoint` does not read it.

Nothing is pickled. A write goes to a staging sibling directory swapped into place at the end
(:mod:`dmquant.atomic`), so an interrupted save leaves the old checkpoint or the new one, never
a half-written one; the manifest also records the tensor file's size, so that a replaced or
truncated file is refused before it is hashed.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import check_output, directory_written_atomically, recover_when_free
from .core.layers import QUANT_LAYERS
from .core.packing import decode_e2m1, encode_e2m1, pack_codes, unpack_codes
from .core.primitives import FP4_E2M1, IntFormat, QFormat
from .core.quantizer import Quantizer
from .errors import CheckpointError
from .manifest import validate_manifest

FORMAT_VERSION = 1
TENSORS_FILE = "quantized_model.safetensors"
MANIFEST_FILE = "dmquant.json"
CODES_SUFFIX = ".codes"
#: The diffusers model config a checkpoint of a diffusers model carries beside its manifest.
CONFIG_FILE = "config.json"
#: What every checkpoint holds.
REQUIRED_FILES = frozenset({TENSORS_FILE, MANIFEST_FILE})
#: What a checkpoint may hold besides (``write_checkpoint(..., files=)``).
OPTIONAL_FILES = frozenset({CONFIG_FILE})
#: Everything a checkpoint directory holds: ``--overwrite`` replaces a directory with nothing else in it.
CHECKPOINT_FILES = REQUIRED_FILES | OPTIONAL_FILES
#: A manifest is metadata; a larger file is not one.
MAX_MANIFEST_BYTES = 64 << 20


def _encode(codes: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    if isinstance(fmt, IntFormat):
        return pack_codes(codes, fmt.bits, fmt.qmin)
    if fmt == FP4_E2M1:
        return pack_codes(encode_e2m1(codes).to(torch.int32), 4, 0)
    return codes.to(_stored_dtype(fmt))


def _stored_dtype(fmt: QFormat) -> torch.dtype:
    """The dtype a weight's codes are stored in: packed bytes, or FP8 itself."""
    if isinstance(fmt, IntFormat) or fmt == FP4_E2M1:
        return torch.uint8
    return torch.float8_e4m3fn if fmt.name == "fp8_e4m3" else torch.float8_e5m2


def _decode(stored: torch.Tensor, fmt: QFormat, shape: list[int]) -> torch.Tensor:
    if stored.dtype != _stored_dtype(fmt):
        raise ValueError(f"stored as {stored.dtype}, expected {_stored_dtype(fmt)}")
    if isinstance(fmt, IntFormat):
        return unpack_codes(stored, fmt.bits, fmt.qmin, shape)
    if fmt == FP4_E2M1:
        return decode_e2m1(unpack_codes(stored, 4, 0, shape).to(torch.uint8))
    return stored.float().reshape(shape)


def _weight_code_entries(model: nn.Module) -> list[tuple[str, str, Quantizer, torch.Tensor, list[int]]]:
    """(weight key, codes key, quantizer, weight part, its input-channel range) per quantized weight part."""
    entries = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANT_LAYERS):
            continue
        parts = module.weight_parts()
        if not all(q.enabled for q, _ in parts):
            continue
        start = 0
        for index, (quantizer, part) in enumerate(parts):
            codes_key = f"{name}.weight{CODES_SUFFIX}" + (f".{index}" if len(parts) > 1 else "")
            entries.append((f"{name}.weight", codes_key, quantizer, part, [start, start + part.shape[1]]))
            start += part.shape[1]
    return entries


def state_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store and the code layout: quantized weights replaced by their codes."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layout: dict[str, Any] = {}
    for key, codes_key, quantizer, part, channels in _weight_code_entries(model):
        state.pop(key, None)
        state[codes_key] = _encode(quantizer.codes(part), quantizer.fmt)
        layout[codes_key] = {
            "weight": key,
            "format": quantizer.fmt.name,
            "shape": list(part.shape),
            "channels": channels,
        }
    return state, layout


def restore_weights(model: nn.Module, tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
    """Write the dequantized codes back into the weights (scales must already be loaded).

    ``layout`` must describe exactly the model's own quantized weights (format, shape, channels),
    so a tampered layout is refused before any tensor is sized from it.
    """
    entries = {entry[1]: entry for entry in _weight_code_entries(model)}
    if set(entries) != set(layout):
        raise CheckpointError("the checkpoint's quantized weights do not match the model's quantized layers")
    with torch.no_grad():
        for codes_key, entry in layout.items():
            key, _, quantizer, part, channels = entries[codes_key]
            expected = {"weight": key, "format": quantizer.fmt.name, "shape": list(part.shape), "channels": channels}
            if entry != expected:
                raise CheckpointError(f"dmquant.json: weight_codes.{codes_key}: does not fit the model ({expected})")
            try:
                codes = _decode(tensors[codes_key], quantizer.fmt, list(part.shape))
                decoded = quantizer.decode(codes, part.shape)
            except (KeyError, ValueError, RuntimeError) as error:
                raise CheckpointError(f"{codes_key}: corrupt weight codes or scales ({error})") from None
            start, stop = channels
            weight = model.get_parameter(key)
            weight[:, start:stop].copy_(decoded.to(weight.dtype))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_ours(directory: Path) -> bool:
    """Every entry of ``directory`` is a checkpoint file (complete or not)."""
    return all(path.name in CHECKPOINT_FILES and path.is_file() for path in directory.iterdir())


def _is_complete(directory: Path) -> bool:
    return _is_ours(directory) and REQUIRED_FILES <= {path.name for path in directory.iterdir()}


def check_target(directory: str | Path, *, overwrite: bool) -> Path:
    """``directory`` if a checkpoint can be saved there: see :func:`~dmquant.atomic.check_output`.

    With ``overwrite`` an existing directory is replaced only if it is empty or holds nothing but
    checkpoint files; anything else in it might be the user's, so it is refused.
    """
    return check_output(Path(directory), overwrite=overwrite, replaceable=_is_ours, what="a dmquant checkpoint")


def write_checkpoint(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    *,
    overwrite: bool = False,
    files: dict[str, str] | None = None,
) -> Path:
    """Write tensors + manifest (and the text ``files``, by name) to ``directory``: staged beside it, swapped
    in whole, under its lock.

    ``files`` may only name the optional files a checkpoint holds (:data:`OPTIONAL_FILES`), so that every
    file in a checkpoint directory is one ``--overwrite`` knows as dmquant's. Leftovers of an interrupted
    earlier save are recovered or removed first (with a message).
    """
    target = Path(directory)
    unknown = sorted(set(files or {}) - OPTIONAL_FILES)
    if unknown:
        raise ValueError(
            f"write_checkpoint: files={unknown} are not files a checkpoint holds ({sorted(OPTIONAL_FILES)})"
        )
    with directory_written_atomically(
        target, overwrite=overwrite, ours=_is_ours, complete=_is_complete, what="a dmquant checkpoint"
    ) as staging:
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"format": "dmquant"})
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "sha256": sha256(staging / TENSORS_FILE),
            "tensors_bytes": (staging / TENSORS_FILE).stat().st_size,
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
    return target


def _regular_file(path: Path, max_bytes: int | None = None) -> int:
    """The size of ``path``, which must be a regular file (not a device, pipe or directory) of at most ``max_bytes``."""
    try:
        status = path.stat()
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror})") from None
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    if max_bytes is not None and status.st_size > max_bytes:
        raise CheckpointError(f"{path}: {status.st_size} bytes, more than a manifest can be ({max_bytes})")
    return status.st_size


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: manifest valid (:mod:`dmquant.manifest`), tensor file intact (checksum)."""
    directory = Path(directory)
    recover_when_free(directory, ours=_is_ours, complete=_is_complete)
    manifest_path, tensors_path = directory / MANIFEST_FILE, directory / TENSORS_FILE
    if not manifest_path.exists() or not tensors_path.exists():
        raise CheckpointError(f"{directory}: not a dmquant checkpoint (needs {MANIFEST_FILE} and {TENSORS_FILE})")
    _regular_file(manifest_path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{manifest_path}: invalid JSON ({str(error)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{directory}: checkpoint format {version!r}, this dmquant reads {FORMAT_VERSION}")
    manifest = validate_manifest(manifest, _regular_file(tensors_path))
    if sha256(tensors_path) != manifest["sha256"]:
        raise CheckpointError(f"{tensors_path}: checksum mismatch — the file is truncated or was modified")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{tensors_path}: unreadable ({error})") from None
    return tensors, manifest
