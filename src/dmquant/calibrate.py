"""Range calibration: weights from themselves, activations from recorded trajectory data."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib.record import CalibrationSet, calibration_runner
from .core.layers import QUANT_LAYERS, activation_quantizers
from .core.quantizer import Quantizer, set_step


def name_quantizers(model: nn.Module) -> None:
    """Give every quantizer its qualified name, for error messages."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            module.name = name


def calibrate_weights(model: nn.Module, *, progress: bool = True) -> None:
    """Set every enabled weight quantizer's range from its own weight."""
    parts = [(q, w) for m in model.modules() if isinstance(m, QUANT_LAYERS) for q, w in m.weight_parts() if q.enabled]
    for quantizer, weight in tqdm(parts, desc="weight ranges", unit="tensor", disable=not progress):
        quantizer.calibrate_on(weight)


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, calibration: CalibrationSet, *, batch_size: int = 32, progress: bool = True
) -> None:
    """Observe every enabled activation quantizer's input over the calibration set, then fix ranges.

    The data is fed step by step, so each batch belongs to one sampling step: per-step
    quantizers observe into that step's parameters, and a non-finite activation is reported
    with the layer and the step where it appeared. Weights are fake-quantized during the pass
    (calibrate them first), activations are not.
    """
    targets = activation_quantizers(model)
    if not targets:
        return
    for quantizer in targets:
        quantizer.observing = True
    per_step = {step: calibration.select_steps([step]) for step in calibration.steps()}
    num_batches = sum(-(-len(subset) // batch_size) for subset in per_step.values())
    bar = tqdm(total=num_batches, desc="calibrating activations", unit="batch", disable=not progress)
    try:
        for step, subset in per_step.items():
            set_step(model, step)
            calibration_runner(model, subset, batch_size=batch_size, after_batch=bar.update)()
    finally:
        bar.close()
        for quantizer in targets:
            quantizer.observing = False
        set_step(model, 0)
    unseen = [q for q in targets if not q.has_observations]
    for quantizer in unseen:
        quantizer.enabled = False
    if unseen:
        names = ", ".join(q.name for q in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
        warnings.warn(
            f"{len(unseen)} activation quantizers never ran on the calibration data and stay FP: {names}", stacklevel=2
        )
    for quantizer in tqdm(targets, desc="activation ranges", unit="quantizer", disable=not progress):
        if quantizer.enabled:
            quantizer.finalize()
