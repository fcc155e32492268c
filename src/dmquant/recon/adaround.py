"""AdaRound: learned up/down rounding of quantized weights.

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML 2020).
Each weight is rounded either down or up, ``floor(w / s)`` or ``floor(w / s) + 1``, and which
of the two is learned per weight by minimising the layer's output reconstruction error on
calibration data, instead of always taking the nearest grid point. The binary choice is
relaxed to a continuous variable ``h(V) ∈ [0, 1]`` (a rectified sigmoid of a logit ``V``),
pushed to {0, 1} by an annealed regulariser, and finally hardened to ``1[V >= 0]``.

BRECQ (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction") and Q-Diffusion (Li et al. 2023) use it for the weights of every layer/block;
the constants and schedules below (ζ = 1.1, γ = -0.1, the logit initialisation, β from 20 to 2
after a 20 % warm-up without regulariser, regulariser weight 0.01, Adam at lr 1e-3, batch 32)
are those of their public reference code (``AdaRoundQuantizer``, ``LinearTempDecay``,
``LossFunction``).

The pure functions work on integer formats only: AdaRound chooses between two neighbouring
points of a uniform integer grid, which float formats (fp8 / fp4) do not have.
:class:`AdaRoundWeights` holds the learnable logits of one ``QuantLinear`` / ``QuantConv2d``,
and :mod:`dmquant.recon.brecq` runs the optimisation (the paper's eq. 21 objective) for one layer
or a whole block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from ..core.primitives import QFormat
from ..errors import CalibrationError, ConfigError

__all__ = [
    "ZETA",
    "GAMMA",
    "rectified_sigmoid",
    "initial_logits",
    "soft_quantized",
    "hard_quantized",
    "rounding_regularizer",
    "reconstruction_loss",
    "BetaSchedule",
    "AdaRoundWeights",
]

ZETA = 1.1
"""Stretch of the rectified sigmoid's upper end (Nagel et al. 2020, eq. 23; Louizos et al. 2018)."""
GAMMA = -0.1
"""Stretch of the rectified sigmoid's lower end (Nagel et al. 2020, eq. 23)."""


def _require_integer_format(fmt: QFormat) -> None:
    if fmt.is_float:
        raise ConfigError(
            f"AdaRound learns up/down rounding on a uniform integer grid; weight format {fmt.name!r} is a float "
            "format with no such grid. Use an integer weight format (e.g. bits: 4) for AdaRound, or keep "
            "round-to-nearest for float formats."
        )


# --------------------------------------------------------------------------------------
# The relaxation (pure functions)
# --------------------------------------------------------------------------------------


