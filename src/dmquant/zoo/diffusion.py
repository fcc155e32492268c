"""The training objective every zoo diffusion model shares: DDPM's ε-prediction loss with dropped conditions.

DDPM's simple loss ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, c)‖² (Ho et al. 2020, eq. 14), with the
condition ``c`` replaced by its null value (null class, empty prompt) with probability
:data:`CONDITION_DROPOUT`, so one network also learns the unconditional model that classifier-free
guidance needs (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

#: Training steps of every zoo noise schedule.
NUM_TRAIN_TIMESTEPS = 1000
#: Fraction of training conditions replaced by the null condition, for classifier-free guidance.
CONDITION_DROPOUT = 0.1


def dropped_conditions(count: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``(count,)`` booleans: which samples of a batch train the unconditional model."""
    return torch.rand(count, generator=generator, device=device) < CONDITION_DROPOUT


def epsilon_loss(
    predict: Callable[[Tensor, Tensor], Tensor], x0: Tensor, scheduler: DDPMScheduler, generator: torch.Generator
) -> Tensor:
    """DDPM's simple loss of ``predict(x_t, t) -> ε̂`` on clean data ``x0`` (t uniform over the schedule)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(predict(x_t, t).float(), noise)
