"""Procedural glyph images: the ground truth dmquant's reference models are trained and judged on.

No image dataset can be downloaded where dmquant is developed and tested, so the reference
models learn a distribution we can generate anywhere, exactly: the 62 alphanumeric characters
rendered from the DejaVu fonts that matplotlib ships (Sans, Serif, Mono, each regular, bold,
oblique and bold oblique), at a random scale, rotation and position, in a foreground colour on
a background colour (each solid or a linear gradient), with light texture noise.

Rendering has two stages:

1. A *glyph atlas* per resolution: every (font, character) outline from matplotlib's
   ``TextPath`` is filled at 4× supersampling (even-odd rule, with PIL) and box-filtered down,
   on a square canvas of ``ATLAS_SPAN`` em centred on the glyph's horizontal middle and a fixed
   height above the baseline — so lower- and upper-case letters keep their relative size and
   vertical place (``o`` vs ``O``, ``p`` vs ``P``).
2. Per image, an affine warp of its atlas entry (``torch.nn.functional.grid_sample``) gives the
   coverage mask, which blends the foreground over the background; then the noise.

Every random draw for image ``i`` comes from a CPU generator seeded by ``(seed, i // CHUNK)``,
so an image depends only on the seed and its index: any slice renders the same pixels however
it is batched, on any device (up to float rounding). Splits are seeds (``SPLITS``).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: The classes, in label order: digits, upper case, lower case.
CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase
NUM_CLASSES = len(CHARACTERS)

FAMILIES = ("sans", "serif", "mono")
#: Font file of each (family, bold, oblique) face in matplotlib's ``mpl-data/fonts/ttf``.
FONT_FILES = {
    ("sans", False, False): "DejaVuSans.ttf",
    ("sans", True, False): "DejaVuSans-Bold.ttf",
    ("sans", False, True): "DejaVuSans-Oblique.ttf",
    ("sans", True, True): "DejaVuSans-BoldOblique.ttf",
    ("serif", False, False): "DejaVuSerif.ttf",
    ("serif", True, False): "DejaVuSerif-Bold.ttf",
    ("serif", False, True): "DejaVuSerif-Italic.ttf",
    ("serif", True, True): "DejaVuSerif-BoldItalic.ttf",
    ("mono", False, False): "DejaVuSansMono.ttf",
    ("mono", True, False): "DejaVuSansMono-Bold.ttf",
    ("mono", False, True): "DejaVuSansMono-Oblique.ttf",
    ("mono", True, True): "DejaVuSansMono-BoldOblique.ttf",
}
#: Faces in atlas order; a face index ``f`` is ``(family, bold, oblique) = FACES[f]``.
FACES = tuple(FONT_FILES)

#: Named colours (sRGB in [0, 1]); their names are what text prompts will say.
COLOURS = {
    "red": (0.85, 0.14, 0.14),
    "orange": (0.96, 0.55, 0.10),
    "yellow": (0.96, 0.86, 0.18),
    "green": (0.18, 0.62, 0.24),
    "cyan": (0.12, 0.74, 0.80),
    "blue": (0.14, 0.30, 0.86),
    "purple": (0.52, 0.24, 0.74),
    "pink": (0.96, 0.55, 0.74),
    "brown": (0.50, 0.30, 0.14),
    "black": (0.07, 0.07, 0.07),
    "gray": (0.52, 0.52, 0.52),
    "white": (0.96, 0.96, 0.96),
}
COLOUR_NAMES = tuple(COLOURS)
#: Least difference in luma (Rec. 601) between foreground and any background colour.
MIN_CONTRAST = 0.3

#: Seeds of the named splits.
SPLITS = {"train": 0, "test": 1}
#: Images per independently seeded chunk.
CHUNK = 1024

#: Atlas canvas side in em, centred on the glyph's middle and ``ATLAS_CENTRE_Y`` em above the baseline.
ATLAS_SPAN = 1.3
ATLAS_CENTRE_Y = 0.26
ATLAS_SUPERSAMPLING = 4
#: Nominal em size as a fraction of the image side (then scaled by ``scale``).
EM_FRACTION = 0.72

#: Ranges of the geometric jitter.
SCALE_RANGE = (0.88, 1.12)
MAX_ROTATION_DEG = 12.0
MAX_SHIFT = 0.08  # fraction of the image side, per axis
#: Probabilities of gradient fills, the per-channel colour jitter and the texture noise amplitudes.
P_BACKGROUND_GRADIENT = 0.4
P_FOREGROUND_GRADIENT = 0.2
COLOUR_JITTER = 0.05
TEXTURE_AMPLITUDE = 0.04
GRAIN_AMPLITUDE = 0.015


def _luma(rgb: tuple[float, float, float]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrast_table() -> Tensor:
    """``(C, C)`` bool: may colour ``j`` lie behind a glyph of colour ``i``."""
    luma = torch.tensor([_luma(c) for c in COLOURS.values()])
    return (luma[:, None] - luma[None, :]).abs() >= MIN_CONTRAST


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _fill_glyph(path, size: int, centre_x: float) -> np.ndarray:
    """Coverage in [0, 1] of one glyph outline on the ``size``² atlas canvas (even-odd fill)."""
    from PIL import Image, ImageDraw

    fine = size * ATLAS_SUPERSAMPLING
    pixels_per_em = fine / ATLAS_SPAN
    top = ATLAS_CENTRE_Y + ATLAS_SPAN / 2
    left = centre_x - ATLAS_SPAN / 2
    inside = np.zeros((fine, fine), dtype=bool)
    for polygon in path.to_polygons(closed_only=True):
        points = [((x - left) * pixels_per_em, (top - y) * pixels_per_em) for x, y in polygon]
        mask = Image.new("1", (fine, fine), 0)
        ImageDraw.Draw(mask).polygon(points, fill=1)
        inside ^= np.asarray(mask, dtype=bool)
    s = ATLAS_SUPERSAMPLING
    return inside.reshape(size, s, size, s).mean(axis=(1, 3))


@lru_cache(maxsize=4)
def glyph_atlas(size: int) -> Tensor:
    """``(len(FACES), NUM_CLASSES, size, size)`` float32 coverage masks of every glyph.

    Built from the font outlines on first use (a second or two) and cached per size.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    font_dir = _font_dir()
    atlas = np.zeros((len(FACES), NUM_CLASSES, size, size), dtype=np.float32)
    for f, face in enumerate(FACES):
        prop = FontProperties(fname=str(font_dir / FONT_FILES[face]))
        for c, char in enumerate(CHARACTERS):
            path = TextPath((0, 0), char, size=1, prop=prop)
            extents = path.get_extents()
            atlas[f, c] = _fill_glyph(path, size, (extents.x0 + extents.x1) / 2)
    return torch.from_numpy(atlas)


