"""Features of image sets from a pluggable feature network, extracted once and reused by every metric.

FID, sFID, KID, Inception Score and precision/recall all compare statistics of features of the
same images, and the FID floor compares two real sets with the same network. Extracting the
features once per image set (:func:`extract_features`) and keeping them as :class:`Features`
lets :mod:`dmquant.eval.distribution` compute all of them without running the network again.

A feature network is anything that follows :class:`FeatureExtractor`; the standard one is
:class:`dmquant.eval.inception.InceptionFeatures`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass(eq=False)
class Features:
    """Three views of the same ``N`` images, one row per image.

    Attributes:
        pooled: ``(N, D)`` globally pooled features (FID, KID, precision/recall).
        spatial: ``(N, S)`` flattened features that keep spatial layout (sFID).
        logits: ``(N, C)`` classifier logits (Inception Score).
    """

    pooled: Tensor
    spatial: Tensor
    logits: Tensor

    def __post_init__(self) -> None:
        shapes = {name: tuple(tensor.shape) for name, tensor in self._fields().items()}
        if any(len(shape) != 2 for shape in shapes.values()):
            raise ValueError(f"features must be 2-D (N, dims), got shapes {shapes}")
        if len({shape[0] for shape in shapes.values()}) != 1:
            raise ValueError(f"features disagree on the number of images: {shapes}")

    def _fields(self) -> dict[str, Tensor]:
        return {"pooled": self.pooled, "spatial": self.spatial, "logits": self.logits}

    def __len__(self) -> int:
        return self.pooled.shape[0]

    @classmethod
    def cat(cls, parts: Sequence[Features]) -> Features:
        """Concatenate the rows of several feature sets, in order."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of features")
        names = ("pooled", "spatial", "logits")
        return cls(**{name: torch.cat([getattr(part, name) for part in parts]) for name in names})

    def subset(self, index: slice | Tensor | Sequence[int]) -> Features:
        """The rows selected by ``index``: a slice, a sequence or tensor of row indices, or a boolean mask."""
        return Features(**{name: tensor[index] for name, tensor in self._fields().items()})

    def to(self, *args: Any, **kwargs: Any) -> Features:
        """Move or cast every view, with the arguments of :meth:`torch.Tensor.to`."""
        return Features(**{name: tensor.to(*args, **kwargs) for name, tensor in self._fields().items()})


class FeatureExtractor(Protocol):
    """A feature network: maps images to :class:`Features`.

    Attributes:
        name: identifies the network (and its weights) in reports, e.g. ``"inception-v3-fid"``.
    """

    name: str

    def features(self, images: Tensor) -> Features:
        """Features of a batch of float ``(B, 3, H, W)`` RGB images in ``[-1, 1]``, of any resolution.

        The extractor resizes and normalises the images to what its network expects.
        """
        ...


def device_of(extractor: FeatureExtractor) -> torch.device:
    """Where an extractor's weights live (CPU for extractors without parameters)."""
    parameter = next(extractor.parameters(), None) if isinstance(extractor, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _eval_mode(extractor: FeatureExtractor) -> Iterator[None]:
    """Put an ``nn.Module`` extractor in eval mode for the block, then restore its mode."""
    if not isinstance(extractor, nn.Module):
        yield
        return
    was_training = extractor.training
    extractor.eval()
    try:
        yield
    finally:
        extractor.train(was_training)


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return images.split(batch_size)
    return images


def extract_features(
    extractor: FeatureExtractor,
    images: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Run ``extractor`` over a set of images and gather the features as float64 on the CPU.

    Args:
        extractor: the feature network; an ``nn.Module`` extractor runs in eval mode (its
            previous mode is restored afterwards). Everything runs under ``torch.inference_mode``.
        images: float ``(N, 3, H, W)`` RGB images in ``[-1, 1]``, split into batches of
            ``batch_size``; or an iterable of such batches (e.g. a generator that samples or
            decodes them), used as given.
        batch_size: images per forward pass when ``images`` is one tensor.
        device: where the network runs. ``None`` keeps the extractor where it is (its
            parameters' device, CPU if it has none); otherwise an ``nn.Module`` extractor is
            moved there. Each batch is moved to this device.
        progress: show a tqdm bar (it disappears when done).
        desc: the bar's label.

    Returns:
        The features of all images, in input order, as float64 CPU tensors.
    """
    if device is not None and isinstance(extractor, nn.Module):
        extractor.to(device)
    target = torch.device(device) if device is not None else device_of(extractor)
    batches = _batches(images, batch_size)
    total = len(batches) if isinstance(batches, Sequence) else None
    parts = []
    with _eval_mode(extractor), torch.inference_mode():
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False, disable=not progress):
            if batch.dim() != 4 or batch.shape[1] != 3:
                raise ValueError(f"expected (B, 3, H, W) RGB batches, got shape {tuple(batch.shape)}")
            parts.append(extractor.features(batch.to(target)).to("cpu", torch.float64))
    if not parts:
        raise ValueError("no images to extract features from")
    return Features.cat(parts)
