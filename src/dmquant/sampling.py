"""dmquant's own sampling loop over diffusers schedulers, with per-step hooks.

With the full-precision model and the same ``torch.Generator`` the loop reproduces the output of
diffusers' pipelines (``DDPMPipeline``, ``DDIMPipeline``, ``DiTPipeline``, ``StableDiffusionPipeline``):
it draws the initial noise and calls ``scheduler.step`` exactly as they do. Unlike the pipelines
it exposes every step to :class:`StepHook` objects, which is where calibration recording, noise
measurement, noise correction and per-step precision switching attach. No decoding is done: a
latent model's result is its latents.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from tqdm.auto import tqdm

from dmquant.denoiser import Denoiser, as_denoiser
from dmquant.errors import ConfigError
from dmquant.step_coefficients import noise_std


def _batch_size(tensors: dict[str, Tensor]) -> int | None:
    sizes = {name: tensor.shape[0] for name, tensor in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"conditioning tensors disagree on the batch size: {sizes}")
    return next(iter(sizes.values()), None)


@dataclass
class Conditioning:
    """Per-sample conditioning and its unconditional counterpart for classifier-free guidance.

    Classifier-free guidance (Ho & Salimans 2022) is on when ``guidance_scale > 1``, as in diffusers'
    pipelines; the model then sees the batch twice, unconditional copy first.

    Args:
        cond: conditioning keywords of the model, each batched along dim 0: ``{}``,
            ``{"class_labels": (B,)}`` or ``{"encoder_hidden_states": (B, L, D)}``.
        uncond: the same keys with their unconditional values (null class, negative prompt
            embeddings); required when ``guidance_scale > 1``.
        guidance_scale: ``s`` in ``eps = eps_u + s * (eps_c - eps_u)``.
    """

    cond: dict[str, Tensor] = field(default_factory=dict)
    uncond: dict[str, Tensor] | None = None
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.guided and self.uncond is None:
            raise ConfigError(
                f"guidance_scale={self.guidance_scale} needs unconditional values (a null class label "
                "or negative embeddings) for classifier-free guidance"
            )
        if self.uncond is not None:
            if self.uncond.keys() != self.cond.keys():
                raise ConfigError(f"uncond has the keys {sorted(self.uncond)} but cond has {sorted(self.cond)}")
            shapes = {name: (tuple(self.cond[name].shape), tuple(self.uncond[name].shape)) for name in self.cond}
            mismatched = {name: pair for name, pair in shapes.items() if pair[0] != pair[1]}
            if mismatched:
                raise ConfigError(f"cond and uncond shapes differ (cond, uncond): {mismatched}")
        _batch_size(self.cond)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is applied."""
        return self.guidance_scale > 1

    @property
    def batch_size(self) -> int | None:
        """Number of samples conditioned; ``None`` for unconditional generation (any batch size)."""
        return _batch_size(self.cond)

    def model_cond(self) -> dict[str, Tensor]:
        """The conditioning keywords fed to the model: ``cat([uncond, cond])`` when guided."""
        if not self.guided:
            return dict(self.cond)
        return {name: torch.cat([self.uncond[name], self.cond[name]]) for name in self.cond}

    def slice(self, start: int, stop: int) -> Conditioning:
        """The conditioning of samples ``start:stop``."""
        return self._map(lambda tensor: tensor[start:stop])

    def to(self, device: torch.device | str | None) -> Conditioning:
        """A copy with every tensor on ``device``."""
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        uncond = None if self.uncond is None else {name: fn(t) for name, t in self.uncond.items()}
        return Conditioning({name: fn(t) for name, t in self.cond.items()}, uncond, self.guidance_scale)

    @classmethod
    def unconditional(cls) -> Conditioning:
        """No conditioning (unconditional models)."""
        return cls()

    @classmethod
    def classes(
        cls, labels: Tensor | Sequence[int], null_label: int | None = None, guidance_scale: float = 1.0
    ) -> Conditioning:
        """Class labels (B,), with ``null_label`` as the unconditional class for guidance."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        uncond = None if null_label is None else {"class_labels": torch.full_like(labels, null_label)}
        return cls({"class_labels": labels}, uncond, guidance_scale)

    @classmethod
    def embeddings(
        cls, encoder_hidden_states: Tensor, negative: Tensor | None = None, guidance_scale: float = 1.0
    ) -> Conditioning:
        """Cross-attention embeddings (B, L, D), with ``negative`` ones (same shape) for guidance."""
        uncond = None if negative is None else {"encoder_hidden_states": negative}
        return cls({"encoder_hidden_states": encoder_hidden_states}, uncond, guidance_scale)


@dataclass(frozen=True)
class StepContext:
    """What one denoising step sees, handed to every :class:`StepHook`.

    Attributes:
        step_index: position in the trajectory, 0 being the first (noisiest) step.
        num_steps: length of the trajectory, ``len(scheduler.timesteps)``.
        timestep: the scheduler's timestep for this step (a scalar tensor).
        sample: ``x_t`` before ``scheduler.scale_model_input``, (B, C, H, W).
        model_input: exactly what the denoiser is fed: ``x_t`` scaled, and doubled as
            ``cat([x, x])`` under classifier-free guidance (unconditional copy first).
        model_timestep: the timestep fed to the model, broadcast to the model batch.
        model_cond: exactly the conditioning keywords fed to the model (doubled when guided).
        guidance_scale: the classifier-free guidance scale in use (``1.0``: none).
        scheduler: the scheduler driving this run (a copy of the caller's).
        eta: DDIM's ``eta`` of this run (schedulers that do not take it ignore it).
    """

    step_index: int
    num_steps: int
    timestep: Tensor
    sample: Tensor
    model_input: Tensor
    model_timestep: Tensor
    model_cond: dict[str, Tensor]
    guidance_scale: float
    scheduler: Any
    eta: float = 0.0


class StepHook:
    """Observes or alters each sampling step; every method is a no-op by default.

    Subclasses override what they need: calibration recording (``begin_step``), noise correction
    (``noise_estimate``), per-step precision switching (``begin_step`` / ``end_step``).
    """

    def begin_step(self, ctx: StepContext) -> None:
        """Called before the model runs at this step."""

    def noise_estimate(self, ctx: StepContext, eps: Tensor) -> Tensor:
        """Called with the noise estimate after guidance and learned-variance removal; returns the one to use."""
        return eps

    def noise_scale(self, ctx: StepContext) -> float:
        """Factor on the noise the scheduler injects at this step (PTQD's variance-schedule calibration)."""
        return 1.0

    def end_step(self, ctx: StepContext, prev_sample: Tensor) -> None:
        """Called after the scheduler step with ``x_{t-1}``."""


def guided_noise_estimate(
    denoiser: Denoiser,
    model_input: Tensor,
    model_timestep: Tensor,
    model_cond: dict[str, Tensor],
    guidance_scale: float = 1.0,
) -> Tensor:
    """Run the denoiser on a (possibly guidance-doubled) batch and return the noise estimate.

    Under classifier-free guidance (``guidance_scale > 1``) the batch holds the unconditional
    half first and the estimates combine as ``eps = eps_u + s * (eps_c - eps_u)`` (Ho & Salimans
    2022, eq. 6, with s = 1 + w). Learned-variance channels are dropped.
    """
    eps = denoiser.noise_channels(denoiser(model_input, model_timestep, model_cond))
    if guidance_scale <= 1:
        return eps
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _accepted_kwargs(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` takes, as ``DiffusionPipeline.prepare_extra_step_kwargs`` picks them."""
    parameters = inspect.signature(fn).parameters
    return {name: value for name, value in kwargs.items() if name in parameters}


def copy_scheduler(scheduler: Any, scheduler_class: type | None = None) -> Any:
    """A fresh scheduler of the same (or the given) class and configuration, sharing no state with ``scheduler``.

    ``from_config`` leaves out the keys a config lists in ``_use_default_values`` (those at their
    defaults when the scheduler was built), so a config patched afterwards, as
    ``StableDiffusionPipeline`` patches ``steps_offset`` and ``clip_sample``, would revert; the
    list is dropped to copy the configuration as it stands.
    """
    config = {key: value for key, value in scheduler.config.items() if key != "_use_default_values"}
    return (scheduler_class or type(scheduler)).from_config(config)


def prepare_scheduler(scheduler: Any, num_inference_steps: int, device: torch.device | str | None = None) -> Any:
    """A fresh copy of ``scheduler`` with its timesteps set; the caller's object is left untouched."""
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    scheduler = copy_scheduler(scheduler)
    scheduler.set_timesteps(num_inference_steps, **_accepted_kwargs(scheduler.set_timesteps, device=device))
    return scheduler


def _sample_shape(denoiser: Denoiser, batch_size: int, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
    if sample_shape is not None:
        return (batch_size, *sample_shape)
    size = denoiser.sample_size
    if denoiser.in_channels is None or size is None:
        raise ConfigError(
            f"cannot tell the sample shape of {type(denoiser.model).__name__}: pass sample_shape=(C, H, W)"
        )
    height, width = (size, size) if isinstance(size, int) else size
    return (batch_size, denoiser.in_channels, height, width)


def probe_call(model: nn.Module, conditioning: Conditioning, batch_size: int = 1) -> Callable[[], Tensor]:
    """One call of the denoiser ``model`` as sampling ``batch_size`` samples makes it: a random sample (drawn from
    seed 0) at timestep 500, ``conditioning`` (for those samples) as the model is fed it — both copies under
    classifier-free guidance —, on the model's device and in its dtype.

    The input a model is probed with where only the call's shapes (split shortcuts, BOPs) or its speed (kernel
    paths) matter, not its values.
    """
    denoiser = Denoiser(model)
    device = denoiser.device
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    rows = batch_size * (2 if conditioning.guided else 1)
    generator = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(_sample_shape(denoiser, rows, None), device=device, generator=generator).to(dtype)
    timestep = torch.full((rows,), 500, device=device)
    cond = conditioning.to(device).model_cond()
    return lambda: denoiser(sample, timestep, cond)


def _check_conditioning(conditioning: Conditioning | None, batch_size: int) -> Conditioning:
    conditioning = conditioning if conditioning is not None else Conditioning.unconditional()
    if conditioning.batch_size not in (None, batch_size):
        raise ConfigError(f"the conditioning is for {conditioning.batch_size} samples but batch_size={batch_size}")
    return conditioning


def _replaying(generator: torch.Generator | list[torch.Generator]) -> torch.Generator | list[torch.Generator]:
    """Generators in the state of ``generator`` (or of each in a list), to redraw what it draws next."""
    if isinstance(generator, list):
        return [_replaying(g) for g in generator]
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _step_with_scaled_noise(
    scheduler: Any,
    eps: Tensor,
    t: Tensor,
    x: Tensor,
    scale: float,
    generator: torch.Generator | list[torch.Generator] | None,
    step_kwargs: dict[str, Any],
) -> Tensor:
    """``scheduler.step`` with its injected noise ``σ_t z`` scaled to ``scale · σ_t z``, the mean unchanged.

    Schedulers that take ``variance_noise`` (DDIM) get ``scale · z`` drawn as they would draw
    ``z``; DDPM's step is taken as is and ``(1 − scale) σ_t z`` taken away again, with ``z``
    redrawn from a copy of the generator's state and ``σ_t`` from
    :func:`dmquant.step_coefficients.noise_std`.
    """
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, (1,))))
        step_kwargs = {**step_kwargs, "generator": generator} if "generator" in step_kwargs else step_kwargs
    draw = {"generator": generator, "device": eps.device, "dtype": eps.dtype}
    if "variance_noise" in inspect.signature(scheduler.step).parameters:
        noise = randn_tensor(eps.shape, **draw) * scale  # drawn as the step would draw it, then scaled
        kwargs = {key: value for key, value in step_kwargs.items() if key != "generator"}
        return scheduler.step(eps, t, x, **kwargs, variance_noise=noise).prev_sample
    if not isinstance(scheduler, DDPMScheduler) or "generator" not in step_kwargs:
        raise ConfigError(f"cannot rescale the noise of a {type(scheduler).__name__} step (DDIM and DDPM only)")
    replay = _replaying(generator)
    prev = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    sigma = noise_std(scheduler, int(t))
    return (
        prev if sigma == 0 else prev - (1.0 - scale) * sigma * randn_tensor(eps.shape, **{**draw, "generator": replay})
    )


@torch.no_grad()
def sample(
    model_or_denoiser: nn.Module | Denoiser,
    scheduler: Any,
    *,
    batch_size: int,
    num_inference_steps: int,
    conditioning: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    hooks: Sequence[StepHook] = (),
    latents: Tensor | None = None,
    sample_shape: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "sampling",
) -> Tensor:
    """Sample ``x_0`` with ``scheduler``, calling ``hooks`` at every step.

    The generator is consumed as diffusers' pipelines consume it: the initial noise is
    ``randn_tensor(shape, generator) * scheduler.init_noise_sigma``, and ``generator`` and ``eta``
    go to ``scheduler.step`` when its signature takes them. The scheduler is copied, so the
    caller's object is not mutated and repeated calls are independent.

    Args:
        model_or_denoiser: the denoising network, or a :class:`Denoiser` around it.
        scheduler: any diffusers scheduler (``set_timesteps`` / ``scale_model_input`` / ``step``).
        batch_size: number of samples.
        num_inference_steps: passed to ``scheduler.set_timesteps``.
        conditioning: class labels or embeddings, with guidance; ``None`` for unconditional models.
        generator: random source of the initial noise and of stochastic scheduler steps.
        eta: DDIM's ``eta`` (ignored by schedulers that do not take it).
        hooks: called in order at every step (see :class:`StepHook`).
        latents: initial unit-variance noise (B, C, H, W) instead of drawing it; it is scaled by
            ``init_noise_sigma`` like the pipelines' ``latents`` argument.
        sample_shape: (C, H, W) of one sample; defaults to the model's ``in_channels`` and
            ``sample_size``.
        device: where to sample; defaults to the model's device.
        dtype: dtype of the initial noise.
        progress: show a progress bar over the steps.
        desc: what the progress bar says it runs (``"FP"``, ``"W8A8"``, ...).

    Returns:
        The final sample (B, C, H, W): an image in [-1, 1] for pixel models, latents (not decoded)
        for latent models.
    """
    denoiser = as_denoiser(model_or_denoiser)
    device = torch.device(device) if device is not None else denoiser.device
    conditioning = _check_conditioning(conditioning, batch_size).to(device)
    scheduler = prepare_scheduler(scheduler, num_inference_steps, device)
    if latents is None:
        shape = _sample_shape(denoiser, batch_size, sample_shape)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif latents.shape[0] != batch_size:
        raise ConfigError(f"latents hold {latents.shape[0]} samples but batch_size={batch_size}")
    x = latents.to(device) * scheduler.init_noise_sigma

    step_kwargs = _accepted_kwargs(scheduler.step, generator=generator, eta=eta)
    model_cond = conditioning.model_cond()
    copies = 2 if conditioning.guided else 1
    timesteps = scheduler.timesteps
    for step_index, t in enumerate(tqdm(timesteps, desc=desc, leave=False, disable=not progress)):
        model_input = scheduler.scale_model_input(torch.cat([x] * copies), t)
        ctx = StepContext(
            step_index=step_index,
            num_steps=len(timesteps),
            timestep=t,
            sample=x,
            model_input=model_input,
            model_timestep=torch.as_tensor(t, device=device).reshape(1).expand(model_input.shape[0]),
            model_cond=model_cond,
            guidance_scale=conditioning.guidance_scale,
            scheduler=scheduler,
            eta=eta,
        )
        for hook in hooks:
            hook.begin_step(ctx)
        eps = guided_noise_estimate(
            denoiser, ctx.model_input, ctx.model_timestep, ctx.model_cond, conditioning.guidance_scale
        )
        for hook in hooks:
            eps = hook.noise_estimate(ctx, eps)
        scale = math.prod(hook.noise_scale(ctx) for hook in hooks)
        if scale == 1.0:
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        else:
            x = _step_with_scaled_noise(scheduler, eps, t, x, scale, generator, step_kwargs)
        for hook in hooks:
            hook.end_step(ctx, x)
    return x


class _ZeroNoiseEstimate(Denoiser):
    """A denoiser's shapes and device with a zero noise estimate at every step, at no model's cost."""

    def __init__(self, denoiser: Denoiser):
        vars(self).update(vars(denoiser))
        self._device = denoiser.device

    @property
    def device(self) -> torch.device:
        return self._device

    def __call__(self, sample: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        return torch.zeros_like(sample)

    def noise_channels(self, output: Tensor) -> Tensor:
        return output


def advance_generator(
    model_or_denoiser: nn.Module | Denoiser,
    scheduler: Any,
    *,
    batch_size: int,
    num_inference_steps: int,
    conditioning: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None,
    eta: float = 0.0,
    sample_shape: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Leave ``generator`` in the state :func:`sample` with these arguments (and no hooks) leaves it, without
    running the model: what a sampling loop draws depends on the shapes only, so the loop runs on a zero noise
    estimate. A process that samples the later of a sequence of batches drawn from one generator skips the
    earlier ones with it (:func:`dmquant.calib.record.record_calibration` over several processes)."""
    sample(
        _ZeroNoiseEstimate(as_denoiser(model_or_denoiser)),
        scheduler,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        conditioning=conditioning,
        generator=generator,
        eta=eta,
        sample_shape=sample_shape,
        device=device,
        dtype=dtype,
        progress=False,
    )
