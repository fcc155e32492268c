"""FP8 attention: the simulated computation against a direct one, conversion, and cuDNN's kernel on a GPU."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from diffusers.models.attention_processor import Attention

from dmquant import api
from dmquant.config import QuantizerConfig, load_recipe
from dmquant.core.attention import MATMUL_ATTRIBUTE, QuantAttnProcessor, quantize_attention
from dmquant.core.observers import make_observer
from dmquant.denoiser import Denoiser
from dmquant.kernels import fp8_attention
from dmquant.kernels.convert import REPORT_ATTRIBUTE, convert_model

FP8 = QuantizerConfig(bits="fp8_e4m3", symmetric=True, granularity="tensor", observer="minmax")


def _e4m3(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` on a per-tensor fp8 e4m3 grid, by torch's own float8 cast (not dmquant's quantizer)."""
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def test_the_unit_observer_keeps_the_range_of_a_probability_whatever_it_sees():
    observer = make_observer("unit", "tensor", "fp8_e4m3", True)
    observer.update(torch.rand(4, 8) * 0.2)
    low, high = observer.compute()
    assert low.item() == 0.0 and high.item() == 1.0


def _calibrated_attention(heads=2, head_dim=16, tokens=24, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=heads * head_dim, heads=heads, dim_head=head_dim)
    quantize_attention(attn, FP8, "fp8_e4m3")
    quant = getattr(attn, MATMUL_ATTRIBUTE)
    for quantizer in (quant.query, quant.key, quant.value, quant.probs):
        quantizer.observing = True
    hidden = torch.randn(2, tokens, heads * head_dim)
    with torch.no_grad():
        attn(hidden)
    for quantizer in (quant.query, quant.key, quant.value, quant.probs):
        quantizer.finalize()
    return attn, hidden


def test_simulated_fp8_attention_is_the_direct_computation():
    """Q, K, V on their fp8 grids, softmax on the grid of [0, 1], the output on V's grid: by hand, with torch's cast."""
    attn, hidden = _calibrated_attention()
    quant = getattr(attn, MATMUL_ATTRIBUTE)
    assert quant.fp8_attention and quant.probs.scale.item() == pytest.approx(1 / 448)
    with torch.no_grad():
        q, k, v = (attn.head_to_batch_dim(layer(hidden)) for layer in (attn.to_q, attn.to_k, attn.to_v))
        s_q, s_k, s_v = (quantizer.scale.item() for quantizer in (quant.query, quant.key, quant.value))
        q, k, v = _e4m3(q, s_q), _e4m3(k, s_k), _e4m3(v, s_v)
        probs = _e4m3(torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1), 1 / 448)
        output = attn.to_out[0](attn.batch_to_head_dim(_e4m3(probs @ v, s_v)))
        expected = attn.to_out[1](output)
        torch.testing.assert_close(attn(hidden), expected, rtol=1e-5, atol=1e-6)
        # the output's rounding is the only step FP8 attention adds to 8-bit operand quantization
        rounded = quant.round_output(probs @ v)
        assert not torch.equal(rounded, probs @ v) and torch.equal(rounded, _e4m3(probs @ v, s_v))


def test_integer_softmax_attention_keeps_its_output_unrounded():
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    quantize_attention(attn, QuantizerConfig(bits=8, symmetric=False), 16)
    quant = getattr(attn, MATMUL_ATTRIBUTE)
    output = torch.randn(4, 8, 16)
    assert not quant.fp8_attention and quant.round_output(output) is output


@pytest.fixture(scope="module")
def fp8_attention_model(unet, calibration):
    """tiny-unet at W8A8-FP8 with FP8 attention (its self-attention has 16-wide heads)."""
    config = load_recipe("minmax").with_bits("fp8_e4m3", "fp8_e4m3")
    config = dataclasses.replace(
        config, attention=dataclasses.replace(config.attention, enabled=True, softmax_bits="fp8_e4m3")
    )
    return api.quantize(unet.denoiser, config, calibration, progress=False)


def _outputs(model, calibration):
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        return Denoiser(model)(x, t, cond)


