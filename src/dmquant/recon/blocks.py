"""The units block reconstruction optimises one at a time, in the order the model runs them.

BRECQ (Li et al. 2021, Sec. 3.2) reconstructs the output of one *block* at a time — a residual
block, a transformer block — rather than of each layer (AdaRound) or of the whole network:
within a block the layers' quantization errors interact and are optimised together, across
blocks the objective stays cheap. Q-Diffusion (Li et al. 2023) applies it to the UNet's residual
and attention blocks. For diffusers models the natural blocks are

- ``resnet``: ``ResnetBlock2D`` (two convolutions, the time-embedding projection, the shortcut);
- ``transformer``: ``BasicTransformerBlock`` — the self-/cross-attention and feed-forward block
  of ``UNet2DConditionModel``'s transformers and each DiT block;
- ``attention``: an ``Attention`` outside any transformer block (``UNet2DModel``'s
  attention on feature maps);

and every quantized layer outside those blocks (``conv_in``, time embedding, down/up-samplers,
the transformers' ``proj_in``/``proj_out``, ``conv_out``, DiT's patch embedding and output
layers) is a ``layer`` unit of its own, reconstructed layer-wise. A block is a unit only if it
holds at least one quantized layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..core.layers import QUANT_LAYERS
from ..errors import ModelError

#: Block types in order of precedence: a block nested in an earlier kind's block is not its own unit.
BLOCK_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (ResnetBlock2D, "resnet"),
    (BasicTransformerBlock, "transformer"),
    (Attention, "attention"),
)


@dataclass(frozen=True)
class ReconUnit:
    """One unit of reconstruction: a block or a single quantized layer, by its qualified name."""

    name: str
    module: nn.Module
    kind: str  # "resnet" | "transformer" | "attention" | "layer"


def _block_kind(module: nn.Module) -> str | None:
    return next((kind for block_type, kind in BLOCK_KINDS if isinstance(module, block_type)), None)


def candidate_units(model: nn.Module) -> list[ReconUnit]:
    """Outermost blocks holding quantized layers, then the quantized layers outside every block."""
    units: list[ReconUnit] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        kind = _block_kind(module)
        if kind is not None and any(isinstance(m, QUANT_LAYERS) for m in module.modules()):
            units.append(ReconUnit(name, module, kind))
            inside.append(name)
        elif isinstance(module, QUANT_LAYERS):
            units.append(ReconUnit(name, module, "layer"))
    return units


def reconstruction_units(model: nn.Module, run_forward: Callable[[], Any]) -> list[ReconUnit]:
    """The reconstruction units of ``model`` (with quantizers attached), in execution order.

    ``run_forward`` runs the model once (e.g. on one calibration batch); the order is that of
    each unit's first call. A unit that never runs is an error: its inputs could not be captured.
    """
    units = candidate_units(model)
    if not units:
        raise ModelError(f"{type(model).__name__} has no quantized layers: attach quantizers first")
    first_call: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the inputs pass unchanged
            first_call.setdefault(name, len(first_call))

        return hook

    handles = [unit.module.register_forward_pre_hook(record(unit.name)) for unit in units]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    never = [unit.name for unit in units if unit.name not in first_call]
    if never:
        raise ModelError(f"these quantized units never ran in the forward pass: {', '.join(never)}")
    return sorted(units, key=lambda unit: first_call[unit.name])
