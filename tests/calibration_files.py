"""A calibration set (:class:`dmquant.calib.record.CalibrationSet`) as one safetensors file, for the tests."""

from __future__ import annotations

import os

from safetensors import SafetensorError, safe_open

from dmquant.calib.record import CalibrationSet
from dmquant.errors import CalibrationError
from dmquant.tensor_files import write_tensors

#: ``metadata["format"]`` of a saved calibration set.
CALIBRATION_FORMAT = "dmquant.calibration/1"
_FIELDS = ("samples", "timesteps", "step_indices")


def save_calibration(calibration: CalibrationSet, path: str | os.PathLike[str]) -> None:
    """Write the set to one safetensors file, atomically (a temporary file renamed into place)."""
    metadata = {"format": CALIBRATION_FORMAT, "num_inference_steps": str(calibration.num_inference_steps)}
    write_tensors(path, calibration.named_tensors(), metadata=metadata)


def load_calibration(path: str | os.PathLike[str]) -> CalibrationSet:
    """Read a set written by :func:`save_calibration`."""
    try:
        with safe_open(os.fspath(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise CalibrationError(f"{path} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(
            f"{path} is not a dmquant calibration set (format {metadata.get('format')!r}, "
            f"expected {CALIBRATION_FORMAT!r})"
        )
    missing = [name for name in _FIELDS if name not in tensors]
    if missing or not metadata.get("num_inference_steps", "").isdigit():
        raise CalibrationError(f"{path} is incomplete: missing {missing or ['num_inference_steps']}")
    return CalibrationSet.from_named_tensors(tensors, int(metadata["num_inference_steps"]))
