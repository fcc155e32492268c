"""Conversion to low-bit layers: stored codes, the reference path against the simulated model, the report."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

import dmquant.kernels
from dmquant import api
from dmquant.config import LayerRule, QuantizerConfig, load_recipe
from dmquant.core.layers import QuantConv2d, QuantLinear
from dmquant.core.quantizer import Quantizer, set_step
from dmquant.denoiser import Denoiser
from dmquant.kernels.convert import REPORT_ATTRIBUTE, convert_model
from dmquant.kernels.layers import LowBitConv2d, LowBitLinear, activation_mode
from dmquant.kernels.weights import LowBitWeight, UnsupportedWeight, as_matrix, group_size_of


def _quantized(unet, calibration, weight_bits, activation_bits, *, recipe="minmax", **changes):
    config = load_recipe(recipe).with_bits(weight_bits, activation_bits)
    config = dataclasses.replace(config, **changes)
    return api.quantize(unet.denoiser, config, calibration, progress=False)


def _outputs(model, calibration):
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        return Denoiser(model)(x, t, cond)


def _weight_quantizer(config: str, weight: torch.Tensor, **options) -> Quantizer:
    quantizer = Quantizer(QuantizerConfig(**{"bits": 8, "observer": "minmax"} | options | {"granularity": config}))
    quantizer.calibrate_on(weight)
    return quantizer


@pytest.mark.parametrize(
    ("bits", "options", "layout", "dtype"),
    [
        (8, {"symmetric": False}, "int8", torch.int8),
        (8, {"symmetric": True}, "int8", torch.int8),
        (6, {"symmetric": False}, "int8", torch.int8),
        (4, {"symmetric": False}, "int4", torch.uint8),
        (3, {"symmetric": True}, "int4", torch.uint8),
        ("fp8_e4m3", {"symmetric": True}, "fp8", torch.float8_e4m3fn),
    ],
)
@pytest.mark.parametrize("granularity", ["channel", "group:4"])
def test_stored_weight_dequantizes_to_the_simulated_quantized_weight(bits, options, layout, dtype, granularity):
    torch.manual_seed(0)
    weight = torch.randn(6, 12, 3, 3) * torch.linspace(0.1, 3, 6).reshape(6, 1, 1, 1) + 0.3
    quantizer = _weight_quantizer(granularity, weight, bits=bits, **options)
    stored = LowBitWeight.from_quantizer(quantizer, weight)
    assert stored.layout == layout and stored.stored.dtype == dtype
    assert torch.equal(stored.dequantize(), as_matrix(quantizer(weight)))
    assert stored.group_size == (108 if granularity == "channel" else 4)
    if layout == "int4":
        assert stored.stored.shape == (6, 54)  # two codes a byte
        assert stored.codes().max() <= 15 and stored.codes().min() >= 0


def test_conv_weights_are_laid_out_by_output_channel_then_kh_kw_cin():
    weight = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    matrix = as_matrix(weight)
    assert matrix.shape == (2, 12)
    kh, kw, cin = 1, 0, 2  # element (cout=1, cin=2, kh=1, kw=0) sits at k = (kh * 2 + kw) * 3 + cin
    assert matrix[1, (kh * 2 + kw) * 3 + cin] == weight[1, cin, kh, kw]


def test_group_size_is_the_longest_run_of_equal_parameters_dividing_k():
    assert group_size_of(torch.ones(3, 12)) == 12
    assert group_size_of(torch.arange(12.0).repeat_interleave(4).reshape(4, 12)) == 4
    assert group_size_of(torch.tensor([[1.0, 1, 1, 2, 2, 2]])) == 3
    assert group_size_of(torch.tensor([[1.0, 1, 2, 2, 2, 2]])) == 2  # runs of 2 and 4: groups of 2


def test_float4_weights_have_no_layout():
    quantizer = _weight_quantizer("channel", torch.randn(4, 8), bits="fp4_e2m1", symmetric=True)
    with pytest.raises(UnsupportedWeight, match="fp4_e2m1"):
        LowBitWeight.from_quantizer(quantizer, torch.randn(4, 8))


@pytest.mark.parametrize(
    ("weight_bits", "activation_bits", "layouts", "mode"),
    [
        (8, 8, {"int8"}, "int8"),
        (4, 8, {"int4", "int8"}, "int8"),  # the first and last layer stay at 8 bits
        ("fp8_e4m3", "fp8_e4m3", {"fp8", "int8"}, "fp8"),
        (4, 16, {"int4", "int8"}, "none"),
    ],
)
def test_converted_model_computes_what_the_simulated_one_does(
    unet, calibration, weight_bits, activation_bits, layouts, mode
):
    quantized = _quantized(unet, calibration, weight_bits, activation_bits)
    converted = convert_model(quantized)
    report = getattr(converted, REPORT_ATTRIBUTE)
    assert set(report.converted) == layouts and not report.kept
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in converted.modules())
    modes = {activation_mode(m.input_quantizer) for m in converted.modules() if isinstance(m, LowBitLinear)}
    assert mode in modes
    assert torch.equal(_outputs(converted, calibration), _outputs(quantized, calibration))  # the reference path
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())  # a copy: the simulated model is kept


def test_split_shortcut_convs_become_one_convolution_per_input_part(unet, calibration):
    quantized = _quantized(unet, calibration, 4, 8, split_shortcut=True)
    converted = convert_model(quantized)
    split = [m for m in converted.modules() if isinstance(m, LowBitConv2d) and len(m.parts) == 2]
    assert split, "tiny-unet's up-blocks have split shortcuts"
    assert torch.equal(_outputs(converted, calibration), _outputs(quantized, calibration))


def test_per_step_activation_parameters_follow_the_sampling_step(unet, calibration):
    quantized = _quantized(unet, calibration, 4, 8, per_step_activations=True)
    converted = convert_model(quantized)
    for step in (0, 3):
        set_step(quantized, step)
        set_step(converted, step)
        assert torch.equal(_outputs(converted, calibration), _outputs(quantized, calibration))


def test_a_compiled_converted_model_follows_the_sampling_step_without_going_stale(unet, calibration):
    """torch.compile guards on the quantizers' step: each parameter set gets its graph, reused when it comes back."""
    converted = convert_model(_quantized(unet, calibration, 4, 8, per_step_activations=True))
    expected = {}
    for step in (0, 3):
        set_step(converted, step)
        expected[step] = _outputs(converted, calibration)
    assert not torch.equal(expected[0], expected[3])
    torch._dynamo.reset()
    converted.compile(backend="eager")
    for step in (0, 3, 0):
        set_step(converted, step)
        assert torch.equal(_outputs(converted, calibration), expected[step])


