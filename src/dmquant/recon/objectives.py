"""Reconstruction objectives beyond a unit's output: EDA-DM's fine-grained block reconstruction.

EDA-DM (Liu et al. 2024, "Enhanced Distribution Alignment for Post-Training Quantization of
Diffusion Models", Sec. 4.2, FBR) adds to the block-output loss the losses of the outputs of the
block's inner quantized layers — every one but the last, whose output the block loss already
covers — weighted by γ (0.8 in its experiments)::

    L = L(O_q, O_fp) + γ · Σ_{l inner} L(o_l^q, o_l^fp)

so that errors are fixed where they arise inside the block rather than only where they surface.
Here ``L`` is :func:`~dmquant.recon.adaround.reconstruction_loss` for both terms; the FP inner
outputs come from the FP block run on the FP model's inputs, the quantized ones from the block
being reconstructed on its own inputs, in the same iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .adaround import reconstruction_loss
from .capture import recorded_outputs

#: ``fp_inputs(indices) -> (args, kwargs)``: the FP model's inputs of the unit for those samples.
InputSampler = Callable[[Tensor], tuple[Sequence[Any], dict[str, Any]]]


def _layers(unit: nn.Module) -> dict[str, nn.Module]:
    """The unit's Linear and Conv2d layers (quantized or not) by their name inside it."""
    return {name: m for name, m in unit.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))}


class InnerLayerLoss:
    """The FBR term ``γ · Σ L(o_l^q, o_l^fp)`` over a unit's inner layers (all but the last to run).

    Args:
        unit: the quantized unit being reconstructed.
        fp_unit: the same unit of the FP model (layers under the same names).
        fp_inputs: the FP model's inputs of the unit for given sample indices.
        weight: γ.
    """

    def __init__(self, unit: nn.Module, fp_unit: nn.Module, fp_inputs: InputSampler, weight: float):
        self.layers, self.fp_layers = _layers(unit), _layers(fp_unit)
        if self.layers.keys() != self.fp_layers.keys():
            raise ValueError("the FP unit's layers are not those of the quantized unit")
        self.fp_unit = fp_unit
        self.fp_inputs = fp_inputs
        self.weight = weight

    def inputs(self, indices: Tensor) -> tuple[Sequence[Any], dict[str, Any]]:
        """The FP unit's ``(args, kwargs)`` for the samples ``indices`` (what :meth:`term` takes)."""
        return self.fp_inputs(indices)

    @contextmanager
    def term(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[Callable[[], Tensor | float]]:
        """Run the FP unit on ``args`` / ``kwargs`` (from :meth:`inputs`), record the quantized
        unit's layers while open, and yield a function giving the weighted term once the
        quantized unit has run."""
        with torch.no_grad(), recorded_outputs(self.fp_layers) as fp_outputs:
            self.fp_unit(*args, **kwargs)
        inner = list(fp_outputs)[:-1]
        with recorded_outputs(self.layers) as outputs:

            def value() -> Tensor | float:
                losses = [
                    reconstruction_loss(outputs[name], fp_outputs[name], 1 if outputs[name].ndim == 4 else -1)
                    for name in inner
                ]
                return self.weight * sum(losses) if losses else 0.0

            yield value
