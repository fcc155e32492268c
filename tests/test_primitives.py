from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmquant.core.primitives import (
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    SUPPORTED_INT_BITS,
    FloatFormat,
    Granularity,
    IntFormat,
    choose_qparams,
    dequantize,
    expand_params,
    fake_quant,
    from_blocks,
    lsq_grad_scale,
    param_shape,
    parse_format,
    quantize,
    round_ste,
    round_to_float_format,
    scale_gradient,
    to_blocks,
)
from dmquant.errors import ConfigError

FLOAT_FORMATS = (FP8_E4M3, FP8_E5M2, FP4_E2M1)
INT_FORMATS = tuple(IntFormat(b, s) for b in SUPPORTED_INT_BITS for s in (True, False))


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, qmin, qmax, name",
    [
        (IntFormat(8), -128, 127, "int8"),
        (IntFormat(8, signed=False), 0, 255, "uint8"),
        (IntFormat(4), -8, 7, "int4"),
        (IntFormat(4, signed=False), 0, 15, "uint4"),
        (IntFormat(2), -2, 1, "int2"),
        (IntFormat(16), -32768, 32767, "int16"),
    ],
)
def test_int_format_range_and_name(fmt, qmin, qmax, name):
    assert (fmt.qmin, fmt.qmax, fmt.name, fmt.is_float) == (qmin, qmax, name, False)


@pytest.mark.parametrize(
    "fmt, bits, max_value, min_subnormal",
    [(FP8_E4M3, 8, 448.0, 2.0**-9), (FP8_E5M2, 8, 57344.0, 2.0**-16), (FP4_E2M1, 4, 6.0, 0.5)],
)
def test_float_format_constants(fmt, bits, max_value, min_subnormal):
    assert fmt.is_float and fmt.bits == bits
    assert fmt.max_value == max_value and fmt.min_subnormal == min_subnormal
    # max_value is the largest finite value of the format: all-ones mantissa in the top binade
    # that is not reserved (e4m3 "fn" reserves only S.1111.111 for nan).
    assert round_to_float_format(torch.tensor([max_value * 4]), fmt).item() == max_value


@pytest.mark.parametrize(
    "spec, expected",
    [
        (8, IntFormat(8)),
        ("8", IntFormat(8)),
        ("int8", IntFormat(8)),
        ("INT4", IntFormat(4)),
        ("uint8", IntFormat(8, signed=False)),
        ("uint4", IntFormat(4, signed=False)),
        ("int16", IntFormat(16)),
        ("fp8_e4m3", FP8_E4M3),
        ("e4m3", FP8_E4M3),
        ("fp8_e5m2", FP8_E5M2),
        ("e5m2", FP8_E5M2),
        ("fp4_e2m1", FP4_E2M1),
        ("fp4", FP4_E2M1),
        ("e2m1", FP4_E2M1),
        (FP8_E4M3, FP8_E4M3),
        (IntFormat(3), IntFormat(3)),
    ],
)
def test_parse_format(spec, expected):
    assert parse_format(spec) == expected


@pytest.mark.parametrize("spec, bits", [(9, 9), ("9", 9), ("int1", 1), ("uint32", 32), (1, 1), (0, 0)])
def test_parse_format_rejects_unsupported_bits(spec, bits):
    with pytest.raises(ConfigError) as info:
        parse_format(spec)
    message = str(info.value)
    assert f"bit width {bits};" in message
    assert "[2, 3, 4, 5, 6, 7, 8, 16]" in message


@pytest.mark.parametrize("spec", ["fp16", "int", "uint", "e3m4", "", "int8x", True, 8.0, None])
def test_parse_format_rejects_unknown(spec):
    with pytest.raises(ConfigError, match="fp8_e4m3") as info:
        parse_format(spec)
    assert repr(spec) in str(info.value)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------
# Granularity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tensor", Granularity.per_tensor()),
        ("channel", Granularity.per_channel(0)),
        ("channel:1", Granularity.per_channel(1)),
        ("channel:-1", Granularity("channel", axis=-1)),
        ("group:128", Granularity("group", axis=0, group_size=128, group_axis=1)),
        ("group:64:1:0", Granularity.per_group(64, axis=1, group_axis=0)),
    ],
)
def test_granularity_parse_and_str_round_trip(spec, expected):
    assert Granularity.parse(spec) == expected
    assert Granularity.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "spec",
    ["row", "group", "group:0", "group:-4", "group:4:1", "group:4:1:1", "channel:a", "channel:0:1", "tensor:0", ""],
)
def test_granularity_parse_rejects(spec):
    with pytest.raises(ConfigError) as info:
        Granularity.parse(spec)
    assert repr(spec) in str(info.value)


