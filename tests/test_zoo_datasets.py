"""The procedural glyph dataset: determinism, ranges, the contrast rule, glyph geometry, speed."""

from __future__ import annotations

import time
from dataclasses import fields

import pytest
import torch

from dmquant.zoo import datasets as D
from dmquant.zoo.datasets import (
    CHARACTERS,
    CHUNK,
    COLOUR_NAMES,
    COLOURS,
    EM_FRACTION,
    FACES,
    MAX_ROTATION_DEG,
    MAX_SHIFT,
    MIN_CONTRAST,
    NUM_CLASSES,
    P_BACKGROUND_GRADIENT,
    P_FOREGROUND_GRADIENT,
    SCALE_RANGE,
    GlyphBatch,
    GlyphDataset,
    glyph_atlas,
)

CPU = torch.device("cpu")
#: Rec. 601 luma weights, written out here rather than taken from the module.
LUMA = torch.tensor([0.299, 0.587, 0.114])
PALETTE = torch.tensor(list(COLOURS.values()))
FIELD_NAMES = [f.name for f in fields(GlyphBatch)]


def assert_same_batch(a: GlyphBatch, b: GlyphBatch) -> None:
    """Identical draws; pixels equal up to float rounding (small batches may vectorise differently)."""
    for name in FIELD_NAMES:
        if name == "images":
            torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
        else:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def train32() -> GlyphBatch:
    return GlyphDataset("train", 32).batch(0, 2000)


def hand_draws(chars: str, *, face: int = 0, scale: float = 1.0, rotation: float = 0.0, shift=(0.0, 0.0), res=32):
    """Draws for ``_render``: black glyphs on white, no jitter, gradient, texture or grain."""
    n = len(chars)
    return {
        "labels": torch.tensor([CHARACTERS.index(c) for c in chars]),
        "face": torch.full((n,), face),
        "foreground": torch.full((n,), COLOUR_NAMES.index("black")),
        "background": torch.full((n,), COLOUR_NAMES.index("white")),
        "background2": torch.full((n,), COLOUR_NAMES.index("white")),
        "foreground_gradient": torch.zeros(n, dtype=torch.bool),
        "background_gradient": torch.zeros(n, dtype=torch.bool),
        "scale": torch.full((n,), scale),
        "rotation": torch.full((n,), rotation),
        "shift": torch.tensor([list(shift)] * n),
        "jitter": torch.zeros(n, 4, 3),
        "angles": torch.zeros(n, 2),
        "shade": torch.full((n,), 0.7),
        "texture": torch.zeros(n, 1, 4, 4),
        "grain": torch.zeros(n, 1, res, res),
    }


def coverage(chars: str, res: int = 32, **kwargs) -> torch.Tensor:
    """``(N, R, R)`` glyph coverage recovered from black-on-white renders (no noise)."""
    images = D._render(hand_draws(chars, res=res, **kwargs), res, CPU)
    black, white = COLOURS["black"][0], COLOURS["white"][0]
    return ((white - (images[:, 0] + 1) / 2) / (white - black)).clamp(0, 1)


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """``(x, y)`` centre of mass in pixels, pixel centres at ``i + 0.5``."""
    axis = torch.arange(mask.shape[-1], dtype=torch.float32) + 0.5
    area = mask.sum()
    return float((mask.sum(0) * axis).sum() / area), float((mask.sum(1) * axis).sum() / area)


# ------------------------------------------------------------------ determinism


def test_any_slice_renders_the_same_images_however_batched(train32):
    part = GlyphDataset("train", 32).batch(1000, 50)  # crosses the chunk boundary at 1024
    assert 1000 < CHUNK < 1050
    assert_same_batch(part, train32.slice(slice(1000, 1050)))

    D._draw_chunk.cache_clear()  # drawn afresh, not served from the cache
    again = GlyphDataset("train", 32).batch(1000, 50)
    assert_same_batch(again, part)

    for start, count in [(1023, 1), (1024, 1), (0, 3), (1990, 10)]:
        assert_same_batch(GlyphDataset("train", 32).batch(start, count), train32.slice(slice(start, start + count)))


