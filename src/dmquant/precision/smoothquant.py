"""SmoothQuant: move activation outliers into the weights, per input channel, FP function unchanged.

SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", eq. 4) divides each input channel ``j`` of a layer's activation by

    s_j = max|X_j|^α / max|W_j|^(1−α)

and multiplies the matching input channel of the weight by it, so ``(X / s)(W s)ᵀ = X Wᵀ``: a
channel with outliers is flattened for activation quantization and the weight, which quantizes
per output channel and so tolerates it better, takes the range; α (0.5 by default) sets how much
moves. The efficient-LDM study (Yang et al. 2023) applies it to the modules its SQNR analysis
finds sensitive. Here the scale lives in the quantized layer (``smoothing``), the weight is
multiplied in place, and ``max|X_j|`` is observed over the calibration data with every quantizer
off (the FP activations).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from ..core.quantizer import quantizers


def smoothing_scales(activation_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` per input channel ``j`` (dim 1 of ``weight``).

    Channels where either maximum is 0 keep ``s_j = 1`` (nothing to balance).
    """
    reduce = [dim for dim in range(weight.ndim) if dim != 1]
    weight_absmax = weight.detach().abs().amax(dim=reduce).float()
    act = activation_absmax.float().to(weight_absmax.device)
    scales = act.pow(alpha) / weight_absmax.pow(1.0 - alpha)
    usable = (act > 0) & (weight_absmax > 0) & torch.isfinite(scales)
    return torch.where(usable, scales, torch.ones_like(scales))


def smoothed_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, QuantLinear | QuantConv2d]:
    """The quantized layers whose qualified names match one of ``patterns`` (fnmatch globs)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QUANT_LAYERS) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }


def input_absmax(model: nn.Module, layers: dict[str, nn.Module], run_batches: Callable[[], Any]) -> dict[str, Tensor]:
    """``max|X_j|`` per input channel of each layer's input while ``run_batches()`` runs the model FP."""
    found: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            (x,) = args[:1]
            dims = [d for d in range(x.ndim) if d != (1 if isinstance(module, nn.Conv2d) else x.ndim - 1)]
            value = x.detach().abs().amax(dim=dims).float()
            found[name] = value if name not in found else torch.maximum(found[name], value)

        return record

    states = [(q, q.enabled) for q in quantizers(model)]
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for quantizer, _ in states:
            quantizer.enabled = False
        with torch.no_grad():
            run_batches()
    finally:
        for handle in handles:
            handle.remove()
        for quantizer, enabled in states:
            quantizer.enabled = enabled
    return found


@torch.no_grad()
def smooth(layer: QuantLinear | QuantConv2d, activation_absmax: Tensor, alpha: float) -> Tensor:
    """Apply SmoothQuant to one layer (before its weight ranges are calibrated); returns ``s``."""
    if layer.smoothing is None:
        layer.enable_smoothing()
    scales = smoothing_scales(activation_absmax, layer.weight, alpha)
    shape = (1, -1, *([1] * (layer.weight.ndim - 2)))
    layer.weight.mul_(scales.to(layer.weight.dtype).reshape(shape))
    layer.smoothing.mul_(scales)
    return scales
