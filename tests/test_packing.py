from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmquant.core.packing import (
    E2M1_VALUES,
    SUPPORTED_BITS,
    decode_e2m1,
    encode_e2m1,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)


def _bytes(packed: torch.Tensor) -> list[int]:
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    return packed.tolist()


def test_4bit_nibbles_low_first():
    assert _bytes(pack_codes(torch.tensor([1, 2, 3]), bits=4, qmin=0)) == [0x21, 0x03]


def test_4bit_signed_codes_are_stored_offset_by_qmin():
    assert _bytes(pack_codes(torch.tensor([-7, -6, -5]), bits=4, qmin=-8)) == [0x21, 0x03]


def test_3bit_codes_cross_byte_boundary():
    # 5 = 101b -> stream bits 0..2 = 1,0,1; 3 = 011b -> bits 3..5 = 1,1,0;
    # 6 = 110b -> bits 6..8 = 0,1,1. Byte 0 holds bits 0..7 = 1,0,1,1,1,0,0,1 (LSB first)
    # = 1 + 4 + 8 + 16 + 128 = 157; byte 1 holds bit 8 = 1 and zero padding.
    packed = pack_codes(torch.tensor([5, 3, 6]), bits=3, qmin=0)
    assert _bytes(packed) == [157, 1]
    # The same fields as a signed 3-bit format (qmin = -4).
    assert _bytes(pack_codes(torch.tensor([1, -1, 2]), bits=3, qmin=-4)) == [157, 1]
    assert unpack_codes(packed, bits=3, qmin=0, shape=(3,)).tolist() == [5, 3, 6]


def test_1bit_stream():
    codes = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1])
    assert _bytes(pack_codes(codes, bits=1, qmin=0)) == [0b00001101, 0b00000001]


def test_8bit_is_one_byte_per_code():
    codes = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
    assert _bytes(pack_codes(codes, bits=8, qmin=-128)) == [0, 127, 128, 255]


def test_16bit_is_little_endian_uint16_of_offsets():
    codes = torch.tensor([-32768, 0, 32767])
    packed = pack_codes(codes, bits=16, qmin=-32768)
    assert _bytes(packed) == [0x00, 0x00, 0x00, 0x80, 0xFF, 0xFF]
    # Viewed as int16 the bytes are the offsets in two's complement.
    assert packed.view(torch.int16).tolist() == [0, -32768, -1]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_round_trip(bits):
    qmin = -(2 ** (bits - 1))
    qmax = qmin + 2**bits - 1
    codes = torch.tensor([qmax] * 11 + [qmin] * 5 + [qmax])
    packed = pack_codes(codes, bits, qmin)
    assert torch.equal(unpack_codes(packed, bits, qmin, codes.shape), codes.to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3),
    signed=st.booleans(),
    shift=st.integers(-3, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(bits, shape, signed, shift, seed):
    qmin = (-(2 ** (bits - 1)) if signed else 0) + shift
    qmax = qmin + 2**bits - 1
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmax + 1, tuple(shape), generator=generator)
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    unpacked = unpack_codes(packed, bits, qmin, shape)
    assert unpacked.dtype == torch.int32
    assert unpacked.shape == codes.shape
    assert torch.equal(unpacked, codes.to(torch.int32))


def test_packed_nbytes():
    assert packed_nbytes(0, 4) == 0
    assert packed_nbytes(3, 4) == 2
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(5, 16) == 10
    with pytest.raises(ValueError, match="non-negative"):
        packed_nbytes(-1, 4)


@pytest.mark.parametrize("bits", [0, 9, 12, 32])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=f"{bits}-bit"):
        pack_codes(torch.zeros(4, dtype=torch.int64), bits, 0)
    with pytest.raises(ValueError, match=f"{bits}-bit"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), bits, 0, (4,))


def test_out_of_range_codes_name_the_range():
    with pytest.raises(ValueError, match=r"\[-8, 8\].*\[-8, 7\]"):
        pack_codes(torch.tensor([-8, 0, 8]), bits=4, qmin=-8)
    with pytest.raises(ValueError, match=r"\[-1, 3\].*\[0, 15\]"):
        pack_codes(torch.tensor([-1, 3]), bits=4, qmin=0)


def test_non_integer_codes_rejected():
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([1.0, 2.0]), bits=4, qmin=0)
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(2, dtype=torch.int8), bits=4, qmin=0, shape=(4,))


def test_truncated_or_padded_input_rejected():
    codes = torch.arange(10).reshape(2, 5) % 8
    packed = pack_codes(codes, bits=3, qmin=0)
    with pytest.raises(ValueError, match="take 4 bytes, got 3"):
        unpack_codes(packed[:-1], bits=3, qmin=0, shape=(2, 5))
    with pytest.raises(ValueError, match="take 4 bytes, got 5"):
        unpack_codes(torch.cat([packed, packed[:1]]), bits=3, qmin=0, shape=(2, 5))
    with pytest.raises(ValueError, match="take"):
        unpack_codes(packed, bits=3, qmin=0, shape=(3, 5))


def test_empty_tensor():
    packed = pack_codes(torch.zeros(0, 3, dtype=torch.int64), bits=5, qmin=0)
    assert packed.numel() == 0
    assert unpack_codes(packed, bits=5, qmin=0, shape=(0, 3)).shape == (0, 3)


def test_e2m1_table():
    assert len(E2M1_VALUES) == 16
    assert E2M1_VALUES[:8] == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert E2M1_VALUES[8:] == tuple(-v for v in E2M1_VALUES[:8])
    assert math.copysign(1.0, E2M1_VALUES[8]) == -1.0


def test_e2m1_hand_examples():
    values = torch.tensor([0.5, -3.0, 6.0, -0.0, 1.5, 0.0, -6.0, 4.0])
    assert encode_e2m1(values).tolist() == [1, 13, 7, 8, 3, 0, 15, 6]
    assert encode_e2m1(values).dtype == torch.uint8


def test_e2m1_round_trip_all_patterns():
    codes = torch.arange(16, dtype=torch.uint8)
    values = decode_e2m1(codes)
    assert values.dtype == torch.float32
    assert values.tolist() == list(E2M1_VALUES)
    assert torch.equal(torch.signbit(values), codes >= 8)
    assert torch.equal(encode_e2m1(values), codes)
    assert torch.equal(encode_e2m1(values.to(torch.bfloat16)), codes)


def test_e2m1_codes_pack_as_4bit():
    values = torch.tensor([[1.0, -0.5], [6.0, 0.0]])
    packed = pack_codes(encode_e2m1(values), bits=4, qmin=0)
    assert _bytes(packed) == [0x92, 0x07]
    assert torch.equal(decode_e2m1(unpack_codes(packed, 4, 0, values.shape)), values)


@pytest.mark.parametrize("value", [2.5, 7.0, 0.25, float("nan"), float("inf")])
def test_e2m1_rejects_unrepresentable(value):
    with pytest.raises(ValueError, match="not representable"):
        encode_e2m1(torch.tensor([1.0, value]))


def test_e2m1_decode_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        decode_e2m1(torch.tensor([0, 16]))
