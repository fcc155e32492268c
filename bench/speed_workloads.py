"""The speed benchmark's models: each a float32 master on the device and the inputs of one denoiser call.

SD-1.5's and SDXL's UNets and DiT-XL/2 at batch 2, the trained zoo models at ``bench/quality.py``'s sampling
batch, and the deployment shapes (FLUX.1-dev, SD3-medium, PixArt-Σ at 1024², SDXL and SD-1.5 at batch 8);
random weights unless trained ones ship with dmquant. ``--tiny`` shrinks the architectures for CPU smoke tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch import Tensor, nn

from bench import peers
from dmquant.calib.record import CalibrationSet
from dmquant.catalog import REFERENCE_MODELS
from dmquant.models import load_model

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
#: Width of SDXL's pooled text embedding (its time_ids are 6 numbers embedded at addition_time_embed_dim).
SDXL_TEXT_EMBEDS = 1280
DIT_XL_2_256 = {
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 32,
    "num_embeds_ada_norm": 1000,
}
#: FLUX.1-dev's transformer (12 B parameters); at 1024² its 128×128×16 latent is packed into 4,096 tokens of 64.
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_TEXT_TOKENS = 512
FLUX_IMAGE_TOKENS = 4096
#: SD3-medium's MMDiT (2 B parameters) at 1024²: latents 16×128×128, 77 CLIP + 256 T5 text tokens.
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
SD3_TEXT_TOKENS = 333
#: PixArt-Σ XL/2 at 1024² (0.6 B parameters): latents 4×128×128, 300 T5 tokens.
PIXART_SIGMA = {
    "sample_size": 128,
    "num_layers": 28,
    "attention_head_dim": 72,
    "num_attention_heads": 16,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
    "interpolation_scale": 2,
}
PIXART_TEXT_TOKENS = 300
#: ``--tiny``: the same architectures shrunk for CPU smoke tests (not representative of anything).
TINY_OVERRIDES = {
    "sd15-unet": {"sample_size": 16, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
                  "cross_attention_dim": 32, "norm_num_groups": 8},
    "sdxl-unet": {"sample_size": 16, "block_out_channels": (32, 64, 64), "layers_per_block": 1,
                  "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 4, 4),
                  "cross_attention_dim": 32, "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 32 + 6 * 8, "norm_num_groups": 8},
    "dit-xl-2-256": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "sample_size": 8},
    "flux-dev": {"in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                 "axes_dims_rope": (4, 6, 6)},
    "sd3-medium": {"sample_size": 16, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
                   "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 32,
                   "pooled_projection_dim": 16, "pos_embed_max_size": 16},
    "pixart-sigma": {"sample_size": 8, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                     "cross_attention_dim": 32, "caption_channels": 32},
}  # fmt: skip
#: ``--tiny`` text lengths and image tokens (FLUX: an 4×4 grid).
TINY_TOKENS = {"flux-dev": (8, 16), "sd3-medium": (8, None), "pixart-sigma": (8, None)}
TINY_SDXL_TEXT_EMBEDS = 32
#: Prompt length of the SD text encoders.
TEXT_TOKENS = 77
#: The trained zoo models (:data:`dmquant.catalog.REFERENCE_MODELS`), in the speed table's order (by name).
ZOO_MODELS = tuple(sorted(REFERENCE_MODELS))
#: The architectures at the shapes users run them (random weights; the batch is in the name where it is not 2).
DEPLOYMENT_MODELS = ("flux-dev", "sd3-medium", "pixart-sigma", "sdxl-unet-b8", "sd15-unet-b8")
MODELS = ("sd15-unet", "sdxl-unet", "dit-xl-2-256", *ZOO_MODELS, *DEPLOYMENT_MODELS)
#: Denoiser batch of the SD/SDXL/DiT models: one image's conditional and unconditional copy.
BATCH = 2
#: The batch of the ``-b8`` workloads: four images with guidance.
LARGE_BATCH = 8
#: Samples per batch of bench/quality.py; the zoo models are timed at it (twice under guidance).
ZOO_SAMPLING_BATCH = 1000


class FlatConditionUNet(UNet2DConditionModel):
    """SDXL's UNet taking its added conditions as keywords of their own, like every other input.

    ``UNet2DConditionModel`` wants ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``;
    dmquant's calibration sets hold flat tensors, so this takes ``text_embeds`` and ``time_ids``.
    """

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, **kwargs: Any) -> Any:
        added = {name: kwargs.pop(name) for name in ("text_embeds", "time_ids")}
        return super().forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, **kwargs)


class FluxDenoiser(FluxTransformer2DModel):
    """FLUX's transformer called as ``f(sample, timestep, **cond)``, ``sample`` its packed (B, tokens, 64) latent.

    The position ids (``img_ids``: 0, row, column per latent token of a square image; ``txt_ids``: zeros) are made
    from the shapes per call, as FluxPipeline makes them, instead of riding in ``cond``: they have no batch axis.
    """

    def forward(self, sample: Tensor, timestep: Tensor, **cond: Any) -> Any:
        side = math.isqrt(sample.shape[1])
        rows, columns = torch.meshgrid(
            torch.arange(side, device=sample.device), torch.arange(side, device=sample.device), indexing="ij"
        )
        img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(sample.dtype)
        txt_ids = sample.new_zeros(cond["encoder_hidden_states"].shape[1], 3)
        return super().forward(hidden_states=sample, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, **cond)


class SD3Denoiser(SD3Transformer2DModel):
    """SD3's MMDiT called as ``f(sample, timestep, **cond)``."""

    def forward(self, sample: Tensor, timestep: Tensor, **cond: Any) -> Any:
        return super().forward(hidden_states=sample, timestep=timestep, **cond)


