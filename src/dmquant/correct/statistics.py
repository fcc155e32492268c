"""PTQD's statistics of the quantization noise in the noise estimate, per sampling step.

PTQD (He et al. 2023, "PTQD: Accurate Post-Training Quantization for Diffusion Models",
Sec. 4.1-4.2) writes the quantized model's noise estimate as

    ε_q = ε_fp + Δ,    Δ = k_t · ε_fp + Δ'

where ``k_t`` is the least-squares slope of the error ``Δ`` on ``ε_fp`` (the part of the error
correlated with the FP estimate) and ``Δ'`` the residual, uncorrelated with ``ε_fp``. The
residual has a mean ``b_t(c)`` per channel (a bias, removed by bias correction) and a standard
deviation ``σ_res(t)`` about it (absorbed by variance-schedule calibration). They are measured
by running the FP and the quantized model on the same ``x_t`` along FP trajectories, on the
estimate the sampler uses (classifier-free guidance already combined).

The model ``Δ = k_t ε_fp + b_t(c) + noise`` is a line with one slope and an intercept per
channel, fitted by least squares over all elements (samples, channels, positions)::

    k_t      = Σ_c Cov_c(Δ, ε_fp) / Σ_c Var_c(ε_fp)      (within-channel (co)variances, pooled)
    b_t(c)   = mean over samples and positions of channel c of (Δ − k_t ε_fp)
    σ_res(t) = sqrt(mean of (Δ − k_t ε_fp − b_t(c))²)

(a single global intercept would let channels whose FP estimate and bias both differ in mean
tilt the slope). Everything is accumulated as sums in float64, so any number of batches gives
the statistics of all the elements pooled.

Deviation from the reference code (ziplab/PTQD, ``quant_scripts/analyze_error.py``), on
purpose: there ``σ_res(t)`` is the average over samples of each sample's standard deviation of
``Δ − k_t ε_fp`` over its channels and positions. That standard deviation is taken about the
sample's overall mean, so it also counts the spread of the channel biases ``b_t(c)`` (and of
the sample means), which bias correction has already removed; and a mean of standard deviations
is not the standard deviation of the pooled elements. Here ``σ_res(t)`` is the pooled
root-mean-square about ``b_t(c)``: the spread of exactly the noise left after CNC and BC, which
is what variance-schedule calibration has to absorb (:mod:`dmquant.correct.step`). The two agree
when the channel biases are equal and every sample has the same spread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..denoiser import Denoiser
from ..errors import CalibrationError
from ..eval.noise import SideBySide
from ..sampling import Conditioning, StepContext, StepHook, sample

__all__ = ["ErrorMoments", "NoiseStatistics", "collect_noise_statistics"]


class ErrorMoments:
    """Running per-channel sums of one step's FP estimates ``f`` and errors ``d = ε_q − ε_fp``.

    Channels are on dim 1. Sums are float64 on the CPU, so batches can be added in any number.
    """

    _KEYS = ("f", "d", "ff", "fd", "dd")

    def __init__(self) -> None:
        self.per_channel_count = 0
        self.sums: dict[str, Tensor] | None = None

    def update(self, eps_fp: Tensor, eps_q: Tensor) -> None:
        if eps_fp.shape != eps_q.shape or eps_fp.ndim < 2:
            raise CalibrationError(f"noise estimates of shapes {tuple(eps_fp.shape)} and {tuple(eps_q.shape)}")
        f = eps_fp.detach().double()
        d = eps_q.detach().double() - f
        dims = [dim for dim in range(f.ndim) if dim != 1]
        terms = {"f": f, "d": d, "ff": f * f, "fd": f * d, "dd": d * d}
        batch = {key: terms[key].sum(dim=dims).cpu() for key in self._KEYS}
        self.sums = batch if self.sums is None else {key: self.sums[key] + batch[key] for key in self._KEYS}
        self.per_channel_count += f.numel() // f.shape[1]

    def solve(self) -> tuple[float, float, list[float]]:
        """``(k_t, σ_res(t), b_t(c))`` from the sums (see the module docstring)."""
        if self.sums is None:
            raise CalibrationError("no noise estimates were recorded at this step")
        n, s = self.per_channel_count, self.sums
        within_ff = float((s["ff"] - s["f"] ** 2 / n).sum())
        within_fd = float((s["fd"] - s["f"] * s["d"] / n).sum())
        k = within_fd / within_ff if within_ff > 0 else 0.0
        bias = (s["d"] - k * s["f"]) / n
        residual_square = float((s["dd"] - 2 * k * s["fd"] + k * k * s["ff"]).sum()) - n * float((bias * bias).sum())
        return k, math.sqrt(max(residual_square / (n * len(bias)), 0.0)), bias.tolist()


@dataclass(frozen=True)
class NoiseStatistics:
    """Per-step PTQD statistics of one quantized model on one sampler (step 0: noisiest).

    ``timesteps[i]``, ``correlation[i]`` (k_t), ``residual_std[i]`` (σ_res(t)) and ``bias[i]``
    (b_t(c), one value per channel of the noise estimate) describe step ``i`` of a trajectory of
    ``num_inference_steps`` steps; ``num_samples`` trajectories were measured.
    """

    num_inference_steps: int
    timesteps: list[int]
    correlation: list[float]
    residual_std: list[float]
    bias: list[list[float]]
    num_samples: int

    def __post_init__(self) -> None:
        lengths = {len(self.timesteps), len(self.correlation), len(self.residual_std), len(self.bias)}
        if lengths != {self.num_inference_steps}:
            raise CalibrationError(
                f"noise statistics for {self.num_inference_steps} steps hold per-step lists "
                f"of lengths {sorted(lengths)}"
            )
        numbers = [*self.correlation, *self.residual_std, *(value for channels in self.bias for value in channels)]
        if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in numbers):
            raise CalibrationError("noise statistics hold a value that is not a finite number")
        if not all(isinstance(value, int) for value in self.timesteps) or len({len(b) for b in self.bias}) > 1:
            raise CalibrationError("noise statistics need integer timesteps and one bias per channel at every step")

    def to_json(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self.num_inference_steps,
            "timesteps": list(self.timesteps),
            "correlation": list(self.correlation),
            "residual_std": list(self.residual_std),
            "bias": [list(b) for b in self.bias],
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NoiseStatistics:
        try:
            return cls(**{key: data[key] for key in cls.__dataclass_fields__})
        except (KeyError, TypeError) as error:
            raise CalibrationError(f"malformed noise statistics: {error!r}") from None


def collect_noise_statistics(
    fp_model: Any,
    quantized_model: Any,
    scheduler: Any,
    *,
    num_inference_steps: int,
    num_samples: int,
    conditioning: Callable[[int], Conditioning],
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    quantized_hooks: Sequence[StepHook] = (),
    progress: bool = True,
) -> NoiseStatistics:
    """Measure :class:`NoiseStatistics` along ``num_samples`` FP trajectories.

    The FP model drives the trajectories (so the statistics describe the error the quantized
    model makes on the inputs FP sampling visits); at every step the quantized model is run on
    exactly the FP model's input and both guided estimates are compared. ``conditioning(n)``
    gives the conditioning of a batch of ``n`` samples; ``quantized_hooks`` (e.g. a per-step
    range selector) see each step before the quantized model runs.
    """
    if num_samples < 1:
        raise CalibrationError("noise statistics need at least one sample")
    moments = [ErrorMoments() for _ in range(num_inference_steps)]
    timesteps = [0] * num_inference_steps

    def record(ctx: StepContext, eps: Tensor, eps_q: Tensor) -> None:
        moments[ctx.step_index].update(eps, eps_q)
        timesteps[ctx.step_index] = int(ctx.timestep)

    recorder = SideBySide(Denoiser(quantized_model), record, quantized_hooks)
    bar = tqdm(total=num_samples, desc="noise statistics", unit="sample", disable=not progress)
    for start in range(0, num_samples, batch_size):
        size = min(batch_size, num_samples - start)
        sample(
            fp_model,
            scheduler,
            batch_size=size,
            num_inference_steps=num_inference_steps,
            conditioning=conditioning(size),
            generator=generator,
            eta=eta,
            hooks=[recorder],
            progress=False,
        )
        bar.update(size)
    bar.close()
    solved = [step.solve() for step in moments]
    return NoiseStatistics(
        num_inference_steps=num_inference_steps,
        timesteps=timesteps,
        correlation=[k for k, _, _ in solved],
        residual_std=[s for _, s, _ in solved],
        bias=[b for _, _, b in solved],
        num_samples=num_samples,
    )