@lru_cache(maxsize=8)
def _atlas_on(size: int, device: torch.device) -> Tensor:
    return glyph_atlas(size).to(device)


def _atlas_size(resolution: int) -> int:
    """Atlas side so that one atlas pixel is about one image pixel at nominal scale."""
    return max(8, round(resolution * EM_FRACTION * ATLAS_SPAN))


#: The fields of a :class:`GlyphBatch` that :meth:`GlyphBatch.attributes` puts in words.
_DESCRIBED_FIELDS = (
    "labels",
    "face",
    "foreground",
    "background",
    "background2",
    "background_gradient",
    "foreground_gradient",
)


@dataclass
class GlyphBatch:
    """Rendered glyph images and everything that was drawn to make them.

    ``images`` are ``(N, 3, R, R)`` float32 in ``[-1, 1]``; the other fields are ``(N,)`` (``shift``
    is ``(N, 2)``) and index the module's tables: ``labels`` → ``CHARACTERS``, ``face`` →
    ``FACES``, colours → ``COLOUR_NAMES``. ``background2`` is the gradient's second colour (equal
    to ``background`` for a solid background).
    """

    images: Tensor
    labels: Tensor
    face: Tensor
    foreground: Tensor
    background: Tensor
    background2: Tensor
    foreground_gradient: Tensor
    background_gradient: Tensor
    scale: Tensor
    rotation: Tensor
    shift: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def attributes(self, i: int) -> dict[str, object]:
        """The style of image ``i`` in words: character, font family, weight, slant and colours."""
        return self.slice(slice(i, i + 1)).attribute_list()[0]

    def attribute_list(self) -> list[dict[str, object]]:
        """:meth:`attributes` of every image (one device transfer per field)."""
        drawn = {name: getattr(self, name).tolist() for name in _DESCRIBED_FIELDS}
        described = []
        for i in range(len(self)):
            family, bold, oblique = FACES[drawn["face"][i]]
            described.append(
                {
                    "character": CHARACTERS[drawn["labels"][i]],
                    "family": family,
                    "bold": bold,
                    "oblique": oblique,
                    "foreground": COLOUR_NAMES[drawn["foreground"][i]],
                    "background": COLOUR_NAMES[drawn["background"][i]],
                    "background2": COLOUR_NAMES[drawn["background2"][i]],
                    "background_gradient": bool(drawn["background_gradient"][i]),
                    "foreground_gradient": bool(drawn["foreground_gradient"][i]),
                }
            )
        return described

    def slice(self, index: slice) -> GlyphBatch:
        return GlyphBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, batches: list[GlyphBatch]) -> GlyphBatch:
        return cls(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(cls)})


