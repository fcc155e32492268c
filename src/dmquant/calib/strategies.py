"""Which steps of the sampling trajectory calibration data is taken from.

A strategy comes in one of two kinds:

- a plain function ``(num_steps: int) -> list[int]`` mapping the length of the sampling
  trajectory (``len(scheduler.timesteps)``) to the step indices at which *every* trajectory is
  recorded, 0 being the first (noisiest) step (Q-Diffusion's uniform selection);
- a :class:`PerTrajectorySteps`, which gives *each* trajectory one step of its own, drawn from a
  distribution over diffusion time (PTQ4DM's NDTC): one calibration row per trajectory.

Strategies are built by factories registered in :data:`TIMESTEP_STRATEGIES`, so that a recipe
can name one with its options (:func:`get_strategy`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dmquant.errors import ConfigError

#: ``(num_steps) -> step indices``: every trajectory is recorded at each of these steps.
TimestepStrategy = Callable[[int], list[int]]


@dataclass(frozen=True)
class PerTrajectorySteps:
    """A strategy that records each trajectory at one step of its own.

    ``assign(timesteps, num_train_timesteps, num_trajectories)`` returns, for trajectory
    ``j``, the index into ``timesteps`` (the sampler's timestep of each step, noisiest first)
    at which it is recorded.
    """

    name: str
    assign: Callable[[Tensor, int, int], list[int]]


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def uniform(count: int | None = None, every: int | None = None) -> TimestepStrategy:
    """Steps spaced uniformly over the trajectory, from the first one.

    Q-Diffusion's time step-aware calibration (Li et al. 2023, "Q-Diffusion: Quantizing Diffusion
    Models") draws calibration data at every ``(T / count)``-th step of the FP model's trajectory
    of ``T`` steps: the indices ``range(0, T, T // count)``, as in its reference implementation
    (so up to ``2 * count - 1`` steps when ``count`` does not divide ``T``).

    Args:
        count: number of steps aimed at; the stride is ``T // count`` (at least 1).
        every: a fixed stride instead. Neither given: every step.
    """
    _positive("count", count)
    _positive("every", every)
    if count is not None and every is not None:
        raise ConfigError("uniform takes count or every, not both")

    def steps(num_steps: int) -> list[int]:
        stride = every if every is not None else max(1, num_steps // (count or num_steps))
        return list(range(0, num_steps, stride))

    return steps


def single_step() -> TimestepStrategy:
    """Only the first step of the trajectory: the inputs at maximal diffusion noise.

    The efficient-LDM study (Yang et al. 2023, "Efficient Quantization Strategies for Latent
    Diffusion Models") calibrates at this one step, where the modules it finds sensitive are
    most robust to quantization because the diffusion noise dominates; it is also the cheapest
    calibration. To compare it with other strategies at an equal calibration size, record as
    many trajectories as they record rows.
    """

    def steps(num_steps: int) -> list[int]:
        return [0]

    return steps


def skew_normal(count: int, mean: float, std: float, skew: float, generator: torch.Generator) -> Tensor:
    """``count`` draws of the skew-normal with the given mean, standard deviation and shape ``skew``.

    Azzalini's representation: with ``δ = α / sqrt(1 + α²)`` and ``u, v ~ N(0, 1)`` independent,
    ``z = δ|u| + sqrt(1 - δ²) v`` is standard skew-normal with shape ``α``; its mean is
    ``δ sqrt(2/π)`` and variance ``1 - 2δ²/π``, so ``x = ξ + ω z`` with
    ``ω = std / sqrt(1 - 2δ²/π)`` and ``ξ = mean - ω δ sqrt(2/π)`` has the asked moments.
    ``skew = 0`` is the normal distribution.
    """
    delta = skew / math.sqrt(1.0 + skew * skew)
    u = torch.randn(count, generator=generator, dtype=torch.float64)
    v = torch.randn(count, generator=generator, dtype=torch.float64)
    z = delta * u.abs() + math.sqrt(1.0 - delta * delta) * v
    omega = std / math.sqrt(1.0 - 2.0 * delta * delta / math.pi)
    xi = mean - omega * delta * math.sqrt(2.0 / math.pi)
    return xi + omega * z


def nearest_steps(targets: Tensor, timesteps: Tensor) -> list[int]:
    """For each target timestep, the index of the sampler step whose timestep is nearest (first on ties)."""
    distance = (timesteps.double()[None, :] - targets.double()[:, None]).abs()
    return distance.argmin(dim=1).tolist()


def ndtc(mean: float = 0.4, std: float = 0.4, skew: float = 0.0, seed: int = 0) -> PerTrajectorySteps:
    """PTQ4DM's Normally Distributed Time-step Calibration (Shang et al. 2023, Sec. 4.3).

    Each calibration trajectory is recorded at one step whose *diffusion time* ``t / T`` is drawn
    from a skew-normal with the given mean, standard deviation and shape, truncated to ``[0, 1)``
    (draws outside are redrawn), and mapped to the sampler step with the nearest timestep. The
    recorded row carries the timestep the model was actually fed at that step.

    Defaults: mean 0.4 and std 0.4 (as fractions of ``T``) are the settings of PTQ4DM's released
    scripts, which draw a plain normal (``skew = 0``); the paper describes a skew-normal, so the
    shape is an option. Two deviations from that code
    (``improved-diffusion/scripts/quant_image_sample.py``), which implement its intent:

    - it scales the draw by the number of *respaced* steps, truncates it to an integer and uses
      that as a loop index of the sampler (so with 250 respaced steps out of 4000, "0.4" records
      the sample the 100th loop iteration yields, counted from the noisy end), while the model
      is then fed the index itself as the row's timestep; here the draw is a fraction of
      diffusion time mapped through the scheduler's timestep table, and the row carries the
      timestep its ``x_t`` belongs to;
    - it clamps the indices to ``[0, T − 1]``, so the tails of the normal pile up on the two end
      iterations: with mean 0.4 and std 0.4 about 22.5 % of the rows (``P(x < 0) ≈ 15.9 %``,
      ``P(x ≥ 1) ≈ 6.7 %``); here draws outside ``[0, 1)`` are redrawn, i.e. the distribution
      is truncated to the trajectory, so no step gets the tails' mass.

    Args:
        mean, std: of ``t / T`` before truncation; ``std > 0``.
        skew: skew-normal shape ``α`` (0: normal; negative leans towards small ``t``).
        seed: seed of the draws, so a recipe's calibration set is reproducible.
    """
    if not std > 0:
        raise ConfigError(f"std must be > 0, got {std!r}")
    if not math.isfinite(mean) or not math.isfinite(skew):
        raise ConfigError(f"mean and skew must be finite, got {mean!r} and {skew!r}")

    def assign(timesteps: Tensor, num_train_timesteps: int, num_trajectories: int) -> list[int]:
        mixed = int(np.random.SeedSequence([seed, num_trajectories]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(mixed)
        fractions: list[Tensor] = []
        kept = 0
        for _ in range(1000):
            draws = skew_normal(max(64, 2 * num_trajectories), mean, std, skew, generator)
            inside = draws[(draws >= 0) & (draws < 1)]
            fractions.append(inside)
            kept += inside.numel()
            if kept >= num_trajectories:
                break
        else:
            raise ConfigError(f"ndtc(mean={mean}, std={std}, skew={skew}) puts almost no mass on [0, 1)")
        targets = torch.cat(fractions)[:num_trajectories] * num_train_timesteps
        return nearest_steps(targets, timesteps)

    return PerTrajectorySteps("ndtc", assign)


#: Registered timestep-selection strategies: name -> factory taking the strategy's options.
TIMESTEP_STRATEGIES: dict[str, Callable[..., TimestepStrategy | PerTrajectorySteps]] = {
    "uniform": uniform,
    "ndtc": ndtc,
    "single_step": single_step,
}


def get_strategy(name: str, **options: object) -> TimestepStrategy | PerTrajectorySteps:
    """The strategy registered as ``name``, built with ``options`` (e.g. ``get_strategy("uniform", count=25)``)."""
    try:
        factory = TIMESTEP_STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown timestep strategy {name!r}; known: {', '.join(sorted(TIMESTEP_STRATEGIES))}"
        ) from None
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        known = ", ".join(inspect.signature(factory).parameters)
        raise ConfigError(f"bad options {sorted(options)} for timestep strategy {name!r} ({known}): {error}") from None
    return factory(**options)
