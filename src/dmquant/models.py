"""A denoiser together with what it takes to sample from it, and where such bundles come from.

``load_model`` accepts a built-in name (``tiny-unet``, ``tiny-unet-text``, ``tiny-dit``), a
diffusers pipeline directory (``model_index.json``: DDPM/DDIM, DiT, Stable Diffusion style) or a
diffusers model directory (``config.json`` of a ``UNet2DModel``, ``UNet2DConditionModel`` or
``DiTTransformer2DModel``). Everything loads from local files; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from .catalog import REFERENCE_MODELS, SCHEDULER_NAMES, TINY_MODELS
from .denoiser import DENOISER_CLASSES
from .errors import ModelError
from .sampling import Conditioning, copy_scheduler
from .scheduler_hooks import plain_scheduler
from .zoo import WEIGHTS_DIR, tiny

#: Scheduler names accepted by ``--scheduler``; each is built from the model's own scheduler config.
SCHEDULERS = dict(zip(SCHEDULER_NAMES, (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler), strict=True))
#: Prompts used for calibration and sampling of text-to-image pipelines when none are given.
GENERIC_PROMPTS = (
    "a photograph of a red car on a street",
    "a watercolor painting of mountains at sunset",
    "a close-up portrait of a smiling person",
    "a bowl of fruit on a wooden table",
)
#: Optional file in a model directory that states how the model is conditioned.
MODEL_INFO_FILE = "dmquant_model.json"


@dataclass
class DiffusionModel:
    """A denoiser, its scheduler, how it is conditioned, and (for latent models) its decoder.

    ``source`` is where :func:`load_model` found it: a built-in name or an absolute directory path.
    ``conditioning`` is ``"none"``, ``"class"`` (labels ``0..num_classes-1``, ``null_class``
    for classifier-free guidance) or ``"text"`` (``encode_prompts`` maps prompts to the
    denoiser's ``encoder_hidden_states``; the empty prompt is the unconditional one).
    """

    name: str
    denoiser: nn.Module
    scheduler: object
    conditioning: str = "none"
    num_classes: int | None = None
    null_class: int | None = None
    vae: nn.Module | None = None
    encode_prompts: Callable[[list[str]], torch.Tensor] | None = None
    default_prompts: list[str] = field(default_factory=list)
    default_labels: list[int] = field(default_factory=list)
    guidance_scale: float = 1.0
    source: str | None = None

    def to(self, device: torch.device | str) -> DiffusionModel:
        """Move the denoiser and the decoder to ``device`` (in place; returns self)."""
        self.denoiser.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def with_defaults(
        self, *, prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None
    ) -> DiffusionModel:
        """A copy that calibrates and samples on ``prompts`` (text-conditional models) or class ``labels``
        (class-conditional ones) unless told otherwise; an empty or ``None`` argument keeps the defaults."""
        if prompts and self.conditioning != "text":
            raise ModelError(f"{self.name} is {self.conditioning}-conditioned: it takes no prompts")
        if labels and self.conditioning != "class":
            raise ModelError(f"{self.name} is {self.conditioning}-conditioned: it takes no class labels")
        if labels and any(not 0 <= label < self.num_classes for label in labels):
            raise ModelError(f"class labels must lie in [0, {self.num_classes}), got {list(labels)}")
        return dataclasses.replace(
            self,
            default_prompts=list(prompts) if prompts else self.default_prompts,
            default_labels=list(labels) if labels else self.default_labels,
        )

    def with_denoiser(self, denoiser: nn.Module) -> DiffusionModel:
        return dataclasses.replace(self, denoiser=denoiser)

    def with_scheduler(self, name: str) -> DiffusionModel:
        if name not in SCHEDULERS:
            raise ModelError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
        return dataclasses.replace(self, scheduler=copy_scheduler(self.scheduler, SCHEDULERS[name]))

    def make_conditioning(
        self,
        batch_size: int,
        *,
        labels: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """Conditioning for ``batch_size`` samples; labels/prompts cycle over their defaults
        (``default_labels`` or every class; ``default_prompts``)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if self.conditioning == "class":
            if prompts:
                raise ModelError(f"{self.name} is class-conditional: it takes class labels, not prompts")
            chosen = list(labels or self.default_labels or range(self.num_classes))
            if any(not 0 <= label < self.num_classes for label in chosen):
                raise ModelError(f"class labels must lie in [0, {self.num_classes}), got {chosen}")
            batch = torch.tensor([chosen[i % len(chosen)] for i in range(batch_size)])
            return Conditioning.classes(batch, null_label=self.null_class, guidance_scale=scale)
        if self.conditioning == "text":
            if labels:
                raise ModelError(f"{self.name} is text-conditional: it takes prompts, not class labels")
            chosen = list(prompts) if prompts else self.default_prompts
            if not chosen:
                raise ModelError(f"{self.name}: give prompts, or default_prompts in {MODEL_INFO_FILE}")
            batch = [chosen[i % len(chosen)] for i in range(batch_size)]
            return Conditioning.embeddings(
                self.encode_prompts(batch), negative=self.encode_prompts([""] * batch_size), guidance_scale=scale
            )
        if labels or prompts:
            raise ModelError(f"{self.name} is unconditional: it takes no labels or prompts")
        return Conditioning.unconditional()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Final samples as images in [-1, 1] (decoded by the VAE for latent models)."""
        if self.vae is None:
            return x0
        x0 = x0.to(next(self.vae.parameters()).device)
        return self.vae.decode(x0 / self.vae.config.scaling_factor).sample


def _stand_in_prompt_encoder(dim: int, length: int = 4) -> Callable[[list[str]], torch.Tensor]:
    """Deterministic random embeddings per prompt, standing in for a text encoder in tiny models."""

    def encode(prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
            rows.append(torch.randn(length, dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    return encode


def _linear_ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def _tiny_unet() -> DiffusionModel:
    return DiffusionModel(
        "tiny-unet",
        tiny.tiny_unet2d(),
        _linear_ddim(),
        conditioning="class",
        num_classes=tiny.TINY_NUM_CLASSES,
        null_class=tiny.TINY_NUM_CLASSES,
    )


def _tiny_unet_text() -> DiffusionModel:
    return DiffusionModel(
        "tiny-unet-text",
        tiny.tiny_unet2d_condition(),
        _linear_ddim(),
        conditioning="text",
        vae=tiny.tiny_vae(),
        encode_prompts=_stand_in_prompt_encoder(tiny.TINY_TEXT_DIM),
        default_prompts=["a red A", "a blue B", "a green C", "a yellow D"],
        guidance_scale=3.0,
    )


def _tiny_dit() -> DiffusionModel:
    return DiffusionModel(
        "tiny-dit",
        tiny.tiny_dit(num_embeds_ada_norm=tiny.TINY_NUM_CLASSES),
        _linear_ddim(),
        conditioning="class",
        num_classes=tiny.TINY_NUM_CLASSES,
        null_class=tiny.TINY_NUM_CLASSES,
        vae=tiny.tiny_vae(),
        guidance_scale=3.0,
    )


def _shipped(name: str) -> Callable[[], DiffusionModel]:
    """Loader of a trained reference model shipped in ``zoo/weights/<name>``."""

    def load() -> DiffusionModel:
        path = WEIGHTS_DIR / name
        if not any((path / marker).exists() for marker in ("config.json", "model_index.json")):
            raise ModelError(f"{name} is not in this install ({path}); train it with `dmquant zoo train {name}`")
        return load_model(path)

    return load


#: Models by name: the shipped reference models, then tiny random-initialised ones built in code
#: (useful to exercise the machinery, not to judge quality).
BUILTIN_MODELS: dict[str, Callable[[], DiffusionModel]] = {
    **{name: _shipped(name) for name in REFERENCE_MODELS},
    **dict(zip(TINY_MODELS, (_tiny_unet, _tiny_unet_text, _tiny_dit), strict=True)),
}


def load_model(source: str | Path) -> DiffusionModel:
    """Load a built-in model by name or a diffusers pipeline / model directory.

    Weights are loaded in float32 whatever their stored dtype (the zoo ships fp16): calibration
    and simulated quantization run in float32.
    """
    if str(source) in BUILTIN_MODELS:
        return dataclasses.replace(BUILTIN_MODELS[str(source)](), source=str(source))
    path = Path(source)
    if not path.is_dir():
        raise ModelError(f"{source!s}: neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a model directory")
    if (path / "model_index.json").exists():
        model = _from_pipeline(path)
    elif (path / "config.json").exists():
        model = _from_model_dir(path)
    else:
        raise ModelError(f"{path}: no model_index.json (pipeline) or config.json (model) in this directory")
    return dataclasses.replace(_apply_model_info(model, path), source=str(path.resolve()))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: unreadable JSON ({error})") from None


def read_pipeline(path: Path) -> diffusers.DiffusionPipeline:
    """The diffusers pipeline in directory ``path``, in float32, from local files."""
    try:
        return diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    except Exception as error:  # diffusers raises many types for a broken directory
        raise ModelError(f"{path}: cannot load the diffusers pipeline ({error})") from None


def _from_pipeline(path: Path) -> DiffusionModel:
    return from_pipeline(read_pipeline(path), path.name)


def from_pipeline(pipe: diffusers.DiffusionPipeline, name: str) -> DiffusionModel:
    """The :class:`DiffusionModel` of a loaded diffusers pipeline (its modules shared, not copied).

    dmquant's own sampling loop drives DDPM/DDIM-style, DiT and Stable-Diffusion-style pipelines; for
    a denoiser it cannot condition (SDXL's added conditions, SD3 / FLUX transformers) this raises
    :class:`~dmquant.errors.ModelError` — such pipelines calibrate by running themselves
    (:func:`dmquant.quantize_pipeline`).
    """
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise ModelError(f"{name}: the pipeline has no unet or transformer to quantize")
    if type(denoiser).__name__ not in DENOISER_CLASSES or getattr(denoiser.config, "addition_embed_type", None):
        raise ModelError(f"{name}: dmquant's sampling loop does not condition a {type(denoiser).__name__} of this kind")
    scheduler = plain_scheduler(pipe.scheduler)
    vae = getattr(pipe, "vae", None)
    if getattr(pipe, "text_encoder", None) is not None and hasattr(pipe, "encode_prompt"):

        @torch.no_grad()
        def encode(prompts: list[str]) -> torch.Tensor:
            # the text encoder stays where it was loaded when the denoiser moves (``DiffusionModel.to``)
            return pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0]

        return DiffusionModel(
            name,
            denoiser,
            scheduler,
            "text",
            vae=vae,
            encode_prompts=encode,
            default_prompts=list(GENERIC_PROMPTS),
            guidance_scale=7.5,
        )
    return _conditioning_from_config(DiffusionModel(name, denoiser, scheduler, vae=vae))


def _from_model_dir(path: Path) -> DiffusionModel:
    class_name = _read_json(path / "config.json").get("_class_name")
    if class_name not in DENOISER_CLASSES:
        raise ModelError(
            f"{path}: config.json names {class_name!r}, not a denoiser dmquant loads ({', '.join(DENOISER_CLASSES)})"
        )
    try:
        denoiser = getattr(diffusers, class_name).from_pretrained(
            path, local_files_only=True, torch_dtype=torch.float32
        )
        denoiser.eval()
    except Exception as error:  # diffusers raises OSError, ValueError, ... for a broken directory
        raise ModelError(f"{path}: cannot load the {class_name} ({error})") from None
    if class_name == "UNet2DConditionModel" and not (path / MODEL_INFO_FILE).exists():
        raise ModelError(f"{path}: a UNet2DConditionModel needs a text encoder: load the whole pipeline directory")
    scheduler_dir = next((d for d in (path / "scheduler", path) if (d / "scheduler_config.json").exists()), None)
    if scheduler_dir is None:
        warnings.warn(f"{path}: no scheduler_config.json; using a 1000-step linear-beta DDIM scheduler", stacklevel=2)
        scheduler = _linear_ddim()
    else:
        config = _read_json(scheduler_dir / "scheduler_config.json")
        scheduler_class = getattr(diffusers, str(config.get("_class_name")), DDIMScheduler)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            name = config.get("_class_name")
            raise ModelError(f"{scheduler_dir}: scheduler_config.json names {name!r}, not a scheduler")
        try:
            scheduler = scheduler_class.from_config(config)
        except Exception as error:  # diffusers raises many types for a config it cannot build
            raise ModelError(f"{scheduler_dir}: cannot build the {scheduler_class.__name__} ({error})") from None
    return _conditioning_from_config(DiffusionModel(path.name, denoiser, scheduler))


def _conditioning_from_config(model: DiffusionModel) -> DiffusionModel:
    """Infer class conditioning from the denoiser's config (the null class is the last embedding)."""
    config = model.denoiser.config
    if isinstance(model.denoiser, diffusers.DiTTransformer2DModel):
        num = config.num_embeds_ada_norm
        return dataclasses.replace(model, conditioning="class", num_classes=num, null_class=num, guidance_scale=4.0)
    if getattr(config, "num_class_embeds", None):
        num = config.num_class_embeds - 1
        return dataclasses.replace(model, conditioning="class", num_classes=num, null_class=num)
    return model


def _apply_model_info(model: DiffusionModel, path: Path) -> DiffusionModel:
    """Let ``dmquant_model.json`` state the conditioning explicitly (it overrides inference)."""
    info_path = path / MODEL_INFO_FILE
    if not info_path.exists():
        return model
    info = _read_json(info_path)
    allowed = {"conditioning", "num_classes", "null_class", "default_prompts", "guidance_scale"}
    unknown = set(info) - allowed
    if unknown:
        raise ModelError(f"{info_path}: unknown keys {sorted(unknown)}; valid: {sorted(allowed)}")
    model = dataclasses.replace(model, **info)
    if model.conditioning not in ("none", "class", "text"):
        raise ModelError(f"{info_path}: conditioning must be none, class or text, got {model.conditioning!r}")
    if model.conditioning == "class" and not (
        isinstance(model.num_classes, int) and isinstance(model.null_class, int) and model.num_classes > 0
    ):
        raise ModelError(f"{info_path}: class conditioning needs integer num_classes and null_class")
    if model.conditioning == "text" and model.encode_prompts is None:
        raise ModelError(f"{info_path}: text conditioning needs a text encoder: load the whole pipeline directory")
    return model
