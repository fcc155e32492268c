"""EDA-DM's temporal distribution alignment calibration (TDAC): calibration samples per step by
the density and diversity of the model's own features along the trajectory.

EDA-DM (Liu et al. 2024, "Enhanced Distribution Alignment for Post-Training Quantization of
Diffusion Models", Sec. 4.1) looks at one feature map ``F_t`` per sampling step along
FP trajectories and gives a step more calibration samples the more steps it is typical of
(*density*) and the more it differs from the others (*diversity*). ``F_t`` is the input of a
chosen layer (default: the attention of the UNet's middle block, or the middle transformer block
of a DiT) for a batch of probe trajectories, ``(B, C, H, W)`` for a feature map or ``(B, N, C)``
for tokens, and the scores are computed as the reference code (BienLuky/EDA-DM,
``scripts/calibration.py``) computes them::

    D_t = #{s ≠ t : mean((F_t − F_s)²) ≤ r}
          (mean over every element of the batch: trajectory b at step t against itself at step s)
    V_t = Σ_{s ≠ t} Σ_{b, p} (1 − cos(F_t[b, :, p], F_s[b, :, p]))
          (cosine over the channel vector at each position p of each trajectory b, summed;
           for tokens F_t[b, p, :], the reference having no transformer model)
    w_t = D̂_t + λ · V̂_t        (^: min-max normalised over the steps; all zeros when constant)

and ``N`` calibration samples are allocated in proportion to ``w_t``. Each calibration
trajectory is then recorded once at its allotted step, as PTQ4DM's NDTC records.

Deviations from the reference code, on purpose:

- the allocation rounds by largest remainders so the counts sum to exactly ``N``; the reference
  rounds every share and then adds the missing samples to the largest counts (or takes the
  surplus from the last steps), which moves at most a sample or so per step;
- the probe is its own batch of ``probe_trajectories`` FP trajectories sampled before recording
  (the reference takes the features of its first calibration batch), so the allocation is known
  before any row is recorded;
- a score that is equal at every step normalises to zeros (the reference divides by zero).
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

#: Defaults: r and λ of EDA-DM's CIFAR-10 run. Its other runs' scripts set r = 3.0 for ImageNet
#: and 0.3 for LSUN and Stable Diffusion; λ = 1.2 for ImageNet, 1.0 for LSUN, 5.0 for Stable Diffusion.
DEFAULT_RADIUS = 3.0
DEFAULT_DIVERSITY_WEIGHT = 1.2
#: The ``eps`` of the reference's ``nn.CosineSimilarity``: vector norms are taken as at least this.
COSINE_EPS = 1e-6


def channel_dim(features: Tensor) -> int:
    """The channel axis of one step's features: 1 for feature maps ``(B, C, H, W)``, else the last (tokens)."""
    return 1 if features.ndim == 4 else features.ndim - 1


def density_and_diversity(features: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """``(D_t, V_t)`` of per-step features ``(T, B, ...)`` (see the module docstring).

    Each step's ``(B, ...)`` batch is compared with every other step's element by element; the
    cosine is taken over :func:`channel_dim` of a step's batch.
    """
    steps = len(features)
    flat = features.reshape(steps, -1).double()
    density = torch.zeros(steps, dtype=torch.float64)
    for t in range(steps):
        for s in range(t + 1, steps):
            if (flat[t] - flat[s]).pow(2).mean() <= radius:
                density[t] += 1
                density[s] += 1
    channels = features.double().movedim(1 + channel_dim(features[0]), -1)
    norms = channels.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    unit = (channels / norms).reshape(steps, -1)
    cosine_sums = unit @ unit.T  # [t, s]: Σ over trajectories and positions of cos(F_t, F_s)
    vectors = unit.shape[1] // channels.shape[-1]
    others = ~torch.eye(steps, dtype=torch.bool)
    diversity = ((vectors - cosine_sums) * others).sum(dim=1)
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
    """The input of ``layer`` at every step of ``batch_size`` FP trajectories: ``(T, B, ...)``.

    ``B`` is the batch the layer sees: ``batch_size``, or twice that under classifier-free
    guidance (the unconditional and the conditional copy, as in the reference's guided runs).
    """
    denoiser = as_denoiser(model_or_denoiser)
    name = layer or default_feature_layer(denoiser.model)
    try:
        module = denoiser.model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"TDAC feature layer {name!r} is not in the {type(denoiser.model).__name__}") from None
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = args[0] if args else kwargs["hidden_states"]
        captured.append(inputs.detach().float().cpu())

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
