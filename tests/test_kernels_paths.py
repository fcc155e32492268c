"""kernels/paths.py: the bf16 path's dense layer, the choice of the fastest path, the decision cache, and on a GPU
the whole selection on a converted model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dmquant import api
from dmquant.calib.record import CalibrationSet
from dmquant.catalog import MIN_PATH_GAIN
from dmquant.config import load_recipe
from dmquant.kernels import cudnn_conv, decision_cache, paths
from dmquant.kernels.convert import convert_model
from dmquant.kernels.layers import LowBitConv2d, LowBitLinear
from dmquant.kernels.weights import LowBitWeight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.proj = nn.Linear(32, 48)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.conv(x)).mean(dim=(2, 3)))


def _converted(bits=("fp8_e4m3", "fp8_e4m3"), device="cpu", model=None, sample=(16, 8, 8)) -> nn.Module:
    """``model`` (by default :class:`TwoLayers`) quantized with the minmax recipe at ``bits`` on random calibration
    rows shaped ``sample``, and converted."""
    torch.manual_seed(0)
    model = (model if model is not None else TwoLayers()).to(device)
    calibration = CalibrationSet(
        samples=torch.randn(4, *sample, device=device),
        timesteps=torch.zeros(4, device=device),
        step_indices=torch.zeros(4, dtype=torch.long, device=device),
        cond={},
        num_inference_steps=1,
    )
    quantized = api.quantize(model, load_recipe("minmax").with_bits(*bits), calibration, progress=False)
    return convert_model(quantized)


def test_the_dense_layer_computes_with_the_dequantized_weight_and_an_unquantized_input():
    model = _converted()
    x = torch.randn(3, 16, 8, 8)
    conv = model.conv
    expected = F.conv2d(x, conv.parts[0].weight_4d(conv.kernel_size), conv.bias, conv.stride, conv.padding)
    dense = paths.dense_module(conv, torch.float32)
    assert type(dense) is nn.Conv2d
    torch.testing.assert_close(dense(x), expected)
    linear = model.proj
    h = torch.randn(5, 32)
    torch.testing.assert_close(
        paths.dense_module(linear, torch.float32)(h), F.linear(h, linear.weight.dequantize(), linear.bias)
    )


def test_smoothing_is_folded_into_the_dense_weight():
    model = _converted()
    linear = model.proj
    smoothing = torch.rand(32) + 0.5
    linear.smoothing = smoothing
    h = torch.randn(5, 32)
    expected = F.linear(h / smoothing, linear.weight.dequantize(), linear.bias)
    torch.testing.assert_close(paths.dense_module(linear, torch.float32)(h), expected)


def test_a_signature_names_the_shape_not_the_layer():
    model = _converted()
    x = torch.randn(2, 32)
    first = paths.signature(model.proj, x)
    assert first == paths.signature(model.proj, x.clone())
    assert "proj" not in json.dumps(first)
    assert first != paths.signature(model.proj, torch.randn(3, 32))
    assert first != paths.signature(model.proj, x.half())
    image = torch.randn(2, 16, 8, 8)
    assert paths.signature(model.conv, image) != paths.signature(
        model.conv, image.contiguous(memory_format=torch.channels_last)
    )


def test_the_fastest_path_is_the_least_total_over_the_paths_every_call_took():
    entries = [{"cublas": 1.0, "triton": 2.0, "bf16": 1.5}, {"triton": 0.5, "bf16": 0.9}]
    path, totals = paths.fastest(entries)
    assert totals == {"triton": 2.5, "bf16": 2.4}
    assert path == "bf16"
    assert paths.fastest([{"cublas": 0.2, "bf16": 0.3}]) == ("cublas", {"cublas": 0.2, "bf16": 0.3})


def test_a_quantized_path_is_kept_over_bf16_only_if_it_saves_the_minimum_gain():
    # over two calls: triton saves 0.1 of bf16's 2.0 ms (5%), cublas 0.04 (2%)
    entries = [{"cublas": 0.98, "triton": 0.9, "bf16": 1.0}, {"cublas": 0.98, "triton": 1.0, "bf16": 1.0}]
    assert paths.fastest(entries, min_gain=0.05)[0] == "triton"  # saves exactly 5%
    assert paths.fastest(entries, min_gain=0.06)[0] == "bf16"
    assert paths.fastest(entries, min_gain=0.0)[0] == "triton"
    assert paths.fastest([{"fp8": 0.97, "bf16": 1.0}], min_gain=MIN_PATH_GAIN)[0] == "bf16"  # attention alike
    # int4 layers have no bf16 candidate: the margin has nothing to fall back to
    assert paths.fastest([{"triton": 1.0, "dequant": 1.02}], min_gain=0.5)[0] == "triton"
    report = paths.PathReport("GPU", [paths.PathChoice("a", "bf16", {"cublas": 0.98, "bf16": 1.0}, [[4, 8]])],
                              min_gain=0.05)  # fmt: skip
    assert "kept over bf16 only if it saved 5% of its time" in report.summary()
    assert "time per call 1.000 ms" in report.summary()  # the path taken, not the fastest candidate
    assert report.to_dict()["min_gain"] == 0.05


@pytest.mark.parametrize("min_gain", [-0.1, 1.0])
def test_selection_refuses_a_minimum_gain_outside_zero_to_one(min_gain):
    with pytest.raises(ValueError, match="min_gain"):
        paths.select_paths(_converted(), lambda: None, min_gain=min_gain)


def test_the_bf16_path_replaces_the_layer_and_the_others_set_its_backend():
    model = _converted()
    image = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    dense_conv = paths.dense_module(model.conv, torch.float32, channels_last=True)
    assert dense_conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dense_conv(image), paths.dense_module(model.conv, torch.float32)(image))
    paths._apply(model, "proj", model.proj, "bf16", torch.randn(2, 32))
    assert type(model.proj) is nn.Linear
    paths._apply(model, "conv", model.conv, "triton", torch.randn(1, 16, 8, 8))
    assert isinstance(model.conv, LowBitConv2d) and model.conv.backend == "triton"
    paths._apply(model, "conv", model.conv, "cudnn", torch.randn(1, 16, 8, 8))
    assert model.conv.backend == "cudnn"


def test_for_compiled_execution_a_convolutions_16_bit_paths_are_timed_and_built_channels_last(monkeypatch):
    """Inductor's layout optimization runs compiled convolutions channels-last, whatever layout the eager input had:
    the bf16 candidate is timed on a channels-last copy of a contiguous recorded input and the kept dense layer gets
    a channels-last weight; eagerly, and for a quantized candidate, the recorded layout stays."""
    import torch._inductor.config as inductor_config

    model = _converted()
    conv, x = model.conv, torch.randn(3, 16, 8, 8)
    seen = []
    original = paths.dense_module

    def recording(*args, **kwargs):
        dense = original(*args, **kwargs)
        dense.register_forward_pre_hook(lambda module, inputs: seen.append(paths.memory_layout(inputs[0])))
        return dense

    monkeypatch.setattr(paths, "dense_module", recording)
    for compiled, layout in ((False, "contiguous"), (True, "channels_last")):
        seen.clear()
        paths._candidates(conv, x, dense_for_int4=False, compiled=compiled)["bf16"]()
        assert seen == [layout]
    # inductor's own patch, not monkeypatch: its settings are context variables, which it restores itself
    with inductor_config.patch(layout_optimization=False):
        assert not paths.dense_input_channels_last(conv, x, compiled=True)
    with inductor_config.patch(layout_optimization=True):
        assert not paths.dense_input_channels_last(model.proj, torch.randn(5, 32), compiled=True)  # a Linear
    paths._apply(model, "conv", conv, "bf16", x.to("meta"), compiled=True)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_w4a16_layers_may_dequantize_per_call_onto_the_16_bit_kernels_keeping_their_codes():
    """The ``"dequant"`` path: the int4 weight dequantized per call into the input's dtype, a plain 16-bit GEMM or
    convolution; the W4A16 kernels' function (16-bit activations as they come) up to bf16 rounding, the stored
    codes untouched."""
    model = _converted(bits=(4, 16)).to(torch.bfloat16)
    image = torch.randn(3, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    hidden = torch.randn(5, 32).to(torch.bfloat16)
    for name, x in (("conv", image), ("proj", hidden)):
        layer = model.get_submodule(name)
        candidates = paths._candidates(layer, x, dense_for_int4=False)
        assert "dequant" in candidates and "bf16" not in candidates  # the codes stay: no 16-bit copy is kept
        stored = layer.state_dict()
        paths._apply(model, name, layer, "dequant", x)
        out = layer(x)
        assert layer.backend == "dequant" and out.dtype == torch.bfloat16
        expected = paths.dense_module(layer, torch.float32)(x.float())  # W4A16 kernels leave the input unrounded
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
        assert all(torch.equal(stored[key], value) for key, value in layer.state_dict().items())
    assert "dequant" not in paths._candidates(_converted().proj, torch.randn(5, 32), dense_for_int4=False)  # W8A8


def test_the_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(decision_cache.CACHE_VARIABLE, str(tmp_path / "c"))
    assert paths.cache_path() == tmp_path / "c" / paths.CACHE_FILE
    monkeypatch.delenv(decision_cache.CACHE_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert paths.cache_path() == tmp_path / "x" / "dmquant" / paths.CACHE_FILE


def test_a_malformed_cache_is_ignored_and_writes_merge(tmp_path):
    cache = tmp_path / paths.CACHE_FILE
    cache.write_text("{not json")
    assert paths._read_cache(cache) == {}
    cache.write_text(json.dumps({"a": {"bf16": 1.0}, "bad": {"bf16": "fast"}, "list": [1]}))
    assert paths._read_cache(cache) == {"a": {"bf16": 1.0}}
    paths._write_cache(cache, {"b": {"triton": 2.0}})
    assert paths._read_cache(cache) == {"a": {"bf16": 1.0}, "b": {"triton": 2.0}}


def test_selection_needs_a_cuda_model():
    model = _converted()
    with pytest.raises(ValueError, match="CUDA"):
        paths.select_paths(model, lambda: model(torch.randn(1, 16, 8, 8), torch.zeros(1)))


@pytest.mark.gpu
def test_selection_on_the_gpu_keeps_the_fastest_path_and_measures_a_shape_once(tmp_path, monkeypatch):
    monkeypatch.setenv(decision_cache.CACHE_VARIABLE, str(tmp_path))
    model = _converted(device=DEVICE).to(torch.bfloat16)
    x = torch.randn(64, 16, 32, 32, device=DEVICE, dtype=torch.bfloat16)
    report = paths.select_paths(model, lambda: model(x, torch.zeros(64, device=DEVICE)))
    assert [choice.name for choice in report.choices] == ["conv", "proj"]
    assert ("cudnn" in report.choices[0].times_ms) == cudnn_conv.takes(x, groups=1)  # W8A8-FP8: cuDNN's fp8 conv
    for choice in report.choices:
        assert choice.path == paths.fastest([choice.times_ms], MIN_PATH_GAIN)[0]  # bf16 unless 5% faster
        assert "bf16" in choice.times_ms and not choice.cached
        assert choice.quantization_timed and choice.quantization_ms > 0  # eagerly: with the pass, its time apart
        layer = model.get_submodule(choice.name)
        assert (type(layer) in (nn.Conv2d, nn.Linear)) == (choice.path == "bf16")
    model(x, torch.zeros(64, device=DEVICE))

    again = _converted(device=DEVICE).to(torch.bfloat16)
    monkeypatch.setattr(paths, "measure", lambda *args: pytest.fail("a cached shape was measured again"))
    second = paths.select_paths(again, lambda: again(x, torch.zeros(64, device=DEVICE)))
    assert all(choice.cached for choice in second.choices)
    assert [c.path for c in second.choices] == [c.path for c in report.choices]
    assert [c.quantization_ms for c in second.choices] == [c.quantization_ms for c in report.choices]


@pytest.mark.gpu
def test_a_timing_is_positive_and_leaves_nothing_allocated_behind():
    """Timings warm up on one side stream: the cuBLAS workspace of a new stream per timing would stay allocated."""
    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    assert 0 < paths._median_ms(lambda: a @ a) < 1.0
    torch.cuda.synchronize()
    first = torch.cuda.memory_allocated()
    for _ in range(8):
        paths._median_ms(lambda: a @ a)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == first


@pytest.mark.gpu
def test_paths_for_compiled_execution_are_measured_and_cached_apart(tmp_path, monkeypatch):
    monkeypatch.setenv(decision_cache.CACHE_VARIABLE, str(tmp_path))
    x = torch.randn(64, 16, 32, 32, device=DEVICE, dtype=torch.bfloat16)
    eager, compiled = (_converted(device=DEVICE).to(torch.bfloat16) for _ in range(2))
    paths.select_paths(eager, lambda: eager(x, torch.zeros(64, device=DEVICE)))
    report = paths.select_paths(compiled, lambda: compiled(x, torch.zeros(64, device=DEVICE)), compiled=True)
    assert report.compiled and "for compiled execution" in report.summary()
    assert not any(choice.cached for choice in report.choices)


def test_a_converted_model_cast_to_bf16_keeps_its_codes_and_scales():
    model = _converted()
    before = {name: (t.dtype, t.clone()) for name, t in model.named_buffers() if t is not None}
    cast = model.to(torch.bfloat16)
    for name, tensor in cast.named_buffers():
        if name in before and (name.endswith(("stored", "scale", "zero", "zero_point"))):
            assert tensor.dtype == before[name][0], name
            assert torch.equal(tensor.float(), before[name][1].float()), name
    assert cast.proj.bias.dtype == torch.bfloat16
    assert isinstance(cast.proj, LowBitLinear) and isinstance(cast.proj.weight, LowBitWeight)
    assert cast(torch.randn(1, 16, 8, 8, dtype=torch.bfloat16), torch.zeros(1)).dtype == torch.bfloat16


def test_the_report_lists_each_module_with_its_candidates_times():
    report = paths.PathReport("GPU", [
        paths.PathChoice("a", "cublas", {"cublas": 1.0, "triton": 2.0, "bf16": 1.5}, [[4, 8]]),
        paths.PathChoice("b", "bf16", {"triton": 3.0, "bf16": 2.5}, [[4, 8], [2, 8]], cached=True,
                         quantization_timed=False, quantization_ms=0.25),
        paths.PathChoice("attn", "fp8", {"fp8": 0.5, "bf16": 0.75}, [[1, 2, 64, 64, 16]], kind="attention"),
    ])  # fmt: skip
    assert report.counts() == {"cublas": 1, "bf16": 1, "fp8 attention": 1}
    rows = report.rows()
    assert rows[1] == {"name": "b", "path": "bf16", "input": "4x8; 2x8", "cublas ms": "—", "triton ms": "3.0000",
                       "cudnn ms": "—", "dequant ms": "—", "fp8 ms": "—", "bf16 ms": "2.5000",
                       "input quantization": "fused", "quantization ms": "0.2500"}  # fmt: skip
    assert rows[2]["fp8 ms"] == "0.5000" and rows[2]["input"] == "1x2x64x64x16"
    assert rows[2]["input quantization"] == rows[2]["quantization ms"] == "—"  # its operands are timed otherwise
    assert "4.000 ms against 4.750 ms in bf16" in report.summary()
    int4 = paths.PathReport("GPU", [paths.PathChoice("c", "triton", {"triton": 1.0}, [[4, 8]])])
    assert int4.summary().endswith("time per call 1.000 ms")
    assert report.to_dict()["layers"][1]["cached"] is True


@pytest.fixture
def timed_layer(monkeypatch) -> LowBitLinear:
    """A converted Linear whose timings are made up: cuBLASLt 3 ms, bf16 2.5 ms, its input's quantization 1 ms
    (that call is run, so it must work on CPU)."""
    monkeypatch.setattr(paths, "_candidates", lambda *args: {"cublas": "gemm", "bf16": "dense"})
    made_up = {"gemm": 3.0, "dense": 2.5}
    monkeypatch.setattr(paths, "_median_ms", lambda call: made_up[call] if isinstance(call, str) else (call(), 1.0)[1])
    return _converted().proj


def test_compiled_timing_leaves_out_the_input_quantization(timed_layer):
    """Compiled, the quantization fuses into the op producing the input: a quantized path's time is its call's less
    the quantization's (here 1 ms); bf16's stays."""
    layer = timed_layer
    x = torch.randn(4, 32)
    assert paths.measure(layer, x) == {"cublas": 3.0, "bf16": 2.5, paths.QUANTIZATION: 1.0}
    assert paths.measure(layer, x, compiled=True) == {"cublas": 2.0, "bf16": 2.5, paths.QUANTIZATION: 1.0}
    layer.activation.dynamic = True  # no static pass to time apart
    assert paths.measure(layer, x, compiled=True) == {"cublas": 3.0, "bf16": 2.5}


def test_the_input_quantization_is_each_parts_codes():
    model = _converted()
    (codes,) = paths._input_quantization(model.proj, torch.randn(4, 32))()
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (4, 32)
    assert len(paths._input_quantization(model.conv, torch.randn(2, 16, 8, 8))()) == len(model.conv.parts)
    model.proj.activation.dynamic = True  # per-row scales: a reduction, nothing to take apart
    assert paths._input_quantization(model.proj, torch.randn(4, 32)) is None


def test_compiled_timing_keeps_the_quantization_of_an_input_from_outside_the_graph(timed_layer):
    """An input that enters the compiled graph from outside has no producer to fuse into: its quantization stays."""
    times = paths.measure(timed_layer, torch.randn(4, 32), compiled=True, fuses_quantization=False)
    assert times == {"cublas": 3.0, "bf16": 2.5, paths.QUANTIZATION: 1.0}


class ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.shortcut = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(x)) + self.shortcut(x)


class StemAndBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.block = ResidualBlock()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


def _fusing(model: nn.Module, regions: list[nn.Module]) -> dict[str, bool]:
    """Each converted layer's ``quantization_fuses`` for its first call on a random input, after checking that the
    recorded call gives the model's output."""
    x = torch.randn(2, 3, 8)
    outputs = []
    recorded, _ = paths._record_calls(model, lambda: outputs.append(model(x, torch.zeros(2))), {}, regions)
    torch.testing.assert_close(outputs[0], model(x, torch.zeros(2)), rtol=0, atol=0)  # the call runs unchanged
    assert all(calls[0].meta.shape[0] == 2 for calls in recorded.values())
    return {name: calls[0].quantization_fuses for name, calls in recorded.items()}