def test_granularity_rejects_bad_fields():
    with pytest.raises(ConfigError, match="'rows'.*'tensor', 'channel', 'group'"):
        Granularity("rows")
    with pytest.raises(ConfigError, match="group_size"):
        Granularity("channel", group_size=4)
    with pytest.raises(ConfigError, match="axis"):
        Granularity.per_group(4, axis=1, group_axis=1)


@pytest.mark.parametrize(
    "shape, granularity, expected",
    [
        ((8, 12), Granularity.per_tensor(), (1, 1)),
        ((8, 12), Granularity.per_channel(), (8, 1)),
        ((8, 12), Granularity.per_group(4), (8, 3)),
        ((8, 12, 3, 3), Granularity.per_group(4), (8, 3, 1, 1)),
        ((2, 3, 4, 5), Granularity.per_channel(1), (1, 3, 1, 1)),
        ((2, 3, 4), Granularity.per_channel(-1), (1, 1, 4)),
        ((4, 3), Granularity.per_group(2, axis=1, group_axis=0), (2, 3)),
        ((2, 6, 4), Granularity.per_group(2, axis=-1, group_axis=1), (1, 3, 4)),
    ],
)
def test_param_shape(shape, granularity, expected):
    assert param_shape(shape, granularity) == expected
    assert param_shape(torch.Size(shape), granularity) == expected


def test_param_shape_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"group_size 5 .*size 12"):
        param_shape((8, 12), Granularity.per_group(5))
    with pytest.raises(ValueError, match=r"channel axis 2 .* 2 dims"):
        param_shape((8, 12), Granularity.per_channel(2))
    with pytest.raises(ValueError, match=r"group axis -3"):
        param_shape((8, 12), Granularity.per_group(4, group_axis=-3))
    with pytest.raises(ValueError, match="both dim 1"):
        param_shape((8, 12), Granularity.per_group(4, axis=1, group_axis=-1))


def _rows(t: torch.Tensor) -> list[list[int]]:
    return t.long().tolist()


def test_to_blocks_by_hand():
    x = torch.arange(12.0).reshape(3, 4)
    assert _rows(to_blocks(x, Granularity.per_tensor())) == [list(range(12))]
    assert _rows(to_blocks(x, Granularity.per_channel(0))) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert _rows(to_blocks(x, Granularity.per_channel(1))) == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert _rows(to_blocks(x, Granularity.per_group(2))) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]

    # groups of 2 along dim 0, channels along dim 1: param shape (2, 3), row (g, c) = x[2g:2g+2, c]
    y = torch.arange(12.0).reshape(4, 3)
    blocks = to_blocks(y, Granularity.per_group(2, axis=1, group_axis=0))
    assert _rows(blocks) == [[0, 3], [1, 4], [2, 5], [6, 9], [7, 10], [8, 11]]

    # conv-like weight (O=2, I=4, k=3), groups of 2 input channels: row (o, g) = w[o, 2g:2g+2, :]
    w = torch.arange(24.0).reshape(2, 4, 3)
    blocks = to_blocks(w, Granularity.per_group(2))
    assert _rows(blocks) == [list(range(6 * i, 6 * i + 6)) for i in range(4)]


def test_from_blocks_and_expand_params_by_hand():
    g = Granularity.per_group(2)
    x = torch.arange(8.0).reshape(2, 4)
    blocks = to_blocks(x, g)
    assert torch.equal(from_blocks(blocks, x.shape, g), x)
    params = from_blocks(blocks.amax(dim=1), x.shape, g)
    assert params.tolist() == [[1.0, 3.0], [5.0, 7.0]]
    assert expand_params(params, x.shape, g).tolist() == [[1, 1, 3, 3], [5, 5, 7, 7]]
    # flat (P,) parameters are accepted too, and per-channel parameters just broadcast
    assert expand_params(torch.tensor([1.0, 3.0, 5.0, 7.0]), x.shape, g).tolist() == [[1, 1, 3, 3], [5, 5, 7, 7]]
    assert expand_params(torch.tensor([2.0, 9.0]), x.shape, Granularity.per_channel()).shape == (2, 1)


