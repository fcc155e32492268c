"""The dmquant configurations the benchmarks quantize with, and the methods that name them.

``bench/quality.py``'s recipe cells (a shipped recipe at a bit setting, or one of its variants: without
reconstruction, PTQD's ablation steps, the calibration ablation) and the dmquant rows of ``bench/speed.py``
(minmax at a row's formats; ``bench/fidelity.py`` and ``bench/block_kernels.py`` quantize as those rows do)
are both a loaded recipe with fields overridden, through :func:`dmquant.config.with_overrides`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from torch import nn

from dmquant.config import LayerRule, QuantConfig, available_recipes, load_recipe, with_overrides

#: Bit settings of recipe cells: (weight bits, activation bits, the softmax output's format where the attention
#: matmuls are quantized — their Q, K, V at the activation bits — else None).
BIT_SETTINGS = {
    "W8A8": (8, 8, None),
    "W8A8+attn8": (8, 8, 8),
    "W4A8": (4, 8, None),
    "W4A4": (4, 4, None),
    "W8A8-FP8": ("fp8_e4m3", "fp8_e4m3", None),
    "W8A8-FP8+attn-fp8": ("fp8_e4m3", "fp8_e4m3", "fp8_e4m3"),
}
#: Suffix of a reconstructing recipe run without its reconstruction (what reconstruction buys).
NO_RECONSTRUCTION = "-no-recon"
#: PTQD's ablation: suffix of a correcting recipe -> (CNC, BC, VSC); the recipe itself has all three,
#: and its ``base`` without correction (q-diffusion for ptqd) is the first step, on the same model.
CORRECTION_STEPS = {"-cnc": (True, False, False), "-cnc-bc": (True, True, False)}
#: Calibration ablation: method -> (recipe whose calibration strategy it uses, trajectories), each
#: on q-diffusion's ranges without reconstruction and about CALIBRATION_SIZE samples: uniform
#: records every trajectory at 25 steps (25 × 41 = 1,025), the others one step per trajectory.
CALIBRATION_SIZE = 1024
CALIBRATION_ABLATION = {
    "calib-uniform": ("q-diffusion", 41),
    "calib-ndtc": ("ptq4dm", CALIBRATION_SIZE),
    "calib-tdac": ("eda-dm", CALIBRATION_SIZE),
    "calib-single-step": ("sqnr-hybrid", CALIBRATION_SIZE),
}


def recipe_methods() -> list[str]:
    """Shipped recipes; ``<recipe>-no-recon`` for each that reconstructs; the PTQD and calibration ablations."""
    names = available_recipes()
    variants = [name + NO_RECONSTRUCTION for name in names if load_recipe(name).reconstruction.enabled]
    ablation = [name + step for name in names if load_recipe(name).correction.enabled for step in CORRECTION_STEPS]
    return names + variants + ablation + list(CALIBRATION_ABLATION)


def recipe_config(method: str, bits: str, guidance_scale: float, steps: int) -> QuantConfig:
    """A quality cell's recipe (``method``, its variant applied: ``-no-recon``, an ablation step) at the bit
    setting ``bits``, calibrated at ``guidance_scale``, correcting and switching precision over ``steps``."""
    weight_bits, activation_bits, softmax = BIT_SETTINGS[bits]
    name, step = method, None
    for suffix in (NO_RECONSTRUCTION, *CORRECTION_STEPS):
        if method.endswith(suffix):
            name, step = method.removesuffix(suffix), suffix
    overrides: dict[str, Any] = {}
    if method in CALIBRATION_ABLATION:
        name, step = "q-diffusion", NO_RECONSTRUCTION
        source, trajectories = CALIBRATION_ABLATION[method]
        calibration = dataclasses.replace(load_recipe(source).calibration, num_trajectories=trajectories)
        overrides |= {"name": method, "calibration": calibration}
    if step == NO_RECONSTRUCTION:
        overrides["reconstruction.enabled"] = False
    elif step is not None:
        correlation, bias, variance = CORRECTION_STEPS[step]
        overrides |= {"correction.correlation": correlation, "correction.bias": bias, "correction.variance": variance}
    overrides |= {
        "attention.enabled": softmax is not None,
        "attention.bits": None,
        "attention.softmax_bits": softmax or 8,
        "calibration.guidance_scale": guidance_scale,
        "correction.num_inference_steps": steps,
        "step_precision.num_inference_steps": steps,
    }
    return with_overrides(load_recipe(name).with_bits(weight_bits, activation_bits), overrides)


class Formats(Protocol):
    """A dmquant speed row's formats: (weight bits, activation bits, weight granularity), whether it
    quantizes nn.Linear layers only, and whether its attention matmuls are FP8 attention."""

    formats: tuple[int | str, int | str, str]
    linear_only: bool
    fp8_attention: bool


def dmquant_config(row: Formats, model: nn.Module) -> QuantConfig:
    """minmax at the row's formats (the weight granularity included), attention matmuls off (in fp8 for an
    ``fp8_attention`` row); for a ``linear_only`` row, a first rule that keeps ``model``'s convolutions in full
    precision."""
    weight_bits, activation_bits, granularity = row.formats
    config = load_recipe("minmax").with_bits(weight_bits, activation_bits)
    rules = config.rules
    if isinstance(weight_bits, str):  # a float format: the recipe's 8-bit first/last layers use it too
        rules = [dataclasses.replace(rule, weight_bits=weight_bits, activation_bits=activation_bits) for rule in rules]
    if row.linear_only:
        convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
        if convolutions:
            rules = [LayerRule("|".join(convolutions), keep_fp=True), *rules]
    attention = (
        {"attention.bits": "fp8_e4m3", "attention.softmax_bits": "fp8_e4m3"}
        if row.fp8_attention
        else {"attention.enabled": False}
    )
    return with_overrides(config, {"weight.granularity": granularity, "rules": rules} | attention)