def test_chunks_and_splits_draw_different_images(train32):
    first, second = train32.labels[: 2000 - CHUNK], train32.labels[CHUNK:2000]
    assert (first != second).float().mean() > 0.9  # chunk 1 is not a copy of chunk 0

    test = GlyphDataset("test", 32).batch(0, 500)
    assert (test.labels != train32.labels[:500]).float().mean() > 0.9
    assert (test.images - train32.images[:500]).abs().amax(dim=(1, 2, 3)).min() > 0.1

    seeded = GlyphDataset(1, 32).batch(0, 20)  # a named split is just its seed
    assert_same_batch(seeded, test.slice(slice(0, 20)))


def test_the_draws_of_an_image_do_not_depend_on_resolution(train32):
    big = GlyphDataset("train", 64).batch(0, 100)
    small = train32.slice(slice(0, 100))
    for name in FIELD_NAMES:
        if name != "images":
            assert torch.equal(getattr(big, name), getattr(small, name)), name
    # Same glyph, same colours: the 64-pixel image box-filtered down is close to the 32-pixel one.
    down = torch.nn.functional.avg_pool2d(big.images, 2)
    assert (down - small.images).abs().mean() < 0.06


def test_changing_a_returned_batch_leaves_later_batches_alone():
    dataset = GlyphDataset("train", 16)
    batch = dataset.batch(0, 10)
    expected = batch.labels.clone()
    batch.labels.zero_()
    batch.scale.fill_(5.0)
    again = dataset.batch(0, 10)
    assert torch.equal(again.labels, expected)
    assert (again.scale <= SCALE_RANGE[1]).all()


# ------------------------------------------------------------------ shapes and ranges


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_dtypes_and_ranges(resolution):
    batch = GlyphDataset("test", resolution).batch(100, 300)
    assert len(batch) == 300
    assert batch.images.shape == (300, 3, resolution, resolution)
    assert batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert batch.images.min() < -0.5 and batch.images.max() > 0.5  # uses the range, not a sliver of it
    for name in FIELD_NAMES:
        expected = (300, 2) if name == "shift" else (300, 3, resolution, resolution) if name == "images" else (300,)
        assert getattr(batch, name).shape == expected, name
    assert batch.labels.dtype == torch.int64 and batch.background_gradient.dtype == torch.bool


def test_draws_lie_in_their_ranges_with_the_documented_frequencies():
    batch = GlyphDataset("train", 16).batch(0, 5000)
    for name, size in [("labels", NUM_CLASSES), ("face", len(FACES))]:
        counts = torch.bincount(getattr(batch, name), minlength=size)
        assert len(counts) == size, name  # nothing out of range
        expected = 5000 / size
        assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected, name
    for name in ("foreground", "background", "background2"):
        assert len(torch.bincount(getattr(batch, name), minlength=len(COLOURS))) == len(COLOURS)
    assert set(batch.foreground.tolist()) == set(range(len(COLOURS)))
    # Binomial std at n=5000 is under 0.007: 0.03 is > 4 sigma.
    assert abs(batch.background_gradient.float().mean().item() - P_BACKGROUND_GRADIENT) < 0.03
    assert abs(batch.foreground_gradient.float().mean().item() - P_FOREGROUND_GRADIENT) < 0.03
    solid = ~batch.background_gradient
    assert torch.equal(batch.background2[solid], batch.background[solid])
    assert (batch.background2[~solid] != batch.background[~solid]).float().mean() > 0.5
    assert batch.scale.min() >= SCALE_RANGE[0] and batch.scale.max() <= SCALE_RANGE[1]
    assert batch.scale.max() - batch.scale.min() > 0.9 * (SCALE_RANGE[1] - SCALE_RANGE[0])
    assert batch.rotation.abs().max() <= MAX_ROTATION_DEG and batch.rotation.abs().max() > 0.9 * MAX_ROTATION_DEG
    assert batch.shift.abs().max() <= MAX_SHIFT and batch.shift.abs().max() > 0.9 * MAX_SHIFT


