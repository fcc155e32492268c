"""A calibrated weight stored as the low-bit kernels read it: codes, scales, zero points.

A simulated layer keeps its float weight and fake-quantizes it on every call; a converted layer
keeps only the codes its quantizer gives (``q = clamp(round(w / s) + z, qmin, qmax)``, Jacob et
al. 2018, eq. 1) and the parameters that map them back, ``w = s · (q − z)``, in one of three
layouts, all over a 2-D ``(N, K)`` view of the weight (Linear: as is; Conv2d: the output channel
by ``(kh, kw, cin)``, which matches an NHWC input):

- ``int8``: integer formats of 5–8 bits, codes shifted into ``[-128, 127]`` (an unsigned
  8-bit code ``q`` is stored as ``q − 128`` with its zero point shifted alike);
- ``int4``: integer formats of 2–4 bits, codes shifted to unsigned nibbles ``u = q − qmin`` and
  packed two to a byte, element ``2j`` in the low nibble of byte ``j`` — the layout of
  :func:`dmquant.core.packing.pack_codes` with 4 bits;
- ``fp8``: the fp8 e4m3 format, the codes as ``torch.float8_e4m3fn``.

Scales and zero points are ``(N, K // group_size)`` float32: one group per row with
per-channel parameters, several with group-wise ones. Zero points are kept in the stored codes'
domain, so every layout dequantizes as ``scale · (stored − zero)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.packing import pack_codes
from ..core.primitives import FP8_E4M3
from ..core.quantizer import Quantizer

#: The storage layouts and the integer widths each takes.
INT8_BITS = range(5, 9)
INT4_BITS = range(2, 5)

#: Group sizes the int4 kernels take are multiples of this, their smallest K tile, so that every
#: K tile lies in one group (or the group is the whole row).
GROUP_ALIGNMENT = 32


class UnsupportedWeight(ValueError):
    """A weight quantizer whose format or granularity no low-bit layout stores."""


def as_matrix(weight: Tensor) -> Tensor:
    """The ``(N, K)`` view the kernels multiply: a conv weight ``(Cout, Cin, kh, kw)`` as ``(Cout, kh·kw·Cin)``."""
    if weight.dim() == 2:
        return weight
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def group_size_of(params: Tensor) -> int:
    """The largest run length along K that ``params`` (``(N, K)``, one value per element) is
    constant over, dividing K: K for per-channel parameters."""
    depth = params.shape[1]
    changes = (params[:, 1:] != params[:, :-1]).any(dim=0).nonzero().flatten() + 1
    size = depth
    for boundary in changes.tolist():
        size = math.gcd(size, boundary)
    return size


def unpacked_nibbles(stored: Tensor) -> Tensor:
    """Packed int4 codes ``(N, K / 2)`` uint8 as int32 ``(N, K)``: each byte's low nibble, then its high one
    (:func:`~dmquant.core.packing.unpack_codes` with 4 bits, for rows that fill whole bytes)."""
    return torch.stack((stored & 15, stored >> 4), dim=-1).flatten(-2).to(torch.int32)


def weight_colsums(stored: Tensor, group_size: int | None = None) -> Tensor:
    """``Σ_{k∈g} q_w[n, k]`` over each group of ``group_size`` inputs (None: the whole row), int32
    ``(N, K / G)``: of int8 codes ``(N, K)`` or of the nibbles of packed int4 weights ``(N, K / 2)``
    uint8. The term that corrects for the activations' zero point (see ``tests/integer_reference.py``);
    computed once when a layer is converted."""
    if stored.dtype == torch.uint8:
        codes = unpacked_nibbles(stored)
    elif stored.dtype == torch.int8:
        codes = stored
    else:
        raise TypeError(f"weight codes must be int8 or packed int4 (uint8), got {stored.dtype}")
    rows, depth = codes.shape
    group = group_size or depth
    return codes.to(torch.int32).reshape(rows, depth // group, group).sum(dim=-1, dtype=torch.int32)


def layout_of(quantizer: Quantizer) -> str:
    """The storage layout of a weight quantizer's format (raises :class:`UnsupportedWeight`)."""
    fmt = quantizer.fmt
    if fmt == FP8_E4M3:
        return "fp8"
    if not fmt.is_float and fmt.bits in INT8_BITS:
        return "int8"
    if not fmt.is_float and fmt.bits in INT4_BITS:
        return "int4"
    raise UnsupportedWeight(f"no low-bit layout stores {fmt.name} weights")


