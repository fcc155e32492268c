"""Speed benchmark: denoiser models × execution rows, one JSON file per cell.

Every cell times one denoiser call (the noise estimate of one sampling step) of one model under one
row, with CUDA events after warm-up: median and interquartile range over ``--repeats`` calls. It
also records the peak GPU memory of those calls (``torch.cuda.max_memory_allocated``, reset per
measurement, less what the benchmark itself holds), the bytes of the weights as run (parameters and
buffers; torchao tensor subclasses and packed low-bit weights at their real storage), the FLOPs of a
call (Linear and Conv2d layers by forward hooks, dmquant's converted layers recognised by their
in/out features or channels, attention matmuls Q·Kᵀ and P·V), the achieved TFLOP/s, the kernels
that took the time (torch.profiler on one call) and the fraction of the FLOPs left in full precision.
All rows of a model run side by side in one process.

Models (``--models``), random weights unless trained ones ship with dmquant:

- ``sd15-unet``: Stable Diffusion 1.5's UNet2DConditionModel; latents 2×4×64×64, text 2×77×768.
- ``sdxl-unet``: SDXL base's UNet; latents 2×4×128×128, text 2×77×2048, text_embeds 2×1280, time_ids 2×6.
- ``dit-xl-2-256``: DiT-XL/2 at 256 px; latents 2×4×32×32, class labels.
- ``ddpm-glyphs32``, ``dit-glyphs``, ``ldm-glyphs64``: the trained zoo models at the sampling batch of
  ``bench/quality.py`` (1,000 samples; 2,000 denoiser rows for the two guided models).

Rows (``--rows``), each measured in the execution settings it lists (the first is its headline):

- ``bf16-eager``: the model in bfloat16, eager PyTorch (diffusers' default SDPA attention).
- ``bf16-compiled``: torch.compile (default mode, ``dynamic=False``) of every outermost
  BasicTransformerBlock / ResnetBlock2D / Attention (``--compile-scope blocks``, regional
  compilation: one compiled graph per distinct block shape, the glue between blocks eager) or of
  the whole model (``--compile-scope model``).
- ``bf16-compiled-cudagraphs``: bf16-compiled, its whole call captured once into an explicit
  ``torch.cuda.CUDAGraph`` and replayed (not ``mode="reduce-overhead"``).
- torchao peers on nn.Linear, convolutions left in bfloat16 (``peers.py``; unsupported rows say
  why): ``int8-dynamic`` (Int8DynamicActivationInt8WeightConfig), ``fp8-dynamic-row``
  (Float8DynamicActivationFloat8WeightConfig, PerRow), ``int4-weight-only`` (Int4WeightOnlyConfig,
  tinygemm packing, group 128/64/32 by fan-in).
- dmquant: ``quantize`` with the ``minmax`` recipe at the row's formats, attention matmuls off,
  calibrated on 2 random rows shaped like the inputs, then ``dmquant.kernels.convert.convert_model``
  (real low-bit kernels): ``dmquant-w8a8-fp8`` (fp8 e4m3 weights per channel and activations per
  tensor), ``dmquant-w8a8-fp8-fast`` (the same, its fp8 GEMMs on cuBLASLt with fast accumulation,
  as torchao's fp8 row), ``dmquant-w8a8-fp8-linear-fast`` (that on the nn.Linear layers only, the
  convolutions left in bfloat16 as torchao leaves them), ``dmquant-w8a8-int8`` (int8 symmetric
  per-channel weights, asymmetric per-tensor activations), ``dmquant-w4a8`` and ``dmquant-w4a16``
  (packed int4 weights per output channel, which every layer takes, where torchao's int4 row groups
  by 128/64/32 inputs).
  A conversion that raises makes an ``unsupported`` cell with the reason.

Quantized rows are measured eager, compiled and compiled+CUDA graph (headline: compiled), each
compared with the bf16 row of the same setting; all compiled rows share the inductor settings in
``INDUCTOR_SETTINGS`` (torchao's recommended ones less coordinate-descent tuning, for compile time).

Results go to ``--results`` (default ``bench/results/speed``) as ``<model>/<row>.json``, with the
device's measured peaks (bf16 ``torch.mm``, fp8 ``torch._scaled_mm`` with row-wise scales, int8
``torch._int_mm``, all 8192³) in ``peaks.json``. A cell whose file exists is skipped (``--force``
redoes it); ``--max-minutes`` leaves a model that would not finish in time for the next run of the
same command, and a first model that alone would not finish is split by rows (those left compare with
the stored bf16 cells). The ten rows of the specification on the six models take an H100 about 47
minutes, mostly compiling: run the same command until it says nothing is left. ``--table`` prints the
results as markdown.

Without CUDA the script runs on the CPU in float32 (no CUDA graphs, fp8 and int4 rows
unsupported); ``--tiny`` shrinks the SD/SDXL/DiT configs and the zoo batch for smoke tests. Such
cells are marked ``"representative": false``.

Example (an H100; rerun to resume)::

    python bench/speed.py --max-minutes 9

The whole-model compile goes to a folder of its own, which ``bench/report.py`` shows as a second table::

    python bench/speed.py --compile-scope model --results bench/results/speed-model-scope
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from dmquant.api import info, quantize
from dmquant.calib.record import CalibrationSet
from dmquant.config import LayerRule, QuantConfig, load_recipe, with_overrides
from dmquant.core.layers import QUANT_LAYERS
from dmquant.eval.cost import attention_macs, layer_macs
from dmquant.kernels.convert import REPORT_ATTRIBUTE, convert_model
from dmquant.kernels.layers import LowBitConv2d, LowBitLinear
from dmquant.kernels.paths import select_paths
from dmquant.models import load_model
from dmquant.provenance import environment

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/ is a folder of scripts, not a package)
from quality import git_commit, write_cell  # noqa: E402

SCHEMA_VERSION = 1
GIB, MIB = 2**30, 2**20

# ----------------------------------------------------------------------------------------------
# Models

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
ZOO_MODELS = ("ddpm-glyphs32", "dit-glyphs", "ldm-glyphs64")
#: The architectures at the shapes users run them (random weights; the batch is in the name where it is not 2).
DEPLOYMENT_MODELS = ("flux-dev", "sd3-medium", "pixart-sigma", "sdxl-unet-b8", "sd15-unet-b8")
MODELS = ("sd15-unet", "sdxl-unet", "dit-xl-2-256", *ZOO_MODELS, *DEPLOYMENT_MODELS)
#: Denoiser batch of the SD/SDXL/DiT models: one image's conditional and unconditional copy.
BATCH = 2
#: The batch of the ``-b8`` workloads: four images with guidance.
LARGE_BATCH = 8
#: Samples per batch of bench/quality.py; the zoo models are timed at it (twice under guidance).
ZOO_SAMPLING_BATCH = 1000
#: Seconds one H100 takes for a model with every row and setting: what the ten rows of the
#: specification took (commit bc1055c, each model's rows in one process) scaled to all rows. The
#: torch.compile runs (about 2-5 s per distinct block graph) and the autotuning of dmquant's Triton
#: kernels (per GEMM/conv shape) dominate. ``--max-minutes`` scales them by the pending rows and by how
#: far off the models run so far were.
ESTIMATED_SECONDS = {
    "sd15-unet": 1135,
    "sdxl-unet": 940,
    "dit-xl-2-256": 192,
    "ddpm-glyphs32": 419,
    "dit-glyphs": 146,
    "ldm-glyphs64": 584,
    # guesses, before a measured run: the new models' rows (compile of few distinct blocks; FLUX builds 12 B weights)
    "flux-dev": 900,
    "sd3-medium": 500,
    "pixart-sigma": 400,
    "sdxl-unet-b8": 1200,
    "sd15-unet-b8": 1300,
}


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

# ----------------------------------------------------------------------------------------------
# Rows and execution settings

EAGER, COMPILED, GRAPHED = "eager", "compiled", "compiled+cudagraph"
#: The order settings are measured in (compiling changes the model in place).
SETTINGS = (EAGER, COMPILED, GRAPHED)
#: The bf16 row each setting is compared with.
REFERENCE_ROW = {EAGER: "bf16-eager", COMPILED: "bf16-compiled", GRAPHED: "bf16-compiled-cudagraphs"}
#: ``--memory-format`` choices.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
#: Where regional compilation (``--compile-scope blocks``) applies torch.compile: the outermost of these.
COMPILED_BLOCKS = (
    "BasicTransformerBlock",
    "ResnetBlock2D",
    "Attention",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "JointTransformerBlock",
)
#: torch._inductor settings of every compiled row (torchao's recommended_inductor_config_setter
#: less coordinate-descent tuning, which multiplies compile time).
INDUCTOR_SETTINGS = {"force_fuse_int_mm_with_mul": True, "fx_graph_cache": True, "triton.unique_kernel_names": True}
#: torch._dynamo limits raised so that every compiled block fits: one graph per distinct block shape, and for
#: W8A8-INT8 one per block (dynamo specialises on each layer's activation zero point, a Python int; SDXL has 70
#: transformer blocks).
DYNAMO_SETTINGS = {"recompile_limit": 128, "accumulated_recompile_limit": 1024}
QUANTIZED_SETTINGS = (COMPILED, EAGER, GRAPHED)


@dataclass(frozen=True)
class Row:
    """One way of running a model.

    Attributes:
        name: the row's name (file name of its cells).
        kind: ``"bf16"``, ``"torchao"`` or ``"dmquant"``.
        settings: execution settings measured; the first is the headline one.
        description: what the row runs, exactly.
        peer: the ``peers.py`` name of a torchao row.
        formats: a dmquant row's (weight bits, activation bits, weight granularity).
        fast_accumulation: a dmquant row's fp8 GEMMs on cuBLASLt accumulate without fp32 promotion.
        linear_only: a dmquant row quantizes nn.Linear layers only, its convolutions left in the compute dtype.
        compute: a torchao row's number format of its quantized GEMMs' tensor-core math (``"fp8"`` or
            ``"int8"``); see :attr:`compute_format`.
        measured_paths: a dmquant row's converted layers take the path measured fastest on the device
            (cuBLASLt, Triton or bf16: :mod:`dmquant.kernels.paths`), as ``dmquant convert`` does by default;
            without it, every layer runs on its low-bit kernel.
    """

    name: str
    kind: str
    settings: tuple[str, ...]
    description: str
    peer: str | None = None
    formats: tuple[int | str, int | str, str] | None = None
    fast_accumulation: bool = False
    linear_only: bool = False
    compute: str | None = None
    measured_paths: bool = True

    @property
    def compute_format(self) -> str:
        """The tensor-core math of the row's low-bit GEMMs (``"bf16"``, ``"fp8"`` or ``"int8"``), whose measured
        peak its GEMM/conv throughput is compared with: a dmquant row's follows its activation format."""
        if self.formats is not None:
            return {"fp8_e4m3": "fp8", 8: "int8"}.get(self.formats[1], "bf16")
        return self.compute or "bf16"