def test_kernels_get_the_current_steps_activation_parameters_with_codes_shifted_into_int8(unet, calibration):
    quantized = _quantized(unet, calibration, 4, 8, per_step_activations=True)
    layer = next(m for m in convert_model(quantized).modules() if isinstance(m, LowBitLinear))
    quantizer = layer.input_quantizer
    assert quantizer.fmt.qmin == 0 and quantizer.fmt.qmax == 255  # uint8: codes 0..255 run as -128..127
    for step in (0, 2):
        set_step(layer, step)
        scale, zero = layer.activation.parameters_now()
        assert scale.shape == (1,) and scale.item() == quantizer.scale[step].item()
        assert zero.shape == (1,) and zero.dtype == torch.int32
        assert zero.item() == int(quantizer.zero_point[step]) - 128


def test_layers_that_differ_only_in_their_activation_parameters_share_one_compiled_graph(unet, calibration):
    quantized = _quantized(unet, calibration, 8, 8)
    layers = [m for m in convert_model(quantized).modules() if isinstance(m, LowBitLinear) and m.activation.has_zero]
    zeros = {layer.activation.zero_point.item() for layer in layers}
    assert len(zeros) > 1, "the fixture should calibrate different zero points"
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def kernel_inputs(activation, x):  # what dispatch hands a kernel: the current step's parameters
        scale, zero = activation.parameters_now()
        return torch.round(x / scale) + zero

    torch._dynamo.reset()
    for layer in layers:
        scale, zero = layer.activation.parameters_now()
        x = torch.randn(4)
        assert torch.equal(kernel_inputs(layer.activation, x), torch.round(x / scale) + zero)
    assert counter.frame_count == 1


def test_four_bit_weights_take_under_a_third_of_their_bf16_bytes(unet, calibration):
    quantized = _quantized(unet, calibration, 4, 8, rules=[])
    report = getattr(convert_model(quantized), REPORT_ATTRIBUTE)
    assert set(report.converted) == {"int4"}
    assert report.weight_bytes_after < 0.3 * report.weight_bytes_before / 2  # before: float32
    assert report.summary().startswith(f"converted {len(report.layers)} weights ({len(report.layers)} int4) into 0.")
    assert {layer["activation"] for layer in report.layers} == {"int8"}


