"""Calibration data for post-training quantization, recorded from the FP model's own sampling."""

from dmquant.calib.record import CalibrationSet, record_calibration
from dmquant.calib.strategies import (
    TIMESTEP_STRATEGIES,
    PerTrajectorySteps,
    TimestepStrategy,
    get_strategy,
    ndtc,
    single_step,
    uniform,
)
from dmquant.calib.tdac import FeatureAllocatedSteps, tdac

__all__ = [
    "TIMESTEP_STRATEGIES",
    "CalibrationSet",
    "FeatureAllocatedSteps",
    "PerTrajectorySteps",
    "TimestepStrategy",
    "get_strategy",
    "ndtc",
    "record_calibration",
    "single_step",
    "tdac",
    "uniform",
]
