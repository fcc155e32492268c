"""Which named colour is a glyph drawn in? Foreground-colour accuracy of text-to-image samples.

Generated images come with no glyph mask, so the estimate works from pixels alone:

1. Background model: a plane ``a + b·x + c·y`` per channel, fitted by least squares to the
   border pixels (the outer ``BORDER_FRACTION`` of each side). The glyph sits inside the border,
   and a plane also follows the linear background gradients the dataset draws.
2. Foreground pixels: those whose RGB distance from the background model is at least
   ``FOREGROUND_SHARE`` of the image's largest distance — the glyph's most saturated pixels,
   clear of anti-aliased edges and of the shaded end of a foreground gradient.
3. Their per-channel median, mapped to the nearest of the named ``COLOURS`` in RGB.

Measured on 4000 held-out real glyphs (the ceiling a model can be judged against): 97.9 % at
32×32 and 98.3 % at 64×64 overall; 99.9 % on solid foregrounds, 90-92 % on the 20 % drawn as
gradients. The remaining confusions are yellow→orange, orange→brown and white→pink, where a
gradient's shade crosses into the neighbouring named colour.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .datasets import COLOURS

#: Share of the image side, per edge, whose pixels fit the background model.
BORDER_FRACTION = 0.08
#: Foreground pixels lie at least this share of the largest distance from the background model.
FOREGROUND_SHARE = 0.9


def _border(size: int, device: torch.device) -> Tensor:
    width = max(2, round(size * BORDER_FRACTION))
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[:width] = mask[-width:] = True
    mask[:, :width] = mask[:, -width:] = True
    return mask.reshape(-1)


def foreground_colours(images: Tensor) -> Tensor:
    """``(N,)`` indices into ``COLOUR_NAMES``: the estimated glyph colour of images ``(N, 3, R, R)`` in [-1, 1]."""
    rgb = (images.float() + 1) / 2
    n, _, height, width = rgb.shape
    device = rgb.device
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height, device=device), torch.linspace(-1, 1, width, device=device), indexing="ij"
    )
    design = torch.stack([torch.ones_like(xs), xs, ys], -1).reshape(-1, 3)  # (P, 3)
    border = _border(height, device)
    pixels = rgb.reshape(n, 3, -1).transpose(1, 2)  # (N, P, 3)
    plane = torch.linalg.lstsq(design[border].expand(n, -1, -1), pixels[:, border]).solution  # (N, 3, 3)
    distance = (pixels - design @ plane).norm(dim=-1)  # (N, P)
    chosen = distance >= FOREGROUND_SHARE * distance.amax(1, keepdim=True)
    colour = torch.where(chosen.unsqueeze(-1), pixels, torch.nan).nanmedian(dim=1).values  # (N, 3)
    palette = torch.tensor(list(COLOURS.values()), device=device)
    return torch.cdist(colour, palette).argmin(1)


def colour_accuracy(images: Tensor, expected: Tensor) -> float:
    """Share of images whose estimated foreground colour is the ``expected`` one (indices into ``COLOUR_NAMES``)."""
    return (foreground_colours(images).cpu() == expected.cpu()).double().mean().item()
