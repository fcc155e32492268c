"""The on-disk format of a quantized model: safetensors + a JSON manifest, written atomically.

A checkpoint directory holds

* ``quantized_model.safetensors`` — every quantized weight as its integer codes (bit-packed
  below 8 bits; FP8 as float8 tensors, FP4 as packed e2m1 codes) instead of the FP tensor,
  the quantizers' scales and zero points, and every other parameter/buffer in its FP dtype;
* ``dmquant.json`` — format version, dmquant version, the base architecture (class and
  diffusers config), the recipe, the shortcut splits, the layer report, the per-weight code
  layout, and the SHA-256 of the tensor file.

Nothing is pickled. A write goes to a temporary sibling directory renamed into place at the
end, so an interrupted save leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .core.layers import QUANT_LAYERS
from .core.packing import decode_e2m1, encode_e2m1, pack_codes, unpack_codes
from .core.primitives import FP4_E2M1, IntFormat, QFormat
from .core.quantizer import Quantizer
from .errors import CheckpointError

FORMAT_VERSION = 1
TENSORS_FILE = "quantized_model.safetensors"
MANIFEST_FILE = "dmquant.json"
CODES_SUFFIX = ".codes"


def _encode(codes: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    if isinstance(fmt, IntFormat):
        return pack_codes(codes, fmt.bits, fmt.qmin)
    if fmt == FP4_E2M1:
        return pack_codes(encode_e2m1(codes).to(torch.int32), 4, 0)
    return codes.to(torch.float8_e4m3fn if fmt.name == "fp8_e4m3" else torch.float8_e5m2)


def _decode(stored: torch.Tensor, fmt: QFormat, shape: list[int]) -> torch.Tensor:
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
    """Write the dequantized codes back into the weights (scales must already be loaded)."""
    entries = {codes_key: (key, quantizer) for key, codes_key, quantizer, _, _ in _weight_code_entries(model)}
    if set(entries) != set(layout):
        raise CheckpointError("the checkpoint's quantized weights do not match the model's quantized layers")
    with torch.no_grad():
        for codes_key, entry in layout.items():
            key, quantizer = entries[codes_key]
            shape = torch.Size(entry["shape"])
            try:
                codes = _decode(tensors[codes_key], quantizer.fmt, list(shape))
            except (KeyError, ValueError, RuntimeError) as error:
                raise CheckpointError(f"{codes_key}: corrupt weight codes ({error})") from None
            start, stop = entry["channels"]
            weight = model.get_parameter(key)
            weight[:, start:stop].copy_(quantizer.decode(codes, shape).to(weight.dtype))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_target(directory: str | Path, *, overwrite: bool) -> Path:
    """Refuse an output path that exists, unless ``overwrite`` and it is an empty or checkpoint directory."""
    target = Path(directory)
    if not target.exists():
        return target
    if not overwrite:
        raise CheckpointError(f"{target} exists; choose another directory or pass overwrite=True (--overwrite)")
    if not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a checkpoint directory; it is left as it is")
    if any(target.iterdir()) and not (target / MANIFEST_FILE).exists():
        raise CheckpointError(f"{target} is a non-empty directory that holds no dmquant checkpoint; not overwriting it")
    return target


def write_checkpoint(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    *,
    overwrite: bool = False,
    files: dict[str, str] | None = None,
) -> Path:
    """Write tensors + manifest (and the text ``files``, by name) to ``directory`` atomically (temp dir + rename)."""
    target = check_target(directory, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"format": "dmquant"})
        manifest = {**manifest, "format_version": FORMAT_VERSION, "sha256": sha256(staging / TENSORS_FILE)}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: manifest present and valid, tensor file intact (checksum)."""
    directory = Path(directory)
    manifest_path, tensors_path = directory / MANIFEST_FILE, directory / TENSORS_FILE
    if not manifest_path.exists() or not tensors_path.exists():
        raise CheckpointError(f"{directory}: not a dmquant checkpoint (needs {MANIFEST_FILE} and {TENSORS_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path}: invalid JSON ({error})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {manifest.get('format_version')!r}, this dmquant reads {FORMAT_VERSION}"
        )
    if sha256(tensors_path) != manifest.get("sha256"):
        raise CheckpointError(f"{tensors_path}: checksum mismatch — the file is truncated or was modified")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{tensors_path}: unreadable ({error})") from None
    return tensors, manifest