def test_every_background_colour_contrasts_with_the_foreground(train32):
    luma = PALETTE @ LUMA
    fg = luma[train32.foreground]
    for name in ("background", "background2"):
        contrast = (fg - luma[getattr(train32, name)]).abs()
        assert contrast.min() >= MIN_CONTRAST - 1e-6, name
    # The rule does exclude pairs: some colour pairs are too close in luma to be drawn together.
    pairs = set(zip(train32.foreground.tolist(), train32.background.tolist(), strict=True))
    close = {(i, j) for i in range(len(COLOURS)) for j in range(len(COLOURS)) if abs(luma[i] - luma[j]) < MIN_CONTRAST}
    assert close and not (pairs & close)


def test_pixels_show_the_drawn_colours(train32):
    """The border of a solid-background image has the background's luma; its extreme pixel the glyph's."""
    plain = (~train32.background_gradient & ~train32.foreground_gradient).nonzero().flatten()[:300]
    images = (train32.images[plain] + 1) / 2
    pixel_luma = torch.einsum("nchw,c->nhw", images, LUMA)
    border = torch.cat([pixel_luma[:, 0], pixel_luma[:, -1], pixel_luma[:, :, 0], pixel_luma[:, :, -1]], dim=1)
    bg = (PALETTE @ LUMA)[train32.background[plain]]
    fg = (PALETTE @ LUMA)[train32.foreground[plain]]
    assert (border.median(dim=1).values - bg).abs().max() < 0.08
    # The pixel farthest in luma from the background belongs to the glyph stroke.
    farthest = (pixel_luma.flatten(1) - bg[:, None]).abs().argmax(dim=1)
    stroke = pixel_luma.flatten(1).gather(1, farthest[:, None]).squeeze(1)
    assert ((stroke - fg).abs() < (stroke - bg).abs()).all()
    assert (stroke - fg).abs().median() < 0.06 and (stroke - fg).abs().max() < 0.2


# ------------------------------------------------------------------ glyph geometry


def test_atlas_shape_range_and_margins():
    for size in (30, 60):  # the atlases of 32- and 64-pixel images
        atlas = glyph_atlas(size)
        assert atlas.shape == (len(FACES), NUM_CLASSES, size, size)
        assert atlas.dtype == torch.float32
        assert atlas.min() >= 0 and atlas.max() <= 1
        assert (atlas.amax(dim=(2, 3)) == 1).all()  # every glyph has fully covered pixels
        border = torch.cat([atlas[..., 0, :], atlas[..., -1, :], atlas[..., 0], atlas[..., -1]], dim=-1)
        assert border.max() < 0.05  # no glyph is cut off by the canvas
    assert D._atlas_size(32) == 30 and D._atlas_size(64) == 60
    assert glyph_atlas(30) is glyph_atlas(30)  # cached


def test_an_unjittered_glyph_is_centred_and_em_sized():
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    chars = "OHoxIA"
    masks = coverage(chars)
    for char, mask in zip(chars, masks, strict=True):
        x, _ = centroid(mask)
        assert abs(x - 16) < 0.35, char
    # Cap height from the font's outline: the rows H covers span it at EM_FRACTION of the image side.
    prop = FontProperties(fname=str(D._font_dir() / D.FONT_FILES[FACES[0]]))
    expected = TextPath((0, 0), "H", size=1, prop=prop).get_extents().height * EM_FRACTION * 32
    rows = masks[1].amax(dim=1)
    assert abs(rows.sum().item() - expected) < 1.0


def test_shift_scale_and_rotation_move_the_glyph_as_documented():
    still, shifted = coverage("OO", shift=(0.0, 0.0)), coverage("O", shift=(0.1, 0.0))[0]
    x0, y0 = centroid(still[0])
    x1, y1 = centroid(shifted)
    assert x1 - x0 == pytest.approx(0.1 * 32, abs=0.2)  # shift is a fraction of the image side
    assert y1 == pytest.approx(y0, abs=0.1)
    down = coverage("O", shift=(0.0, 0.1))[0]
    assert centroid(down)[1] - y0 == pytest.approx(3.2, abs=0.2)  # +y is down the image

    bigger = coverage("O", scale=1.1)[0]
    assert float(bigger.sum() / still[0].sum()) == pytest.approx(1.1**2, rel=0.05)

    def spread(mask):
        axis = torch.arange(32.0) + 0.5
        x, y = centroid(mask)
        return float((mask.sum(0) * (axis - x) ** 2).sum()), float((mask.sum(1) * (axis - y) ** 2).sum())

    upright, turned = coverage("I")[0], coverage("I", rotation=90.0)[0]
    assert spread(upright)[1] > 5 * spread(upright)[0]  # a tall bar ...
    assert spread(turned)[0] > 5 * spread(turned)[1]  # ... lies on its side
    assert float(turned.sum()) == pytest.approx(float(upright.sum()), rel=0.05)