@pytest.mark.parametrize(
    ("compiled", "expected"),
    [
        ("block", {"stem": False, "block.shortcut": False, "block.proj": True}),  # regional compilation
        ("model", {"stem": False, "block.shortcut": True, "block.proj": True}),  # the model as one graph
        (None, {"stem": False, "block.shortcut": False, "block.proj": False}),  # eager
    ],
)
def test_each_recorded_input_says_whether_its_producer_is_in_the_layers_compiled_graph(compiled, expected):
    """The stem's input is the model's input; the shortcut takes the block's input; ``proj`` takes SiLU's output,
    computed inside the block."""
    model = _converted(model=StemAndBlock(), sample=(3, 8))
    assert _fusing(model, {"block": [model.block], "model": [model], None: []}[compiled]) == expected


def test_layers_whose_input_was_laid_out_anew_are_measured_again():
    """A second recording finds which converted layers' inputs changed strides (a dense replacement upstream wrote
    NCHW where the converted convolution wrote channels-last) or fusion; a layer gone to bf16 is not recorded."""

    def call(shape, fuses=False, memory_format=torch.contiguous_format):
        meta = torch.empty(shape, device="meta").contiguous(memory_format=memory_format)
        return paths.RecordedInput(meta, fuses, fuses)

    image = (2, 8, 4, 4)
    before = {
        "up": [call(image, memory_format=torch.channels_last)],
        "proj": [call((2, 8))],
        "ff": [call((2, 8), fuses=True)],
        "gone": [call((2, 8))],
    }
    after = {"up": [call(image)], "proj": [call((2, 8))], "ff": [call((2, 8), fuses=False)]}
    assert paths.relaid_out(before, after) == ["up", "ff"]
    assert paths.relaid_out(before, before) == []


def test_a_recorded_input_says_whether_its_layer_runs_in_a_compiled_region():
    model = _converted(model=StemAndBlock(), sample=(3, 8))
    recorded, _ = paths._record_calls(model, lambda: model(torch.randn(2, 3, 8), torch.zeros(2)), {}, [model.block])
    assert {name: calls[0].in_compiled_region for name, calls in recorded.items()} == {
        "stem": False, "block.shortcut": True, "block.proj": True,
    }  # fmt: skip


class NormAndAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.norm = nn.LayerNorm(8)
        self.attn = Attention(query_dim=8, heads=2, dim_head=4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(x))


def test_the_attention_output_projection_keeps_its_quantization_pass():
    """Q, K and V come out of the LayerNorm, which their quantization fuses into; ``to_out`` takes the attention
    kernel's output, which it does not."""
    model = _converted(model=NormAndAttention(), sample=(3, 8))
    fusing = _fusing(model, [model])
    assert fusing == {"attn.to_q": True, "attn.to_k": True, "attn.to_v": True, "attn.to_out.0": False}
