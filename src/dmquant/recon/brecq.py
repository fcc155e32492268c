"""Reconstruction of one unit — a single layer or a whole block — with AdaRound on all its weights
and, optionally, learned activation step sizes (LSQ) and QDrop.

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

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.layers import QUANT_LAYERS, activation_quantizers
from ..errors import ConfigError
from .adaround import AdaRoundWeights, BetaSchedule, reconstruction_loss
from .cache import block_output
from .graphed import ReplayedIteration, graphs_available
from .objectives import InnerLayerLoss
from .parallel import SampleShare
from .qdrop import dropped_activations

#: ``sample(indices) -> (args, kwargs, target)`` for the unit's forward.
Sampler = Callable[[Tensor], tuple[Sequence[Any], dict[str, Any], Tensor]]

#: One iteration's data: ``(args, kwargs, target, fp_inputs)``, ``fp_inputs`` the FP unit's
#: ``(args, kwargs)`` for EDA-DM's inner-layer loss (empty without it).
Batch = tuple[Sequence[Any], dict[str, Any], Tensor, tuple[Any, ...]]


@dataclass(frozen=True)
class ReconstructionResult:
    """Outcome of reconstructing one unit.

    ``initial_mse`` is the element-mean squared error of the unit's output against the targets
    before the optimisation, ``final_mse`` the same after it (rounding hardened, step sizes
    kept; both over all samples, without QDrop's dropping); ``changed_fraction`` is the fraction
    of the unit's quantized weights whose code differs from round-to-nearest's (``None`` when
    the rounding was not learned); ``learned_scales`` the number of activation quantizers whose
    step sizes were learned.
    """

    initial_mse: float
    final_mse: float
    changed_fraction: float | None
    learned_scales: int
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
def _output_mse(unit: nn.Module, sample: Sampler, share: SampleShare, chunk: int) -> float:
    total, elements = 0.0, 0
    for start in range(0, len(share), chunk):
        args, kwargs, target = sample(torch.arange(start, min(start + chunk, len(share))))
        output = block_output(unit(*args, **kwargs)).float()
        total += float((output - target.float()).pow(2).sum())
        elements += output.numel()
    total, elements = share.sum([total, elements])
    return total / elements


def _unit_device(unit: nn.Module) -> torch.device:
    return next(unit.parameters()).device


def _cosine_annealed(base: float, t: int, iterations: int) -> float:
    """Cosine annealing from ``base`` to 0 over ``iterations`` (Loshchilov & Hutter 2017, eq. 5,
    without restarts): the learning rate of iteration ``t``, ``base · (1 + cos(π t / T)) / 2``."""
    return base * (1.0 + math.cos(math.pi * t / iterations)) / 2.0


def _set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(value)  # in place: a replayed step reads this tensor
        else:
            group["lr"] = value


def reconstruct(
    unit: nn.Module,
    sample: Sampler,
    count: int,
    *,
    train_sample: Sampler | None = None,
    iterations: int = 2000,
    batch_size: int = 32,
    learn_rounding: bool = True,
    learn_activation_scales: bool = False,
    learning_rate: float = 1e-3,
    activation_learning_rate: float = 4e-5,
    regularizer_scale: float = 0.01,
    warmup: float = 0.2,
    beta_start: float = 20.0,
    beta_end: float = 2.0,
    drop_probability: float = 0.0,
    inner_loss: InnerLayerLoss | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = True,
    share: SampleShare | None = None,
    progress: bool = True,
    desc: str = "reconstruct",
) -> ReconstructionResult:
    """Learn the rounding of every quantized weight in ``unit`` and/or its activation step sizes.

    With ``learn_rounding`` the rounding logits of every enabled weight quantizer are optimised
    (Adam at ``learning_rate``) under AdaRound's regulariser, ``w(t)`` and ``β(t)`` following
    :class:`~dmquant.recon.adaround.BetaSchedule`, and hardened into the weights at the end.
    With ``learn_activation_scales`` the step sizes of the unit's enabled activation quantizers
    are trained too (LSQ, Esser et al. 2020: Adam at ``activation_learning_rate`` with cosine
    annealing to 0, as BRECQ's and QDrop's code do; kept positive). Activation quantizers are
    used as they are set (disable them for a weight-only pass). ``drop_probability > 0`` applies
    QDrop inside the unit (:func:`~dmquant.recon.qdrop.dropped_activations`). ``inner_loss``
    adds EDA-DM's loss on the unit's inner layers (:class:`~dmquant.recon.objectives.InnerLayerLoss`)
    to the output loss. The unit's own parameters get no gradients.

    Batches of ``batch_size`` of the ``count`` samples are drawn by ``generator`` (``None``:
    seeded with 0, so a run is reproducible) and fetched with ``train_sample`` if given (e.g.
    with QDrop's mixed inputs, :func:`~dmquant.recon.qdrop.mix_inputs`), else with ``sample``;
    the reported errors always use ``sample``. Defaults (lr 1e-3 for the rounding, 4e-5 for step
    sizes, batch 32, regulariser weight 0.01, β from 20 to 2 after a 20 % warm-up) are those of
    BRECQ's and Q-Diffusion's reconstruction functions (4e-5 is also PTQ4DM's ``--lr``;
    Q-Diffusion's scripts pass 4e-4 for the step sizes, which its recipe sets); they run 20k
    iterations per unit, the AdaRound paper 10k per layer. The default 2000 is a cheaper setting
    for small models.

    On a CUDA device with ``cuda_graph`` the iteration is captured once and replayed
    (:class:`~dmquant.recon.graphed.ReplayedIteration`): the same computation with a fraction of
    the host's launch work, which bounds small models; ``False`` runs it eagerly.

    ``share`` spreads the ``count`` samples over the processes of a launch (data-parallel,
    :mod:`dmquant.recon.parallel`): ``sample`` and ``train_sample`` then take positions in this
    process's share, and the gradients are summed over the processes before each step.
    """
    if count < 1:
        raise ValueError("reconstruction needs at least one sample")
    share = share if share is not None else SampleShare(count)
    if share.total != count:
        raise ValueError(f"the share is of {share.total} samples, the unit has {count}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (learn_rounding or learn_activation_scales):
        raise ValueError("nothing to learn: set learn_rounding and/or learn_activation_scales")
    schedule = BetaSchedule(iterations, warmup=warmup, start=beta_start, end=beta_end)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = _unit_device(unit)
    drop_generator = torch.Generator(device=device)
    drop_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    chunk = max(batch_size, 256)

    roundings = _roundings(unit) if learn_rounding else []
    scaled = [q for q in activation_quantizers(unit) if q.calibrated] if learn_activation_scales else []
    if learn_activation_scales and not scaled:
        raise ConfigError(f"{type(unit).__name__} has no calibrated activation quantizer whose step size to learn")
    initial_mse = _output_mse(unit, sample, share, chunk)
    own = [(p, p.requires_grad) for p in unit.parameters()]  # before the step sizes become parameters
    graphed = cuda_graph and graphs_available(device) and share.count == 1  # shares vary in size
    optimizers: list[torch.optim.Optimizer] = []
    if roundings:
        logits = [p for r in roundings for p in r.parameters()]
        optimizers.append(torch.optim.Adam(logits, lr=learning_rate, capturable=graphed))
    scales = [q.learn_scale() for q in scaled]
    if scales:  # its learning rate changes every iteration: a device tensor when the step is replayed
        scale_rate = torch.tensor(activation_learning_rate, device=device) if graphed else activation_learning_rate
        optimizers.append(torch.optim.Adam(scales, lr=scale_rate, capturable=graphed))

    learned = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    fraction = 1.0  # of the iteration's batch held by this process (set per iteration below)

    def step(batch: Batch | None, beta: Tensor | float, weight: Tensor | float) -> Tensor:
        loss = torch.zeros((), device=device)
        if batch is not None:  # None: this process holds none of the batch's samples
            args, kwargs, target, fp_inputs = batch
            with inner_loss.term(*fp_inputs) if inner_loss else nullcontext(lambda: 0.0) as inner_term:
                output = block_output(unit(*args, **kwargs))
                loss = reconstruction_loss(output, target, _channel_dim(output)) + inner_term()
        if share.count > 1:  # this process's part of the batch's mean
            loss = loss * fraction
        if roundings:  # weight is 0 during the warm-up: the term then adds exact zeros
            regularizer = regularizer_scale * weight * sum(rounding.regularizer(beta) for rounding in roundings)
            loss = loss + (regularizer / share.count if share.count > 1 else regularizer)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        share.sum_gradients(learned)
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            for scale in scales:
                scale.clamp_(min=torch.finfo(scale.dtype).tiny)
        return loss.detach()

    def batch(index: Tensor) -> Batch:
        args, kwargs, target = (train_sample or sample)(index)
        return args, kwargs, target, inner_loss.inputs(index) if inner_loss else ()

    drawn = [drop_generator] if drop_probability > 0 else []
    iteration = ReplayedIteration(step, device, enabled=graphed, generators=drawn)
    report_every = max(1, iterations // 100)
    try:
        for parameter, _ in own:
            parameter.requires_grad_(False)
        with ExitStack() as stack, torch.enable_grad():
            for rounding in roundings:
                stack.enter_context(rounding.use_soft_weight())
            stack.enter_context(dropped_activations(activation_quantizers(unit), drop_probability, drop_generator))
            bar = stack.enter_context(tqdm(total=iterations, desc=desc, unit="it", leave=False, disable=not progress))
            for t in range(iterations):
                if scales:
                    _set_learning_rate(optimizers[-1], _cosine_annealed(activation_learning_rate, t, iterations))
                index, fraction = share.local(torch.randperm(count, generator=generator)[:batch_size])
                weight = schedule.regularizer_weight(t) if roundings else 0.0
                loss = iteration(batch(index) if len(index) else None, schedule.beta(t), weight)
                bar.update()
                if progress and (t % report_every == 0 or t == iterations - 1):
                    bar.set_postfix(loss=f"{loss.item():.4g}", beta=f"{schedule.beta(t):.3g}")
    finally:
        for parameter, requires_grad in own:
            parameter.requires_grad_(requires_grad)
        for quantizer in scaled:
            quantizer.freeze_scale()

    changed = None
    if roundings:
        counts = [(r.changed_fraction(), sum(p.numel() for p in r.parameters())) for r in roundings]
        changed = sum(fraction * size for fraction, size in counts) / sum(size for _, size in counts)
        for rounding in roundings:
            rounding.harden()
    final_mse = _output_mse(unit, sample, share, chunk)
    return ReconstructionResult(initial_mse, final_mse, changed, len(scaled), iterations)