@st.composite
def shapes_and_granularities(draw, max_dims: int = 4):
    ndim = draw(st.integers(1, max_dims))
    shape = list(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["tensor", "channel", "group"] if ndim > 1 else ["tensor", "channel"]))
    if kind == "tensor":
        return tuple(shape), Granularity.per_tensor()
    axis = draw(st.integers(-ndim, ndim - 1))
    if kind == "channel":
        return tuple(shape), Granularity.per_channel(axis)
    gaxis = draw(st.integers(0, ndim - 1).filter(lambda a: a != axis % ndim))
    group_size = draw(st.integers(1, 3))
    shape[gaxis] = group_size * draw(st.integers(1, 3))
    return tuple(shape), Granularity.per_group(group_size, axis=axis, group_axis=gaxis - ndim * draw(st.booleans()))


@settings(max_examples=150, deadline=None)
@given(shapes_and_granularities())
def test_blocks_params_and_expansion_agree(case):
    shape, g = case
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    blocks = to_blocks(x, g)
    pshape = param_shape(shape, g)
    assert blocks.shape == (math.prod(pshape), x.numel() // math.prod(pshape))
    assert torch.equal(from_blocks(blocks, shape, g), x)
    # label every element with the index of its parameter via expand_params: each block row
    # must then hold a single label, equal to its row number
    labels = torch.arange(math.prod(pshape), dtype=torch.float32).reshape(pshape)
    expanded = expand_params(labels, shape, g).expand(shape)
    label_blocks = to_blocks(expanded.contiguous(), g)
    assert torch.equal(label_blocks, torch.arange(blocks.shape[0], dtype=torch.float32)[:, None].expand_as(blocks))
    assert torch.equal(from_blocks(labels.flatten(), shape, g), labels)


# --------------------------------------------------------------------------------------
# choose_qparams / quantize / dequantize by hand
# --------------------------------------------------------------------------------------


def test_int8_symmetric_by_hand():
    x = torch.tensor([-2.54, 0.0, 1.0, 2.54, -0.03])
    scale, zp = choose_qparams(x.min(), x.max(), IntFormat(8), symmetric=True)
    assert scale.item() == pytest.approx(0.02) and zp.item() == 0.0
    codes = quantize(x, scale, zp, IntFormat(8))
    assert codes.dtype == torch.int32
    assert codes.tolist() == [-127, 0, 50, 127, -2]  # -1.5 rounds half to even
    assert torch.allclose(dequantize(codes, scale, zp, IntFormat(8)), torch.tensor([-2.54, 0, 1.0, 2.54, -0.04]))


def test_uint4_asymmetric_by_hand():
    fmt = IntFormat(4, signed=False)
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0])
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), fmt, symmetric=False)
    assert scale.item() == pytest.approx(0.2) and zp.item() == 5.0  # 3 / 15, round(0 + 1 / 0.2)
    codes = quantize(x, scale, zp, fmt)
    assert codes.tolist() == [0, 5, 7, 15, 15]  # 0.5 / 0.2 = 2.5 rounds to 2; 3.0 clamps
    assert torch.allclose(dequantize(codes, scale, zp, fmt), torch.tensor([-1.0, 0.0, 0.4, 2.0, 2.0]))


def test_int8_asymmetric_signed_zero_point():
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), IntFormat(8), symmetric=False)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == round(-128 + 255 / 4)  # qmin - min / scale = -64.25 -> -64
    assert quantize(torch.tensor([0.0]), scale, zp, IntFormat(8)).item() == -64


def test_range_is_widened_to_include_zero_and_unsigned_symmetric_clamps_negatives():
    fmt = IntFormat(4, signed=False)
    scale, zp = choose_qparams(torch.tensor(1.0), torch.tensor(3.0), fmt, symmetric=False)
    assert scale.item() == pytest.approx(0.2) and zp.item() == 0.0  # range [0, 3], not [1, 3]
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), fmt, symmetric=True)
    assert scale.item() == pytest.approx(0.2) and zp.item() == 0.0
    assert quantize(torch.tensor([-1.0, 3.0]), scale, zp, fmt).tolist() == [0, 15]