def test_conversion_puts_fp8_attention_on_its_processor_and_computes_the_simulated_model(
    fp8_attention_model, calibration
):
    converted = convert_model(fp8_attention_model)
    report = getattr(converted, REPORT_ATTRIBUTE)
    attentions = [m for m in converted.modules() if isinstance(m, Attention)]
    assert attentions and len(report.fp8_attention) == len(attentions)
    assert all(isinstance(m.processor, fp8_attention.Fp8AttnProcessor) for m in attentions)
    assert "attention modules on FP8 attention" in report.summary()
    assert all(isinstance(m.processor, QuantAttnProcessor) for m in fp8_attention_model.modules() if m in attentions)
    # on CPU the processor computes the simulated attention: bit for bit
    assert torch.equal(_outputs(converted, calibration), _outputs(fp8_attention_model, calibration))


def test_the_kernel_declines_what_cudnn_does_not_take():
    query = torch.zeros(1, 8, 64)
    assert not fp8_attention.takes(query, query, 4, None, 0.25)  # a CPU tensor
    assert fp8_attention.padded_head_dim(72) == 80  # PixArt's and DiT-XL/2's heads run padded
    assert fp8_attention.padded_head_dim(40) == 48 and fp8_attention.padded_head_dim(128) == 128
    assert fp8_attention.padded_head_dim(160) is None  # SD-1.5's widest heads: above cuDNN's 128


def test_zero_padded_heads_give_the_attention_of_the_unpadded_ones():
    """Q·Kᵀ is unchanged by zero channels, and V's zero channels give zero outputs, dropped after."""
    torch.manual_seed(0)
    heads, head_dim, scale = 3, 24, 24**-0.5
    q, k, v = torch.randn(2, 10, heads * head_dim), torch.randn(2, 7, heads * head_dim), torch.randn(2, 7, 72)
    padded = [fp8_attention.pad_heads(x, heads, 32) for x in (q, k, v)]
    assert padded[0].shape == (2, 10, 96) and not padded[0].unflatten(-1, (heads, 32))[..., head_dim:].any()
    assert torch.equal(fp8_attention.unpad_heads(padded[0], heads, head_dim), q)
    out = fp8_attention.full_precision_attention(*padded, None, heads, scale)
    expected = fp8_attention.full_precision_attention(q, k, v, None, heads, scale)
    torch.testing.assert_close(fp8_attention.unpad_heads(out, heads, head_dim), expected)


def test_a_shape_cudnn_refuses_is_tried_and_warned_once(monkeypatch):
    attempts = []

    def refuse(*shape):
        attempts.append(shape)
        raise RuntimeError("no engine")

    monkeypatch.setattr(fp8_attention, "_graph", refuse)
    fp8_attention._builds_once.cache_clear()
    shape = (1, 2, 300, 300, 16, 0.25, 0)
    with pytest.warns(UserWarning, match="refused"):
        assert not fp8_attention._builds(*shape)
    assert not fp8_attention._builds(*shape) and len(attempts) == 1
    fp8_attention._builds_once.cache_clear()


def test_whether_cudnn_builds_a_shape_is_a_constant_under_compile(monkeypatch):
    """Answered at trace time, not traced: a graph build inside a compiled block would break its graph."""
    import os

    import torch._dynamo.testing

    builds = []
    monkeypatch.setattr(fp8_attention, "_graph", lambda *shape: builds.append(os.getpid()))  # untraceable
    fp8_attention._builds_once.cache_clear()

    def branch(x):
        return x + 1 if fp8_attention._builds(1, 2, 64, 64, 16, 0.25, 0) else x - 1

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    assert torch.equal(torch.compile(branch, backend=counter, fullgraph=True)(torch.zeros(2)), torch.ones(2))
    assert counter.frame_count == 1 and len(builds) == 1
    fp8_attention._builds_once.cache_clear()


