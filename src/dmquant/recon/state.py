"""The on-disk progress of a model reconstruction, so that a killed run resumes where it stopped.

A state directory holds ``progress.json`` (a fingerprint of what is being reconstructed and one
record per finished unit) and, per finished unit, ``<pass>-<index>.safetensors`` with the unit's
whole state dict after its reconstruction (hardened weights, quantizer ranges). Every file is
written atomically, the unit's tensors before its record, so a record always has its tensors.
A directory whose fingerprint differs (another model, recipe or calibration set) is refused
rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..atomic import write_atomically
from ..errors import CalibrationError

#: ``progress.json["format"]``.
STATE_FORMAT = "dmquant.reconstruction/1"
_PROGRESS = "progress.json"


def fingerprint(settings: Mapping[str, Any], tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of ``settings`` (as sorted JSON) and of every named tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ReconstructionState:
    """Finished units of one reconstruction, kept in ``directory`` (``None``: in memory only)."""

    def __init__(self, directory: str | os.PathLike[str] | None, key: str):
        self.directory = None if directory is None else Path(directory)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        if self.directory is None:
            return
        progress = self.directory / _PROGRESS
        if not progress.exists():
            return
        try:
            data = json.loads(progress.read_text())
        except (OSError, ValueError) as error:
            raise CalibrationError(f"{progress} is unreadable ({error}); remove the directory to start over") from None
        if data.get("format") != STATE_FORMAT or data.get("key") != key:
            raise CalibrationError(
                f"{self.directory} holds the progress of another reconstruction (different model, recipe or "
                "calibration data); remove it or choose another state directory"
            )
        self.records = dict(data.get("units", {}))

    @staticmethod
    def unit_id(pass_name: str, index: int) -> str:
        return f"{pass_name}-{index:03d}"

    def done(self, unit_id: str) -> dict[str, Any] | None:
        """The record of a finished unit, or ``None``."""
        return self.records.get(unit_id)

    def restore(self, unit_id: str, module: nn.Module) -> None:
        """Load the saved state of a finished unit into ``module``."""
        assert self.directory is not None, "an in-memory state has nothing to restore"
        path = self.directory / f"{unit_id}.safetensors"
        try:
            tensors = load_file(path, device=str(next(module.parameters()).device))
        except (FileNotFoundError, SafetensorError, OSError) as error:
            raise CalibrationError(f"{path}: the saved unit is unreadable ({error}); remove {self.directory}") from None
        module.load_state_dict(tensors)

    def finish(self, unit_id: str, module: nn.Module, record: dict[str, Any]) -> None:
        """Record a finished unit: its state dict, then its record."""
        self.records[unit_id] = record
        if self.directory is None:
            return
        tensors = {name: value.detach().cpu().contiguous() for name, value in module.state_dict().items()}
        write_atomically(self.directory / f"{unit_id}.safetensors", lambda file: file.write(save(tensors)))
        progress = {"format": STATE_FORMAT, "key": self.key, "units": self.records}
        text = json.dumps(progress, indent=1).encode()
        write_atomically(self.directory / _PROGRESS, lambda file: file.write(text))
