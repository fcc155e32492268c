"""A diffusers scheduler that runs dmquant's step hooks inside a pipeline's own loop.

Per-step parts of a quantized model (per-step activation ranges, a step-aware bit schedule, PTQD's noise
corrections) need to know the sampling step. dmquant's own loop (:mod:`dmquant.sampling`) tells them through
step hooks; inside ``pipe(...)`` a :class:`HookedScheduler` does, from the scheduler calls every diffusers
pipeline makes: ``set_timesteps`` starts a trajectory, ``step`` ends a step (and takes the noise estimate the
corrections adjust).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .sampling import StepContext, StepHook, _step_with_scaled_noise


class HookedScheduler:
    """A diffusers scheduler that runs dmquant's step hooks inside a pipeline's own loop.

    It stands in for ``scheduler`` (every other attribute is the wrapped scheduler's, and ``step`` /
    ``set_timesteps`` keep its signature, so a pipeline passes them ``eta`` and ``generator`` as it would).
    ``set_timesteps`` starts a trajectory at step 0 (``begin_step``); ``step`` hands the noise estimate to
    ``noise_estimate``, scales the injected noise by ``noise_scale``, calls ``end_step`` and begins the next
    step. Pipelines do not expose what the model is fed, so the contexts carry the scheduler's sample and
    timestep there and no conditioning: recording hooks belong to dmquant's own loop.
    """

    def __init__(self, scheduler: Any, hooks: Sequence[StepHook]):
        self.__dict__.update(scheduler=scheduler, hooks=list(hooks), step_index_=0)

    @property
    def set_timesteps(self) -> Callable[..., Any]:
        """The scheduler's ``set_timesteps`` (its signature kept), then step 0 begins."""
        return functools.update_wrapper(
            functools.partial(HookedScheduler._set_timesteps, self), self.scheduler.set_timesteps
        )

    @property
    def step(self) -> Callable[..., Any]:
        """The scheduler's ``step`` (its signature kept, so pipelines pass ``eta`` and ``generator``), hooked."""
        return functools.update_wrapper(functools.partial(HookedScheduler._step, self), self.scheduler.step)

    def _set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        result = self.scheduler.set_timesteps(*args, **kwargs)
        self.__dict__["step_index_"] = 0
        self._begin(None, 0.0)
        return result

    def __getattr__(self, name: str) -> Any:
        if "scheduler" not in self.__dict__:  # a copy being built (copy.deepcopy) has no state yet
            raise AttributeError(name)
        return getattr(self.__dict__["scheduler"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.scheduler, name, value)

    def _context(self, sample: torch.Tensor | None, eta: float) -> StepContext:
        timesteps = self.scheduler.timesteps
        timestep = timesteps[self.step_index_]
        return StepContext(
            step_index=self.step_index_,
            num_steps=len(timesteps),
            timestep=timestep,
            sample=sample,
            model_input=sample,
            model_timestep=timestep,
            model_cond={},
            guidance_scale=1.0,
            scheduler=self.scheduler,
            eta=eta,
        )

    def _begin(self, sample: torch.Tensor | None, eta: float) -> None:
        ctx = self._context(sample, eta)
        for hook in self.hooks:
            hook.begin_step(ctx)

    def _step(self, eps: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        eta = float(kwargs.get("eta", 0.0))
        ctx = self._context(sample, eta)
        for hook in self.hooks:
            eps = hook.noise_estimate(ctx, eps)
        scale = math.prod(hook.noise_scale(ctx) for hook in self.hooks)
        if scale == 1.0:
            output = self.scheduler.step(eps, timestep, sample, *args, **kwargs)
            prev = output[0] if isinstance(output, tuple) else output.prev_sample
        else:
            return_dict = kwargs.pop("return_dict", True)
            prev = _step_with_scaled_noise(
                self.scheduler, eps, timestep, sample, scale, kwargs.get("generator"), kwargs
            )
            output = SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
        for hook in self.hooks:
            hook.end_step(ctx, prev)
        self.__dict__["step_index_"] += 1
        if self.step_index_ < len(self.scheduler.timesteps):
            self._begin(prev, eta)
        return output


def plain_scheduler(scheduler: Any) -> Any:
    """The diffusers scheduler itself, out of a :class:`HookedScheduler` if it is in one."""
    return scheduler.scheduler if isinstance(scheduler, HookedScheduler) else scheduler