@lru_cache(maxsize=8)
def _draw_chunk(seed: int, chunk: int, resolution: int) -> dict[str, Tensor]:
    """Every random choice of the ``CHUNK`` images of one chunk, from its own CPU generator.

    Cached, so consecutive batches inside one chunk draw it once; callers must not modify the tensors.
    """
    # torch's CPU generator keeps only 32 bits of a seed: mix (seed, chunk) into 32 bits first.
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0]))
    n = CHUNK

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=g) * (high - low) + low

    labels = torch.randint(NUM_CLASSES, (n,), generator=g)
    face = torch.randint(len(FACES), (n,), generator=g)
    foreground = torch.randint(len(COLOURS), (n,), generator=g)
    allowed = _contrast_table()[foreground].float()  # (n, C) backgrounds allowed behind each glyph
    background = torch.multinomial(allowed, 1, generator=g).squeeze(1)
    background2 = torch.multinomial(allowed, 1, generator=g).squeeze(1)
    background_gradient = torch.rand(n, generator=g) < P_BACKGROUND_GRADIENT
    background2 = torch.where(background_gradient, background2, background)
    return {
        "labels": labels,
        "face": face,
        "foreground": foreground,
        "background": background,
        "background2": background2,
        "foreground_gradient": torch.rand(n, generator=g) < P_FOREGROUND_GRADIENT,
        "background_gradient": background_gradient,
        "scale": uniform(*SCALE_RANGE, n),
        "rotation": uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n),
        "shift": uniform(-MAX_SHIFT, MAX_SHIFT, n, 2),
        # Continuous draws that only shape pixels.
        "jitter": uniform(-COLOUR_JITTER, COLOUR_JITTER, n, 4, 3),
        "angles": uniform(0.0, 2 * math.pi, n, 2),
        "shade": uniform(0.55, 0.8, n),
        "texture": torch.randn(n, 1, 4, 4, generator=g),
        "grain": torch.randn(n, 1, resolution, resolution, generator=g),
    }


def _gradient(first: Tensor, second: Tensor, angle: Tensor, grid: Tensor) -> Tensor:
    """``(N, 3, R, R)``: ``first`` → ``second`` along direction ``angle`` across the image."""
    direction = torch.stack([angle.cos(), angle.sin()], dim=-1)  # (N, 2)
    t = ((grid @ direction.T).permute(2, 0, 1) / math.sqrt(2) + 1) / 2  # (N, R, R) in [0, 1]
    t = t.unsqueeze(1)
    return first[:, :, None, None] * (1 - t) + second[:, :, None, None] * t