class KeepsDtypes(nn.Module):
    """A module whose buffers keep their dtypes when the model around it is cast (``.to(torch.bfloat16)``,
    ``.half()``, a pipeline loaded in fp16): kernels read codes, scales and zero points in the dtypes they were
    stored in, and a float32 scale cast to bf16 would change the layer's function. Device moves apply as usual."""

    def _apply(self, fn, recurse: bool = True):
        def device_only(tensor: Tensor) -> Tensor:
            target = fn(tensor.new_empty(0))  # what fn does to this dtype and device, on no data
            return tensor.to(device=target.device) if target.dtype != tensor.dtype else fn(tensor)

        return super()._apply(device_only, recurse)


class LowBitWeight(KeepsDtypes):
    """One weight in a kernel layout (module docstring); buffers only, so it moves with ``.to()`` (keeping its
    dtypes, :class:`KeepsDtypes`)."""

    def __init__(self, layout: str, stored: Tensor, scale: Tensor, zero: Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.layout = layout
        self.shape = torch.Size(shape)
        self.register_buffer("stored", stored)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        integer = layout != "fp8"
        self.register_buffer("kernel_zero", self._kernel_zero() if integer and zero.any() else None)
        self.register_buffer("column_sums", weight_colsums(stored, self.group_size) if integer else None)

    @classmethod
    def from_quantizer(cls, quantizer: Quantizer, weight: Tensor) -> LowBitWeight:
        """Store ``weight`` as its calibrated ``quantizer`` quantizes it."""
        if not quantizer.enabled or not quantizer.calibrated:
            raise UnsupportedWeight(f"{quantizer.name or 'weight quantizer'}: needs to be enabled and calibrated")
        layout = layout_of(quantizer)
        codes = as_matrix(quantizer.codes(weight))
        scale, zero = (as_matrix(p.expand(weight.shape)).float() for p in quantizer.qparams(weight.shape))
        group = group_size_of(torch.stack([scale, zero]).flatten(0, 1))
        if layout == "int4" and group % 2:
            raise UnsupportedWeight(f"int4 packing needs an even group size (and K), got {group}")
        scale, zero = scale[:, ::group].contiguous(), zero[:, ::group].contiguous()
        if layout == "fp8":
            stored = codes.to(torch.float8_e4m3fn)
        elif layout == "int8":
            offset = 128 if quantizer.fmt.qmax > 127 else 0
            stored, zero = (codes - offset).to(torch.int8), zero - offset
        else:
            qmin = quantizer.fmt.qmin
            stored = pack_codes(codes - qmin, 4, qmin=0).reshape(codes.shape[0], -1)
            zero = zero - qmin
        return cls(layout, stored.contiguous(), scale, zero, codes.shape)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    def codes(self) -> Tensor:
        """The stored codes as an ``(N, K)`` tensor (nibbles unpacked, int32; fp8 as float32)."""
        if self.layout == "int4":  # K is even: each row's codes fill whole bytes
            return unpacked_nibbles(self.stored)
        return self.stored.float() if self.layout == "fp8" else self.stored

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``scale · (codes − zero)`` as ``(N, K)``, computed in float32 (equal to the simulated quantized weight)
        and rounded once to ``dtype``. An int4 weight on CUDA, outside ``torch.compile``, is dequantized in one
        pass (:mod:`~dmquant.kernels.triton_dequantize`, the same values); compiled, these operations fuse into
        one kernel."""
        if self.layout == "int4" and self.stored.is_cuda and not torch.compiler.is_compiling():
            from . import triton_dequantize  # Triton: imported where a GPU call needs it

            return triton_dequantize.dequantize_int4(self.stored, self.scale, self.zero, self.group_size, dtype)
        rows, groups = self.scale.shape
        codes = self.codes().float().reshape(rows, groups, -1)
        weight = (codes - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return weight.reshape(self.shape).to(dtype)

    def _kernel_zero(self) -> Tensor:
        """Zero points as the integer kernels take them: int32 ``(N,)`` per channel for int8, the
        ``(N, groups)`` float32 array for int4."""
        return self.zero[:, 0].to(torch.int32) if self.layout == "int8" else self.zero

    @property
    def nbytes(self) -> int:
        """Bytes of what a kernel reads: codes, scales, zero points and column sums."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.layout}, shape={tuple(self.shape)}, group_size={self.group_size}"
