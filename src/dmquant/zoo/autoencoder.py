"""The glyph autoencoder: a diffusers ``AutoencoderKL`` between 64×64×3 glyph images and 16×16×4 latents.

The latent space of the latent reference models (``ldm-glyphs64``, ``dit-glyphs``), as Stable
Diffusion's KL-regularised autoencoder is theirs (Rombach et al. 2022, sec. 3 and app. G). It is
trained on the reconstruction loss and a weak KL term with the LDM weighting — per-sample sums,
``L = Σ|x − x̂| + 1e-6 · KL(q(z|x) ‖ N(0, I))`` — here divided by the pixel count. The perceptual
(LPIPS) and adversarial terms of the original are left out: their pretrained networks cannot be
downloaded here, and glyphs are flat shapes that the L1 term reconstructs well.

The export stores the latent scaling factor (1 / standard deviation of the latents of held-out
glyphs, as Stable Diffusion's 0.18215 was measured) in the autoencoder's config, so diffusion
models train on unit-variance latents.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

from ..errors import ModelError
from ..eval.images import psnr, to_unit_range
from . import WEIGHTS_DIR
from .datasets import GlyphBatch, GlyphDataset

AUTOENCODER_NAME = "glyph-vae"
#: Weight of the KL term against the summed L1 reconstruction error (LDM's ``kl_weight``).
KL_WEIGHT = 1e-6
#: Held-out glyphs that the scaling factor and the reconstruction PSNR are measured on.
MEASURE_COUNT = 2000


def glyph_autoencoder() -> AutoencoderKL:
    """64×64×3 ↔ 16×16×4 (two downsamplings), widths 32/48/64, ~0.84 M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 48, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def autoencoder_loss(model: nn.Module, batch: GlyphBatch, generator: torch.Generator) -> Tensor:
    """Mean L1 reconstruction error + ``KL_WEIGHT`` · KL per pixel (the LDM weighting; see module doc)."""
    posterior = model.encode(batch.images).latent_dist
    reconstruction = model.decode(posterior.sample(generator)).sample
    pixels = batch.images[0].numel()
    return F.l1_loss(reconstruction.float(), batch.images) + KL_WEIGHT * posterior.kl().float().mean() / pixels


def _held_out_images(model: AutoencoderKL) -> Tensor:
    return GlyphDataset("test", 64).batch(0, MEASURE_COUNT, next(model.parameters()).device).images


@torch.no_grad()
def _latent_means(model: AutoencoderKL, images: Tensor) -> Tensor:
    return torch.cat([model.encode(chunk).latent_dist.mode() for chunk in images.split(500)])


def measure_autoencoder(model: nn.Module) -> dict:
    """Reconstruction PSNR and latent standard deviation on held-out glyphs."""
    model = model.float().eval()
    images = _held_out_images(model)
    latents = _latent_means(model, images)
    with torch.no_grad():
        reconstructions = torch.cat([model.decode(chunk).sample for chunk in latents.split(500)])
    return {
        "test_reconstruction_psnr_db": float(psnr(to_unit_range(images), to_unit_range(reconstructions.clamp(-1, 1)))),
        "test_latent_std": latents.std().item(),
    }


def export_autoencoder(model: nn.Module, directory: Path) -> None:
    """fp16 ``save_pretrained`` with ``scaling_factor`` = 1 / std of held-out latents."""
    model = copy.deepcopy(model).float().eval()
    latents = _latent_means(model, _held_out_images(model))
    model.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    model.cpu().half().save_pretrained(directory, safe_serialization=True)


@lru_cache(maxsize=4)
def _shipped(device: str) -> AutoencoderKL:
    directory = WEIGHTS_DIR / AUTOENCODER_NAME
    if not (directory / "config.json").exists():
        raise ModelError(
            f"no {AUTOENCODER_NAME} in this install ({directory}); train it with `dmquant zoo train {AUTOENCODER_NAME}`"
        )
    model = AutoencoderKL.from_pretrained(directory, torch_dtype=torch.float32).to(device).eval()
    return model.requires_grad_(False)


def shipped_autoencoder(device: torch.device | str = "cpu") -> AutoencoderKL:
    """The shipped glyph autoencoder (frozen, float32) on ``device``."""
    return _shipped(str(torch.device(device)))


@torch.no_grad()
def encode_latents(images: Tensor, generator: torch.Generator) -> Tensor:
    """Scaled latents ``z ~ q(z | x) · scaling_factor`` of images in [-1, 1], as LDMs train on."""
    autoencoder = shipped_autoencoder(images.device)
    return autoencoder.encode(images).latent_dist.sample(generator) * autoencoder.config.scaling_factor