def test_symbolic_sizes_are_specialized_to_the_call_under_dynamic_shape_compilation():
    """cuDNN's graph is planned per shape at trace time: a graph traced with symbolic sizes takes the sizes of its
    call as constants (one graph per shape), with no graph break."""
    seen = []

    def branch(x):
        sizes = fp8_attention.concrete(tuple(x.shape))
        seen.append(sizes)  # at trace time: constants, not symbols
        return x + 1 if sizes[0] == 4 else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(branch, backend="eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(torch.zeros(4, 5)), torch.ones(4, 5))
    assert torch.equal(compiled(torch.zeros(3, 5)), -torch.ones(3, 5))
    assert seen == [(4, 5), (3, 5)] and all(type(size) is int for sizes in seen for size in sizes)
    torch._dynamo.reset()


@functools.cache
def _fp8_sdpa_on_cpu() -> list[int]:
    """A CPU kernel for ``dmquant::fp8_sdpa`` (registered once): its function on dequantized codes. Returns the list
    of the widths (heads · head dimension) of the operands it was called on."""
    widths: list[int] = []

    @fp8_attention.fp8_sdpa.register_kernel("cpu")
    def _(q, k, v, descale_q, descale_k, descale_v, descale_s, heads, attn_scale):
        widths.append(q.shape[-1])
        q, k, v = (codes.float() * scale for codes, scale in ((q, descale_q), (k, descale_k), (v, descale_v)))
        out = fp8_attention.full_precision_attention(q, k, v, None, heads, attn_scale)
        return (out / descale_v).clamp(-448, 448).to(torch.float8_e4m3fn)

    return widths


@pytest.mark.parametrize("head_dim", [16, 24], ids=["cudnn-width", "padded"])
def test_the_kernel_path_compiles_into_one_graph(monkeypatch, head_dim):
    """The processor's kernel path (pad and quantize Q, K, V; the custom op; unpad and dequantize O) traces without
    a graph break and computes the simulated attention up to the unrounded probabilities."""
    widths = _fp8_sdpa_on_cpu()
    attn, hidden = _calibrated_attention(head_dim=head_dim)
    with torch.no_grad():
        simulated = attn(hidden)
    fp8_attention.convert_attention(attn)
    monkeypatch.setattr(fp8_attention, "takes", lambda *args: True)
    torch._dynamo.reset()
    with torch.no_grad():
        on_kernel = torch.compile(attn, backend="eager", fullgraph=True)(hidden)
    assert not torch.equal(on_kernel, simulated)  # the op ran: it leaves the probabilities unrounded
    assert _psnr(simulated, on_kernel) > 30
    assert widths[-1] == attn.heads * 16 * -(-head_dim // 16)  # on heads padded to a multiple of 16


needs_cudnn_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_attention.CUDNN_FRONTEND_AVAILABLE)
    or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a Hopper GPU and nvidia-cudnn-frontend",
)


def _psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = (reference.float() - other.float()).pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).amax() / error))


@pytest.mark.gpu
@needs_cudnn_fp8
@pytest.mark.parametrize(("heads", "head_dim", "tokens"), [(2, 64, 1024), (4, 128, 300), (2, 72, 1024)])
def test_cudnn_fp8_attention_matches_the_simulated_attention(heads, head_dim, tokens):
    attn, hidden = _calibrated_attention(heads=heads, head_dim=head_dim, tokens=tokens)
    attn = attn.cuda().to(torch.bfloat16)
    hidden = hidden.cuda().to(torch.bfloat16)
    with torch.no_grad():
        simulated = attn(hidden)
        fp8_attention.convert_attention(attn)
        on_kernel = attn(hidden)
    assert not torch.equal(on_kernel, simulated)  # the kernel ran: a flash softmax rounds differently
    assert _psnr(simulated, on_kernel) > 30


@pytest.mark.gpu
@needs_cudnn_fp8
def test_cudnn_fp8_attention_compiles_and_replays_in_a_cuda_graph():
    attn, hidden = _calibrated_attention(heads=2, head_dim=64, tokens=256)
    attn = attn.cuda().to(torch.bfloat16)
    hidden = hidden.cuda().to(torch.bfloat16)
    fp8_attention.convert_attention(attn)
    with torch.no_grad():
        eager = attn(hidden)
        compiled = torch.compile(attn, mode="reduce-overhead", dynamic=False)  # other tests compiled other shapes
        for _ in range(3):
            graphed = compiled(hidden)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


def _flux_attention(joint: bool):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(0)
    options = {"added_kv_proj_dim": 32, "context_pre_only": False} if joint else {"pre_only": True}
    return FluxAttention(query_dim=32, heads=2, dim_head=16, out_dim=32, bias=True, eps=1e-6, **options)


def _flux_call(attn, joint: bool):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 12, 32, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator) if joint else None
    tokens = 17 if joint else 12
    angles = torch.randn(tokens, 8, generator=generator)
    rotary = (angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1))
    with torch.no_grad():
        output = attn(image, encoder_hidden_states=text, image_rotary_emb=rotary)
    return output if joint else (output,)  # (image, text) of a joint block


