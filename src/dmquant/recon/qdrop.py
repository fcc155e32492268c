"""QDrop's random mixing of quantized and full-precision activations during reconstruction.

QDrop (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely Low-bit
Post-Training Quantization", Sec. 3.3, eq. 9) drops the quantization of each element of an
activation with probability ``p`` while a block is reconstructed — the element keeps its
full-precision value — so the learned rounding and step sizes fit a flatter neighbourhood of the
quantized model rather than one point of it. Its reference code (and PTQ4DM, which builds on it)
applies this at two places:

- inside the block, at every activation quantizer: :func:`dropped_activations`;
- at the block's input, mixing the quantized model's input with the FP model's:
  :func:`mix_inputs`.

``probability`` here is ``p``, the probability of dropping the quantization (of keeping the FP
element), as the paper and the option's name say. The reference code's setting counts the other
way: QDrop's ``drop_prob`` (wimh966/QDrop, ``fake_quant.py`` and ``solver/recon.py``) and
PTQ4DM's ``--prob`` / ``--input_prob`` are the probability that an element *keeps its quantized
value* (``torch.where(rand < drop_prob, quantized, fp)``; 1.0 switches QDrop off). So a value
``v`` from their configurations is ``1 − v`` here; at the 0.5 that all their released settings
use, the two are the same.

The reference draws ``torch.rand_like`` from the global generator; here an explicit generator
makes a reconstruction reproducible given its seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..core.quantizer import Quantizer


def _keep_fp_mask(like: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    return torch.rand(like.shape, generator=generator, device=generator.device).to(like.device) < probability


@contextmanager
def dropped_activations(
    quantizers: Sequence[Quantizer], probability: float, generator: torch.Generator
) -> Iterator[None]:
    """While active, each quantizer's output keeps the FP input element with ``probability``.

    Implemented as forward hooks on the quantizers (removed on exit, also on error); a quantizer
    that is disabled or observing passes its input unchanged either way.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        (x,) = args
        return torch.where(_keep_fp_mask(output, probability, generator), x.to(output.dtype), output)

    handles = [quantizer.register_forward_hook(hook) for quantizer in quantizers] if probability > 0 else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mix_inputs(quantized: Any, full_precision: Any, probability: float, generator: torch.Generator) -> Any:
    """Element-wise mix of the quantized model's and the FP model's block inputs.

    Floating-point tensors take the FP element with ``probability``; anything else (integer
    tensors such as timesteps, constants) must be the same in both and is taken from
    ``quantized``. Lists, tuples and dicts are mixed item by item.
    """
    if isinstance(quantized, Tensor):
        if not quantized.is_floating_point() or probability <= 0:
            return quantized
        return torch.where(_keep_fp_mask(quantized, probability, generator), full_precision, quantized)
    if isinstance(quantized, dict):
        return {key: mix_inputs(value, full_precision[key], probability, generator) for key, value in quantized.items()}
    if isinstance(quantized, (list, tuple)):
        return type(quantized)(
            mix_inputs(q, f, probability, generator) for q, f in zip(quantized, full_precision, strict=True)
        )
    return quantized
