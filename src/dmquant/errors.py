"""Exceptions dmquant raises at its boundaries, each with a message that names the cause."""


class DmquantError(Exception):
    """Base class: the CLI prints these as a one-line cause and exits non-zero."""


class ConfigError(DmquantError, ValueError):
    """A config or recipe has an unknown key or an impossible value."""


class CalibrationError(DmquantError, RuntimeError):
    """Calibration data is empty or produces non-finite activations."""


class CheckpointError(DmquantError, RuntimeError):
    """A quantized checkpoint is missing, truncated, tampered with or for another architecture."""


class ModelError(DmquantError, ValueError):
    """A model cannot be loaded or has nothing dmquant can quantize."""


class OutputError(DmquantError, OSError):
    """An output path cannot be written: it exists, lies below a file, is not writable or is being written."""