@pytest.mark.parametrize("joint", [True, False], ids=["double-stream", "single-stream"])
def test_the_flux_processor_with_its_quantizers_off_is_diffusers_flux_attention(joint):
    attn = _flux_attention(joint)
    expected = _flux_call(attn, joint)
    quantize_attention(attn, dataclasses.replace(FP8, enabled=False), "fp8_e4m3")
    getattr(attn, MATMUL_ATTRIBUTE).probs.enabled = False
    for got, want in zip(_flux_call(attn, joint), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("joint", [True, False], ids=["double-stream", "single-stream"])
def test_flux_attention_converts_to_fp8_attention_and_computes_the_simulated_one_on_cpu(joint):
    attn = _flux_attention(joint)
    quantize_attention(attn, FP8, "fp8_e4m3")
    quant = getattr(attn, MATMUL_ATTRIBUTE)
    for quantizer in (quant.query, quant.key, quant.value, quant.probs):
        quantizer.observing = True
    _flux_call(attn, joint)
    for quantizer in (quant.query, quant.key, quant.value, quant.probs):
        quantizer.finalize()
    simulated = _flux_call(attn, joint)
    assert fp8_attention.convert_attention(attn) == [""]
    assert isinstance(attn.processor, fp8_attention.Fp8JointAttnProcessor)
    for got, want in zip(_flux_call(attn, joint), simulated, strict=True):
        assert torch.equal(got, want)


def _sd3_attention(context_pre_only: bool):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    torch.manual_seed(0)
    return Attention(
        query_dim=32, added_kv_proj_dim=32, dim_head=16, heads=2, out_dim=32, context_pre_only=context_pre_only,
        bias=True, processor=JointAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6,
    )  # fmt: skip


def _sd3_call(attn):
    generator = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 12, 32, generator=generator), torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return attn(image, encoder_hidden_states=text)