def test_per_channel_qparams_shapes_and_values():
    w = torch.tensor([[-1.0, 0.5], [0.25, 0.125], [0.0, 0.0]])
    g = Granularity.per_channel()
    blocks = to_blocks(w, g)
    lo, hi = from_blocks(blocks.amin(1), w.shape, g), from_blocks(blocks.amax(1), w.shape, g)
    scale, zp = choose_qparams(lo, hi, IntFormat(8), symmetric=True)
    assert scale.shape == zp.shape == (3, 1)
    assert torch.allclose(scale.flatten(), torch.tensor([1 / 127, 0.25 / 127, 1e-8]))


def test_all_zero_input_gets_eps_scale_and_round_trips():
    x = torch.zeros(4)
    for symmetric in (True, False):
        scale, zp = choose_qparams(x.min(), x.max(), IntFormat(8), symmetric, eps=1e-6)
        assert scale.item() == pytest.approx(1e-6)
        assert torch.equal(fake_quant(x, scale, zp, IntFormat(8)), x)


def test_float_formats_choose_qparams():
    scale, zp = choose_qparams(torch.tensor([-896.0, -1.0]), torch.tensor([10.0, 3.0]), FP8_E4M3, True)
    assert scale.tolist() == pytest.approx([2.0, 3.0 / 448]) and zp.tolist() == [0.0, 0.0]
    codes = quantize(torch.tensor([-896.0, 100.0]), 2.0, 0.0, FP8_E4M3)
    assert codes.dtype == torch.float32 and codes.tolist() == [-448.0, 48.0]  # 50: tie of 48 and 52 (ulp 4), to even
    with pytest.raises(ConfigError, match="fp8_e4m3.*symmetric"):
        choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), FP8_E4M3, symmetric=False)


# --------------------------------------------------------------------------------------
# Float rounding against torch's own casts and the e2m1 table
# --------------------------------------------------------------------------------------


def _dense_sweep(fmt: FloatFormat, dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the format, every midpoint (ties) and its float32 neighbours,
    plus a log and linear sweep through the subnormal, normal and saturating ranges."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = values[values.isfinite()].unique()
    mids = (values[1:] + values[:-1]) / 2
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    logs = torch.logspace(-20, 17, 40001, base=2.0)
    return torch.cat(
        [
            values,
            mids,
            torch.nextafter(mids, up),
            torch.nextafter(mids, down),
            logs,
            -logs,
            torch.linspace(-2 * fmt.max_value, 2 * fmt.max_value, 40001),
            torch.tensor([0.0, -0.0, 1e30, -1e30, math.inf, -math.inf]),
        ]
    )


@pytest.mark.parametrize("fmt, dtype", [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)])
def test_round_to_float_format_matches_torch_fp8_cast(fmt, dtype):
    x = _dense_sweep(fmt, dtype)
    expected = x.clamp(-fmt.max_value, fmt.max_value).to(dtype).float()
    got = round_to_float_format(x, fmt)
    assert got.dtype == torch.float32
    # bit-for-bit, signed zeros included
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # index parity == mantissa bit


def _e2m1_reference(v: float) -> float:
    a = min(abs(v), 6.0)
    dists = [abs(a - t) for t in E2M1_TABLE]
    best = min(dists)
    candidates = [i for i, d in enumerate(dists) if d == best]
    index = next((i for i in candidates if i % 2 == 0), candidates[0])  # ties to even mantissa
    return math.copysign(E2M1_TABLE[index], v)


def test_round_to_float_format_e2m1_table():
    x = torch.cat([torch.arange(-64, 65) / 8.0, torch.linspace(-7, 7, 1001), torch.tensor([100.0, -1e9])])
    expected = torch.tensor([_e2m1_reference(v) for v in x.tolist()])
    assert torch.equal(round_to_float_format(x, FP4_E2M1), expected)
    # the ties, explicitly: to the even neighbour
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    assert round_to_float_format(ties, FP4_E2M1).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]


# --------------------------------------------------------------------------------------
# Properties of quantize / fake_quant
# --------------------------------------------------------------------------------------


@st.composite
def quant_cases(draw, formats=INT_FORMATS, allow_clamp: bool = True):
    shape, g = draw(shapes_and_granularities(max_dims=3))
    fmt = draw(st.sampled_from(formats))
    symmetric = True if fmt.is_float else draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.5, -2.0]))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) + offset) * magnitude
    blocks = to_blocks(x, g)
    lo, hi = from_blocks(blocks.amin(1), shape, g), from_blocks(blocks.amax(1), shape, g)
    scale, zp = choose_qparams(lo, hi, fmt, symmetric)
    # sometimes shrink the range so that values get clamped
    shrink = draw(st.sampled_from([1.0, 1.0, 0.5])) if allow_clamp else 1.0
    return x, expand_params(scale * shrink, shape, g), expand_params(zp, shape, g), fmt, symmetric


