"""One calling convention for every denoiser dmquant supports: ``eps = f(x_t, t, **cond)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import diffusers
import torch
from diffusers import DiTTransformer2DModel, ModelMixin, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from dmquant.errors import ModelError

#: Denoiser classes dmquant loads from a model directory.
DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")
#: Where diffusers defines its denoisers: the classes a pipeline's ``unet`` or ``transformer`` may be.
_DENOISER_MODULES = ("diffusers.models.unets.", "diffusers.models.transformers.")


def is_denoiser_class(name: str) -> bool:
    """``name`` names a denoiser a quantized checkpoint may be built on: one of :data:`DENOISER_CLASSES`, or
    (for :func:`dmquant.quantize_pipeline`'s SD3, FLUX, ... pipelines) another diffusers UNet or transformer
    model class. Nothing else of diffusers (autoencoders, pipelines, the module's own attributes) is."""
    if name in DENOISER_CLASSES:
        return True
    if not name.isidentifier() or name.startswith("_"):
        return False
    model_class = getattr(diffusers, name, None)
    return (
        isinstance(model_class, type)
        and issubclass(model_class, diffusers.ModelMixin)
        and model_class.__module__.startswith(_DENOISER_MODULES)
    )


#: Model families dmquant recognises, most specific first; anything else is ``"generic"``.
_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (UNet2DConditionModel, "unet2d_condition"),
    (UNet2DModel, "unet2d"),
    (DiTTransformer2DModel, "dit"),
)


#: Denoisers whose sample is a sequence of packed latent tokens ``(N, L, C)`` (FLUX packs 2x2 latent patches),
#: not a latent image ``(N, C, H, W)``.
TOKEN_SAMPLE_CLASSES = frozenset({"FluxTransformer2DModel"})


def _model_kind(model: nn.Module) -> str:
    for model_type, kind in _KINDS:
        if isinstance(model, model_type):
            return kind
    return "generic"


def _config_value(model: nn.Module, name: str) -> Any:
    """``model.config[name]`` for diffusers models, else the attribute ``model.<name>``, else ``None``."""
    config = getattr(model, "config", None)
    if isinstance(config, Mapping) and name in config:
        return config[name]
    return getattr(model, name, None)


def _required_cond(model: nn.Module, kind: str) -> frozenset[str]:
    """Conditioning keywords the model cannot run without."""
    if kind == "unet2d_condition":
        return frozenset({"encoder_hidden_states"})
    if kind == "dit" or (kind == "unet2d" and model.class_embedding is not None):
        return frozenset({"class_labels"})
    return frozenset()


class Denoiser:
    """Calls any supported model as a noise estimate ``eps = f(x_t, t, **cond)``.

    Supported are diffusers' ``UNet2DModel`` (``kind="unet2d"``), ``UNet2DConditionModel``
    (``"unet2d_condition"``) and ``DiTTransformer2DModel`` (``"dit"``), and any ``nn.Module`` called
    as ``model(x, t, **cond)`` that returns a tensor or an object with ``.sample`` (``"generic"``).

    Args:
        model: the denoising network; it is called as is (quantized modules inside it included).
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise ModelError(f"a denoiser must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.kind = _model_kind(model)
        self.in_channels: int | None = _config_value(model, "in_channels")
        self.out_channels: int | None = _config_value(model, "out_channels")
        self.sample_size: int | tuple[int, int] | None = _config_value(model, "sample_size")
        self.required_cond = _required_cond(model, self.kind)
        #: whether the sample is ``(N, L, C)`` tokens (:data:`TOKEN_SAMPLE_CLASSES`), its channels the last axis
        self.takes_tokens = any(cls.__name__ in TOKEN_SAMPLE_CLASSES for cls in type(model).__mro__)

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (CPU for a model without parameters)."""
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def learned_variance(self) -> bool:
        """Whether the output carries learned-variance channels after the noise estimate (DiT, IDDPM)."""
        return self.in_channels is not None and self.out_channels == 2 * self.in_channels

    def __call__(self, sample: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Run the model on ``sample`` (B, C, H, W) at ``timestep`` (B,) and return its raw output.

        The output of diffusers models (``.sample``) is unwrapped; learned-variance channels are
        kept (see :meth:`noise_channels`).
        """
        missing = self.required_cond - cond.keys()
        if missing:
            raise ModelError(
                f"{type(self.model).__name__} needs the conditioning {sorted(missing)}, got {sorted(cond)}"
            )
        keywords = nest_conditioning(cond)
        if isinstance(self.model, ModelMixin):  # SD3 / FLUX transformers take encoder_hidden_states second
            output = self.model(sample, timestep=timestep, **keywords)
        else:
            output = self.model(sample, timestep, **keywords)
        return output if isinstance(output, Tensor) else output.sample

    def noise_channels(self, output: Tensor) -> Tensor:
        """The noise estimate part of ``output``: learned-variance channels dropped, as ``DiTPipeline`` does."""
        return output[:, : self.in_channels] if self.learned_variance else output


def nest_conditioning(cond: Mapping[str, Tensor]) -> dict[str, Any]:
    """Keywords of a model call from flat conditioning: ``"added_cond_kwargs.time_ids"`` becomes
    ``added_cond_kwargs={"time_ids": ...}`` (SDXL's UNet takes its pooled text embeddings and size
    conditions so). Calibration sets hold every conditioning tensor flat, batched along dim 0."""
    keywords: dict[str, Any] = {}
    for name, tensor in cond.items():
        outer, dot, inner = name.partition(".")
        if dot:
            keywords.setdefault(outer, {})[inner] = tensor
        else:
            keywords[name] = tensor
    return keywords


def flatten_conditioning(keywords: Mapping[str, Any]) -> dict[str, Tensor]:
    """The inverse of :func:`nest_conditioning` for the tensors among a call's keywords (others are dropped)."""
    flat: dict[str, Tensor] = {}
    for name, value in keywords.items():
        if isinstance(value, Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update({f"{name}.{key}": tensor for key, tensor in value.items() if isinstance(tensor, Tensor)})
    return flat


def as_denoiser(model_or_denoiser: nn.Module | Denoiser) -> Denoiser:
    """``model_or_denoiser`` itself if it is a :class:`Denoiser`, else a :class:`Denoiser` around it."""
    if isinstance(model_or_denoiser, Denoiser):
        return model_or_denoiser
    return Denoiser(model_or_denoiser)