@pytest.mark.parametrize("face", range(len(FACES)), ids=["-".join(map(str, face)) for face in FACES])
def test_lower_and_upper_case_keep_their_relative_size_and_place(face):
    o, big_o, p, big_p = coverage("oOpP", face=face)
    assert o.sum() < 0.8 * big_o.sum()
    assert centroid(o)[1] > centroid(big_o)[1] + 1  # x-height letters sit lower than capitals
    assert centroid(p)[1] > centroid(big_p)[1] + 3  # the descender reaches below the baseline


@pytest.mark.parametrize("face", [i for i, (_, bold, _) in enumerate(FACES) if not bold])
def test_holes_are_not_filled(face):
    big_o = coverage("O", face=face)[0]
    assert big_o[15:17, 15:17].max() < 0.05  # even-odd fill keeps the counter open
    assert big_o.max() > 0.95


# ------------------------------------------------------------------ attributes and arguments


def test_attributes_name_the_drawn_style():
    face = FACES.index(("serif", True, False))
    batch = GlyphBatch(
        images=torch.zeros(2, 3, 8, 8),
        labels=torch.tensor([10, 61]),
        face=torch.tensor([face, 0]),
        foreground=torch.tensor([COLOUR_NAMES.index("red"), COLOUR_NAMES.index("white")]),
        background=torch.tensor([COLOUR_NAMES.index("white"), COLOUR_NAMES.index("black")]),
        background2=torch.tensor([COLOUR_NAMES.index("yellow"), COLOUR_NAMES.index("black")]),
        foreground_gradient=torch.tensor([False, True]),
        background_gradient=torch.tensor([True, False]),
        scale=torch.ones(2),
        rotation=torch.zeros(2),
        shift=torch.zeros(2, 2),
    )
    assert batch.attributes(0) == {
        "character": "A",
        "family": "serif",
        "bold": True,
        "oblique": False,
        "foreground": "red",
        "background": "white",
        "background2": "yellow",
        "background_gradient": True,
        "foreground_gradient": False,
    }
    second = batch.attributes(1)
    assert (second["character"], second["family"], second["bold"], second["oblique"]) == ("z", "sans", False, False)
    assert (second["foreground"], second["background"], second["foreground_gradient"]) == ("white", "black", True)


def test_attributes_of_rendered_images_follow_the_tables(train32):
    for i in (0, 1, 1500):
        words = train32.attributes(i)
        assert words["character"] == CHARACTERS[train32.labels[i]]
        assert (words["family"], words["bold"], words["oblique"]) == FACES[train32.face[i]]
        assert words["background2"] == COLOUR_NAMES[train32.background2[i]]
        assert type(words["bold"]) is bool and type(words["background_gradient"]) is bool


@pytest.mark.parametrize("start", [0, 1000, CHUNK])
def test_empty_batches(start):
    batch = GlyphDataset("train", 32).batch(start, 0)
    assert len(batch) == 0
    assert batch.images.shape == (0, 3, 32, 32)
    assert batch.shift.shape == (0, 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        GlyphDataset().batch(-1, 4)
    with pytest.raises(ValueError, match="non-negative"):
        GlyphDataset().batch(0, -4)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        GlyphDataset("validation")
    with pytest.raises(ValueError, match="at least 8"):
        GlyphDataset("train", 7)
    assert GlyphDataset("train", 8).batch(0, 2).images.shape == (2, 3, 8, 8)


def test_rendering_is_fast():
    """100k 32×32 glyphs must render in a minute on a CPU: 5000 in well under 5 s here."""
    dataset = GlyphDataset(7, 32)
    dataset.batch(0, 1)  # the atlas is built once per size; time the rendering
    began = time.perf_counter()
    batch = dataset.batch(100, 5000)
    elapsed = time.perf_counter() - began
    assert len(batch) == 5000
    assert elapsed < 5.0, f"5000 images took {elapsed:.1f} s"