@settings(max_examples=200, deadline=None)
@given(quant_cases())
def test_int_codes_in_range_and_error_at_most_half_a_step_inside(case):
    x, scale, zp, fmt, symmetric = case
    codes = quantize(x, scale, zp, fmt)
    assert codes.dtype == torch.int32
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    xq = fake_quant(x, scale, zp, fmt)
    low, high = (fmt.qmin - zp) * scale, (fmt.qmax - zp) * scale
    inside = (x >= low) & (x <= high)
    err = (x - xq).abs()
    bound = (scale / 2) * (1 + 1e-5) + x.abs() * 1e-6
    assert bool((err <= bound)[inside.expand_as(x)].all())


@settings(max_examples=150, deadline=None)
@given(quant_cases(allow_clamp=False))
def test_own_range_is_covered_within_half_a_step(case):
    """With parameters from each block's own min/max, every element is within half a step of
    its quantized value (the zero point's rounding moves the grid by at most half a step),
    except negatives under unsigned symmetric quantization, which clamp to 0 by design."""
    x, scale, zp, fmt, symmetric = case
    err = (x - fake_quant(x, scale, zp, fmt)).abs()
    ok = err <= scale * (0.5 + 1e-5) + x.abs() * 1e-6
    if symmetric and not fmt.signed:
        ok |= x < 0
    assert bool(ok.all())


@settings(max_examples=200, deadline=None)
@given(quant_cases(formats=INT_FORMATS + FLOAT_FORMATS))
def test_fake_quant_forward_is_bit_identical_to_dequantize_quantize(case):
    x, scale, zp, fmt, _ = case
    expected = dequantize(quantize(x, scale, zp, fmt), scale, zp, fmt)
    got = fake_quant(x, scale, zp, fmt)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # python-number parameters too
    s = float(scale.flatten()[0])
    assert torch.equal(
        fake_quant(x, s, 0, fmt).view(torch.int32), dequantize(quantize(x, s, 0, fmt), s, 0, fmt).view(torch.int32)
    )


@settings(max_examples=200, deadline=None)
@given(quant_cases(formats=INT_FORMATS))
def test_fake_quant_in_place_path_equals_the_autograd_path(case):
    """Without autograd, integer fake-quant takes an in-place path; it must give the STE path's bits."""
    x, scale, zp, fmt, _ = case
    with torch.no_grad():
        fast = fake_quant(x, scale, zp, fmt)
    tracked = fake_quant(x.clone().requires_grad_(True), scale, zp, fmt).detach()
    assert torch.equal(fast.view(torch.int32), tracked.view(torch.int32))
    assert fast.data_ptr() != x.data_ptr()


@settings(max_examples=150, deadline=None)
@given(quant_cases(formats=INT_FORMATS + FLOAT_FORMATS))
def test_fake_quant_is_idempotent(case):
    x, scale, zp, fmt, _ = case
    once = fake_quant(x, scale, zp, fmt)
    assert torch.equal(fake_quant(once, scale, zp, fmt), once)


@settings(max_examples=150, deadline=None)
@given(quant_cases(formats=INT_FORMATS + FLOAT_FORMATS), st.integers(0, 2**16))
def test_fake_quant_is_monotone(case, seed):
    x, scale, zp, fmt, _ = case
    bump = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) * x.abs().max()
    assert bool((fake_quant(x + bump, scale, zp, fmt) >= fake_quant(x, scale, zp, fmt)).all())


@settings(max_examples=100, deadline=None)
@given(quant_cases(formats=FLOAT_FORMATS))
def test_float_codes_are_representable_and_saturate(case):
    x, scale, zp, fmt, _ = case
    codes = quantize(x, scale, zp, fmt)
    assert codes.abs().max() <= fmt.max_value
    assert torch.equal(round_to_float_format(codes, fmt), codes)
    # relative error of a normal value is at most half an ulp: 2**-(mantissa_bits + 1)
    v = x / scale
    normal = (v.abs() >= 2.0**fmt.min_exponent) & (v.abs() <= fmt.max_value)
    rel = ((codes - v).abs() / v.abs())[normal]
    assert bool((rel <= 2.0 ** -(fmt.mantissa_bits + 1) + 1e-6).all())


