"""Quantization arithmetic as pure functions on tensors.

Everything here is stateless: formats and granularities are frozen dataclasses, and the
functions take tensors and return tensors. Modules (``dmquant.core.layers``) hold the
parameters and call these.

Conventions
-----------
* Uniform affine quantization (Jacob et al. 2018, "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference", eq. 1: ``r = S (q - Z)``)::

      q     = clamp(round(x / scale) + zero_point, qmin, qmax)
      x_hat = (q - zero_point) * scale

* Float formats (fp8 / fp4) are *scaled* casts: ``q = round_to_float_format(x / scale)``,
  ``x_hat = q * scale``, with ``zero_point`` always 0.
* Quantization parameters have shape :func:`param_shape` — the tensor's ndim with a 1 on
  every dimension they are shared along — and :func:`expand_params` makes them broadcast
  against the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from dmquant.errors import ConfigError

__all__ = [
    "SUPPORTED_INT_BITS",
    "IntFormat",
    "FloatFormat",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP4_E2M1",
    "QFormat",
    "parse_format",
    "Granularity",
    "param_shape",
    "to_blocks",
    "from_blocks",
    "expand_params",
    "choose_qparams",
    "quantize",
    "dequantize",
    "round_ste",
    "round_to_float_format",
    "fake_quant",
    "lsq_grad_scale",
    "scale_gradient",
]

SUPPORTED_INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntFormat:
    """A ``bits``-wide integer grid, two's complement when ``signed``."""

    bits: int
    signed: bool = True

    is_float: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in SUPPORTED_INT_BITS:
            raise ConfigError(f"unsupported integer bit width {self.bits!r}; supported: {list(SUPPORTED_INT_BITS)}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"


@dataclass(frozen=True)
class FloatFormat:
    """A small IEEE-754-like binary float: sign, ``exponent_bits``, ``mantissa_bits``.

    Subnormals are included; there is no inf or nan, values saturate at ``max_value``
    (the OCP "fn" encodings, OCP 8-bit Floating Point Specification (OFP8) 2023 and OCP
    Microscaling Formats (MX) v1.0 for e2m1).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float

    is_float: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (subnormals share it)."""
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        """The smallest positive representable value."""
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def qmin(self) -> float:
        """Lower end of the code range, ``-max_value`` (mirrors :attr:`IntFormat.qmin`)."""
        return -self.max_value

    @property
    def qmax(self) -> float:
        """Upper end of the code range, ``max_value`` (LSQ's ``Q_P`` for float formats)."""
        return self.max_value


FP8_E4M3 = FloatFormat("fp8_e4m3", exponent_bits=4, mantissa_bits=3, bias=7, max_value=448.0)
FP8_E5M2 = FloatFormat("fp8_e5m2", exponent_bits=5, mantissa_bits=2, bias=15, max_value=57344.0)
FP4_E2M1 = FloatFormat("fp4_e2m1", exponent_bits=2, mantissa_bits=1, bias=1, max_value=6.0)

QFormat = IntFormat | FloatFormat

_FLOAT_FORMATS = {
    "fp8_e4m3": FP8_E4M3,
    "e4m3": FP8_E4M3,
    "fp8_e5m2": FP8_E5M2,
    "e5m2": FP8_E5M2,
    "fp4_e2m1": FP4_E2M1,
    "fp4": FP4_E2M1,
    "e2m1": FP4_E2M1,
}


def parse_format(spec: str | int | QFormat) -> QFormat:
    """Parse a format spec: ``8``, ``"8"``, ``"int4"``, ``"uint8"``, ``"fp8_e4m3"``, ``"e5m2"``, ``"fp4"``.

    A bare bit width means a signed integer. An already-built format is returned unchanged.
    """
    if isinstance(spec, (IntFormat, FloatFormat)):
        return spec
    valid = f"a bit width in {list(SUPPORTED_INT_BITS)} as 'N', 'intN' or 'uintN', or one of {sorted(_FLOAT_FORMATS)}"
    if isinstance(spec, int) and not isinstance(spec, bool):
        bits, signed = spec, True
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text in _FLOAT_FORMATS:
            return _FLOAT_FORMATS[text]
        signed, digits = True, text
        if text.startswith("uint"):
            signed, digits = False, text[4:]
        elif text.startswith("int"):
            digits = text[3:]
        if not (digits.isascii() and digits.isdigit()):
            raise ConfigError(f"unknown quantization format {spec!r}; expected {valid}")
        bits = int(digits)
    else:
        raise ConfigError(f"unknown quantization format {spec!r}; expected {valid}")
    return IntFormat(bits, signed)


# --------------------------------------------------------------------------------------
# Granularity
# --------------------------------------------------------------------------------------

_GRANULARITY_KINDS = ("tensor", "channel", "group")


@dataclass(frozen=True)
class Granularity:
    """Which elements of a tensor share one quantization parameter.

    * ``tensor``: all of them;
    * ``channel``: those with the same index along ``axis``;
    * ``group``: within each channel (``axis``), runs of ``group_size`` contiguous
      elements along ``group_axis``.

    Axes may be negative; they are normalised against a tensor's ndim where used.
    ``str(g)`` is a spec that :meth:`parse` turns back into ``g``.
    """

    kind: str = "tensor"
    axis: int = 0
    group_size: int = 0
    group_axis: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _GRANULARITY_KINDS:
            raise ConfigError(f"unknown granularity kind {self.kind!r}; valid: {list(_GRANULARITY_KINDS)}")
        for field in ("axis", "group_size", "group_axis"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"granularity {field} must be an int, got {value!r}")
        if self.kind == "group":
            if self.group_size < 1:
                raise ConfigError(f"group granularity needs group_size >= 1, got {self.group_size}")
            if self.axis == self.group_axis:
                raise ConfigError(f"group granularity needs axis != group_axis, got both {self.axis}")
        elif self.group_size != 0:
            raise ConfigError(f"group_size={self.group_size} is only valid for kind 'group', not {self.kind!r}")

    @classmethod
    def per_tensor(cls) -> Granularity:
        return cls("tensor")

    @classmethod
    def per_channel(cls, axis: int = 0) -> Granularity:
        return cls("channel", axis=axis)

    @classmethod
    def per_group(cls, group_size: int, axis: int = 0, group_axis: int = 1) -> Granularity:
        return cls("group", axis=axis, group_size=group_size, group_axis=group_axis)

    @classmethod
    def parse(cls, spec: str) -> Granularity:
        """Parse ``"tensor"``, ``"channel"``, ``"channel:AXIS"``, ``"group:SIZE"`` or
        ``"group:SIZE:AXIS:GROUP_AXIS"``."""
        valid = "'tensor', 'channel', 'channel:AXIS', 'group:SIZE', 'group:SIZE:AXIS:GROUP_AXIS'"
        if not isinstance(spec, str):
            raise ConfigError(f"granularity spec must be a string, got {spec!r}; valid: {valid}")
        kind, *fields = spec.strip().lower().split(":")
        try:
            if not spec.isascii():  # int() would read other scripts' digits
                raise ValueError(spec)
            numbers = [int(f) for f in fields]
        except ValueError:
            raise ConfigError(f"bad granularity {spec!r}; valid: {valid}") from None
        try:
            if kind == "tensor" and not numbers:
                return cls.per_tensor()
            if kind == "channel" and len(numbers) <= 1:
                return cls.per_channel(*numbers)
            if kind == "group" and len(numbers) in (1, 3):
                return cls.per_group(*numbers)
        except ConfigError as err:
            raise ConfigError(f"bad granularity {spec!r}: {err}") from None
        raise ConfigError(f"bad granularity {spec!r}; valid: {valid}")

    def __str__(self) -> str:
        if self.kind == "tensor":
            return "tensor"
        if self.kind == "channel":
            return f"channel:{self.axis}"
        return f"group:{self.group_size}:{self.axis}:{self.group_axis}"


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def _resolve_axes(shape: tuple[int, ...], granularity: Granularity) -> tuple[int | None, int | None]:
    """Channel axis and group axis of ``granularity`` normalised against ``shape`` (None where
    the kind has none), checked to be in range, distinct, and evenly divided into groups."""
    if granularity.kind == "tensor":
        return None, None
    axis = _normalize_axis(granularity.axis, len(shape), "channel axis")
    if granularity.kind == "channel":
        return axis, None
    gaxis = _normalize_axis(granularity.group_axis, len(shape), "group axis")
    if axis == gaxis:
        raise ValueError(f"channel axis and group axis are both dim {axis} of shape {shape}")
    if shape[gaxis] % granularity.group_size:
        raise ValueError(
            f"group_size {granularity.group_size} does not divide dim {gaxis} of shape {shape} (size {shape[gaxis]})"
        )
    return axis, gaxis


def param_shape(shape: Sequence[int], granularity: Granularity) -> tuple[int, ...]:
    """Shape of the quantization parameters of a tensor of ``shape``.

    Same ndim as ``shape``: 1 on every dim parameters are shared along, ``shape[axis]`` on
    the channel axis and ``shape[group_axis] // group_size`` on the group axis, e.g.
    ``(O, I)`` per_group(4) -> ``(O, I // 4)``; ``(N, C, H, W)`` per_channel(1) -> ``(1, C, 1, 1)``.
    """
    shape = tuple(int(s) for s in shape)
    axis, gaxis = _resolve_axes(shape, granularity)
    result = [1] * len(shape)
    if axis is not None:
        result[axis] = shape[axis]
    if gaxis is not None:
        result[gaxis] = shape[gaxis] // granularity.group_size
    return tuple(result)


def _block_layout(shape: Sequence[int], granularity: Granularity) -> tuple[tuple[int, ...], list[int]]:
    """``shape`` with the group axis split into ``(groups, group_size)``, and the dims of
    that split shape that index parameters, in increasing order."""
    shape = tuple(int(s) for s in shape)
    axis, gaxis = _resolve_axes(shape, granularity)
    if gaxis is None:
        return shape, [] if axis is None else [axis]
    groups = shape[gaxis] // granularity.group_size
    split = shape[:gaxis] + (groups, granularity.group_size) + shape[gaxis + 1 :]
    return split, sorted([axis if axis < gaxis else axis + 1, gaxis])


def to_blocks(x: Tensor, granularity: Granularity) -> Tensor:
    """Arrange ``x`` as a ``(P, R)`` matrix whose row ``p`` holds the ``R`` elements sharing
    parameter ``p``; rows follow the C-contiguous order of a :func:`param_shape` tensor."""
    split, dims = _block_layout(x.shape, granularity)
    moved = x.reshape(split).movedim(dims, list(range(len(dims))))
    return moved.reshape(math.prod(split[d] for d in dims), -1)


def from_blocks(values: Tensor, shape: Sequence[int], granularity: Granularity) -> Tensor:
    """Inverse of :func:`to_blocks`.

    A ``(P,)`` vector becomes a tensor of ``param_shape(shape)``; a ``(P, R)`` matrix becomes
    a tensor of ``shape``.
    """
    if values.dim() == 1:
        return values.reshape(param_shape(shape, granularity))
    if values.dim() != 2:
        raise ValueError(f"from_blocks expects a (P,) or (P, R) tensor, got shape {tuple(values.shape)}")
    split, dims = _block_layout(shape, granularity)
    rest = [d for d in range(len(split)) if d not in dims]
    moved = values.reshape([split[d] for d in dims + rest])
    return moved.movedim(list(range(len(dims))), dims).reshape(tuple(shape))


def expand_params(params: Tensor, shape: Sequence[int], granularity: Granularity) -> Tensor:
    """Make ``params`` (``param_shape(shape)``, or its ``P`` values flat) broadcast against a
    tensor of ``shape``: group parameters are repeated ``group_size`` times along the group
    axis, the others already broadcast."""
    params = params.reshape(param_shape(shape, granularity))
    if granularity.kind != "group":
        return params
    return params.repeat_interleave(granularity.group_size, dim=granularity.group_axis % len(shape))


# --------------------------------------------------------------------------------------
# Quantization parameters, quantize / dequantize
# --------------------------------------------------------------------------------------


def choose_qparams(
    min_val: Tensor, max_val: Tensor, fmt: QFormat, symmetric: bool, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the range ``[min_val, max_val]`` onto ``fmt``.

    The range is first widened to include 0, so that 0 is exactly representable. With
    ``Q_N = -qmin`` and ``Q_P = qmax`` (Jacob et al. 2018, eq. 1 for the affine map):

    * int, symmetric, signed:   ``scale = max(|min|, |max|) / Q_P``, zero point 0;
    * int, symmetric, unsigned: ``scale = max / Q_P``, zero point 0 (negatives clamp to 0);
    * int, asymmetric:          ``scale = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(round(qmin - min / scale), qmin, qmax)``;
    * float formats (symmetric only): ``scale = max(|min|, |max|) / fmt.max_value``, zero point 0.

    ``scale`` is clamped to at least ``eps``. Both outputs are float32 with the shape of
    ``min_val``; the zero point holds integer values.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32).clamp(max=0.0)
    max_val = torch.as_tensor(max_val, dtype=torch.float32).clamp(min=0.0)
    zero = torch.zeros_like(min_val)
    if fmt.is_float:
        if not symmetric:
            raise ConfigError(
                f"float format {fmt.name!r} supports symmetric quantization only; "
                "use symmetric=True or an integer format"
            )
        scale = torch.maximum(-min_val, max_val) / fmt.max_value
        return scale.clamp(min=eps), zero
    if symmetric:
        amax = torch.maximum(-min_val, max_val) if fmt.signed else max_val
        return (amax / fmt.qmax).clamp(min=eps), zero
    scale = ((max_val - min_val) / (fmt.qmax - fmt.qmin)).clamp(min=eps)
    zero_point = torch.round(fmt.qmin - min_val / scale).clamp(fmt.qmin, fmt.qmax)
    return scale, zero_point


def round_to_float_format(x: Tensor, fmt: FloatFormat) -> Tensor:
    """Round to the nearest value representable in ``fmt`` (ties to even), as float32.

    Subnormals are included and the result saturates at ``±fmt.max_value`` (never inf or
    nan for finite input), matching ``x.clamp(-max, max).to(torch.float8_e4m3fn)`` for e4m3
    and the same for e5m2 (OCP OFP8 spec, 2023; e2m1 from the OCP MX v1.0 spec). Written by
    hand because torch has no fp4 dtype; for fp8 it agrees bit for bit with torch's casts.
    """
    a = x.to(torch.float32).abs().clamp(max=fmt.max_value)
    # a = mant * 2**exp with mant in [0.5, 1): the binade exponent is exp - 1, floored at the
    # smallest normal exponent so the subnormal range shares its spacing.
    _, exp = torch.frexp(a)
    exp = exp.clamp(min=fmt.min_exponent + 1)
    ulp_exp = exp - 1 - fmt.mantissa_bits
    rounded = torch.ldexp(torch.round(torch.ldexp(a, -ulp_exp)), ulp_exp)
    return torch.copysign(rounded, x.to(torch.float32))


def quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, fmt: QFormat) -> Tensor:
    """Quantize ``x`` to codes of ``fmt``.

    Integer formats: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as ``torch.int32``.
    Float formats: ``round_to_float_format(x / scale)`` as float32 values (not bit patterns);
    their zero point must be 0. ``scale`` and ``zero_point`` broadcast against ``x``.
    """
    v = x.to(torch.float32) / scale
    if fmt.is_float:
        return round_to_float_format(v, fmt)
    return torch.clamp(torch.round(v) + zero_point, fmt.qmin, fmt.qmax).to(torch.int32)


