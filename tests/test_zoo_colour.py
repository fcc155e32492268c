"""The foreground-colour estimator behind the text-to-image model's colour accuracy."""

from __future__ import annotations

import pytest
import torch

from dmquant.zoo.colour import colour_accuracy, foreground_colours
from dmquant.zoo.datasets import COLOUR_NAMES, COLOURS, GlyphDataset


@pytest.mark.parametrize("resolution", [32, 64])
def test_reads_the_colour_of_real_glyphs(resolution):
    """Measured on 4000 held-out glyphs: 97.9 % (32) and 98.3 % (64); solid foregrounds 99.9 %."""
    batch = GlyphDataset("test", resolution).batch(0, 1000)
    assert colour_accuracy(batch.images, batch.foreground) >= 0.95
    solid = ~batch.foreground_gradient
    assert colour_accuracy(batch.images[solid], batch.foreground[solid]) >= 0.99


def test_a_square_of_a_named_colour_on_another_background():
    images = torch.empty(len(COLOURS), 3, 32, 32)
    names = list(COLOURS)
    for i, name in enumerate(names):
        background = COLOURS["white" if name in ("black", "blue", "purple", "brown") else "black"]
        images[i] = torch.tensor(background).view(3, 1, 1)
        images[i, :, 10:22, 12:20] = torch.tensor(COLOURS[name]).view(3, 1, 1)
    assert [COLOUR_NAMES[i] for i in foreground_colours(images * 2 - 1)] == names


def test_each_image_is_read_on_its_own_whatever_the_batch():
    batch = GlyphDataset("test", 32).batch(0, 64)
    together = foreground_colours(batch.images)
    apart = torch.cat([foreground_colours(batch.images[i : i + 1]) for i in range(64)])
    assert torch.equal(together, apart)
    assert torch.equal(foreground_colours(batch.images.flip(0)), together.flip(0))


def test_output_is_on_the_input_device():
    images = GlyphDataset("test", 32).batch(0, 4).images
    assert foreground_colours(images).device == images.device
    assert colour_accuracy(images, torch.zeros(4, dtype=torch.long)) in (0.0, 0.25, 0.5, 0.75, 1.0)