@pytest.mark.parametrize("context_pre_only", [False, True])
def test_sd3_joint_attention_is_quantizable_and_its_processor_off_is_diffusers(context_pre_only):
    from dmquant.core.attention import QuantJointAttnProcessor, is_quantizable_attention

    attn = _sd3_attention(context_pre_only)
    assert is_quantizable_attention(attn)
    expected = _sd3_call(attn)
    quantize_attention(attn, dataclasses.replace(FP8, enabled=False), "fp8_e4m3")
    getattr(attn, MATMUL_ATTRIBUTE).probs.enabled = False
    assert isinstance(attn.processor, QuantJointAttnProcessor)
    for got, want in zip(_sd3_call(attn), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_attention_with_added_projections_stays_unquantized():
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    from dmquant.core.attention import is_quantizable_attention

    attn = Attention(query_dim=32, added_kv_proj_dim=32, heads=2, dim_head=16, processor=AttnAddedKVProcessor())
    assert not is_quantizable_attention(attn)


def _converted_calibrated_attention():
    attn, hidden = _calibrated_attention()
    fp8_attention.convert_attention(attn)
    return attn, hidden


def test_the_bf16_path_is_diffusers_attention_on_unquantized_operands():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, hidden = _converted_calibrated_attention()
    mask = torch.zeros(2, 1, hidden.shape[1])
    mask[1, 0, -5:] = -10000.0  # the second sample's last tokens masked out
    with torch.no_grad():
        simulated = attn(hidden, attention_mask=mask)
        attn.processor.path = "bf16"
        full_precision = attn(hidden, attention_mask=mask)
        attn.set_processor(AttnProcessor2_0())
        expected = attn(hidden, attention_mask=mask)
    torch.testing.assert_close(full_precision, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(simulated, expected, rtol=1e-5, atol=1e-6)  # the path changed what is computed


@pytest.mark.parametrize("joint", [True, False], ids=["double-stream", "single-stream"])
def test_the_bf16_path_of_flux_attention_is_diffusers_flux_attention(joint):
    attn = _flux_attention(joint)
    expected = _flux_call(attn, joint)
    quantize_attention(attn, FP8, "fp8_e4m3")  # uncalibrated: the bf16 path never reads the quantizers
    fp8_attention.convert_attention(attn)
    attn.processor.path = "bf16"
    for got, want in zip(_flux_call(attn, joint), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_recording_processor_lists_each_call_with_its_shape():
    attn, hidden = _converted_calibrated_attention()
    attn.processor.calls = []
    with torch.no_grad():
        attn(hidden)
        attn(hidden[:1, :10])
    first, second = attn.processor.calls
    standalone = ("query", "key", "value")  # no norm between the projections and the attention
    assert first == fp8_attention.AttentionCall(2, 2, 24, 24, 16, attn.scale, "float32", False, standalone)
    assert (second.batch, second.q_tokens, second.kv_tokens) == (1, 10, 10)


def test_path_selection_records_every_attention_call_beside_the_layers(fp8_attention_model, calibration):
    from dmquant.kernels import paths

    converted = convert_model(fp8_attention_model)
    x, t, cond, _ = next(calibration.batches(4))
    processors = paths._fp8_attention_processors(converted)
    layers, attention = paths._record_calls(converted, lambda: Denoiser(converted)(x, t, cond), processors)
    assert set(attention) == set(getattr(converted, REPORT_ATTRIBUTE).fp8_attention) and layers
    assert all(len(calls) == 1 and not calls[0].on_kernel and calls[0].batch == 4 for calls in attention.values())
    assert all(m.processor.calls is None for m in converted.modules() if isinstance(m, Attention))


@pytest.mark.gpu
@needs_cudnn_fp8
def test_path_selection_keeps_the_faster_attention_and_caches_it(tmp_path, monkeypatch):
    from dmquant.catalog import MIN_PATH_GAIN
    from dmquant.kernels import decision_cache, paths

    monkeypatch.setenv(decision_cache.CACHE_VARIABLE, str(tmp_path))
    attn, hidden = _calibrated_attention(heads=2, head_dim=64, tokens=1024)
    attn, hidden = attn.cuda().to(torch.bfloat16), hidden.cuda().to(torch.bfloat16)
    fp8_attention.convert_attention(attn)
    report = paths.select_paths(attn, lambda: attn(hidden))
    (choice,) = [c for c in report.choices if c.kind == "attention"]
    assert set(choice.times_ms) == {"fp8", "bf16"} and choice.inputs == [[2, 2, 1024, 1024, 64]]
    assert choice.path == paths.fastest([choice.times_ms], MIN_PATH_GAIN)[0] == attn.processor.path
    monkeypatch.setattr(paths, "measure_attention", lambda *args: pytest.fail("a cached shape was measured again"))
    assert paths.select_paths(attn, lambda: attn(hidden)).choices[-1].cached


def test_the_operands_whose_quantization_has_no_producer_to_fuse_into():
    plain = Attention(query_dim=32, heads=2, dim_head=16)
    normed = Attention(query_dim=32, heads=2, dim_head=16, qk_norm="rms_norm")
    assert fp8_attention.standalone_operands(plain) == ("query", "key", "value")  # SDXL's, PixArt's
    assert fp8_attention.standalone_operands(normed) == ("value",)
    assert fp8_attention.standalone_operands(_sd3_attention(context_pre_only=False)) == ()  # tokens concatenated
    assert fp8_attention.standalone_operands(_flux_attention(joint=True)) == ()
    assert fp8_attention.standalone_operands(_flux_attention(joint=False)) == ("value",)  # single-stream


def test_the_fp8_candidate_is_timed_with_the_quantizations_it_runs(monkeypatch):
    """Each call timed counts 1 ms (on CPU, through the op's CPU kernel): bf16 SDPA one call; fp8 the kernel and the
    quantization of Q, K and V eagerly, of V alone compiled (Q's and K's fuse into their norms)."""
    from dmquant.kernels import paths

    _fp8_sdpa_on_cpu()
    timed = []
    monkeypatch.setattr(paths, "_median_ms", lambda call: (timed.append(call()), 1.0)[1])
    shape = fp8_attention.AttentionCall(1, 2, 8, 8, 16, 0.25, "float32", True, ("value",))
    cpu = torch.device("cpu")
    assert paths.measure_attention(shape, cpu) == {"bf16": 1.0, "fp8": 4.0}
    timed.clear()
    assert paths.measure_attention(shape, cpu, compiled=True) == {"bf16": 1.0, "fp8": 2.0}
    assert [t.dtype for t in timed] == [torch.float32, torch.float8_e4m3fn, torch.float8_e4m3fn]
    assert paths.measure_attention(dataclasses.replace(shape, on_kernel=False), cpu) == {"bf16": 1.0}
