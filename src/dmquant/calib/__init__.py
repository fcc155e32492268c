"""Calibration data for post-training quantization, recorded from the FP model's own sampling."""

from dmquant.calib.record import CalibrationSet, record_calibration
from dmquant.calib.strategies import (
    TIMESTEP_STRATEGIES,
    PerTrajectorySteps,
    TimestepStrategy,
    get_strategy,
    ndtc,
    uniform,
)

__all__ = [
    "TIMESTEP_STRATEGIES",
    "CalibrationSet",
    "PerTrajectorySteps",
    "TimestepStrategy",
    "get_strategy",
    "ndtc",
    "record_calibration",
    "uniform",
]
