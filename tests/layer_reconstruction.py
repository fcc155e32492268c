"""AdaRound's layer-wise reconstruction of one quantized layer on given tensors, for the tests.

:func:`dmquant.recon.brecq.reconstruct` takes its data from a ``sample`` callable (a captured block's cache, in
the model-level loop); this feeds it one layer's ``inputs`` and ``targets`` directly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from dmquant.core.layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from dmquant.recon.brecq import ReconstructionResult, reconstruct


def reconstruct_layer(
    layer: QuantLinear | QuantConv2d, inputs: Tensor, targets: Tensor, **options: Any
) -> ReconstructionResult:
    """AdaRound's layer-wise reconstruction: :func:`reconstruct` on one layer's ``inputs`` → ``targets``.

    Targets are typically the FP layer's output on the same inputs (or, as in BRECQ / Q-Diffusion,
    on the FP model's inputs while ``inputs`` come from the quantized model).
    """
    if not isinstance(layer, QUANT_LAYERS):
        raise TypeError(f"reconstruct_layer needs a QuantLinear or QuantConv2d, got {type(layer).__name__}")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"need as many targets as inputs, at least one: got {inputs.shape[0]} inputs, {targets.shape[0]} targets"
        )
    device = layer.weight.device

    def sample(index: Tensor) -> tuple[tuple[Tensor], dict, Tensor]:
        return (inputs[index].to(device),), {}, targets[index].to(device)

    return reconstruct(layer, sample, inputs.shape[0], desc="adaround", **options)
