"""The Inception-v3 network that FID, sFID, KID, IS and precision/recall are reported with.

Published FIDs are computed with TensorFlow's Inception-v3 graph of 2015-12-05
(``classify_image_graph_def.pb``), not with torchvision's ImageNet Inception-v3: its weights
differ, and so do three details of its layers. This module writes that network in plain torch
as pytorch-fid's ``FIDInceptionV3`` does (torchvision's ``Inception3`` layout with the
``FIDInceptionA/C/E`` blocks), so it loads pytorch-fid's port of the weights,
``pt_inception-2015-12-05-6726825d.pth``, key for key:

* the average pools inside the mixed blocks leave padding out of the average
  (``count_include_pad=False``), as TensorFlow's do;
* the pool branch of the last block (``Mixed_7c``) is a max pool, not an average pool;
* the classifier has 1008 outputs.

Nothing is downloaded: :meth:`InceptionFeatures.from_weights` reads the weights file from a
path given as an argument or in ``DMQUANT_INCEPTION_WEIGHTS``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from dmquant.errors import ModelError
from dmquant.eval.features import Features

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "DMQUANT_INCEPTION_WEIGHTS"

#: Side of the square images the network was trained on; inputs are resized to it.
INPUT_SIZE = 299
NUM_CLASSES = 1008
#: ADM's sFID keeps the first 7 channels of ``mixed_6/conv`` (17 x 17 at 299 px): 2023 dims.
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args: int | tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool, stride 1, that averages only the pixels inside the image, as TensorFlow's."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-5d: 1x1, 5x5 and double 3x3 branches and an average-pool branch."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17 with strided 3x3 convolutions and a max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: factorised 7x7 branches (1x7 and 7x1) and an average-pool branch."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8 with strided convolutions and a max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b-7c: expanded 3x3 branches (1x3 and 3x1 side by side) and a pool branch.

    ``Mixed_7b`` pools by average like the other blocks; ``Mixed_7c`` by max (``max_pool=True``),
    a quirk of the TF graph that FID weights depend on.
    """

    def __init__(self, in_channels: int, *, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """FID Inception-v3 as a :class:`~dmquant.eval.features.FeatureExtractor` (name ``"inception-v3-fid"``).

    Images in ``[-1, 1]`` are resized bilinearly to 299x299 (``align_corners=False``, no
    antialiasing, as pytorch-fid) and fed as they are: pytorch-fid maps its ``[0, 1]`` input to
    ``[-1, 1]`` after resizing, which gives the same network input. The features are

    * ``pooled``: the 2048-d global average pool (``pool_3``), FID's features;
    * ``spatial``: ADM's sFID features, the first 7 channels of TF's ``mixed_6/conv``, which is
      the 1x1 branch of ``Mixed_6d`` and so the first channels of ``Mixed_6d``'s output,
      flattened in TF's height-width-channel order (7 x 17 x 17 = 2023 dims at 299 px);
    * ``logits``: ``pool_3 @ fc.weight.T``, the 1008 classifier logits *without* the fc bias,
      which is what the reference Inception Score code (Salimans et al. 2016), ADM's evaluator
      and torch-fidelity's ``logits_unbiased`` (torchmetrics' IS default) feed the softmax.

    Build it with :meth:`from_weights`; the constructor leaves the weights at random.
    """

    name = "inception-v3-fid"

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, images: Tensor) -> Features:
        """Features of float ``(B, 3, H, W)`` RGB images in ``[-1, 1]``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pooled = x.mean(dim=(2, 3))
        return Features(pooled=pooled, spatial=spatial, logits=pooled @ self.fc.weight.T)

    def features(self, images: Tensor) -> Features:
        """The :class:`~dmquant.eval.features.FeatureExtractor` entry point: same as calling the module."""
        return self(images)

    @classmethod
    def from_weights(cls, path: str | os.PathLike[str] | None = None) -> InceptionFeatures:
        """Build the network with pytorch-fid's FID weights, in eval mode and frozen.

        Args:
            path: the weights file (``.pth`` as published, or ``.safetensors`` with the same
                keys); defaults to the ``DMQUANT_INCEPTION_WEIGHTS`` environment variable.

        Raises:
            ModelError: no path is given, the file does not exist or cannot be read, or its
                keys or shapes are not those of the FID Inception-v3.
        """
        path = path if path is not None else os.environ.get(WEIGHTS_ENV)
        if path is None or not Path(path).is_file():
            where = "no path was given" if path is None else f"{path} is not a file"
            raise ModelError(
                f"FID Inception-v3 weights not found ({where}). Download {WEIGHTS_FILE} from {WEIGHTS_URL} "
                "(dmquant never downloads it) and pass its path to InceptionFeatures.from_weights(path) "
                f"(--inception-weights on the command line) or set the environment variable {WEIGHTS_ENV}."
            )
        model = cls()
        state_dict = _read_state_dict(Path(path))
        try:
            incompatible = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as error:
            raise ModelError(f"{path} does not fit the FID Inception-v3: {error}") from None
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise ModelError(
                f"{path} is not a FID Inception-v3 state dict: missing keys {incompatible.missing_keys}, "
                f"unexpected keys {incompatible.unexpected_keys}"
            )
        return model.eval().requires_grad_(False)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise ModelError(f"cannot read the weights file {path}: {error}") from None
    if not isinstance(state_dict, dict):
        raise ModelError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict
