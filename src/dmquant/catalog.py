"""The names and defaults the command line offers — built-in models, samplers, shipped recipes — without importing
torch.

``dmquant --help`` builds every subcommand's options from these; the modules that give the names a meaning
(:mod:`dmquant.models`, :mod:`dmquant.config`) import them from here, so they are written once.
"""

from __future__ import annotations

from pathlib import Path

#: Trained reference models that ship with dmquant (see ``dmquant zoo list``): the one list of their names, which
#: the zoo's registry (:data:`dmquant.zoo.reference.ZOO`), the built-in models and the benchmarks take.
REFERENCE_MODELS = ("ddpm-glyphs32", "ldm-glyphs64", "dit-glyphs")
#: Random-initialised models built in code, to exercise the machinery (not to judge quality).
TINY_MODELS = ("tiny-unet", "tiny-unet-text", "tiny-dit")
#: Samplers ``--scheduler`` accepts, each built from the model's own scheduler config.
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm-solver")
#: Where the shipped recipes live, so that ``--recipe NAME`` works from any install.
RECIPES_DIR = Path(__file__).parent / "recipes"
#: The fraction of bf16's time a measured low-bit path must save to be kept over bf16 (:mod:`dmquant.kernels.paths`
#: says why), the default of ``--min-path-gain``.
MIN_PATH_GAIN = 0.05


def available_recipes() -> list[str]:
    """Names of the shipped recipes (YAML first, then TOML)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) + sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