_DMQUANT = (
    "dmquant.quantize with the minmax recipe (first/last layer at 8 bits), attention matmuls off, {what}, "
    "calibrated on 2 random input rows; then dmquant.kernels.convert.convert_model; the model but its low-bit "
    "layers (codes, float32 scales) cast to the compute dtype"
)
#: How a row with ``measured_paths`` ends (appended to its description).
_MEASURED_PATHS = (
    "; on CUDA each converted W8A8 layer then takes the path measured fastest there (cuBLASLt, Triton, or bf16 with "
    "its dequantized weight; dmquant.kernels.paths), int4 layers keep their kernel"
)
ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("bf16-eager", "bf16", (EAGER,), "bfloat16 model, eager PyTorch"),
        Row("bf16-compiled", "bf16", (COMPILED,), "bfloat16 model under torch.compile (see settings.compile)"),
        Row(
            "bf16-compiled-cudagraphs",
            "bf16",
            (GRAPHED,),
            "bf16-compiled with its whole call captured into one explicit torch.cuda.CUDAGraph and replayed",
        ),
        Row("int8-dynamic", "torchao", QUANTIZED_SETTINGS, peers.PEERS["torchao-int8-dynamic"].description,
            peer="torchao-int8-dynamic", compute="int8"),
        Row("fp8-dynamic-row", "torchao", QUANTIZED_SETTINGS, peers.PEERS["torchao-fp8-dynamic"].description,
            peer="torchao-fp8-dynamic", compute="fp8"),
        Row("int4-weight-only", "torchao", QUANTIZED_SETTINGS, peers.PEERS["torchao-int4-weight-only"].description,
            peer="torchao-int4-weight-only"),
        Row("dmquant-w8a8-fp8", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="fp8 e4m3 weights per output channel and activations per tensor"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel")),
        Row("dmquant-w8a8-fp8-every-layer", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="fp8 as dmquant-w8a8-fp8-fast, every converted layer on its fp8 kernel (no "
                            "measured choice of paths)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True, measured_paths=False),
        Row("dmquant-w8a8-fp8-fast", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="fp8 as dmquant-w8a8-fp8, its fp8 GEMMs on cuBLASLt with fast accumulation "
                            "(use_fast_accum=True, as torchao's fp8 rows)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True),
        Row("dmquant-w8a8-fp8-linear-fast", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="fp8 as dmquant-w8a8-fp8-fast on the nn.Linear layers only, the convolutions left "
                            "in bfloat16 on cuDNN (torchao's layer coverage, with static activation scales)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True, linear_only=True),
        Row("dmquant-w8a8-int8", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="int8 symmetric per-channel weights, int8 asymmetric per-tensor activations"),
            formats=(8, 8, "channel")),
        Row("dmquant-w4a8", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="int4 weights per output channel, int8 per-tensor activations"),
            formats=(4, 8, "channel")),
        Row("dmquant-w4a16", "dmquant", QUANTIZED_SETTINGS,
            _DMQUANT.format(what="int4 weights per output channel, 16-bit activations"),
            formats=(4, 16, "channel")),
    )
}  # fmt: skip