def rectified_sigmoid(v: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """``h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1)`` (Nagel et al. 2020, eq. 23).

    The stretch past [0, 1] lets ``h`` reach exactly 0 and 1 at finite ``V`` (where its
    gradient then vanishes), so the regulariser can settle each weight's rounding.
    """
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def initial_logits(weight: Tensor, scale: Tensor | float, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """Logits ``V`` with ``h(V) = w/s - floor(w/s)``, the fractional part of ``w / s``.

    The soft weight ``s·(floor(w/s) + h(V))`` then starts exactly at ``w`` (before the clamp to
    the code range), and ``1[V >= 0]`` at round-to-nearest. This is the reference code's
    initialisation (BRECQ / Q-Diffusion ``AdaRoundQuantizer.init_alpha``), inverting eq. 23 of
    Nagel et al. 2020 on its unclipped part::

        rest = w/s - floor(w/s)                      # in [0, 1)
        V    = -log((ζ - γ) / (rest - γ) - 1)

    ``scale`` broadcasts against ``weight``; the result is float32 with the broadcast shape.
    """
    v = weight.detach().to(torch.float32) / scale
    rest = v - torch.floor(v)
    return -torch.log((zeta - gamma) / (rest - gamma) - 1.0)


def _codes(weight: Tensor, scale: Tensor | float, zero_point: Tensor | float, up: Tensor, fmt: QFormat) -> Tensor:
    """``clamp(floor(w/s) + up + z, qmin, qmax)`` as float32 (``up`` in [0, 1])."""
    v = weight.to(torch.float32) / scale
    return torch.clamp(torch.floor(v) + up + zero_point, fmt.qmin, fmt.qmax)


def soft_quantized(
    weight: Tensor, scale: Tensor | float, zero_point: Tensor | float, logits: Tensor, fmt: QFormat
) -> Tensor:
    """The relaxed quantized weight ``s·(clamp(floor(w/s) + h(V) + z, qmin, qmax) - z)``.

    Nagel et al. 2020, eq. 22 (there without zero point; the affine form is the reference
    code's). ``scale`` and ``zero_point`` must already broadcast against ``weight`` (as
    :meth:`dmquant.core.quantizer.Quantizer.qparams` returns them, through ``expand_params``);
    ``logits`` has the weight's shape. Differentiable in ``logits`` (and ``scale``); integer
    formats only.
    """
    _require_integer_format(fmt)
    codes = _codes(weight, scale, zero_point, rectified_sigmoid(logits), fmt)
    return (codes - zero_point) * scale


def hard_quantized(
    weight: Tensor, scale: Tensor | float, zero_point: Tensor | float, logits: Tensor, fmt: QFormat
) -> Tensor:
    """The final rounding: :func:`soft_quantized` with ``h(V)`` replaced by ``1[V >= 0]``.

    Computed in the same order as :func:`dmquant.core.primitives.fake_quant`
    (``(code - z) * s``), so where the decisions agree with round-to-nearest the values agree
    bit for bit. Integer formats only.
    """
    _require_integer_format(fmt)
    codes = _codes(weight, scale, zero_point, (logits >= 0).to(torch.float32), fmt)
    return (codes - zero_point) * scale


def rounding_regularizer(logits: Tensor, beta: float, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """``f_reg(V) = Σ 1 - |2h(V) - 1|^β`` (Nagel et al. 2020, eq. 24).

    Zero when every ``h(V)`` is 0 or 1, one per weight at ``h = 0.5``. A large ``β`` leaves
    ``h`` free except near 0 and 1; annealing ``β`` down (:class:`BetaSchedule`) pulls every
    ``h`` to one end.
    """
    return (1.0 - (2.0 * rectified_sigmoid(logits, zeta, gamma) - 1.0).abs().pow(beta)).sum()


def reconstruction_loss(output: Tensor, target: Tensor, channel_dim: int = 1) -> Tensor:
    """Squared error summed over the channel dimension, averaged over all others.

    The reference code's ``lp_loss(pred, tgt, p=2)`` (BRECQ / Q-Diffusion:
    ``(pred - tgt).abs().pow(2).sum(1).mean()``), with the channel dimension made explicit so
    that a Linear on ``(N, L, C)`` tokens sums over ``C`` (-1) rather than over tokens. Its scale
    relative to :func:`rounding_regularizer` is the one the reference's regulariser weight 0.01
    was chosen with (a plain element mean would make the regulariser ``C`` times stronger).
    """
    return (output.float() - target.float()).pow(2).sum(channel_dim).mean()


@dataclass(frozen=True)
class BetaSchedule:
    """Annealing of the regulariser's exponent β over ``iterations`` steps.

    The reference code's ``LinearTempDecay`` with its ``LossFunction`` warm-up (BRECQ /
    Q-Diffusion; the annealing itself is Nagel et al. 2020, Sec. 3.2 below eq. 24): for
    ``t < warmup·T`` the regulariser is off (:meth:`regularizer_weight` 0) and β stays at
    ``start``; then β decays linearly to ``end``::

        rel = (t - warmup·T) / ((1 - warmup)·T)
        β   = end + (start - end)·max(0, 1 - rel)
    """

    iterations: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {self.iterations!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.start >= self.end > 0:
            raise ValueError(f"need start >= end > 0, got start={self.start}, end={self.end}")

    @property
    def decay_start(self) -> float:
        """The iteration where the warm-up ends and β starts to decay."""
        return self.warmup * self.iterations

    def beta(self, t: float) -> float:
        if t < self.decay_start:
            return float(self.start)
        rel = (t - self.decay_start) / ((1.0 - self.warmup) * self.iterations)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)

    def regularizer_weight(self, t: float) -> float:
        """0 during the warm-up, 1 after."""
        return 0.0 if t < self.decay_start else 1.0


# --------------------------------------------------------------------------------------
# One layer's learnable rounding
# --------------------------------------------------------------------------------------


class AdaRoundWeights(nn.Module):
    """The learnable rounding logits of one ``QuantLinear`` / ``QuantConv2d``.

    One logits tensor per :meth:`weight_parts` entry whose quantizer is enabled (two for a split
    ``QuantConv2d``), initialised by :func:`initial_logits` from the layer's calibrated weight
    quantizers, so the hard rounding starts at round-to-nearest. Parts whose quantizer is
    disabled stay as the layer has them. :meth:`parameters` yields the logits only (the layer
    is referenced, not registered as a submodule).

    Use :meth:`use_soft_weight` around the optimisation so the layer's forward sees
    :meth:`soft_weight`, and :meth:`harden` at the end: it writes the hard-rounded de-quantized
    weight into ``layer.weight``, which the layer's ordinary weight quantizer then maps back to
    exactly those codes. The scale and zero point are read from the quantizers at every call
    (not copied), and the weight itself is never changed before :meth:`harden`.
    """

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__()
        if not isinstance(layer, QUANT_LAYERS):
            raise TypeError(f"AdaRound needs a QuantLinear or QuantConv2d, got {type(layer).__name__}")
        object.__setattr__(self, "_layer", layer)  # not a submodule: parameters() are the logits only
        self.logits = nn.ParameterDict()
        for index, (quantizer, part) in enumerate(layer.weight_parts()):
            if not quantizer.enabled:
                continue
            _require_integer_format(quantizer.fmt)
            if not quantizer.calibrated or quantizer.observing:
                raise CalibrationError(
                    f"{quantizer.name or 'weight quantizer'}: calibrate the weight ranges before AdaRound"
                )
            scale, _ = quantizer.qparams(part.shape)
            self.logits[str(index)] = nn.Parameter(initial_logits(part, scale.detach()))
        if not len(self.logits):
            raise ConfigError(f"{type(layer).__name__} has no enabled weight quantizer: nothing for AdaRound to round")
        self.hardened = False

    @property
    def layer(self) -> QuantLinear | QuantConv2d:
        return self._layer

    def _check_live(self) -> None:
        if self.hardened:
            raise RuntimeError(
                "these AdaRound logits were hardened into the layer's weight; make a new AdaRoundWeights"
            )

    def _assemble(self, hard: bool) -> Tensor:
        """The full weight with every enabled part soft- or hard-quantized, split parts
        concatenated along input channels as ``QuantConv2d.quantized_weight`` does."""
        pieces = []
        for index, (quantizer, part) in enumerate(self.layer.weight_parts()):
            key = str(index)
            if key not in self.logits:
                pieces.append(quantizer(part))
                continue
            scale, zero_point = quantizer.qparams(part.shape)
            rounding = hard_quantized if hard else soft_quantized
            pieces.append(rounding(part.detach(), scale, zero_point, self.logits[key], quantizer.fmt))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def soft_weight(self) -> Tensor:
        """The relaxed quantized weight (:func:`soft_quantized` per part), differentiable in the logits."""
        self._check_live()
        return self._assemble(hard=False)

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The hard-rounded quantized weight (:func:`hard_quantized` per part), float32."""
        self._check_live()
        return self._assemble(hard=True)

    def regularizer(self, beta: float) -> Tensor:
        """:func:`rounding_regularizer` summed over all parts.

        For a shortcut-split ``QuantConv2d`` this covers both halves. Q-Diffusion's reference
        code (``qdiff/block_recon.py``, ``qdiff/layer_recon.py``) learns the second half's
        rounding too but leaves it out of the rounding loss (only ``weight_quantizer``'s soft
        targets enter it, not ``weight_quantizer_0``'s), so that half is never pushed towards
        {0, 1} and its hardening at the end is unregularised. Both halves are weights rounded
        the same way, so here both are regularised, as AdaRound (Nagel et al. 2020, eq. 24)
        regularises every rounded weight.
        """
        return sum(rounding_regularizer(logits, beta) for logits in self.logits.values())

    @torch.no_grad()
    def changed_fraction(self) -> float:
        """Fraction of the rounded weights whose hard code differs from round-to-nearest's."""
        self._check_live()
        changed = total = 0
        for index, (quantizer, part) in enumerate(self.layer.weight_parts()):
            key = str(index)
            if key not in self.logits:
                continue
            scale, zero_point = quantizer.qparams(part.shape)
            hard = _codes(part, scale, zero_point, (self.logits[key] >= 0).to(torch.float32), quantizer.fmt)
            nearest = quantizer.codes(part)
            changed += int((hard != nearest).sum())
            total += part.numel()
        return changed / total

    @contextmanager
    def use_soft_weight(self) -> Iterator[AdaRoundWeights]:
        """Make the layer's forward use :meth:`soft_weight` inside the block.

        Patches ``quantized_weight`` on the layer instance (its class is untouched) and removes
        the patch on exit, also on error.
        """
        self._check_live()
        layer = self.layer
        if "quantized_weight" in vars(layer):
            raise RuntimeError(f"{type(layer).__name__}.quantized_weight is already patched on this instance")
        layer.quantized_weight = self.soft_weight
        try:
            yield self
        finally:
            del layer.quantized_weight

    @torch.no_grad()
    def harden(self) -> None:
        """Write the hard-rounded, de-quantized weight into ``layer.weight``.

        Afterwards ``layer.quantized_weight()`` reproduces the hard rounding exactly: a weight
        ``(q - z)·s`` divides back to ``q - z`` within far less than half a step, so the
        ordinary round-to-nearest quantizer finds the same codes (bit for bit for float32
        weights; a float16 weight keeps the codes of formats up to 8 bits, a bfloat16 one up
        to 7 bits, where the cast moves a value by less than half a step). The logits are
        spent afterwards.
        """
        hard = self.hard_weight()
        self.layer.weight.data.copy_(hard)
        self.hardened = True
