"""The latent reference models, both on the glyph autoencoder's 16×16×4 latents of 64×64 glyphs.

- ``ldm-glyphs64``: text-to-image in Stable Diffusion's component types — ``AutoencoderKL``,
  ``CLIPTextModel`` + ``CLIPTokenizer``, ``UNet2DConditionModel`` with self- and cross-attention —
  exported as a ``StableDiffusionPipeline`` directory. Stable Diffusion's noise schedule
  (scaled-linear β 0.00085 → 0.012) and sampler settings.
- ``dit-glyphs``: a class-conditional ``DiTTransformer2DModel`` (Peebles & Xie 2023; patch 2,
  adaLN-Zero) exported as a ``DiTPipeline`` directory, with DiT's linear schedule. The label
  table has DiT's 1000 classes plus the null class because ``DiTPipeline`` hard-codes 1000 as the
  null label of classifier-free guidance; labels 0..61 are the glyph classes.

Both pipelines share one autoencoder: their ``vae`` folder is a relative link to ``glyph-vae``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from functools import cache
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import LabelEmbedding
from torch import Tensor, nn

from ..atomic import write_atomically
from . import WEIGHTS_DIR
from .autoencoder import AUTOENCODER_NAME, encode_latents, shipped_autoencoder
from .datasets import NUM_CLASSES, GlyphBatch, GlyphDataset
from .diffusion import NUM_TRAIN_TIMESTEPS, dropped_conditions, epsilon_loss
from .text import TEXT_WIDTH, build_text_encoder, build_tokenizer, prompts, token_ids

LATENT_SIZE = 16
LATENT_CHANNELS = 4
#: Noise schedules: Stable Diffusion's (``ldm``) and DiT's, which is DDPM's (``dit``).
SCHEDULES = {
    "ldm": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "dit": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
}
#: DiT's null label for classifier-free guidance (``DiTPipeline`` hard-codes it).
DIT_NULL_CLASS = 1000
#: Guidance scale each exported pipeline samples with by default.
DEFAULT_GUIDANCE = 4.0
#: Prompts the text-to-image pipeline samples when none are given: the first held-out glyphs.
NUM_DEFAULT_PROMPTS = 8


@cache
def _schedule(name: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="epsilon", **SCHEDULES[name])


def _sampler(name: str) -> DDIMScheduler:
    """DDIM over schedule ``name`` with Stable Diffusion's sampler settings (no clipping of latents)."""
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **SCHEDULES[name],
    )


def _load_in_float32(directory: Path) -> None:
    """Make every component of a saved pipeline load in float32 by default, as diffusers' own models do.

    transformers writes the weights' dtype (fp16 here) into a model's ``config.json`` and loads it back in
    that dtype, so a plain ``from_pretrained(directory)`` would pair an fp16 text encoder with an fp32
    UNet and fail on the first prompt; the fp16 weights are only the shipped storage format.
    """
    for config_path in directory.glob("*/config.json"):
        config = json.loads(config_path.read_text())
        if config.get("dtype", config.get("torch_dtype")) not in (None, "float32"):
            config = {**config, **{key: "float32" for key in ("dtype", "torch_dtype") if key in config}}
            config_path.write_text(json.dumps(config, indent=2) + "\n")  # in the staging directory