class PixArtDenoiser(PixArtTransformer2DModel):
    """PixArt-Σ called as ``f(sample, timestep, **cond)``, without its resolution conditions (Σ has none)."""

    def forward(self, sample: Tensor, timestep: Tensor, **cond: Any) -> Any:
        added = {"resolution": None, "aspect_ratio": None}
        return super().forward(sample, timestep=timestep, added_cond_kwargs=added, **cond)


@dataclass
class Workload:
    """A model in float32 on the device (the master every row copies) and the inputs of one call.

    ``factory`` rebuilds the master (same seed, same weights) for models too large to hold a float32 master beside
    a row's copy (FLUX's 12 B parameters are 48 GB in float32): the bench then drops ``model`` once it has counted
    its FLOPs, and every row builds its own from ``factory``.
    """

    model: nn.Module | None
    sample: Tensor
    timestep: Tensor
    cond: dict[str, Tensor]
    description: str
    factory: Callable[[], nn.Module] | None = None

    def master(self) -> nn.Module:
        """The float32 model: the one held, or a fresh one from ``factory``."""
        return self.model if self.model is not None else self.factory()

    @property
    def batch(self) -> int:
        return self.sample.shape[0]

    def inputs(
        self, dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format
    ) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        """Positional and keyword arguments of a call in ``dtype`` (integer tensors left alone), the sample in
        ``memory_format``."""
        layout = memory_format if self.sample.dim() == 4 else torch.contiguous_format
        sample = self.sample.to(dtype).contiguous(memory_format=layout)
        return (sample, self.timestep), peers.cast_floating(self.cond, dtype)

    def shapes(self) -> dict[str, list[int]]:
        tensors = {"sample": self.sample, "timestep": self.timestep, **self.cond}
        return {name: list(tensor.shape) for name, tensor in tensors.items()}

    def calibration(self, rows: int = 2) -> CalibrationSet:
        """The first ``rows`` inputs as a one-step calibration set (speed does not depend on its quality)."""
        rows = min(rows, self.batch)
        return CalibrationSet(
            samples=self.sample[:rows],
            timesteps=self.timestep[:rows],
            step_indices=torch.zeros(rows, dtype=torch.long, device=self.sample.device),
            cond={name: tensor[:rows] for name, tensor in self.cond.items()},
            num_inference_steps=1,
        )


