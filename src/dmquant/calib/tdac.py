"""EDA-DM's temporal distribution alignment calibration (TDAC): calibration samples per step by
the density and diversity of the model's own features along the trajectory.

EDA-DM (Liu et al. 2024, "Enhanced Distribution Alignment for Post-Training Quantization of
Diffusion Models", Sec. 4.1) looks at one feature map ``F_t`` per sampling step along FP
trajectories and gives a step more calibration samples the more steps it is typical of
(*density*) and the more it differs from the others (*diversity*)::

    D_t = #{s ≠ t : mean((F_t − F_s)²) < r}                (steps within mean-squared distance r)
    V_t = Σ_{s ≠ t} (1 − cos(c_t, c_s))                   (c_t: the channel vector of F_t)
    w_t = D̂_t + λ · V̂_t                                   (^: min-max normalised over the steps)

and ``N`` calibration samples are allocated in proportion to ``w_t``, rounded so they sum to
exactly ``N`` (largest remainders). Here ``F_t`` is the input of a chosen layer (default: the
attention of the UNet's middle block, or the middle transformer block of a DiT) averaged over
a few probe trajectories, and each calibration trajectory is then recorded once at its allotted
step, as PTQ4DM's NDTC records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import as_denoiser
from ..errors import ConfigError
from ..sampling import Conditioning, sample
from .strategies import TIMESTEP_STRATEGIES, PerTrajectorySteps

#: Defaults: EDA-DM uses r = 3.0 or 0.3 depending on the model and λ ≈ 1.2.
DEFAULT_RADIUS = 3.0
DEFAULT_DIVERSITY_WEIGHT = 1.2


def density_and_diversity(features: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """``(D_t, V_t)`` of per-step features ``(T, C, ...)`` (see the module docstring)."""
    flat = features.flatten(1).double()
    distance = torch.cdist(flat, flat).pow(2) / flat.shape[1]  # mean squared distance
    others = ~torch.eye(len(flat), dtype=torch.bool)
    density = ((distance < radius) & others).sum(dim=1).double()
    channels = features.double().flatten(2).mean(dim=2) if features.ndim > 2 else features.double()
    cosine = nn.functional.cosine_similarity(channels[:, None, :], channels[None, :, :], dim=-1)
    diversity = ((1.0 - cosine) * others).sum(dim=1)
    return density, diversity


def min_max(values: Tensor) -> Tensor:
    """``(x − min) / (max − min)``; all zeros when every value is equal."""
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def allocate(weights: Sequence[float], total: int) -> list[int]:
    """``total`` samples in proportion to ``weights`` (largest remainders; equal shares if all are 0)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ConfigError(f"allocation weights must be finite and >= 0, got {list(weights)}")
    if w.sum() == 0:
        w = torch.ones_like(w)
    exact = w / w.sum() * total
    counts = exact.floor().long()
    remainders = (exact - counts).tolist()
    for index in sorted(range(len(w)), key=lambda i: (-remainders[i], i))[: total - int(counts.sum())]:
        counts[index] += 1
    return counts.tolist()


def default_feature_layer(model: nn.Module) -> str:
    """The middle block's attention of a UNet, else the middle transformer block of a DiT."""
    names = dict(model.named_modules())
    if "mid_block.attentions.0" in names:
        return "mid_block.attentions.0"
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return f"transformer_blocks.{len(blocks) // 2}"
    raise ConfigError(f"no default TDAC feature layer in a {type(model).__name__}: give one with layer=")


def step_features(
    model_or_denoiser: Any,
    scheduler: Any,
    *,
    num_inference_steps: int,
    layer: str | None,
    conditioning: Conditioning | None,
    batch_size: int,
    generator: torch.Generator | None,
    eta: float = 0.0,
) -> Tensor:
    """The input of ``layer`` at every step of ``batch_size`` FP trajectories, averaged over them: ``(T, ...)``."""
    denoiser = as_denoiser(model_or_denoiser)
    name = layer or default_feature_layer(denoiser.model)
    try:
        module = denoiser.model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"TDAC feature layer {name!r} is not in the {type(denoiser.model).__name__}") from None
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = args[0] if args else kwargs["hidden_states"]
        captured.append(inputs.detach().float().mean(dim=0).cpu())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample(
            denoiser,
            scheduler,
            batch_size=batch_size,
            num_inference_steps=num_inference_steps,
            conditioning=conditioning,
            generator=generator,
            eta=eta,
            progress=False,
        )
    finally:
        handle.remove()
    if len(captured) != num_inference_steps:
        raise ConfigError(f"TDAC feature layer {name!r} ran {len(captured)} times in {num_inference_steps} steps")
    return torch.stack(captured)


@dataclass(frozen=True)
class FeatureAllocatedSteps:
    """A strategy that probes the FP model first: :meth:`resolve` turns it into :class:`PerTrajectorySteps`.

    ``resolve(model, scheduler, num_inference_steps, conditioning, generator, eta)`` samples
    ``conditioning``'s trajectories (``probe_trajectories`` of them at most; as many when
    unconditional) to decide the steps.
    """

    name: str
    probe_trajectories: int
    resolve: Callable[..., PerTrajectorySteps]


def tdac(
    radius: float = DEFAULT_RADIUS,
    diversity_weight: float = DEFAULT_DIVERSITY_WEIGHT,
    layer: str | None = None,
    probe_trajectories: int = 8,
) -> FeatureAllocatedSteps:
    """EDA-DM's TDAC (see the module docstring): ``radius`` is r, ``diversity_weight`` λ."""
    if not radius > 0 or diversity_weight < 0 or probe_trajectories < 1:
        raise ConfigError("tdac needs radius > 0, diversity_weight >= 0 and probe_trajectories >= 1")

    def resolve(
        model_or_denoiser: Any,
        scheduler: Any,
        num_inference_steps: int,
        conditioning: Conditioning | None,
        generator: torch.Generator | None,
        eta: float = 0.0,
    ) -> PerTrajectorySteps:
        sized = conditioning is not None and conditioning.batch_size is not None
        features = step_features(
            model_or_denoiser,
            scheduler,
            num_inference_steps=num_inference_steps,
            layer=layer,
            conditioning=conditioning,
            batch_size=conditioning.batch_size if sized else probe_trajectories,
            generator=generator,
            eta=eta,
        )
        density, diversity = density_and_diversity(features, radius)
        weights = (min_max(density) + diversity_weight * min_max(diversity)).tolist()

        def assign(timesteps: Tensor, num_train_timesteps: int, num_trajectories: int) -> list[int]:
            counts = allocate(weights, num_trajectories)
            return [step for step, count in enumerate(counts) for _ in range(count)]

        return PerTrajectorySteps("tdac", assign)

    return FeatureAllocatedSteps("tdac", probe_trajectories, resolve)


TIMESTEP_STRATEGIES["tdac"] = tdac