def test_fake_quant_keeps_float32_for_half_inputs():
    x = torch.linspace(-1, 1, 11, dtype=torch.bfloat16)
    out = fake_quant(x, torch.tensor(1 / 127), torch.tensor(0.0), IntFormat(8))
    assert out.dtype == torch.float32
    assert torch.equal(
        out, dequantize(quantize(x, torch.tensor(1 / 127), 0.0, IntFormat(8)), torch.tensor(1 / 127), 0.0, IntFormat(8))
    )


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def test_round_ste_forward_and_gradient():
    x = torch.tensor([-2.5, -1.5, -0.4, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 3.0]
    (y * torch.arange(6.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_ste_gradient_is_one_inside_and_zero_outside():
    fmt = IntFormat(4)  # codes [-8, 7]
    x = torch.tensor([-9.7, -8.6, -7.9, -3.2, 0.4, 6.6, 7.4, 12.0], requires_grad=True)
    fake_quant(x, 1.0, 0.0, fmt).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]

    # with a zero point the representable range moves: uint4, z = 3 -> x / s in [-3, 12]
    x = torch.tensor([-3.6, -2.9, 11.9, 12.2], requires_grad=True)
    fake_quant(x, 1.0, torch.tensor(3.0), IntFormat(4, signed=False)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]

    # float formats: identity inside [-max, max], zero outside
    x = torch.tensor([-500.0, -447.0, 0.3, 300.0, 449.0], requires_grad=True)
    fake_quant(x, 1.0, 0.0, FP8_E4M3).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _lsq_eq3(v: float, qn: int, qp: int) -> float:
    """Esser et al. 2020, eq. 3: d x_hat / d s for v = x / s."""
    if v <= -qn:
        return -qn
    if v >= qp:
        return qp
    return -v + round(v)  # no ties among the test values


def test_lsq_scale_gradient_matches_eq3():
    fmt = IntFormat(4)  # Q_N = 8, Q_P = 7
    s = 0.5
    x = torch.tensor([-5.0, -4.2, -1.3, 0.2, 1.1, 3.3, 3.6, 9.0])
    scale = torch.full_like(x, s, requires_grad=True)
    fake_quant(x, scale, 0.0, fmt).sum().backward()
    expected = [_lsq_eq3(v / s, 8, 7) for v in x.tolist()]
    assert expected == pytest.approx([-8.0, -8.0, -0.4, -0.4, -0.2, 0.4, 7.0, 7.0])
    assert scale.grad.tolist() == pytest.approx(expected, abs=1e-5)

    # a single shared scale accumulates the sum, scaled by LSQ's g when scale_gradient is used
    shared = torch.tensor(s, requires_grad=True)
    g = lsq_grad_scale(x.numel(), fmt)
    fake_quant(x, scale_gradient(shared, g), 0.0, fmt).sum().backward()
    assert shared.grad.item() == pytest.approx(sum(expected) * g, rel=1e-5)


def test_float_fake_quant_scale_gradient():
    x = torch.tensor([0.3, -1000.0, 1000.0])
    scale = torch.ones(3, requires_grad=True)
    fake_quant(x, scale, 0.0, FP8_E4M3).sum().backward()
    near = round_to_float_format(torch.tensor(0.3), FP8_E4M3).item()
    assert scale.grad.tolist() == pytest.approx([near - 0.3, -448.0, 448.0], abs=1e-6)


def test_lsq_grad_scale_and_scale_gradient():
    assert lsq_grad_scale(100, IntFormat(4)) == pytest.approx(1 / math.sqrt(700))
    assert lsq_grad_scale(64, IntFormat(8, signed=False)) == pytest.approx(1 / math.sqrt(64 * 255))
    assert lsq_grad_scale(10, FP8_E4M3) == pytest.approx(1 / math.sqrt(4480))
    with pytest.raises(ValueError, match="0"):
        lsq_grad_scale(0, IntFormat(8))
    x = torch.tensor([0.1, -3.7, 1e-20, 123.456], requires_grad=True)
    y = scale_gradient(x, 0.3)
    assert torch.equal(y, x.detach())
    y.backward(torch.ones(4))
    assert x.grad.tolist() == pytest.approx([0.3] * 4)
