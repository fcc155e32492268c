"""GlyphNet: the feature network behind dmquant's distribution metrics on glyph images.

FID, KID, IS and precision/recall are defined on the features of an Inception-v3 trained on
ImageNet, whose weights cannot reach our machines and whose features mean little for 32×32
glyphs anyway. GlyphNet takes its place for the zoo: a small CNN classifier trained on the
glyph dataset (``zoo/datasets.py``) whose

- pooled penultimate features (``FEATURE_DIM``) serve FID, KID and precision/recall, as
  Inception's pool3 does;
- spatial map after the second stage (the first ``SPATIAL_CHANNELS`` channels of an 8×8 map)
  serves sFID, as ADM's sFID uses the first 7 channels of Inception's ``mixed_6/conv``;
- logits serve the Inception Score and the class accuracy of generated samples.

Metrics computed with it are "proxies": comparable with each other, not with published FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import ModelError
from ..eval.features import Features
from .datasets import NUM_CLASSES

#: Image side GlyphNet works at; other sizes are resized (antialiased bilinear) to it.
INPUT_SIZE = 32
WIDTHS = (32, 64, 128, 192)
FEATURE_DIM = WIDTHS[-1]
SPATIAL_CHANNELS = 32


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()
    )


class GlyphNet(nn.Module):
    """A 4-stage CNN (32×32 → 4×4) with a linear head over the 62 glyph classes."""

    name = "glyphnet"

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = WIDTHS
        self.stem = _conv(3, w[0])
        self.stage1 = nn.Sequential(_conv(w[0], w[1], 2), _conv(w[1], w[1]))  # 16×16
        self.stage2 = nn.Sequential(_conv(w[1], w[2], 2), _conv(w[2], w[2]))  # 8×8
        self.stage3 = nn.Sequential(_conv(w[2], w[3], 2), _conv(w[3], w[3]))  # 4×4
        self.head = nn.Linear(w[3], num_classes)

    def _resize(self, images: Tensor) -> Tensor:
        if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
            return images
        return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)

    def features(self, images: Tensor) -> Features:
        """Pooled, spatial and logit features of images ``(N, 3, H, W)`` in ``[-1, 1]``."""
        spatial = self.stage2(self.stage1(self.stem(self._resize(images))))
        pooled = self.stage3(spatial).mean(dim=(2, 3))
        return Features(pooled=pooled, spatial=spatial[:, :SPATIAL_CHANNELS].flatten(1), logits=self.head(pooled))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits."""
        return self.features(images).logits


def load_glyphnet(path: str | Path, device: torch.device | str = "cpu") -> GlyphNet:
    """A trained GlyphNet from a safetensors file, in float32 and eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no GlyphNet weights here; train them with `dmquant zoo train glyphnet`")
    net = GlyphNet()
    try:
        state = {k: v.float() for k, v in load_file(path).items()}
    except SafetensorError as error:
        raise ModelError(f"{path}: not a safetensors file ({error})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"{path}: not GlyphNet weights ({error})") from None
    return net.to(device).eval()