def dequantize(codes: Tensor, scale: Tensor | float, zero_point: Tensor | float, fmt: QFormat) -> Tensor:
    """``(codes - zero_point) * scale`` as float32 (Jacob et al. 2018, eq. 1)."""
    return (codes.to(torch.float32) - zero_point) * scale


# --------------------------------------------------------------------------------------
# Differentiable (simulated) quantization
# --------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` in the forward pass, the incoming gradient passed through unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def round_ste(x: Tensor) -> Tensor:
    """``torch.round(x)`` in the forward pass, identity gradient (straight-through estimator,
    Bengio et al. 2013, "Estimating or Propagating Gradients Through Stochastic Neurons")."""
    return _StraightThrough.apply(x, torch.round)


def fake_quant(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, fmt: QFormat) -> Tensor:
    """Quantize-dequantize with straight-through gradients; float32 output.

    The forward value is bit-identical to ``dequantize(quantize(x, ...), ...)``. Integer
    formats are computed as LSQ writes its quantizer (Esser et al. 2020, "Learned Step Size
    Quantization", eqs. 1-2), clamping before rounding::

        v     = clamp(x / s, qmin - z, qmax - z)
        x_hat = (round_ste(v) + z - z) * s

    which equals ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` in value (the clamp bounds
    are integers) and gives exactly LSQ's gradients (eq. 3):

    * d/dx is 1 where ``qmin - z <= x / s <= qmax - z`` and 0 where clamped (STE);
    * d/ds, when ``scale`` requires grad, is ``round(x/s) - x/s`` inside and the clamp bound
      ``qmin - z`` / ``qmax - z`` outside (``-Q_N`` / ``Q_P`` for ``z = 0``).

    Float formats use the same form with the cast in place of rounding (``z`` must be 0):
    ``v = clamp(x / s, -max_value, max_value)``, ``x_hat = ste(round_to_float_format)(v) * s``,
    so d/ds is ``round_to_float_format(x/s) - x/s`` inside and ``±max_value`` outside.

    Without autograd (sampling, calibration passes) integer formats take an in-place path,
    ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` on one buffer: the same values, several
    times faster on CPU.
    """
    v = x.to(torch.float32) / scale
    if not fmt.is_float and not (torch.is_grad_enabled() and v.requires_grad):
        return v.round_().add_(zero_point).clamp_(fmt.qmin, fmt.qmax).sub_(zero_point).mul_(scale)
    if fmt.is_float:
        q = _StraightThrough.apply(v.clamp(fmt.qmin, fmt.qmax), partial(round_to_float_format, fmt=fmt))
    else:
        q = round_ste(torch.clamp(v, fmt.qmin - zero_point, fmt.qmax - zero_point)) + zero_point
    return (q - zero_point) * scale


def lsq_grad_scale(numel: int, fmt: QFormat) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(numel * Q_P)`` (Esser et al. 2020,
    "Learned Step Size Quantization", §2.2). ``Q_P`` is ``fmt.qmax`` (``max_value`` for floats)."""
    if numel < 1:
        raise ValueError(f"lsq_grad_scale needs numel >= 1, got {numel}")
    return 1.0 / math.sqrt(numel * fmt.qmax)


def scale_gradient(x: Tensor, g: float) -> Tensor:
    """Identity in the forward pass, gradient multiplied by ``g`` (LSQ's gradient scaling,
    Esser et al. 2020, §2.2)."""
    y = x * g
    return x.detach() + (y - y.detach())