def _render(draws: dict[str, Tensor], resolution: int, device: torch.device) -> Tensor:
    """Pixels of the drawn images, ``(N, 3, R, R)`` in ``[-1, 1]``."""
    d = {k: v.to(device) for k, v in draws.items()}
    n = d["labels"].shape[0]
    if n == 0:  # affine_grid refuses an empty batch
        return torch.empty(0, 3, resolution, resolution, device=device)
    atlas = _atlas_on(_atlas_size(resolution), device)
    masks = atlas[d["face"], d["labels"]].unsqueeze(1)  # (N, 1, A, A)

    # Output normalised coords -> atlas normalised coords: q = k · Rot(-θ) · (p - shift).
    theta = torch.deg2rad(d["rotation"])
    k = 1.0 / (EM_FRACTION * ATLAS_SPAN * d["scale"])
    cos, sin = theta.cos() * k, theta.sin() * k
    linear = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], dim=1)  # (N, 2, 2)
    offset = -(linear @ (2 * d["shift"]).unsqueeze(-1))
    warp = F.affine_grid(torch.cat([linear, offset], dim=2), [n, 1, resolution, resolution], align_corners=False)
    coverage = F.grid_sample(masks, warp, mode="bilinear", padding_mode="zeros", align_corners=False)

    palette = torch.tensor(list(COLOURS.values()), device=device)
    jitter = d["jitter"]
    fg = (palette[d["foreground"]] + jitter[:, 0]).clamp(0, 1)
    bg = (palette[d["background"]] + jitter[:, 1]).clamp(0, 1)
    bg2 = (palette[d["background2"]] + jitter[:, 2]).clamp(0, 1)
    # A foreground gradient runs from the colour to a shade of itself (towards black or white).
    target = (fg.mean(1, keepdim=True) < 0.5).float()
    fg2 = torch.where(d["foreground_gradient"][:, None], fg + (target - fg) * (1 - d["shade"][:, None]), fg)

    axis = (torch.arange(resolution, device=device) + 0.5) / resolution * 2 - 1
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)  # (R, R, 2) as (x, y)
    foreground = _gradient(fg, fg2, d["angles"][:, 0], grid)
    background = _gradient(bg, bg2, d["angles"][:, 1], grid)
    image = background * (1 - coverage) + foreground * coverage

    texture = F.interpolate(d["texture"], size=(resolution, resolution), mode="bicubic", align_corners=False)
    image = image + TEXTURE_AMPLITUDE * texture + GRAIN_AMPLITUDE * d["grain"]
    return image.clamp(0, 1) * 2 - 1


class GlyphDataset:
    """An unbounded, deterministic sequence of glyph images: image ``i`` is a function of ``(seed, i)``.

    Args:
        split: ``"train"``, ``"test"`` (see ``SPLITS``) or an integer seed.
        resolution: image side in pixels (32 and 64 are the reference sizes).

    ``dataset.batch(start, count)`` renders images ``start .. start+count-1``. Render in batches
    of hundreds or more: each call draws the random choices of whole chunks of ``CHUNK`` images.
    """

    def __init__(self, split: str | int = "train", resolution: int = 32):
        if isinstance(split, str):
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)} or give an integer seed")
            split = SPLITS[split]
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        self.seed = int(split)
        self.resolution = resolution

    def batch(self, start: int, count: int, device: torch.device | str | None = None) -> GlyphBatch:
        """Render images ``start`` to ``start + count - 1`` on ``device`` (default CPU)."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be non-negative, got {start} and {count}")
        device = torch.device(device or "cpu")
        parts = []
        end = start + count
        for chunk in range(start // CHUNK, max(-(-end // CHUNK), start // CHUNK + 1)):
            first = max(start, chunk * CHUNK) - chunk * CHUNK
            last = min(end, (chunk + 1) * CHUNK) - chunk * CHUNK
            draws = {k: v[first:last] for k, v in _draw_chunk(self.seed, chunk, self.resolution).items()}
            images = _render(draws, self.resolution, device)
            parts.append(GlyphBatch(images=images, **{f.name: draws[f.name].to(device) for f in _ATTRIBUTE_FIELDS}))
        return GlyphBatch.cat(parts)


_ATTRIBUTE_FIELDS = tuple(f for f in fields(GlyphBatch) if f.name != "images")