class RowUnsupported(Exception):
    """The row cannot run here (a conversion that refuses the model, CUDA graphs without CUDA); the reason is kept."""


@dataclass(frozen=True)
class Cell:
    model: str
    row: str

    def path(self, results: Path) -> Path:
        return results / self.model / f"{self.row}.json"


def plan_cells(models: Sequence[str], rows: Sequence[str], settings: Sequence[str] = SETTINGS) -> list[Cell]:
    """The matrix in run order: per model, the rows in ``ROWS`` order; a row none of whose settings
    is among ``settings`` is left out."""
    return [
        Cell(model, row)
        for model in models
        for row in ROWS
        if row in rows and any(setting in settings for setting in ROWS[row].settings)
    ]


def pending(cells: Sequence[Cell], results: Path, force: bool) -> list[Cell]:
    """Cells still to run: missing, failed, or all of them with ``force``."""

    def done(cell: Cell) -> bool:
        path = cell.path(results)
        return path.exists() and json.loads(path.read_text()).get("status") in ("ok", "unsupported")

    return [cell for cell in cells if force or not done(cell)]


# ----------------------------------------------------------------------------------------------
# FLOPs


def _layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` or ``"linear"`` for a Conv2d/Linear or a converted low-bit layer; else None."""
    if isinstance(module, (nn.Conv2d, LowBitConv2d)):
        return "conv"
    if isinstance(module, (nn.Linear, LowBitLinear)):
        return "linear"
    return None


def layer_precision(module: nn.Module) -> str:
    """``"low-bit"`` (a torchao tensor subclass weight, or a layer class of ``dmquant.kernels``),
    ``"simulated"`` (dmquant's fake-quantized QuantLinear/QuantConv2d) or ``"full"``."""
    if is_traceable_wrapper_subclass(getattr(module, "weight", None)):
        return "low-bit"
    if isinstance(module, (LowBitConv2d, LowBitLinear)):
        return "low-bit"
    return "simulated" if isinstance(module, QUANT_LAYERS) else "full"


def outermost(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """The modules ``wanted`` picks that are not inside another picked one, by qualified name."""
    chosen: dict[str, nn.Module] = {}
    inside: str | None = None
    for name, module in model.named_modules():  # pre-order: a module's descendants follow it
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        inside = None
        if wanted(module):
            chosen[name], inside = module, name
    return chosen


def _layer_flops(module: nn.Module, output: Tensor) -> int:
    """2 × the multiply-accumulates of one call (:func:`dmquant.eval.cost.layer_macs`)."""
    return 2 * layer_macs(module, output)


def _attention_flops(attention: Attention, args: tuple, kwargs: dict) -> int:
    """2 × the multiply-accumulates of one Attention call's Q·Kᵀ and P·V (:func:`dmquant.eval.cost.attention_macs`)."""
    return 2 * sum(attention_macs(attention, args, kwargs))


@dataclass
class LayerFlops:
    kind: str
    precision: str
    flops: int = 0


@dataclass
class FlopCount:
    """FLOPs of one call: per layer (kind, precision) and of the attention matmuls."""

    layers: dict[str, LayerFlops] = field(default_factory=dict)
    attention: int = 0

    def of_kind(self, kind: str) -> int:
        return sum(layer.flops for layer in self.layers.values() if layer.kind == kind)

    @property
    def layer_total(self) -> int:
        return sum(layer.flops for layer in self.layers.values())

    @property
    def total(self) -> int:
        return self.layer_total + self.attention

    def full_precision(self) -> int:
        """FLOPs of layers left in full precision (attention matmuls not included)."""
        return sum(layer.flops for layer in self.layers.values() if layer.precision == "full")

    def summary(self) -> dict[str, Any]:
        full = self.full_precision()
        counts = Counter(f"{layer.kind}/{layer.precision}" for layer in self.layers.values())
        return {
            "total": self.total,
            "linear": self.of_kind("linear"),
            "conv": self.of_kind("conv"),
            "attention": self.attention,
            "layers_by_kind_and_precision": dict(counts),
            "full_precision_layer_fraction": full / self.layer_total if self.layer_total else None,
            "full_precision_fraction": (full + self.attention) / self.total if self.total else None,
        }


@torch.no_grad()
def count_flops(model: nn.Module, call: Callable[[], Any]) -> FlopCount:
    """Run ``call()`` once with hooks on ``model``'s layers (outermost) and attention modules."""
    count = FlopCount()
    handles = []
    for name, module in outermost(model, lambda m: _layer_kind(m) is not None).items():
        kind = _layer_kind(module)
        count.layers[name] = LayerFlops(kind, layer_precision(module))

        def hook(module: nn.Module, inputs: tuple, output: Tensor, name: str = name, kind: str = kind) -> None:
            count.layers[name].flops += _layer_flops(module, output)

        handles.append(module.register_forward_hook(hook))
    for module in model.modules():
        if isinstance(module, Attention):

            def attention_hook(module: Attention, args: tuple, kwargs: dict) -> None:
                count.attention += _attention_flops(module, args, kwargs)

            handles.append(module.register_forward_pre_hook(attention_hook, with_kwargs=True))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return count


# ----------------------------------------------------------------------------------------------
# Weight bytes


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes a tensor really stores: a tensor subclass (torchao) is the sum of its inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return sum(tensor_bytes(part) for part in inner if isinstance(part, Tensor))
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers of ``model`` (each once), at their real storage."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_bytes(tensor) for tensor in tensors.values())


# ----------------------------------------------------------------------------------------------
# Building a row's model


@dataclass
class Built:
    """A row's model, ready to call in the compute dtype, and what building it recorded."""

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bf16_copy(bench: ModelBench) -> nn.Module:
    workload = bench.workload
    master = copy.deepcopy(workload.model) if workload.model is not None else workload.master()
    return nn.Module.to(master, bench.dtype).eval()


def build_bf16(bench: ModelBench, row: Row) -> Built:
    if row.name == "bf16-compiled-cudagraphs" and bench.kept_compiled is not None:
        built, bench.kept_compiled = bench.kept_compiled, None
        return built
    return Built(_bf16_copy(bench))


def build_torchao(bench: ModelBench, row: Row) -> Built:
    """The torchao peer on a bf16 copy (``peers.apply_peer``: its own exclusions, in the cell).

    The rows of each Linear's product are recorded on one call with the workload's inputs first, so
    that the peer can leave out the layers its kernels refuse at this batch (``peers.linear_rows``).
    """
    peers.check_available(row.peer, bench.device)
    source = _bf16_copy(bench)
    args_, kwargs = bench.workload.inputs(bench.dtype)
    rows = peers.linear_rows(source, functools.partial(source, *args_, **kwargs))
    result = peers.apply_peer(row.peer, source, rows=rows)  # a copy, bfloat16 on CUDA like its source
    del source
    exclusions = [{"layers": n, "reason": why} for why, n in Counter(result.skipped_layers.values()).items()]
    details = {
        "coverage": {"quantized": result.quantized, "skipped": result.skipped},
        "exclusions": exclusions,
        "notes": result.notes,
        "peer_versions": peers.peer_versions(),
    }
    return Built(result.model, details)


def dmquant_config(row: Row, model: nn.Module) -> QuantConfig:
    """minmax at the row's formats (the weight granularity included), attention matmuls off; for a
    ``linear_only`` row, a first rule that keeps ``model``'s convolutions in full precision."""
    weight_bits, activation_bits, granularity = row.formats
    config = load_recipe("minmax").with_bits(weight_bits, activation_bits)
    rules = config.rules
    if isinstance(weight_bits, str):  # a float format: the recipe's 8-bit first/last layers use it too
        rules = [dataclasses.replace(rule, weight_bits=weight_bits, activation_bits=activation_bits) for rule in rules]
    if row.linear_only:
        convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
        if convolutions:
            rules = [LayerRule("|".join(convolutions), keep_fp=True), *rules]
    rules = [dataclasses.asdict(rule) for rule in rules]
    return with_overrides(config, {"weight.granularity": granularity, "attention.enabled": False, "rules": rules})


def convert_for(row: Row, model: nn.Module, **options) -> nn.Module:
    """``convert_model`` of a quantized ``model`` with the row's conversion options (and ``options``)."""
    return convert_model(model, fp8_fast_accumulation=row.fast_accumulation, **options)


def build_dmquant(bench: ModelBench, row: Row) -> Built:
    """quantize the float32 master (a copy, or a fresh one for a rebuilt workload, quantized in place), convert it
    to real low-bit layers, cast the rest of the model to the compute dtype; then, for rows with
    ``measured_paths`` on CUDA, time each converted layer's paths on the workload's call and keep the fastest
    (:func:`dmquant.kernels.paths.select_paths`)."""
    workload = bench.workload
    fresh = workload.model is None
    master = workload.master()
    config = dmquant_config(row, master)
    quantized = quantize(master, config, workload.calibration(), batch_size=2, progress=bench.args.progress,
                         inplace=fresh)  # fmt: skip
    layers = info(quantized).report.layers
    try:
        converted = convert_for(row, quantized, inplace=fresh)
    except Exception as error:  # a conversion that refuses is a row this build cannot run
        raise RowUnsupported(f"convert_model raised {type(error).__name__}: {error}") from error
    del quantized, master
    _free_memory()
    model = cast_outside_low_bit_layers(converted, bench.dtype).eval()
    details = {
        "recipe": config.to_dict(),
        "coverage": {
            "quantized": dict(Counter(layer.kind for layer in layers if layer.quantized)),
            "skipped": dict(Counter(layer.kind for layer in layers if not layer.quantized)),
        },
        "conversion": conversion_summary(model),
    }
    if row.measured_paths and bench.device.type == "cuda":
        memory_format = MEMORY_FORMATS[bench.args.memory_format]
        args_, kwargs = workload.inputs(bench.dtype, memory_format)
        convs_in_memory_format(model, memory_format)
        began = time.perf_counter()
        paths = select_paths(model, lambda: model(*args_, **kwargs), progress=bench.args.progress)
        details["paths"] = paths.to_dict() | {"seconds": time.perf_counter() - began, "summary": paths.summary()}
    return Built(model, details)


def conversion_summary(model: nn.Module) -> dict[str, Any] | None:
    """What ``convert_model`` reported (``model.dmquant_conversion``): layouts, how each converted
    layer takes its input (a kernel mode, or the reference path), what stayed simulated and why."""
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if report is None:
        return None
    return {
        "summary": report.summary(),
        "converted": dict(report.converted),
        "activations": dict(Counter(layer["activation"] for layer in report.layers)),
        "kept_simulated": dict(Counter(report.kept.values())),
        "weight_bytes_before": report.weight_bytes_before,
        "weight_bytes_after": report.weight_bytes_after,
    }


def cast_outside_low_bit_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and buffers to ``dtype``, except the buffers of converted low-bit layers
    (their fp8 codes and float32 scales are as their kernels take them). Their biases are cast too: every
    floating parameter is then in ``dtype``, which is how diffusers reads a model's dtype (``ModelMixin.dtype``,
    the first one; UNet2DModel casts its time embedding to it). Returns ``model``."""
    low_bit = outermost(model, lambda module: type(module).__module__.startswith("dmquant.kernels"))
    kept = {id(inner) for layer in low_bit.values() for inner in layer.modules()}
    for module in model.modules():
        buffers = [] if id(module) in kept else module.named_buffers(recurse=False)
        for name, tensor in [*module.named_parameters(recurse=False), *buffers]:
            if tensor.is_floating_point():
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    setattr(module, name, tensor.to(dtype))
    return model


BUILDERS: dict[str, Callable[[ModelBench, Row], Built]] = {
    "bf16": build_bf16,
    "torchao": build_torchao,
    "dmquant": build_dmquant,
}

# ----------------------------------------------------------------------------------------------
# Running: compile, CUDA graphs, timing, profiling


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_compiler() -> dict[str, Any]:
    """Apply ``INDUCTOR_SETTINGS`` and ``DYNAMO_SETTINGS``; returns them as applied."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for dotted, value in INDUCTOR_SETTINGS.items():
        *parents, name = dotted.split(".")
        target = inductor_config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    for name, value in DYNAMO_SETTINGS.items():
        if hasattr(dynamo_config, name):  # named cache_size_limit before torch 2.7
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
    torch.backends.cudnn.benchmark = True
    return {"inductor": INDUCTOR_SETTINGS, "dynamo": DYNAMO_SETTINGS, "cudnn_benchmark": True}


def compile_in_place(model: nn.Module, scope: str) -> int:
    """torch.compile (default mode, ``dynamic=False``) the whole model or its outermost blocks; how many regions."""
    torch._dynamo.reset()
    if scope == "model":
        model.compile(dynamic=False)
        return 1
    regions = outermost(model, lambda module: type(module).__name__ in COMPILED_BLOCKS)
    for module in regions.values():
        module.compile(dynamic=False)
    return len(regions)


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_in_place`: every module runs eagerly again."""
    for module in model.modules():
        module._compiled_call_impl = None


def capture_graph(call: Callable[[], Any]) -> Callable[[], None]:
    """``call`` (static inputs) captured into a torch.cuda.CUDAGraph after warm-up on a side stream; its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def _quantiles(times_ms: list[float]) -> dict[str, float]:
    if len(times_ms) == 1:
        low = median = high = times_ms[0]
    else:
        low, median, high = statistics.quantiles(times_ms, n=4, method="inclusive")
    return {"median_ms": median, "p25_ms": low, "p75_ms": high, "iqr_ms": high - low, "min_ms": min(times_ms)}


