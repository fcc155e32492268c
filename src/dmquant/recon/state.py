"""The on-disk progress of a model reconstruction, so that a killed run resumes where it stopped.

A state directory holds ``progress.json`` (a fingerprint of what is being reconstructed and one
record per finished unit) and, per finished unit, ``<pass>-<index>.safetensors`` with the unit's
whole state dict after its reconstruction (hardened weights, quantizer ranges). Every file is
written atomically, the unit's tensors before its record, so a record always has its tensors,
and the record keeps the SHA-256 of the tensors, so a damaged unit is refused, not restored.
A directory whose fingerprint differs (another model, recipe or calibration set), or that holds
anything but this progress, is refused rather than silently mixed in; :func:`remove_state`
removes only the files the progress lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..atomic import write_atomically
from ..errors import CalibrationError
from ..tensor_files import write_tensors

logger = logging.getLogger(__name__)

#: ``progress.json["format"]``.
STATE_FORMAT = "dmquant.reconstruction/2"
_PROGRESS = "progress.json"


def fingerprint(settings: Mapping[str, Any], tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of ``settings`` (as sorted JSON) and of every named tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_progress(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The progress saved in ``directory``: ``None`` if there is none (no or an empty directory).

    Anything else (files without a readable ``progress.json`` of this format) is not dmquant's
    progress, and a CalibrationError: it is neither resumed from nor removed.
    """
    directory = Path(directory)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return None
    progress = directory / _PROGRESS
    if not directory.is_dir() or not progress.is_file():
        raise CalibrationError(
            f"{directory} is not the reconstruction progress dmquant keeps (no {_PROGRESS}); "
            "choose another state directory"
        )
    try:
        data = json.loads(progress.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise CalibrationError(f"{progress} is unreadable ({error}); remove the directory to start over") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise CalibrationError(f"{progress} is not the reconstruction progress of this dmquant ({STATE_FORMAT})")
    units, checksums = data.get("units"), data.get("checksums")
    if not isinstance(units, dict) or not isinstance(checksums, dict) or set(units) != set(checksums):
        raise CalibrationError(f"{progress}: malformed (units and checksums must name the same units)")
    return data


def remove_state(directory: str | os.PathLike[str]) -> None:
    """Remove the progress in ``directory``: the unit files it lists, itself, then the directory if empty."""
    directory = Path(directory)
    data = read_progress(directory)
    if data is None:
        return
    for unit_id in data["checksums"]:
        (directory / f"{unit_id}.safetensors").unlink(missing_ok=True)
    (directory / _PROGRESS).unlink()
    try:
        directory.rmdir()
    except OSError:
        logger.warning("%s: kept: it holds files the reconstruction did not write", directory)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ReconstructionState:
    """Finished units of one reconstruction, kept in ``directory`` (``None``: in memory only)."""

    def __init__(self, directory: str | os.PathLike[str] | None, key: str):
        self.directory = None if directory is None else Path(directory)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        self.checksums: dict[str, str] = {}
        data = None if self.directory is None else read_progress(self.directory)
        if data is None:
            return
        if data.get("key") != key:
            raise CalibrationError(
                f"{self.directory} holds the progress of another reconstruction (different model, recipe or "
                "calibration data); remove it or choose another state directory"
            )
        self.records, self.checksums = dict(data["units"]), dict(data["checksums"])

    @staticmethod
    def unit_id(pass_name: str, index: int) -> str:
        return f"{pass_name}-{index:03d}"

    def done(self, unit_id: str) -> dict[str, Any] | None:
        """The record of a finished unit, or ``None``."""
        return self.records.get(unit_id)

    def restore(self, unit_id: str, module: nn.Module) -> None:
        """Load the saved state of a finished unit into ``module``, after checking its checksum."""
        assert self.directory is not None, "an in-memory state has nothing to restore"
        path = self.directory / f"{unit_id}.safetensors"
        try:
            if _file_sha256(path) != self.checksums[unit_id]:
                raise CalibrationError(
                    f"{path}: checksum mismatch, the saved unit was damaged; remove {self.directory}"
                )
            tensors = load_file(path, device=str(next(module.parameters()).device))
            module.load_state_dict(tensors)
        except (FileNotFoundError, SafetensorError, OSError, RuntimeError) as error:
            raise CalibrationError(f"{path}: the saved unit is unreadable ({error}); remove {self.directory}") from None

    def finish(self, unit_id: str, module: nn.Module, record: dict[str, Any]) -> None:
        """Record a finished unit: its state dict, then its record with the state's checksum."""
        self.records[unit_id] = record
        if self.directory is None:
            return
        data = write_tensors(self.directory / f"{unit_id}.safetensors", module.state_dict())
        self.checksums[unit_id] = hashlib.sha256(data).hexdigest()
        progress = {"format": STATE_FORMAT, "key": self.key, "units": self.records, "checksums": self.checksums}
        text = json.dumps(progress, indent=1).encode()
        write_atomically(self.directory / _PROGRESS, lambda file: file.write(text))
