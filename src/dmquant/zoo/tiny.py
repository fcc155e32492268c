"""Tiny random-initialised denoisers of the three families dmquant supports.

They are built in code (no download) from a seed and are small enough to run whole sampling
trajectories on a CPU in seconds. Tests use them, and so does ``dmquant demo`` until a trained
reference model ships.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

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