def test_a_layer_without_a_layout_stays_simulated_with_its_reason(unet, calibration):
    quantized = _quantized(unet, calibration, "fp4_e2m1", 8, rules=[LayerRule("conv_in", weight_bits=8)])
    converted = convert_model(quantized)
    report = getattr(converted, REPORT_ATTRIBUTE)
    assert report.converted == {"int8": 1}
    assert report.kept and all("fp4_e2m1" in reason for reason in report.kept.values())
    assert torch.equal(_outputs(converted, calibration), _outputs(quantized, calibration))


def test_dynamic_fp8_gives_linear_layers_per_token_scales_and_leaves_convs_static(unet, calibration):
    quantized = _quantized(unet, calibration, "fp8_e4m3", "fp8_e4m3")
    converted = convert_model(quantized, dynamic_fp8=True)
    linear = next(m for m in converted.modules() if isinstance(m, LowBitLinear))
    assert linear.activation.dynamic and linear.activation.parameters_now() == (None, None)
    assert not any(
        part.activation.dynamic for m in converted.modules() if isinstance(m, LowBitConv2d) for part in m.parts
    )
    report = getattr(converted, REPORT_ATTRIBUTE)
    assert {row["activation"] for row in report.layers if row["kind"] == "Linear"} == {"fp8 (dynamic per token)"}
    x = torch.randn(3, linear.in_features) * torch.tensor([[0.01], [1.0], [300.0]])  # rows of very different size
    scale = x.abs().amax(dim=1, keepdim=True) / 448  # computed another way: torch's own e4m3 cast
    expected = torch.nn.functional.linear(
        (x / scale).to(torch.float8_e4m3fn).float() * scale, linear.weight.dequantize(), linear.bias
    )
    torch.testing.assert_close(linear(x), expected, rtol=1e-6, atol=1e-6)