def _write_pipeline(pipeline, directory: Path, info: dict) -> None:
    """fp16 ``save_pretrained`` of ``pipeline``, its ``vae`` a relative link to the shared autoencoder.

    Written beside ``directory`` first and swapped in whole, so an existing export is replaced only
    by a complete one (and ``save_pretrained`` never writes through an old ``vae`` link).
    """
    directory = directory.absolute()
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    _load_in_float32(staging)
    shutil.rmtree(staging / "vae")
    os.symlink(os.path.relpath(WEIGHTS_DIR / AUTOENCODER_NAME, directory), staging / "vae", target_is_directory=True)
    write_atomically(staging / "dmquant_model.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


# --- ldm-glyphs64 ---------------------------------------------------------------------------


def ldm_unet() -> UNet2DConditionModel:
    """Latent UNet, widths 48/96/96, cross-attention (transformer blocks) at 16×16 and 8×8, ~3.4 M."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


class TextToImage(nn.Module):
    """What ``ldm-glyphs64`` trains: the UNet and the text encoder, jointly (the autoencoder is frozen)."""

    def __init__(self):
        super().__init__()
        self.unet = ldm_unet()
        self.text_encoder = build_text_encoder()

    def forward(self, latents: Tensor, timesteps: Tensor, input_ids: Tensor) -> Tensor:
        states = self.text_encoder(input_ids).last_hidden_state
        return self.unet(latents, timesteps, encoder_hidden_states=states).sample


def text_to_image_loss(model: nn.Module, batch: GlyphBatch, generator: torch.Generator) -> Tensor:
    """ε-prediction loss on scaled latents; a dropped prompt becomes the empty prompt ``""``.

    Draws, in order: latent sample, timesteps, noise, dropped prompts.
    """
    latents = encode_latents(batch.images, generator)

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        dropped = dropped_conditions(len(batch), generator, x_t.device).tolist()
        texts = ["" if drop else text for drop, text in zip(dropped, prompts(batch), strict=True)]
        return model(x_t, t, token_ids(texts, x_t.device))

    return epsilon_loss(predict, latents, _schedule("ldm"), generator)


def export_text_to_image(model: nn.Module, directory: Path) -> None:
    """A ``StableDiffusionPipeline`` directory (fp16) plus ``dmquant_model.json`` (prompts, guidance)."""
    # imported here: the pipeline module pulls in transformers' image processors, which warn
    # without torchvision; only an export needs it
    from diffusers import StableDiffusionPipeline

    model = copy.deepcopy(model).cpu().half()
    pipeline = StableDiffusionPipeline(
        vae=shipped_autoencoder("cpu"),
        text_encoder=model.text_encoder,
        tokenizer=build_tokenizer(),
        unet=model.unet,
        scheduler=_sampler("ldm"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    held_out = GlyphDataset("test", 64).batch(0, NUM_DEFAULT_PROMPTS)
    info = {"conditioning": "text", "default_prompts": prompts(held_out), "guidance_scale": DEFAULT_GUIDANCE}
    _write_pipeline(pipeline, directory, info)


# --- dit-glyphs -----------------------------------------------------------------------------


def dit_glyphs() -> DiTTransformer2DModel:
    """DiT on 16×16×4 latents, patch 2 (64 tokens), 6 blocks of width 128 (4 heads), ~2.9 M parameters.

    diffusers' label embedding drops labels itself in training mode from the global RNG; that is
    turned off here (``dropout_prob = 0`` keeps the null row) so that :func:`class_latent_loss`
    drops them from the step's own generator, deterministically.
    """
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=6,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=DIT_NULL_CLASS,
    )
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def class_latent_loss(model: nn.Module, batch: GlyphBatch, generator: torch.Generator) -> Tensor:
    """ε-prediction loss on scaled latents; a dropped label becomes ``DIT_NULL_CLASS``.

    Draws, in order: latent sample, timesteps, noise, dropped labels.
    """
    latents = encode_latents(batch.images, generator)

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        dropped = dropped_conditions(len(batch), generator, x_t.device)
        labels = torch.where(dropped, torch.full_like(batch.labels, DIT_NULL_CLASS), batch.labels)
        return model(x_t, timestep=t, class_labels=labels).sample

    return epsilon_loss(predict, latents, _schedule("dit"), generator)


def export_dit(model: nn.Module, directory: Path) -> None:
    """A ``DiTPipeline`` directory (fp16) plus ``dmquant_model.json`` (62 classes, null label 1000)."""
    from diffusers import DiTPipeline  # imported here for the same reason as StableDiffusionPipeline above

    transformer = copy.deepcopy(model).cpu().half()
    pipeline = DiTPipeline(transformer=transformer, vae=shipped_autoencoder("cpu"), scheduler=_sampler("dit"))
    info = {
        "conditioning": "class",
        "num_classes": NUM_CLASSES,
        "null_class": DIT_NULL_CLASS,
        "guidance_scale": DEFAULT_GUIDANCE,
    }
    _write_pipeline(pipeline, directory, info)
