"""How one DDIM or DDPM step depends on the noise estimate and how much noise it injects.

Both samplers, for ε-prediction, step as ``x_{t-1} = a_t · x_t + c_t · ε + σ_t · z`` with
``z ~ N(0, I)``. With ``ᾱ_t`` the cumulative product of alphas at this step's timestep and
``ᾱ_prev`` at the next one (the scheduler's final value after the last step):

- DDIM (Song et al. 2021, eq. 12): ``x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)`` and
  ``x_{t-1} = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev − σ_t²) ε + σ_t z`` with
  ``σ_t = η · sqrt((1 − ᾱ_prev) / (1 − ᾱ_t)) · sqrt(1 − ᾱ_t / ᾱ_prev)`` (eq. 16), so
  ``c_t = sqrt(1 − ᾱ_prev − σ_t²) − sqrt(ᾱ_prev) · sqrt(1 − ᾱ_t) / sqrt(ᾱ_t)``;
- DDPM (Ho et al. 2020, eqs. 6-7, ``fixed_small`` variance): with ``β_t = 1 − ᾱ_t / ᾱ_prev``,
  ``x_{t-1} = sqrt(ᾱ_prev) β_t / (1 − ᾱ_t) · x̂_0 + sqrt(1 − β_t)(1 − ᾱ_prev) / (1 − ᾱ_t) · x_t + σ_t z``,
  ``σ_t² = (1 − ᾱ_prev) / (1 − ᾱ_t) · β_t``, so ``c_t = −sqrt(ᾱ_prev) β_t / ((1 − ᾱ_t) sqrt(ᾱ_t)) · sqrt(1 − ᾱ_t)``.

These are the formulas diffusers' ``DDIMScheduler`` and ``DDPMScheduler`` implement (without
sample clipping or thresholding, which make the step non-linear in ε); the tests check them
against the schedulers themselves.
"""

from __future__ import annotations

import math
from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler

from .errors import ConfigError


def _alphas(scheduler: Any, timestep: int) -> tuple[float, float]:
    """``(ᾱ_t, ᾱ_prev)`` of the step at ``timestep`` of a scheduler whose timesteps are set."""
    alphas_cumprod = scheduler.alphas_cumprod
    if isinstance(scheduler, DDIMScheduler):
        previous = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        final = float(scheduler.final_alpha_cumprod)
    elif isinstance(scheduler, DDPMScheduler):
        previous = int(scheduler.previous_timestep(timestep))
        final = 1.0
    else:
        raise ConfigError(f"step coefficients are known for DDIM and DDPM schedulers, not {type(scheduler).__name__}")
    if scheduler.config.prediction_type != "epsilon":
        raise ConfigError(f"step coefficients assume ε-prediction, not {scheduler.config.prediction_type!r}")
    alpha_prev = float(alphas_cumprod[previous]) if previous >= 0 else final
    return float(alphas_cumprod[timestep]), alpha_prev


def noise_std(scheduler: Any, timestep: int, eta: float = 0.0) -> float:
    """``σ_t``: the standard deviation of the noise the step at ``timestep`` injects."""
    alpha, alpha_prev = _alphas(scheduler, int(timestep))
    beta = 1.0 - alpha / alpha_prev
    if isinstance(scheduler, DDIMScheduler):
        return eta * math.sqrt((1.0 - alpha_prev) / (1.0 - alpha) * beta)
    if scheduler.config.variance_type != "fixed_small":
        raise ConfigError(
            f"DDPM noise is known for variance_type 'fixed_small', not {scheduler.config.variance_type!r}"
        )
    if int(timestep) == 0:
        return 0.0
    return math.sqrt(max((1.0 - alpha_prev) / (1.0 - alpha) * beta, 1e-20))


def eps_coefficient(scheduler: Any, timestep: int, eta: float = 0.0) -> float:
    """``c_t``: how much ``x_{t-1}`` moves per unit of the noise estimate ε at ``timestep``."""
    alpha, alpha_prev = _alphas(scheduler, int(timestep))
    through_x0 = math.sqrt(alpha_prev) * math.sqrt(1.0 - alpha) / math.sqrt(alpha)
    if isinstance(scheduler, DDIMScheduler):
        sigma = noise_std(scheduler, timestep, eta)
        return math.sqrt(max(1.0 - alpha_prev - sigma * sigma, 0.0)) - through_x0
    beta = 1.0 - alpha / alpha_prev
    return -through_x0 * beta / (1.0 - alpha)
