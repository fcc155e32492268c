"""Reconstruction of one unit — a single layer or a whole block — with AdaRound on all its weights.

BRECQ (Li et al. 2021, Sec. 3.2) optimises the rounding of every quantized layer inside a block
together, against the block's output: the layers' errors interact inside a block, so they are
fitted jointly; Q-Diffusion (Li et al. 2023) does this for the UNet's residual and attention
blocks. The objective per step is AdaRound's (Nagel et al. 2020, eq. 21, with the reference
code's loss scaling), summed over the unit's layers::

    reconstruction_loss(unit(inputs), target) + regularizer_scale · w(t) · Σ_layers f_reg(V; β(t))

A layer is the unit of one layer (AdaRound's layer-wise setting). Data comes from a ``sample``
callable mapping sample indices to ``(args, kwargs, target)`` — exactly what
:meth:`dmquant.recon.cache.BlockIOCache.batch` returns for a captured block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from ..errors import ConfigError
from .adaround import AdaRoundWeights, BetaSchedule, reconstruction_loss
from .cache import block_output

#: ``sample(indices) -> (args, kwargs, target)`` for the unit's forward.
Sampler = Callable[[Tensor], tuple[Sequence[Any], dict[str, Any], Tensor]]


@dataclass(frozen=True)
class ReconstructionResult:
    """Outcome of reconstructing one unit.

    ``initial_mse`` is the element-mean squared error of the unit's output against the targets
    with round-to-nearest weights, ``final_mse`` the same after hardening the learned rounding
    (both over all samples); ``changed_fraction`` is the fraction of the unit's quantized weights
    whose code differs from round-to-nearest's.
    """

    initial_mse: float
    final_mse: float
    changed_fraction: float
    iterations: int


def _roundings(unit: nn.Module) -> list[AdaRoundWeights]:
    """AdaRound logits for every quantized layer of ``unit`` whose weight quantizer is enabled."""
    layers = [m for m in unit.modules() if isinstance(m, QUANT_LAYERS)]
    found = [AdaRoundWeights(m) for m in layers if any(q.enabled for q, _ in m.weight_parts())]
    if not found:
        raise ConfigError(f"{type(unit).__name__} has no quantized weights to round")
    return found


def _channel_dim(output: Tensor) -> int:
    """Channels are dim 1 of feature maps ``(N, C, H, W)`` and the last dim of tokens ``(N, L, C)``."""
    return 1 if output.ndim == 4 else -1


@torch.no_grad()
def _output_mse(unit: nn.Module, sample: Sampler, count: int, chunk: int) -> float:
    total, elements = 0.0, 0
    for start in range(0, count, chunk):
        args, kwargs, target = sample(torch.arange(start, min(start + chunk, count)))
        output = block_output(unit(*args, **kwargs)).float()
        total += float((output - target.float()).pow(2).sum())
        elements += output.numel()
    return total / elements


def reconstruct(
    unit: nn.Module,
    sample: Sampler,
    count: int,
    *,
    iterations: int = 2000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    regularizer_scale: float = 0.01,
    warmup: float = 0.2,
    beta_start: float = 20.0,
    beta_end: float = 2.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "reconstruct",
) -> ReconstructionResult:
    """Learn the rounding of every quantized weight in ``unit`` against its targets; harden them.

    Optimises the rounding logits only (Adam; the unit's own parameters get no gradients) on
    batches of ``batch_size`` of the ``count`` samples, drawn without replacement by
    ``generator`` (``None``: seeded with 0, so a run is reproducible). ``w(t)`` and ``β(t)``
    follow :class:`~dmquant.recon.adaround.BetaSchedule`. Activation quantizers inside the unit
    are used as they are. At the end every layer's learned rounding is written into its weight.

    Defaults (Adam at lr 1e-3, batch 32, regulariser weight 0.01, β from 20 to 2 after a 20 %
    warm-up) are BRECQ's and Q-Diffusion's; they run 20k iterations per unit, the AdaRound
    paper 10k per layer. The default 2000 is a cheaper setting for small models.
    """
    if count < 1:
        raise ValueError("reconstruction needs at least one sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    schedule = BetaSchedule(iterations, warmup=warmup, start=beta_start, end=beta_end)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    chunk = max(batch_size, 256)

    roundings = _roundings(unit)
    initial_mse = _output_mse(unit, sample, count, chunk)
    optimizer = torch.optim.Adam([p for r in roundings for p in r.parameters()], lr=learning_rate)
    own = [(p, p.requires_grad) for p in unit.parameters()]
    report_every = max(1, iterations // 100)
    try:
        for parameter, _ in own:
            parameter.requires_grad_(False)
        with ExitStack() as soft, torch.enable_grad():
            for rounding in roundings:
                soft.enter_context(rounding.use_soft_weight())
            bar = soft.enter_context(tqdm(total=iterations, desc=desc, unit="it", disable=not progress))
            for t in range(iterations):
                args, kwargs, target = sample(torch.randperm(count, generator=generator)[:batch_size])
                output = block_output(unit(*args, **kwargs))
                loss = reconstruction_loss(output, target, _channel_dim(output))
                weight = schedule.regularizer_weight(t)
                if weight:
                    regularizer = sum(rounding.regularizer(schedule.beta(t)) for rounding in roundings)
                    loss = loss + regularizer_scale * weight * regularizer
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                if progress and (t % report_every == 0 or t == iterations - 1):
                    bar.set_postfix(loss=f"{loss.item():.4g}", beta=f"{schedule.beta(t):.3g}")
    finally:
        for parameter, requires_grad in own:
            parameter.requires_grad_(requires_grad)

    counts = [(r.changed_fraction(), sum(p.numel() for p in r.parameters())) for r in roundings]
    changed = sum(fraction * size for fraction, size in counts) / sum(size for _, size in counts)
    for rounding in roundings:
        rounding.harden()
    final_mse = _output_mse(unit, sample, count, chunk)
    return ReconstructionResult(initial_mse, final_mse, changed, iterations)


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
