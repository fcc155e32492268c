"""Hybrid precision: more bits for the blocks whose quantization noise matters most, within a budget.

The efficient-LDM study (Yang et al. 2023, "Efficient Quantization Strategies for Latent
Diffusion Models", global strategy) finds the blocks with the lowest SQNR and quantizes them at
a higher precision. Here the choice is a greedy knapsack: each block's *gain* is the rise of its
SQNR (dB, pooled over the sampling steps; :mod:`dmquant.precision.sqnr`) from the recipe's
precision to the higher one, its *cost* the BOPs that promotion adds to one denoiser call, and
blocks are promoted by gain per cost, best first, skipping any that would take the model's BOPs
past ``max_bops_ratio`` times those at the recipe's precision. The promotions are written as
layer rules, so the saved recipe says exactly which blocks run at which bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calib.record import CalibrationSet, first_rows_runner
from ..config import LayerRule, QuantConfig
from ..eval.cost import bops
from ..passes import range_calibrated
from ..sampling import Conditioning
from .sqnr import analyze_sensitivity, mean_sqnr_db


@dataclass(frozen=True)
class BlockChoice:
    """One block's case for promotion: SQNR gain (dB) and the BOPs the promotion adds."""

    name: str
    gain_db: float
    extra_bops: int


def greedy_promotions(choices: Sequence[BlockChoice], budget_bops: float) -> list[str]:
    """Blocks promoted by gain per extra BOP (best first) while their extra BOPs fit ``budget_bops``.

    Blocks that gain nothing are never promoted; one that costs nothing extra and gains is always.
    """
    useful = [c for c in choices if c.gain_db > 0]
    ranked = sorted(useful, key=lambda c: (-(c.gain_db / c.extra_bops) if c.extra_bops > 0 else -float("inf"), c.name))
    promoted, spent = [], 0.0
    for choice in ranked:
        if spent + max(choice.extra_bops, 0) <= budget_bops:
            promoted.append(choice.name)
            spent += max(choice.extra_bops, 0)
    return promoted


def block_bops(model: nn.Module, run_forward: Callable[[], Any], blocks: Sequence[str]) -> dict[str, int]:
    """BOPs of one forward pass spent inside each of ``blocks`` (by qualified name)."""
    rows = bops(model, run_forward)["layers"]
    return {
        block: sum(row["bops"] for row in rows if row["name"].split(" ")[0].startswith(block + ".")) for block in blocks
    }


def promotion_rules(blocks: Sequence[str], weight_bits: int | str, activation_bits: int | str) -> list[LayerRule]:
    """One rule per promoted block: every layer and attention inside it at the higher bits."""
    return [LayerRule(f"{name}.*", weight_bits=weight_bits, activation_bits=activation_bits) for name in blocks]


def plan_hybrid(
    fp_model: nn.Module,
    config: QuantConfig,
    calibration: CalibrationSet,
    scheduler: Any,
    conditioning: Conditioning,
    *,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse ``config``'s precision and ``config.hybrid``'s higher one and choose the promotions.

    Both are range-calibrated only (:func:`dmquant.passes.range_calibrated`, over ``batch_size`` rows at a
    time: the other methods refine a precision, they do not change which blocks need one). Returns the plan:
    the promoted blocks, every block's gain and cost, the budget and the BOPs before and after.
    """
    hybrid = config.hybrid
    plain = config.ranges_only()
    settings = {"low": plain, "high": plain.with_bits(hybrid.weight_bits, hybrid.activation_bits)}
    sensitivity, cost, total = {}, {}, {}
    for key, setting in settings.items():
        quantized = range_calibrated(fp_model, setting, calibration, batch_size=batch_size)
        call = first_rows_runner(quantized, calibration, 1)
        sensitivity[key] = analyze_sensitivity(
            fp_model,
            quantized,
            scheduler,
            num_inference_steps=hybrid.num_inference_steps,
            conditioning=conditioning,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )
        cost[key] = block_bops(quantized, call, list(sensitivity[key].blocks))
        total[key] = bops(quantized, call)["bops"]
    choices = [
        BlockChoice(
            name,
            mean_sqnr_db(sensitivity["high"].blocks[name]) - mean_sqnr_db(sensitivity["low"].blocks[name]),
            cost["high"][name] - cost["low"][name],
        )
        for name in sensitivity["low"].blocks
    ]
    budget = (hybrid.max_bops_ratio - 1.0) * total["low"]
    promoted = greedy_promotions(choices, budget)
    extra = sum(c.extra_bops for c in choices if c.name in promoted)
    return {
        "promoted": promoted,
        "blocks": [dataclasses.asdict(c) for c in choices],
        "budget_bops": budget,
        "bops": total["low"],
        "bops_after": total["low"] + extra,
    }
