"""Quality of glyph images: GlyphNet accuracy, and FID-proxies of generated samples with their floors.

Generated samples are judged against held-out real glyphs (the ``test`` split) through GlyphNet's
features. Every distribution metric comes with its *floor*: the same metric between two disjoint
real sets of the same size (FID is biased upward at small N, so a number means something only
next to the floor measured at the same N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..eval.distribution import DistributionReport, distribution_report, fid_floors
from ..eval.features import FeatureExtractor, Features, device_of, extract_features
from .colour import colour_accuracy
from .datasets import GlyphDataset
from .glyphnet import GlyphNet
from .text import prompts

#: Split the real reference images come from (never seen in training).
REFERENCE_SPLIT = "test"


@dataclass
class SampleQuality:
    """Class accuracy, foreground-colour accuracy (when colours were asked for) and distribution metrics."""

    class_accuracy: float
    distribution: DistributionReport
    colour_accuracy: float | None = None

    def as_dict(self) -> dict[str, float | int | str]:
        colour = {} if self.colour_accuracy is None else {"colour_accuracy": self.colour_accuracy}
        return {"class_accuracy": self.class_accuracy, **colour, **self.distribution.as_dict()}


@dataclass
class Requests:
    """What a set of samples is asked for: the held-out glyphs' classes and, for text models, prompts and colours.

    Asking for the reference set's own conditions makes generated and real sets comparable
    class by class. Only a prompt says a colour, so only text requests carry ``colours``.
    """

    labels: Tensor
    colours: Tensor | None = None
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]


def held_out_requests(count: int, *, resolution: int = 32, text: bool = False) -> Requests:
    """The conditions of held-out glyphs ``[0, count)``: labels (and prompts and foreground colours if ``text``)."""
    batch = GlyphDataset(REFERENCE_SPLIT, resolution).batch(0, count)
    if not text:
        return Requests(batch.labels)
    return Requests(batch.labels, colours=batch.foreground, prompts=prompts(batch))


def real_features(
    extractor: FeatureExtractor, count: int, *, resolution: int = 32, start: int = 0, progress: bool = True
) -> tuple[Features, Tensor]:
    """Features (default extractor: GlyphNet) and labels of ``count`` held-out real glyphs from ``start``."""
    device = device_of(extractor)
    dataset = GlyphDataset(REFERENCE_SPLIT, resolution)
    step = 1000
    batches = (dataset.batch(i, min(step, start + count - i), device) for i in range(start, start + count, step))
    labels: list[Tensor] = []

    def images():
        for batch in batches:
            labels.append(batch.labels.cpu())
            yield batch.images

    features = extract_features(extractor, images(), batch_size=step, progress=progress, desc="real features")
    return features, torch.cat(labels)


def classifier_accuracy(glyphnet: GlyphNet, count: int = 10_000, *, resolution: int = 32) -> float:
    """GlyphNet's top-1 accuracy on ``count`` held-out real glyphs."""
    features, labels = real_features(glyphnet, count, resolution=resolution, progress=False)
    return (features.logits.argmax(1) == labels).double().mean().item()


class ReferenceSet:
    """Real features for judging ``num_samples`` generated images: a reference set and a floor set.

    Both are held-out glyphs of ``num_samples`` each, disjoint (indices ``[0, N)`` and ``[N, 2N)``).
    Distribution metrics use ``features`` (default: GlyphNet itself; e.g. an
    :class:`~dmquant.eval.inception.InceptionFeatures` for the standard FID network); class
    accuracy always uses GlyphNet's logits.
    """

    def __init__(
        self,
        glyphnet: GlyphNet,
        num_samples: int,
        *,
        features: FeatureExtractor | None = None,
        resolution: int = 32,
        progress: bool = True,
    ):
        self.glyphnet = glyphnet
        self.features = features or glyphnet
        both, _ = real_features(self.features, 2 * num_samples, resolution=resolution, progress=progress)
        self.reference = both.subset(slice(0, num_samples))
        self.floor_reference = both.subset(slice(num_samples, 2 * num_samples))
        self.floors = fid_floors(self.reference, self.floor_reference)

    def judge(
        self, images: Tensor, labels: Tensor, *, colours: Tensor | None = None, progress: bool = True
    ) -> SampleQuality:
        """Class accuracy (GlyphNet top-1 against the labels asked for) and the distribution report.

        With ``colours`` (indices into ``COLOUR_NAMES``), also the foreground-colour accuracy.
        """
        generated = extract_features(self.features, images, progress=progress, desc="sample features")
        if self.features is not self.glyphnet:
            logits = extract_features(self.glyphnet, images, progress=progress, desc="classify").logits
        else:
            logits = generated.logits
        accuracy = (logits.argmax(1) == labels.cpu()).double().mean().item()
        report = distribution_report(
            generated, self.reference, self.floor_reference, self.features.name, floors=self.floors
        )
        colour = None if colours is None else colour_accuracy(images, colours)
        return SampleQuality(accuracy, report, colour)
