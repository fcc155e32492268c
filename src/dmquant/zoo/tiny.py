"""Tiny random-initialised denoisers of the three families dmquant supports.

They are built in code (no download) from a seed and are small enough to run whole sampling
trajectories on a CPU in seconds. Tests use them, and so does ``dmquant demo`` until a trained
reference model ships.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .text import MAX_LENGTH, build_tokenizer

#: Number of classes of the class-conditional tiny models; label ``TINY_NUM_CLASSES`` is "no class".
TINY_NUM_CLASSES = 10
#: Width of the stand-in text embeddings the cross-attention tiny UNet attends to.
TINY_TEXT_DIM = 32


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet2d(seed: int = 0, class_conditional: bool = True) -> UNet2DModel:
    """A pixel-space ``UNet2DModel`` (16×16×3) with self-attention at the lower resolution."""
    with _seeded(seed):
        return UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=16,
            num_class_embeds=TINY_NUM_CLASSES + 1 if class_conditional else None,
        ).eval()


def tiny_unet2d_condition(seed: int = 0) -> UNet2DConditionModel:
    """A latent ``UNet2DConditionModel`` (8×8×4) with cross-attention to ``TINY_TEXT_DIM`` embeddings."""
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TEXT_DIM,
            norm_num_groups=8,
            attention_head_dim=8,
        ).eval()


def tiny_dit(seed: int = 0, num_embeds_ada_norm: int = 1000) -> DiTTransformer2DModel:
    """A class-conditional ``DiTTransformer2DModel`` on 8×8×4 latents with learned sigma.

    ``num_embeds_ada_norm`` defaults to 1000 because diffusers' ``DiTPipeline`` hard-codes 1000
    as the null class for classifier-free guidance.
    """
    with _seeded(seed):
        return DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=num_embeds_ada_norm,
        ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` mapping 16×16×3 images to 8×8×4 latents, for latent pipelines."""
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        ).eval()


def tiny_text_encoder(seed: int = 0, *, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer, 32-wide CLIP text encoder over the glyph prompt vocabulary (:func:`dmquant.zoo.text.build_tokenizer`);
    with ``projection`` the pooled, projected embedding SDXL and SD3 condition on as well (32 wide)."""
    vocab_size = len(build_tokenizer().get_vocab())
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=2 * TINY_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with _seeded(seed):
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """A random-initialised text-to-image pipeline of diffusers' ``kind``, 16×16 images, in well under a second.

    ``"sd"``: ``StableDiffusionPipeline`` (:func:`tiny_unet2d_condition`); ``"sdxl"``:
    ``StableDiffusionXLPipeline``, its UNet with SDXL's added text-and-size conditioning and two text encoders;
    ``"sd3"``: ``StableDiffusion3Pipeline``, an MM-DiT ``SD3Transformer2DModel`` over two CLIP encoders (no T5:
    the pipeline pads with zeros) and a flow-matching scheduler.
    """
    from diffusers import (  # the pipeline modules pull in transformers' image processors: only when asked
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    ddim = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            tokenizer=build_tokenizer(),
            unet=tiny_unet2d_condition(seed),
            scheduler=ddim,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "sdxl":
        with _seeded(seed):
            unet = UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=TINY_TEXT_DIM + 6 * 8,
                cross_attention_dim=2 * TINY_TEXT_DIM,
                norm_num_groups=8,
            ).eval()
        return StableDiffusionXLPipeline(
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            text_encoder_2=tiny_text_encoder(seed + 1, projection=True),
            tokenizer=build_tokenizer(),
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=ddim,
        )
    if kind == "sd3":
        with _seeded(seed):
            transformer = SD3Transformer2DModel(
                sample_size=8,
                patch_size=1,
                in_channels=4,
                out_channels=4,
                num_layers=1,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=2 * TINY_TEXT_DIM,
                pooled_projection_dim=2 * TINY_TEXT_DIM,
            ).eval()
        vae = tiny_vae(seed)
        vae.register_to_config(shift_factor=0.0)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=tiny_text_encoder(seed, projection=True),
            tokenizer=build_tokenizer(),
            text_encoder_2=tiny_text_encoder(seed + 1, projection=True),
            tokenizer_2=build_tokenizer(),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    raise ValueError(f"unknown tiny pipeline kind {kind!r}: choose sd, sdxl or sd3")