def test_the_reference_path_answers_in_its_inputs_dtype(unet, calibration):
    converted = convert_model(_quantized(unet, calibration, 8, 8))
    linear = next(m for m in converted.modules() if isinstance(m, LowBitLinear))
    conv = next(m for m in converted.modules() if isinstance(m, LowBitConv2d))
    x = torch.randn(2, linear.in_features, dtype=torch.bfloat16)
    assert linear(x).dtype == torch.bfloat16  # a bf16 model keeps running where a layer has no kernel
    assert conv(torch.randn(1, conv.in_channels, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_model_with_nothing_quantized_is_refused(unet):
    with pytest.raises(ValueError, match="quantize it first"):
        convert_model(nn.Sequential(nn.Linear(4, 4)))


def _stored_weight(bits, granularity, out_features=8, in_features=64, symmetric=False):
    weight = torch.randn(out_features, in_features)
    return LowBitWeight.from_quantizer(_weight_quantizer(granularity, weight, bits=bits, symmetric=symmetric), weight)


@pytest.mark.parametrize(
    ("mode", "bits", "granularity", "dtype", "runs"),
    [
        ("int8", 8, "channel", torch.float32, True),
        ("int8", 8, "group:32", torch.float32, False),  # the int8 kernels take per-channel scales only
        ("int8", 4, "group:32", torch.bfloat16, True),
        ("int8", 4, "group:16", torch.bfloat16, False),  # int4 groups must be multiples of the K tile (32)
        ("none", 4, "channel", torch.bfloat16, True),
        ("none", 4, "channel", torch.float32, False),  # W4A16 takes bf16/fp16 activations
        ("none", 8, "channel", torch.bfloat16, False),  # no W8A16 kernel: the reference path
        ("fp8", "fp8_e4m3", "channel", torch.float32, True),
        (None, 8, "channel", torch.float32, False),  # e.g. 4-bit activations
    ],
)
def test_a_kernel_is_chosen_only_for_the_pairs_and_shapes_it_takes(monkeypatch, mode, bits, granularity, dtype, runs):
    from dmquant.kernels import dispatch

    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", True)
    symmetric = bits == "fp8_e4m3"
    weight = _stored_weight(bits, granularity, symmetric=symmetric)
    on_gpu = types.SimpleNamespace(is_cuda=True, dtype=dtype)
    assert dispatch._runs_on_a_kernel(mode, weight, on_gpu) is runs
    assert not dispatch._runs_on_a_kernel(mode, weight, types.SimpleNamespace(is_cuda=False, dtype=dtype))
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    assert not dispatch._runs_on_a_kernel(mode, weight, on_gpu)


def test_the_kernel_choice_compiles_into_the_callers_graph():
    """torch.compile traces the choice of kernel without a graph break (else every converted layer of a compiled
    block would be a graph of its own, its quantization unfused)."""
    from dmquant.kernels import dispatch

    weight = _stored_weight(8, "channel", symmetric=False)
    on_gpu = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)

    @torch.compile(fullgraph=True, backend="eager")
    def choose(x):
        return x + 1 if dispatch.linear_kernel("int8", weight, on_gpu) is None else x - 1

    expected = torch.ones(2) + (1 if not dispatch.TRITON_AVAILABLE else -1)
    torch.testing.assert_close(choose(torch.ones(2)), expected)


def test_a_kernel_call_gets_the_weight_tensors_and_the_current_steps_activation_parameters(monkeypatch):
    from dmquant.kernels import dispatch

    calls = []
    fake = types.ModuleType("dmquant.kernels.triton_gemm")
    fake.int8_linear = fake.fp8_linear = None
    fake.int4_linear = lambda x, **arguments: calls.append(arguments) or x
    monkeypatch.setitem(sys.modules, "dmquant.kernels.triton_gemm", fake)
    monkeypatch.setattr(dmquant.kernels, "triton_gemm", fake, raising=False)
    monkeypatch.setattr(dispatch, "_runs_on_a_kernel", lambda *args: True)
    weight = _stored_weight(4, "group:32")
    activation = types.SimpleNamespace(parameters_now=lambda: (torch.tensor([0.5]), torch.tensor([-3])))
    dispatch.linear_kernel("int8", weight, torch.zeros(1))(torch.zeros(2, 64), activation, weight, None)
    (arguments,) = calls
    assert arguments["x_scale"].item() == 0.5 and arguments["x_zero"].item() == -3 and arguments["act"] == "int8"
    assert arguments["w_packed"] is weight.stored and arguments["group_size"] == 32
    assert torch.equal(arguments["w_colsum"], weight.codes().reshape(8, 2, 32).sum(-1))


@pytest.mark.parametrize("fast", [False, True])
def test_fp8_fast_accumulation_reaches_the_fp8_kernels_of_linears_and_convs(unet, calibration, monkeypatch, fast):
    from dmquant.kernels import dispatch

    calls = []
    record = lambda x, **arguments: calls.append(arguments) or x  # noqa: E731
    gemm, conv = types.ModuleType("dmquant.kernels.triton_gemm"), types.ModuleType("dmquant.kernels.triton_conv")
    gemm.int8_linear = gemm.int4_linear = gemm.fp8_linear = record
    conv.int8_conv2d = conv.int4_conv2d = conv.fp8_conv2d = lambda x, **arguments: calls.append(arguments) or x
    for name, module in (("triton_gemm", gemm), ("triton_conv", conv)):
        monkeypatch.setitem(sys.modules, f"dmquant.kernels.{name}", module)
        monkeypatch.setattr(dmquant.kernels, name, module, raising=False)
    monkeypatch.setattr(dispatch, "_runs_on_a_kernel", lambda *args: True)
    converted = convert_model(_quantized(unet, calibration, "fp8_e4m3", "fp8_e4m3"), fp8_fast_accumulation=fast)
    linear = next(m for m in converted.modules() if isinstance(m, LowBitLinear) and m.activation.mode == "fp8")
    conv_layer = next(
        m
        for m in converted.modules()
        if isinstance(m, LowBitConv2d) and [part.activation.mode for part in m.parts] == ["fp8"]
    )
    linear(torch.zeros(2, linear.in_features))
    conv_layer(torch.zeros(1, conv_layer.in_channels, 4, 4))
    assert [arguments["fast_accumulation"] for arguments in calls] == [fast, fast]
    calls.clear()
    int8 = next(m for m in convert_model(_quantized(unet, calibration, 8, 8)).modules() if isinstance(m, LowBitLinear))
    int8(torch.zeros(2, int8.in_features))
    assert "fast_accumulation" not in calls[0]  # only the fp8 kernels take it
