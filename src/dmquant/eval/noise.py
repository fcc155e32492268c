"""Error of a quantized model's noise estimate along the full-precision model's trajectories.

At every step the quantized model is run on exactly the inputs the FP model sees, so the error
measured is that of one step, not accumulated drift: the per-step signal-to-quantization-noise
ratio that the efficient-LDM study (Yang et al. 2023, "Efficient Quantization Strategies for
Latent Diffusion Models") uses to find sensitive steps and blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dmquant.denoiser import Denoiser, as_denoiser
from dmquant.sampling import Conditioning, StepContext, StepHook, guided_noise_estimate, sample


def mse(reference: Tensor, test: Tensor) -> float:
    """Mean squared error ``mean((reference - test)^2)``, computed in float64."""
    return torch.mean((reference.double() - test.double()) ** 2).item()


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||reference||^2 / ||reference - test||^2)`` in dB.

    Pooled over all elements (the whole batch); ``inf`` when ``test`` equals ``reference``.
    """
    signal = torch.sum(reference.double() ** 2).item()
    noise = torch.sum((reference.double() - test.double()) ** 2).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


class SideBySide(StepHook):
    """Runs a second denoiser on exactly the inputs of each step of a trajectory and reports both estimates.

    At every step ``test_hooks`` see the step (``begin_step``) and the test estimate
    (``noise_estimate``, e.g. a noise correction) before ``on_step(ctx, eps, eps_test)`` is
    called with the driving model's guided estimate and the test model's. The trajectory itself
    is the driving model's: the hook returns ``eps`` unchanged.
    """

    def __init__(
        self,
        test: Denoiser,
        on_step: Callable[[StepContext, Tensor, Tensor], None],
        test_hooks: Sequence[StepHook] = (),
    ):
        self.test = test
        self.on_step = on_step
        self.test_hooks = list(test_hooks)

    def noise_estimate(self, ctx: StepContext, eps: Tensor) -> Tensor:
        for hook in self.test_hooks:
            hook.begin_step(ctx)
        eps_test = guided_noise_estimate(
            self.test, ctx.model_input, ctx.model_timestep, ctx.model_cond, ctx.guidance_scale
        )
        for hook in self.test_hooks:
            eps_test = hook.noise_estimate(ctx, eps_test)
        self.on_step(ctx, eps, eps_test)
        return eps


def noise_estimate_error(
    fp_model: nn.Module | Denoiser,
    q_model: nn.Module | Denoiser,
    scheduler: Any,
    *,
    num_inference_steps: int,
    batch_size: int,
    conditioning: Conditioning | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    test_hooks: Sequence[StepHook] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Per-step error of ``q_model``'s noise estimate against ``fp_model``'s on the FP trajectories.

    ``batch_size`` trajectories are sampled with ``fp_model``; at every step ``q_model`` gets
    the same model inputs (guidance included) and the guided noise estimates are compared.
    ``test_hooks`` are ``q_model``'s sampling hooks (per-step activation parameters, a noise
    correction): they see each step and ``q_model``'s estimate, as when sampling with it.

    Returns:
        One dict per step, in sampling order: ``step_index``, ``timestep``, ``mse`` and
        ``sqnr_db`` (pooled over the batch; ``inf`` where the estimates agree exactly).
    """
    rows: list[dict[str, Any]] = []

    def record(ctx: StepContext, eps: Tensor, eps_test: Tensor) -> None:
        rows.append(
            {
                "step_index": ctx.step_index,
                "timestep": ctx.timestep.item(),
                "mse": mse(eps, eps_test),
                "sqnr_db": sqnr_db(eps, eps_test),
            }
        )

    comparison = SideBySide(as_denoiser(q_model), record, test_hooks)
    sample(
        fp_model,
        scheduler,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        conditioning=conditioning,
        generator=generator,
        eta=eta,
        hooks=[comparison],
        progress=progress,
    )
    return rows
