"""PTQD's corrected sampler step: correlated-noise correction, bias correction, variance-schedule calibration.

With the per-step statistics of :mod:`dmquant.correct.statistics` (``ε_q = (1 + k_t) ε_fp + b_t + Δ''``,
``Δ''`` of standard deviation ``σ_res(t)``), PTQD (He et al. 2023, Sec. 4.1-4.2) corrects each step:

- **CNC** (correlated-noise correction, eq. 9): divide out the correlated part,
  ``ε̃ = ε_q / (1 + k_t)``; the residual noise left in ``ε̃`` then has standard deviation
  ``σ_q(t) = σ_res(t) / (1 + k_t)``;
- **BC** (bias correction, eq. 13): subtract the residual's mean per channel first,
  ``ε̃ = (ε_q − b_t) / (1 + k_t)``;
- **VSC** (variance-schedule calibration, eqs. 11-12): the residual enters ``x_{t-1}`` as
  ``c_t · Δ''`` (``c_t`` from :func:`dmquant.step_coefficients.eps_coefficient`), adding variance
  ``c_t² σ_q²`` on top of the sampler's own ``σ_t²``; the injected noise is lowered to
  ``σ'_t² = σ_t² − c_t² σ_q²`` so the total stays ``σ_t²`` — set to 0 where that is negative
  (the residual alone then exceeds the sampler's noise; nothing is left to take away).

The same rule holds for DDPM: its step is also ``a_t x_t + c_t ε + σ_t z`` (see
:mod:`dmquant.step_coefficients`), so replacing ``ε`` by ``ε + Δ''`` adds ``c_t² σ_q²`` to the
variance of ``x_{t-1}`` given ``x_t`` and ``σ'_t² = σ_t² − c_t² σ_q²`` keeps it. With deterministic
DDIM (η = 0) ``σ_t = 0``: VSC has nothing to absorb into and leaves the step alone.

On the step itself: VSC changes only the noise the sampler injects (:meth:`NoiseCorrection.noise_scale`);
the direction term of a DDIM step, ``sqrt(1 − ᾱ_{t−1} − σ_t²) · ε``, keeps the sampler's ``σ_t``.
PTQD's reference code (``ldm/models/diffusion/ddim.py``) puts ``σ'_t`` there too. We do not, on
purpose: the variance budget ``c_t² σ_q²`` is worked out with the coefficient ``c_t`` of the step
at ``σ_t`` (the reference's own correction term is computed that way too), and putting ``σ'_t``
into the direction term changes ``c_t`` and the mean of ``x_{t−1}`` — the step becomes DDIM at a
smaller η rather than the asked sampler with its noise budget met. At ``σ'_t / σ_t = 0.6`` and
η = 1 (50 DDIM steps of the linear schedule) the two steps' ``x_{t−1}`` differ by about 10 % of
its RMS at the early steps, 3 % at the late ones. Keeping ``σ_t`` also makes the same rule hold
for DDPM, whose step has no direction term to change.

On ``k_t``: PTQD's reference code clips it at 0, discarding a negative correlation. Here a
negative ``k_t`` (the quantized estimate shrunk towards zero, as clipped activation ranges do)
is corrected like a positive one — it is measured the same way and dividing by ``1 + k_t < 1``
undoes it — but ``k_t`` is held at or above :data:`MIN_CORRELATION`, so that a badly broken
model cannot make the correction divide by (nearly) zero and blow the estimate up.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from ..errors import CalibrationError
from ..sampling import StepContext, StepHook
from ..step_coefficients import eps_coefficient, noise_std
from .statistics import NoiseStatistics

logger = logging.getLogger(__name__)

#: Lowest ``k_t`` used: the correction divides by at most ``1 / (1 + MIN_CORRELATION) = 2``.
MIN_CORRELATION = -0.5


class NoiseCorrection(StepHook):
    """Applies PTQD's corrections during sampling; each one can be switched off for ablations.

    Args:
        statistics: measured for this quantized model with the sampler and number of steps
            used now (the trajectory length and timesteps must match).
        correlation, bias, variance: CNC, BC and VSC (VSC reads the run's sampler and η from
            each step's context).
    """

    def __init__(
        self,
        statistics: NoiseStatistics,
        *,
        correlation: bool = True,
        bias: bool = True,
        variance: bool = True,
    ):
        self.statistics = statistics
        self.correlation = correlation
        self.bias = bias
        self.variance = variance

    def _k(self, step: int) -> float:
        return max(self.statistics.correlation[step], MIN_CORRELATION) if self.correlation else 0.0

    def begin_step(self, ctx: StepContext) -> None:
        stats = self.statistics
        if ctx.num_steps != stats.num_inference_steps or int(ctx.timestep) != stats.timesteps[ctx.step_index]:
            raise CalibrationError(
                f"the noise statistics were measured on {stats.num_inference_steps} steps "
                f"(timesteps {stats.timesteps[:3]}...), this run samples {ctx.num_steps} steps at timestep "
                f"{int(ctx.timestep)} for step {ctx.step_index}: measure them for this sampler"
            )

    def noise_estimate(self, ctx: StepContext, eps: Tensor) -> Tensor:
        step = ctx.step_index
        if self.bias:
            bias = torch.as_tensor(self.statistics.bias[step], dtype=eps.dtype, device=eps.device)
            eps = eps - bias.reshape(1, -1, *([1] * (eps.ndim - 2)))
        return eps / (1.0 + self._k(step))

    def residual_std(self, step: int) -> float:
        """``σ_q(t)``: the standard deviation of the noise left in the corrected estimate."""
        return self.statistics.residual_std[step] / (1.0 + self._k(step))

    def noise_scale(self, ctx: StepContext) -> float:
        if not self.variance:
            return 1.0
        sigma = noise_std(ctx.scheduler, int(ctx.timestep), ctx.eta)
        if sigma == 0.0:
            if ctx.step_index == 0:
                logger.info(
                    "PTQD variance-schedule calibration: this sampler injects no noise (deterministic DDIM, "
                    "eta = 0), so there is none to absorb the residual quantization noise into; VSC does nothing"
                )
            return 1.0
        added = eps_coefficient(ctx.scheduler, int(ctx.timestep), ctx.eta) * self.residual_std(ctx.step_index)
        return math.sqrt(max(sigma * sigma - added * added, 0.0)) / sigma
