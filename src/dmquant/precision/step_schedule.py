"""Step-aware mixed precision: activation bits that change along the sampling trajectory.

PTQD (He et al. 2023, "PTQD: Accurate Post-Training Quantization for Diffusion Models", Sec. 4.3)
observes that the signal-to-noise ratio of the quantization noise in the noise estimate falls
towards the end of sampling, where the remaining image detail is small, and gives those late
steps more activation bits (e.g. A4 early, A8 late). Here every scheduled activation quantizer
holds one parameter set per format of the schedule (:meth:`~dmquant.core.quantizer.Quantizer.schedule_formats`),
each calibrated on the steps that use it, and the step index selects the format while sampling:
the switch needs no reloading and no recompiling. What it costs is reported as the BOPs of the
whole trajectory, the sum over steps of each step's BOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..config import QuantConfig
from ..core.attention import AttentionQuantizers
from ..core.layers import activation_quantizers
from ..core.quantizer import Quantizer, set_step
from ..eval.cost import bops


def scheduled_quantizers(model: nn.Module, config: QuantConfig) -> list[Quantizer]:
    """The activation quantizers a bit schedule applies to: those at the recipe's default
    activation format (not the ones rules fix, e.g. the first and last layer), softmax outputs excluded."""
    default = config.activation.format
    softmax = {id(m.probs) for m in model.modules() if isinstance(m, AttentionQuantizers)}
    return [q for q in activation_quantizers(model) if q.config.format == default and id(q) not in softmax]


def apply_step_precision(model: nn.Module, config: QuantConfig) -> int:
    """Give the scheduled quantizers of ``model`` the schedule of ``config.step_precision``; returns how many."""
    bits = config.step_precision.bits_by_step(config.activation.bits)
    found = scheduled_quantizers(model, config)
    for quantizer in found:
        quantizer.schedule_formats([quantizer.config.with_bits(b).format for b in bits])
    return len(found)


def choose_switch_step(sqnr_per_step: Sequence[float], threshold_db: float) -> int:
    """The first step from which the SQNR of the noise estimate stays below ``threshold_db``.

    Steps are in sampling order (0: noisiest). Returns ``len(sqnr_per_step)`` when the last step
    is at or above the threshold (no late steps need more bits), 0 when every step is below it.
    """
    switch = len(sqnr_per_step)
    while switch > 0 and not sqnr_per_step[switch - 1] >= threshold_db:
        switch -= 1
    return switch


def trajectory_bops(model: nn.Module, run_forward: Callable[[], Any], num_steps: int) -> dict[str, Any]:
    """BOPs of one forward pass at every sampling step and their sum over the trajectory.

    Steps whose quantizers use the same formats cost the same, so each distinct pattern of formats
    is measured once. ``bops_per_step[i]`` is step ``i``'s; ``mean_bits_ratio`` compares the
    trajectory with running every step at step 0's precision.
    """
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    measured: dict[tuple, dict[str, Any]] = {}
    per_step = []
    try:
        for step in range(num_steps):
            set_step(model, step)
            pattern = tuple(q.fmt for q in quantizers)
            if pattern not in measured:
                measured[pattern] = bops(model, run_forward)
            per_step.append(measured[pattern])
    finally:
        set_step(model, 0)
    total = sum(report["bops"] for report in per_step)
    first = per_step[0]["bops"] * num_steps
    return {
        "bops_per_step": [report["bops"] for report in per_step],
        "trajectory_bops": total,
        "mean_bits_ratio": total / first if first else math.nan,
        "first_step": per_step[0],
    }