def timed(bench: ModelBench, call: Callable[[], Any]) -> dict[str, Any]:
    """Median and IQR of ``--repeats`` calls after ``--warmup`` (CUDA events on CUDA), and their peak memory."""
    device, args = bench.device, bench.args
    for _ in range(args.warmup):
        call()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - began))
    return _quantiles(times) | {"repeats": args.repeats, "peak_memory_gib": bench.peak_memory_gib()}


#: Kernel categories by name, checked in order (flash/fmha kernels carry "gemm" in their names too,
#: inductor's fused elementwise kernels the names of the ops they follow, such as addmm).
KERNEL_CATEGORIES = (
    ("other", re.compile(r"^triton_(poi|red|per)_")),  # inductor's fused pointwise/reduction kernels
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("gemm/conv", re.compile(r"gemm|gemv|matmul|cutlass|xmma|nvjet|tinygemm|conv|fprop|wgmma|_mm|mm_|addmm|triton_tem|"
                             r"sm\d\d_|cublas|cudnn|int4pack|scaled_mm|linear", re.I)),
)  # fmt: skip


def kernel_category(name: str) -> str:
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def kernel_times_us(call: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Self time of each kernel of one call (CUDA kernels on CUDA; aten ops on the CPU), in µs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as profiler:
        call()
        _synchronize(device)
    times: dict[str, float] = {}
    for event in profiler.key_averages():
        if device.type == "cuda" and event.device_type == DeviceType.CUDA:
            times[event.key] = times.get(event.key, 0.0) + event.self_device_time_total
        elif device.type != "cuda" and event.device_type == DeviceType.CPU:
            times[event.key] = times.get(event.key, 0.0) + event.self_cpu_time_total
    return {name: us for name, us in times.items() if us > 0}


def kernel_summary(times_us: dict[str, float], flops: FlopCount, top: int = 8) -> dict[str, Any]:
    """Time per kernel category, achieved TFLOP/s of the GEMM/conv and attention kernels, the top kernels."""
    total = sum(times_us.values())
    by_category: dict[str, float] = {}
    for name, us in times_us.items():
        by_category[kernel_category(name)] = by_category.get(kernel_category(name), 0.0) + us

    def tflops(flop: int, us: float) -> float | None:
        return flop / (us * 1e-6) / 1e12 if us else None

    ranked = sorted(times_us.items(), key=lambda item: -item[1])[:top]
    return {
        "kernel_time_ms": total / 1000,
        "time_share": {category: us / total for category, us in by_category.items()} if total else {},
        "gemm_conv_tflops": tflops(flops.layer_total, by_category.get("gemm/conv", 0.0)),
        "attention_tflops": tflops(flops.attention, by_category.get("attention", 0.0)),
        "top": [
            {"name": name[:160], "ms": us / 1000, "share": us / total, "category": kernel_category(name)}
            for name, us in ranked
        ],
    }


# ----------------------------------------------------------------------------------------------
# One model's rows


class ModelBench:
    """One model's shared state: the float32 master and inputs on the device, the FP FLOP count,
    the latencies measured so far (the speed-up references) and a compiled bf16 model kept for the
    CUDA-graph row."""

    def __init__(self, name: str, args: argparse.Namespace, rows: Sequence[str]):
        self.name = name
        self.args = args
        self.rows = list(rows)  # the rows this run measures
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with torch.no_grad():
            self.workload = WORKLOADS[name](args, self.device)
        master = self.workload.model
        args_, kwargs = self.workload.inputs(torch.float32)
        self.fp_flops = count_flops(master, lambda: master(*args_, **kwargs))
        if self.workload.factory is not None:  # rebuilt per row: not held beside the rows' copies
            self.workload.model = master = None
        self.medians: dict[tuple[str, str], float] = {}
        self.kept_compiled: Built | None = None
        _free_memory()
        self.baseline = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def peak_memory_gib(self) -> float | None:
        """Peak allocated GPU memory since the last reset, less the master and inputs this bench holds."""
        if self.device.type != "cuda":
            return None
        return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / GIB

    def resident_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return (torch.cuda.memory_allocated(self.device) - self.baseline) / GIB

    def settings(self, row: Row) -> list[str]:
        """The row's settings that ``--settings`` selects and the device can run, headline first."""
        runnable = SETTINGS if self.device.type == "cuda" else (EAGER, COMPILED)
        return [setting for setting in row.settings if setting in self.args.settings and setting in runnable]

    def reference_ms(self, setting: str, results: Path) -> tuple[float | None, str | None]:
        """Median of the bf16 row of ``setting``: from this run, else from its stored cell."""
        row = REFERENCE_ROW[setting]
        if (row, setting) in self.medians:
            return self.medians[row, setting], "this run"
        path = Cell(self.name, row).path(results)
        if path.exists():
            stored = json.loads(path.read_text())
            median = ((stored.get("measurements") or {}).get(setting) or {}).get("median_ms")
            if stored.get("status") == "ok" and median is not None:
                return median, f"stored cell ({stored.get('environment', {}).get('date')})"
        return None, None


def convs_in_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """The 4-D weights of ``model``'s float ``nn.Conv2d`` layers in ``memory_format``, in place (converted layers and
    tensor subclasses left as they are, unlike ``nn.Module.to``); returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and type(module.weight) is nn.Parameter:
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
    return model


@torch.no_grad()
def measure(bench: ModelBench, row: Row, built: Built) -> dict[str, Any]:
    """Every selected setting of ``row`` on ``built``: latency, memory, compile time, kernels."""
    settings = bench.settings(row)
    memory_format = MEMORY_FORMATS[bench.args.memory_format]
    args_, kwargs = bench.workload.inputs(bench.dtype, memory_format)
    model = convs_in_memory_format(built.model, memory_format)

    def call() -> Any:
        return model(*args_, **kwargs)

    out: dict[str, Any] = {"measurements": {}, "resident_gib": bench.resident_gib()}
    began = time.perf_counter()  # the first call also autotunes kernels (cuDNN, dmquant's Triton GEMMs)
    out["flops"] = flops = bench.fp_flops if built.compiled else count_flops(model, call)
    out["first_call_s"] = None if built.compiled else time.perf_counter() - began
    if EAGER in settings:
        out["measurements"][EAGER] = timed(bench, call)
    if {COMPILED, GRAPHED} & set(settings):
        _measure_compiled(bench, built, call, settings, out)
    # compiled unless compiling failed or the row runs eager only: the kernels of the headline setting
    out["kernels"] = profiled_kernels(call, bench.device, flops)
    return out


def profiled_kernels(call: Callable[[], Any], device: torch.device, flops: FlopCount) -> dict[str, Any]:
    """:func:`kernel_summary` of one profiled call, or why the profiler could not run (CUPTI refused)."""
    try:
        return kernel_summary(kernel_times_us(call, device), flops)
    except Exception as error:  # the latency stands without a kernel breakdown
        return {"error": f"torch.profiler failed: {type(error).__name__}: {error}"}


def _measure_compiled(bench: ModelBench, built: Built, call: Callable[[], Any], settings: list[str], out: dict) -> None:
    """Compile (unless ``built`` is compiled already), time the compiled and the graphed settings."""
    if not built.compiled:
        began = time.perf_counter()
        try:
            out["compile_regions"] = compile_in_place(built.model, bench.args.compile_scope)
            call()
            _synchronize(bench.device)
        except Exception as error:  # a model torch.compile cannot take still has its eager numbers
            uncompile(built.model)
            reason = f"torch.compile failed: {type(error).__name__}: {error}"
            out["measurements"] |= {setting: {"error": reason} for setting in settings if setting != EAGER}
            return
        out["compile_s"] = time.perf_counter() - began
        built.compiled = True
    if COMPILED in settings:
        out["measurements"][COMPILED] = timed(bench, call)
    if GRAPHED in settings:
        out["measurements"][GRAPHED] = _timed_graph(bench, call)


def _timed_graph(bench: ModelBench, call: Callable[[], Any]) -> dict[str, Any]:
    try:
        replay = capture_graph(call)
    except Exception as error:  # capture refuses some ops (CPU syncs); the other settings stand
        return {"error": f"CUDA graph capture failed: {type(error).__name__}: {error}"}
    result = timed(bench, replay)
    del replay
    return result


def _headline(settings: list[str], measurements: dict[str, dict]) -> str | None:
    """The first of the row's selected settings that measured a latency."""
    return next((s for s in settings if "median_ms" in measurements.get(s, {})), None)


def metrics_of(bench: ModelBench, row: Row, measured: dict[str, Any], results: Path) -> tuple[dict[str, Any], str]:
    """The cell's flat numbers (the headline setting's latency and memory, speed-ups, FLOPs, TFLOP/s) and
    which setting is the headline; each measurement gets its speed-up over the bf16 row of its setting."""
    measurements = measured["measurements"]
    headline = _headline(bench.settings(row), measurements)
    if headline is None:
        raise RuntimeError("no setting measured a latency: " + json.dumps(measurements))
    for setting, result in measurements.items():
        if "median_ms" in result:
            bench.medians[row.name, setting] = result["median_ms"]
            reference, source = bench.reference_ms(setting, results)
            result["speedup_vs_bf16_same_setting"] = reference / result["median_ms"] if reference else None
            result["reference"] = f"{REFERENCE_ROW[setting]} ({source})" if source else None
    main = measurements[headline]
    eager_reference, _ = bench.reference_ms(EAGER, results)
    flops, kernels = measured["flops"].summary(), measured.get("kernels") or {}
    share = kernels.get("time_share", {})
    return {
        "median_ms": main["median_ms"],
        "iqr_ms": main["iqr_ms"],
        "eager_ms": measurements.get(EAGER, {}).get("median_ms"),
        "compiled_ms": measurements.get(COMPILED, {}).get("median_ms"),
        "cuda_graph_ms": measurements.get(GRAPHED, {}).get("median_ms"),
        "speedup_vs_bf16_eager": eager_reference / main["median_ms"] if eager_reference else None,
        "speedup_vs_bf16_same_compile": main["speedup_vs_bf16_same_setting"],
        "peak_memory_gib": main["peak_memory_gib"],
        "resident_gib": measured["resident_gib"],
        "compile_s": measured.get("compile_s"),
        "first_call_s": measured["first_call_s"],
        "gflops_per_call": flops["total"] / 1e9,
        "tflops": flops["total"] / (main["median_ms"] * 1e-3) / 1e12,
        "gemm_conv_tflops": kernels.get("gemm_conv_tflops"),
        "attention_tflops": kernels.get("attention_tflops"),
        "gemm_conv_time_share": share.get("gemm/conv"),
        "attention_time_share": share.get("attention"),
        "full_precision_flop_fraction": flops["full_precision_fraction"],
        "full_precision_layer_flop_fraction": flops["full_precision_layer_fraction"],
    }, headline


#: How the ``compiled+cudagraph`` setting runs.
CUDA_GRAPH_SETTING = (
    "explicit torch.cuda.CUDAGraph capture of one whole call after compile and warm-up (3 calls on a side "
    "stream), static inputs, replayed per call; not torch.compile(mode='reduce-overhead')"
)


def _row_settings(bench: ModelBench, row: Row, headline: str, compile_settings: dict) -> dict[str, Any]:
    """How the row ran: dtype, settings measured, compile and CUDA-graph settings, warm-up and repeats."""
    settings = bench.settings(row)
    scope = bench.args.compile_scope
    compile_setting = {
        "api": "torch.compile",
        "mode": "default",
        "dynamic": False,
        "fullgraph": False,
        "scope": scope,
        "regions": f"outermost {', '.join(COMPILED_BLOCKS)} modules" if scope == "blocks" else "the whole model",
    }
    return {
        "dtype": str(bench.dtype).removeprefix("torch."),
        "memory_format": bench.args.memory_format,
        "measured": settings,
        "headline": headline,
        "warmup": bench.args.warmup,
        "repeats": bench.args.repeats,
        "compile": compile_setting | compile_settings if {COMPILED, GRAPHED} & set(settings) else None,
        "cuda_graph": CUDA_GRAPH_SETTING if GRAPHED in settings else None,
    }


def run_row(bench: ModelBench, row: Row, results: Path, compile_settings: dict) -> dict[str, Any]:
    """Build and measure one row; its cell's body (status, metrics, details)."""
    if not bench.settings(row):
        raise RowUnsupported("CUDA graphs need a CUDA device")
    began = time.perf_counter()
    built = BUILDERS[row.kind](bench, row)
    build_s = time.perf_counter() - began
    measured = measure(bench, row, built)
    metrics, headline = metrics_of(bench, row, measured, results)
    if row.name == "bf16-compiled" and built.compiled and "bf16-compiled-cudagraphs" in bench.rows:
        bench.kept_compiled = built  # the CUDA-graph row replays this very compiled model
    notes = list(built.details.pop("notes", []))
    first = bench.settings(row)[0]
    if headline != first:
        notes.append(f"headline setting is {headline}: {first} failed (see measurements)")
    return {
        "metrics": metrics | {"build_s": build_s},
        "settings": _row_settings(bench, row, headline, compile_settings),
        "measurements": measured["measurements"],
        "flops": measured["flops"].summary() | {"fp_model_total": bench.fp_flops.total},
        "kernels": measured.get("kernels"),
        "weight_bytes": weight_bytes(built.model),
        "notes": notes,
        **built.details,
    }


def run_cell(bench: ModelBench, cell: Cell, command: str, compile_settings: dict) -> dict[str, Any]:
    """One cell's JSON: what ran, its status and numbers, and where and when it ran."""
    row = ROWS[cell.row]
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "benchmark": "speed",
        "model": cell.model,
        "model_description": bench.workload.description,
        "row": cell.row,
        "kind": row.kind,
        "description": row.description + (_MEASURED_PATHS if row.kind == "dmquant" and row.measured_paths else ""),
        "status": "ok",
        "reason": None,
        "representative": bench.device.type == "cuda" and not bench.args.tiny,
        "inputs": {"batch": bench.workload.batch, "shapes": bench.workload.shapes()},
    }
    try:
        record |= run_row(bench, row, Path(bench.args.results), compile_settings)
    except (RowUnsupported, peers.PeerUnavailable) as error:
        record |= {"status": "unsupported", "reason": str(error)}
    except Exception as error:  # a cell that breaks is recorded, and the matrix goes on
        record |= {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    finally:
        _free_memory()
    record["metrics"] = record.get("metrics") or {}
    if "weight_bytes" in record:
        record["metrics"]["weight_mib"] = record["weight_bytes"] / MIB
    return record | {"command": command, "environment": run_environment(), "git_commit": git_commit()}


def run_environment() -> dict[str, Any]:
    """dmquant's provenance plus the GPU's compute capability and the compiler/peer versions."""
    versions = {}
    for distribution in ("triton", "torchao"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    cuda = torch.cuda.is_available()
    return (
        environment()
        | versions
        | {
            "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        }
    )


# ----------------------------------------------------------------------------------------------
# Device peaks


def _peak_tflops(run: Callable[[], Any], flops: int, device: torch.device, repeats: int = 10) -> float:
    for _ in range(3):
        run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
    return flops / statistics.median(times) / 1e12


#: The ``peaks.json`` entry of each compute format (:attr:`Row.compute_format`), and how the table names it.
PEAK_KEYS = {"bf16": "bf16_tflops", "fp8": "fp8_rowwise_tflops", "int8": "int8_tops"}
PEAK_LABELS = {"bf16": "bf16", "fp8": "fp8 row-wise", "int8": "int8"}


def peak_kernels(size: int, device: torch.device) -> dict[str, Callable[[], Any]]:
    """The peak probes on ``size``³ under their ``PEAK_KEYS``: bf16 ``torch.mm``, fp8 e4m3
    ``torch._scaled_mm`` with row-wise scales, int8 ``torch._int_mm``."""
    generator = torch.Generator(device=device).manual_seed(0)

    def random(dtype: torch.dtype) -> Tensor:
        return torch.randn(size, size, device=device, generator=generator).to(dtype)

    a_bf16, b_bf16 = random(torch.bfloat16), random(torch.bfloat16)
    a_fp8, b_fp8 = random(torch.float8_e4m3fn), random(torch.float8_e4m3fn).t()  # column-major right operand
    row_scale = torch.ones(size, 1, device=device)
    column_scale = torch.ones(1, size, device=device)
    a_int8 = torch.randint(-128, 128, (size, size), device=device, dtype=torch.int8)
    b_int8 = torch.randint(-128, 128, (size, size), device=device, dtype=torch.int8).t()
    return {
        PEAK_KEYS["bf16"]: lambda: torch.mm(a_bf16, b_bf16),
        PEAK_KEYS["fp8"]: lambda: torch._scaled_mm(
            a_fp8, b_fp8, scale_a=row_scale, scale_b=column_scale, out_dtype=torch.bfloat16
        ),
        PEAK_KEYS["int8"]: lambda: torch._int_mm(a_int8, b_int8),
    }


def measure_peaks(device: torch.device, size: int) -> dict[str, Any]:
    """Achieved TFLOP/s (TOPS for int8) of each peak probe on a ``size``³ product; errors say why not."""
    peaks: dict[str, Any] = {"size": size, "errors": {}}
    try:
        probes = peak_kernels(size, device)
    except Exception as error:  # fp8 dtypes missing from an old torch
        return peaks | {"errors": {"setup": f"{type(error).__name__}: {error}"}}
    for name, run in probes.items():
        try:
            peaks[name] = _peak_tflops(run, 2 * size**3, device)
        except Exception as error:  # e.g. fp8 _scaled_mm below sm 8.9
            peaks[name] = None
            peaks["errors"][name] = f"{type(error).__name__}: {error}"
    return peaks


def write_peaks(args: argparse.Namespace, command: str) -> dict[str, Any]:
    device = torch.device(args.device)
    size = 8192 if device.type == "cuda" and not args.tiny else 256
    record = {"schema": SCHEMA_VERSION, "representative": device.type == "cuda" and not args.tiny}
    record |= measure_peaks(device, size)
    record |= {"command": command, "environment": run_environment(), "git_commit": git_commit()}
    write_cell(Path(args.results) / "peaks.json", record)
    return record


# ----------------------------------------------------------------------------------------------
# The matrix


def _by_model(cells: list[Cell]) -> list[tuple[str, list[Cell]]]:
    return [(model, [cell for cell in cells if cell.model == model]) for model in dict.fromkeys(c.model for c in cells)]


def estimated_seconds(model: str, cells: int) -> float:
    """A guess of an H100's time for ``cells`` rows of ``model`` (``ESTIMATED_SECONDS`` covers all)."""
    return ESTIMATED_SECONDS[model] * cells / len(ROWS)


@dataclass
class TimeBudget:
    """``--max-minutes`` (None: no limit), and how long the models run so far took against their estimates."""

    seconds: float | None
    started: float = field(default_factory=time.monotonic)
    spent: float = 0.0
    estimated: float = 0.0

    def guess(self, model: str, cells: int) -> float:
        """The estimate of ``cells`` rows of ``model``, scaled by how far off the estimates so far were."""
        factor = self.spent / self.estimated if self.estimated else 1.0
        return estimated_seconds(model, cells) * factor

    def allows(self, seconds: float) -> bool:
        return self.seconds is None or time.monotonic() - self.started + seconds <= self.seconds

    def record(self, model: str, cells: int, seconds: float) -> None:
        self.spent += seconds
        self.estimated += estimated_seconds(model, cells)


def run_matrix(args: argparse.Namespace, command: str) -> int:
    """Run the pending cells model by model within ``--max-minutes``; returns how many are left.

    A model whose estimate (scaled by how long the models so far took against theirs) would end
    past the limit is left whole for the next run, and smaller models after it may still run; the
    first model of a run starts anyway, and if even it does not fit, its rows are split over runs
    (the rows left compare with the stored bf16 cells).
    """
    todo = pending(plan_cells(args.models, args.rows, args.settings), Path(args.results), args.force)
    budget = TimeBudget(None if args.max_minutes is None else 60 * args.max_minutes)
    compile_settings = configure_compiler()
    if todo:
        write_peaks(args, command)
    left = 0
    for model, cells in _by_model(todo):
        guess = budget.guess(model, len(cells))
        if budget.estimated and not budget.allows(guess):
            print(f"{model}: left for the next run (about {guess:.0f} s, over --max-minutes)")
            left += len(cells)
            continue
        began = time.monotonic()
        done = _run_model(model, cells, args, command, compile_settings, budget)
        budget.record(model, done, time.monotonic() - began)
        left += len(cells) - done
    if left:
        print(f"{left} cells left (time limit); run the same command again to resume")
    return left


def _run_model(
    model: str, cells: list[Cell], args: argparse.Namespace, command: str, compile_settings: dict, budget: TimeBudget
) -> int:
    """Run ``model``'s cells in one process, stopping before a row that would end past the budget
    (the first always runs); returns how many ran."""
    results = Path(args.results)
    bench = ModelBench(model, args, [cell.row for cell in cells])
    longest, done = 0.0, 0
    for cell in cells:
        if done and not budget.allows(max(longest, budget.guess(model, 1))):
            print(f"{model}: {len(cells) - done} rows left for the next run (--max-minutes)")
            break
        began = time.monotonic()
        record = run_cell(bench, cell, command, compile_settings)
        write_cell(cell.path(results), record)
        seconds = time.monotonic() - began
        longest = max(longest, seconds)
        summary = record["reason"] or f"{record['metrics'].get('median_ms', float('nan')):.3f} ms"
        print(f"{cell.model} {cell.row}: {record['status']}, {summary} ({seconds:.0f} s)")
        done += 1
    del bench
    _free_memory()
    return done


# ----------------------------------------------------------------------------------------------
# Table


def _number(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table_notes(cell: dict[str, Any]) -> str:
    """The notes column: the headline setting, the other settings' speed-ups, what stayed in bf16."""
    if cell.get("status") != "ok":
        reason = (cell.get("reason") or "").replace("\n", " ")
        return f"{cell.get('status')}: {reason[:140]}"
    notes = [(cell.get("settings") or {}).get("headline") or ""]
    for setting, result in (cell.get("measurements") or {}).items():
        speedup = result.get("speedup_vs_bf16_same_setting")
        if "error" in result:
            notes.append(f"{setting} failed")
        elif setting != notes[0] and speedup is not None:
            notes.append(f"{setting} {speedup:.2f}x")
    fraction = (cell.get("metrics") or {}).get("full_precision_layer_flop_fraction")
    if cell.get("kind") != "bf16" and fraction is not None:
        notes.append(f"{100 * fraction:.0f}% of Linear/Conv FLOPs in full precision")
    if not cell.get("representative", True):
        notes.append("not representative (CPU or --tiny)")
    return "; ".join(note for note in notes if note)


def _row_order(cell: dict[str, Any]) -> tuple[int, int, str]:
    model, row = cell.get("model", ""), cell.get("row", "")
    model_rank = MODELS.index(model) if model in MODELS else len(MODELS)
    row_rank = list(ROWS).index(row) if row in ROWS else len(ROWS)
    return model_rank, row_rank, f"{model}/{row}"


def _gemm_conv_throughput(metrics: dict[str, Any], row: str, peaks: dict[str, Any]) -> str:
    """The GEMM/conv kernels' TFLOP/s, with its share of the measured peak of the row's compute format."""
    tflops = metrics.get("gemm_conv_tflops")
    compute = ROWS[row].compute_format if row in ROWS else None
    peak = peaks.get(PEAK_KEYS[compute]) if compute else None
    if tflops is None or not peak:
        return _number(tflops, ".0f")
    return f"{tflops:.0f} ({100 * tflops / peak:.0f}% of {compute})"


def speed_table(results_dir: str | Path) -> str:
    """The speed cells under ``results_dir`` as a markdown table (plus the device peaks, when measured)."""
    results = Path(results_dir)
    cells = [json.loads(path.read_text()) for path in results.glob("*/*.json")]
    peaks_file = results / "peaks.json"
    peaks = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
    header = (
        "| model | row | median ms | speed-up vs bf16 (same compile) | peak GiB | weight MiB | TFLOP/s "
        "| GEMM/conv TFLOP/s (of peak) | notes |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [header]
    for cell in sorted(cells, key=_row_order):
        metrics = (cell.get("metrics") or {}) if cell.get("status") == "ok" else {}
        speedup = metrics.get("speedup_vs_bf16_same_compile")
        values = [
            cell.get("model"),
            cell.get("row"),
            _number(metrics.get("median_ms"), ".2f"),
            "—" if speedup is None else f"{speedup:.2f}x",
            _number(metrics.get("peak_memory_gib"), ".2f"),
            _number(metrics.get("weight_mib"), ".1f"),
            _number(metrics.get("tflops"), ".3g"),
            _gemm_conv_throughput(metrics, cell.get("row", ""), peaks),
            _table_notes(cell).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(str(value) for value in values) + " |")
    if peaks:
        size = peaks.get("size")
        measured = ", ".join(
            f"{PEAK_LABELS[compute]} {_number(peaks.get(key), '.3g')}" for compute, key in PEAK_KEYS.items()
        )
        device = (peaks.get("environment") or {}).get("device")
        lines.append(
            f"\nDevice peaks on {device} ({size}³ products, TFLOP/s; int8 in TOPS): {measured}. GEMM/conv TFLOP/s:"
            " the FLOPs of the Linear and Conv2d layers over the time of the GEMM and convolution kernels in one"
            " profiled call, against the peak of the format its low-bit layers compute in (a row that leaves layers"
            " in bf16, as torchao's leave the convolutions, mixes formats)."
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See the module docstring (below) for what is measured.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        metavar="MODEL",
        help=f"models (default: all): {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        metavar="ROW",
        help=f"rows (default: all): {', '.join(ROWS)}",
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS, metavar="SETTING",
                        help=f"execution settings measured (default: all): {', '.join(SETTINGS)}; "
                        "a row with none of them is left out")  # fmt: skip
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default="channels_last",
                        help="layout of every row's 4-D weights and latents (default: %(default)s, as diffusers "
                        "recommends for UNets; cuDNN and dmquant's convolutions both read NHWC)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per setting (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when a GPU is visible) or cpu (float32, a smoke test)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, help="denoiser batch of every model (default: 2; zoo: quality's)")
    parser.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks",
                        help="torch.compile the outermost transformer/resnet/attention blocks (default) "
                        "or the whole model")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="shrunk SD/SDXL/DiT configs, zoo batch 2: CPU tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--results", default="bench/results/speed", help="where cell JSON goes")
    parser.add_argument("--max-minutes", type=float, help="leave models that would not finish in time for a rerun")
    parser.add_argument("--force", action="store_true", help="rerun cells whose results exist")
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    parser.add_argument("-q", "--quiet", dest="progress", action="store_false", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(speed_table(args.results), end="")
        return 0
    command = "python bench/speed.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    run_matrix(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