def _random_model(factory: Callable[..., nn.Module], config: dict, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        return factory(**config).eval()


def _architecture(name: str, base: dict, tiny: bool) -> dict:
    return base | TINY_OVERRIDES[name] if tiny else dict(base)


def _sd15(args: argparse.Namespace, device: torch.device, default_batch: int = BATCH) -> Workload:
    config = _architecture("sd15-unet", SD15_UNET, args.tiny)
    batch, size = args.batch_size or default_batch, config["sample_size"]
    cond = {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"])}
    return _diffusers_workload(UNet2DConditionModel, config, (batch, 4, size, size), cond, device, args.seed)


def _sdxl(args: argparse.Namespace, device: torch.device, default_batch: int = BATCH) -> Workload:
    config = _architecture("sdxl-unet", SDXL_UNET, args.tiny)
    batch, size = args.batch_size or default_batch, config["sample_size"]
    text_embeds = TINY_SDXL_TEXT_EMBEDS if args.tiny else SDXL_TEXT_EMBEDS
    resolution = 8.0 * size
    cond = {
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"]),
        "text_embeds": torch.randn(batch, text_embeds),
        # original size, crop top-left, target size
        "time_ids": torch.tensor([resolution, resolution, 0.0, 0.0, resolution, resolution]).repeat(batch, 1),
    }
    return _diffusers_workload(FlatConditionUNet, config, (batch, 4, size, size), cond, device, args.seed)


def _dit(args: argparse.Namespace, device: torch.device) -> Workload:
    config = _architecture("dit-xl-2-256", DIT_XL_2_256, args.tiny)
    batch, size = args.batch_size or BATCH, config["sample_size"]
    cond = {"class_labels": torch.randint(0, config["num_embeds_ada_norm"], (batch,))}
    return _diffusers_workload(DiTTransformer2DModel, config, (batch, 4, size, size), cond, device, args.seed)


def _flux(args: argparse.Namespace, device: torch.device) -> Workload:
    config = _architecture("flux-dev", FLUX_DEV, args.tiny)
    text, image = TINY_TOKENS["flux-dev"] if args.tiny else (FLUX_TEXT_TOKENS, FLUX_IMAGE_TOKENS)
    batch = args.batch_size or 1
    cond = {
        "encoder_hidden_states": torch.randn(batch, text, config["joint_attention_dim"]),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"]),
        "guidance": torch.full((batch,), 3.5),
    }
    workload = _diffusers_workload(FluxDenoiser, config, (batch, image, config["in_channels"]), cond, device,
                                   args.seed, rebuilt=True)  # fmt: skip
    workload.timestep = torch.rand(batch, generator=torch.Generator().manual_seed(args.seed)).to(device)
    return workload


def _sd3(args: argparse.Namespace, device: torch.device) -> Workload:
    config = _architecture("sd3-medium", SD3_MEDIUM, args.tiny)
    text = TINY_TOKENS["sd3-medium"][0] if args.tiny else SD3_TEXT_TOKENS
    batch, size = args.batch_size or BATCH, config["sample_size"]
    cond = {
        "encoder_hidden_states": torch.randn(batch, text, config["joint_attention_dim"]),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"]),
    }
    sample_shape = (batch, config["in_channels"], size, size)
    return _diffusers_workload(SD3Denoiser, config, sample_shape, cond, device, args.seed, rebuilt=True)


def _pixart(args: argparse.Namespace, device: torch.device) -> Workload:
    config = _architecture("pixart-sigma", PIXART_SIGMA, args.tiny)
    text = TINY_TOKENS["pixart-sigma"][0] if args.tiny else PIXART_TEXT_TOKENS
    batch, size = args.batch_size or BATCH, config["sample_size"]
    cond = {"encoder_hidden_states": torch.randn(batch, text, config["caption_channels"])}
    sample_shape = (batch, config["in_channels"], size, size)
    return _diffusers_workload(PixArtDenoiser, config, sample_shape, cond, device, args.seed)


def _diffusers_workload(
    factory: Callable[..., nn.Module],
    config: dict,
    sample_shape: tuple[int, ...],
    cond: dict[str, Tensor],
    device: torch.device,
    seed: int,
    rebuilt: bool = False,
) -> Workload:
    """The model from ``config`` with random weights; ``rebuilt``: per row (:class:`Workload`'s ``factory``)."""
    build = functools.partial(_random_model, factory, config, device, seed)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(sample_shape, generator=generator)
    timestep = torch.randint(0, 1000, (sample_shape[0],), generator=generator)
    description = f"{factory.__name__}, random weights; config {json.dumps(config)}"
    return Workload(build(), sample.to(device), timestep.to(device), _on(cond, device), description,
                    factory=build if rebuilt else None)  # fmt: skip


def _zoo(name: str) -> Callable[[argparse.Namespace, torch.device], Workload]:
    """Builder of a trained zoo model's workload at bench/quality.py's sampling batch."""

    def build(args: argparse.Namespace, device: torch.device) -> Workload:
        zoo = load_model(name)
        copies = 2 if zoo.guidance_scale > 1 else 1
        batch = args.batch_size or (BATCH if args.tiny else ZOO_SAMPLING_BATCH * copies)
        cond = zoo.make_conditioning(batch, guidance_scale=1.0).model_cond()
        config = zoo.denoiser.config
        generator = torch.Generator().manual_seed(args.seed)
        sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
        timestep = torch.randint(0, 1000, (batch,), generator=generator)
        guided = f", {copies} copies per sample under its guidance" if copies > 1 else ""
        description = f"dmquant zoo model {name} ({type(zoo.denoiser).__name__}, trained){guided}"
        return Workload(zoo.denoiser.to(device).eval(), sample.to(device), timestep.to(device), _on(cond, device),
                        description)  # fmt: skip

    return build


def _on(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {name: tensor.to(device) for name, tensor in tensors.items()}


WORKLOADS: dict[str, Callable[[argparse.Namespace, torch.device], Workload]] = {
    "sd15-unet": _sd15,
    "sdxl-unet": _sdxl,
    "dit-xl-2-256": _dit,
    **{name: _zoo(name) for name in ZOO_MODELS},
    "flux-dev": _flux,
    "sd3-medium": _sd3,
    "pixart-sigma": _pixart,
    "sdxl-unet-b8": functools.partial(_sdxl, default_batch=LARGE_BATCH),
    "sd15-unet-b8": functools.partial(_sd15, default_batch=LARGE_BATCH),
}
