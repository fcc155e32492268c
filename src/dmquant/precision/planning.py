"""Planners: what a recipe leaves open, chosen from the measured noise of a range-calibrated probe.

Each quantizes the FP model at the recipe's precision with ranges only (:func:`dmquant.passes.range_calibrated`:
the other methods refine a precision, they do not change where it hurts), samples FP trajectories beside it,
and returns the choice :func:`dmquant.api.quantize` writes into the recipe before quantizing:

- :func:`plan_switch_step`: PTQD's switch of a step-aware bit schedule (He et al. 2023, Sec. 4.3);
- :func:`plan_smoothed_layers`: the layers the efficient-LDM study (Yang et al. 2023) smooths, those with the
  lowest SQNR on their own input (:mod:`dmquant.precision.sqnr`);
- hybrid precision's promotions are planned by :func:`dmquant.precision.hybrid.plan_hybrid`.
"""

from __future__ import annotations

import torch

from ..calib.record import CalibrationSet
from ..config import QuantConfig
from ..eval.noise import noise_estimate_error
from ..models import DiffusionModel
from ..passes import range_calibrated
from .sqnr import analyze_sensitivity
from .step_schedule import choose_switch_step

#: FP trajectories along which the SQNR that chooses the step-aware precision switch is measured.
SWITCH_TRAJECTORIES = 16


def plan_switch_step(
    model: DiffusionModel, config: QuantConfig, calibration: CalibrationSet, *, batch_size: int
) -> int:
    """PTQD's switch step: quantize at the early bits everywhere (ranges only, no reconstruction)
    and find where the per-step SQNR of the noise estimate drops below the threshold for good."""
    schedule = config.step_precision
    probe = range_calibrated(model.denoiser, config, calibration, batch_size=batch_size)
    rows = noise_estimate_error(
        model.denoiser,
        probe,
        model.scheduler,
        num_inference_steps=schedule.num_inference_steps,
        batch_size=SWITCH_TRAJECTORIES,
        conditioning=model.make_conditioning(SWITCH_TRAJECTORIES, guidance_scale=model.guidance_scale),
        generator=torch.Generator().manual_seed(config.calibration.seed),
        progress=False,
    )
    return choose_switch_step([row["sqnr_db"] for row in rows], schedule.snr_threshold_db)


def plan_smoothed_layers(
    model: DiffusionModel, config: QuantConfig, calibration: CalibrationSet, *, batch_size: int, progress: bool = True
) -> list[str]:
    """The ``config.smoothing.most_sensitive`` layers with the lowest SQNR on their own input
    (:func:`dmquant.precision.sqnr.analyze_sensitivity` of the recipe's ranges)."""
    smoothing = config.smoothing
    probe = range_calibrated(model.denoiser, config, calibration, batch_size=batch_size)
    sensitivity = analyze_sensitivity(
        model.denoiser,
        probe,
        model.scheduler,
        num_inference_steps=smoothing.num_inference_steps,
        conditioning=model.make_conditioning(smoothing.num_samples, guidance_scale=model.guidance_scale),
        generator=torch.Generator().manual_seed(config.calibration.seed),
        progress=progress,
    )
    return [name for name, _ in sensitivity.module_ranking()[: smoothing.most_sensitive]]
