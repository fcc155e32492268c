"""Which steps of the sampling trajectory calibration data is taken from.

A timestep-selection strategy is a plain function ``(num_steps: int) -> list[int]`` that maps
the length of the sampling trajectory (``len(scheduler.timesteps)``) to the step indices to
record, 0 being the first (noisiest) step. Strategies are built by factories registered in
:data:`TIMESTEP_STRATEGIES`, so that a recipe can name one with its options
(:func:`get_strategy`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from dmquant.errors import ConfigError

#: ``(num_steps) -> step indices``: the calibration timestep-selection seam.
TimestepStrategy = Callable[[int], list[int]]


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


#: Registered timestep-selection strategies: name -> factory taking the strategy's options.
TIMESTEP_STRATEGIES: dict[str, Callable[..., TimestepStrategy]] = {
    "uniform": uniform,
}


def get_strategy(name: str, **options: object) -> TimestepStrategy:
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
