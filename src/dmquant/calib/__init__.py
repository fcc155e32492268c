"""Calibration data for post-training quantization, recorded from the FP model's own sampling."""

from dmquant.calib.record import CalibrationSet, record_calibration
from dmquant.calib.strategies import TIMESTEP_STRATEGIES, TimestepStrategy, get_strategy, uniform

__all__ = [
    "TIMESTEP_STRATEGIES",
    "CalibrationSet",
    "TimestepStrategy",
    "get_strategy",
    "record_calibration",
    "uniform",
]
