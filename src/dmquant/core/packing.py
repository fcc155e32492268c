"""Storage of integer quantization codes in checkpoints.

Codes of a ``bits``-wide format are stored offset by ``qmin`` (so every stored field is
unsigned) in a dense little-endian bit stream: code ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``.
The final byte is zero-padded. With ``bits == 8`` this is one byte per code and with
``bits == 16`` it is the little-endian ``uint16`` layout, so every supported width goes
through one code path.

The fp4 e2m1 helpers map representable values to their 4-bit patterns; those codes are
stored with ``pack_codes(codes, 4, qmin=0)``.

Bit packing is written by hand: torch has no sub-byte dtypes for arbitrary widths, and the
layout must stay fixed for checkpoints to remain readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Code widths :func:`pack_codes` stores.
SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16)

#: The 16 fp4 e2m1 values indexed by bit pattern (sign bit 3, exponent bits 2..1,
#: mantissa bit 0). Pattern 8 is -0.0.
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths are {SUPPORTED_BITS}")


def _require_integer(tensor: Tensor, name: str) -> None:
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _group(bits: int) -> tuple[int, int]:
    """Codes and bytes in the smallest run of codes that fills whole bytes (at most 56 bits)."""
    common = math.gcd(bits, 8)
    return 8 // common, bits // common


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack_codes` produces for ``numel`` codes of ``bits`` bits."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    return (numel * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int, qmin: int) -> Tensor:
    """Pack integer codes into a dense little-endian bit stream.

    Args:
        codes: integer tensor of any shape with values in ``[qmin, qmin + 2**bits - 1]``.
        bits: field width, one of :data:`SUPPORTED_BITS`.
        qmin: smallest code of the format (negative for signed formats).

    Returns:
        1-D ``torch.uint8`` tensor of ``packed_nbytes(codes.numel(), bits)`` bytes holding
        ``codes - qmin`` in row-major order, on the device of ``codes``.

    Raises:
        TypeError: ``codes`` is not an integer tensor.
        ValueError: ``bits`` is unsupported or a code lies outside the format's range.
    """
    _check_bits(bits)
    _require_integer(codes, "codes")
    qmax = qmin + 2**bits - 1
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() > 0:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < qmin or hi > qmax:
            raise ValueError(
                f"codes span [{lo}, {hi}] but {bits}-bit codes with qmin={qmin} must lie in [{qmin}, {qmax}]"
            )
    codes_per_group, bytes_per_group = _group(bits)
    num_groups = -(-flat.numel() // codes_per_group)
    fields = torch.zeros(num_groups * codes_per_group, dtype=torch.int64, device=codes.device)
    fields[: flat.numel()] = flat - qmin
    field_shifts = bits * torch.arange(codes_per_group, device=codes.device)
    words = (fields.view(num_groups, codes_per_group) << field_shifts).sum(dim=1)
    byte_shifts = 8 * torch.arange(bytes_per_group, device=codes.device)
    stream = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: packed_nbytes(flat.numel(), bits)].to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, qmin: int, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: ``torch.uint8`` tensor as returned by :func:`pack_codes`.
        bits: field width the codes were packed with.
        qmin: smallest code of the format the codes were packed with.
        shape: shape of the original codes tensor.

    Returns:
        ``torch.int32`` tensor of ``shape`` on the device of ``packed``.

    Raises:
        TypeError: ``packed`` is not ``torch.uint8``.
        ValueError: ``bits`` is unsupported, ``shape`` has a negative dimension, or
            ``packed`` does not hold exactly ``packed_nbytes(prod(shape), bits)`` bytes
            (a truncated or padded checkpoint entry).
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be torch.uint8, got {packed.dtype}")
    shape = tuple(int(size) for size in shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"shape must have non-negative dimensions, got {shape}")
    numel = math.prod(shape)
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{bits}-bit codes of shape {shape} take {expected} bytes, got {packed.numel()}")
    codes_per_group, bytes_per_group = _group(bits)
    num_groups = -(-numel // codes_per_group)
    stream = torch.zeros(num_groups * bytes_per_group, dtype=torch.int64, device=packed.device)
    stream[:expected] = packed.reshape(-1)
    byte_shifts = 8 * torch.arange(bytes_per_group, device=packed.device)
    words = (stream.view(num_groups, bytes_per_group) << byte_shifts).sum(dim=1)
    field_shifts = bits * torch.arange(codes_per_group, device=packed.device)
    fields = (words.unsqueeze(1) >> field_shifts) & (2**bits - 1)
    return (fields.reshape(-1)[:numel] + qmin).to(torch.int32).reshape(shape)


def encode_e2m1(values: Tensor) -> Tensor:
    """Map fp4 e2m1-representable values to their 4-bit patterns.

    Args:
        values: floating-point tensor whose entries are all in :data:`E2M1_VALUES`; the sign
            of zero is kept (``-0.0`` encodes to pattern 8).

    Returns:
        ``torch.uint8`` tensor of the same shape with patterns in ``0..15``.

    Raises:
        TypeError: ``values`` is not a floating-point tensor.
        ValueError: an entry (including NaN or inf) is not exactly representable.
    """
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
    values = values.to(torch.float32)
    magnitudes = torch.tensor(E2M1_VALUES[:8], device=values.device)
    absolute = values.abs()
    index = torch.searchsorted(magnitudes, absolute).clamp(max=len(magnitudes) - 1)
    representable = magnitudes[index] == absolute
    if not bool(representable.all()):
        bad = values[~representable].unique()[:8].tolist()
        raise ValueError(f"values not representable in fp4 e2m1: {bad}")
    return (index | (torch.signbit(values).to(torch.int64) << 3)).to(torch.uint8)


def decode_e2m1(codes: Tensor) -> Tensor:
    """Map 4-bit e2m1 patterns (``0..15``) to their ``torch.float32`` values.

    Raises:
        TypeError: ``codes`` is not an integer tensor.
        ValueError: a code lies outside ``0..15``.
    """
    _require_integer(codes, "e2m1 codes")
    index = codes.to(torch.int64)
    if index.numel() > 0 and (int(index.min()) < 0 or int(index.max()) > 15):
        raise ValueError(f"e2m1 codes span [{int(index.min())}, {int(index.max())}], must lie in [0, 15]")
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)[index]
