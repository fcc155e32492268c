"""Block input/output caches for BRECQ block reconstruction, on the three tiny diffusers families."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from block_io_files import load_cache, save_cache
from calibration_files import save_calibration
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from dmquant.calib.record import CalibrationSet, calibration_runner
from dmquant.denoiser import Denoiser
from dmquant.errors import CalibrationError, ModelError
from dmquant.recon.cache import BlockIOCache, block_output, paired
from dmquant.recon.capture import SkippedForward, capture_block_io, capture_paired_io
from dmquant.zoo.tiny import TINY_NUM_CLASSES, TINY_TEXT_DIM, tiny_dit, tiny_unet2d, tiny_unet2d_condition

SIZES = (2, 3, 1)


def _batches(kind: str, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Three calibration batches of different sizes for a tiny model family."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in SIZES:
        t = torch.randint(0, 1000, (size,), generator=g)
        if kind == "unet2d":
            x = torch.randn(size, 3, 16, 16, generator=g)
            cond = {"class_labels": torch.randint(0, TINY_NUM_CLASSES + 1, (size,), generator=g)}
        elif kind == "unet2d_condition":
            x = torch.randn(size, 4, 8, 8, generator=g)
            cond = {"encoder_hidden_states": torch.randn(size, 5, TINY_TEXT_DIM, generator=g)}
        else:
            x = torch.randn(size, 4, 8, 8, generator=g)
            cond = {"class_labels": torch.randint(0, 1000, (size,), generator=g)}
        out.append((x, t, cond))
    return out


def _runner(model, batches, fail_after: int | None = None):
    denoiser = Denoiser(model)

    def run():
        for number, (x, t, cond) in enumerate(batches):
            if fail_after is not None and number == fail_after:
                raise RuntimeError("boom")
            denoiser(x, t, cond)

    return run


_MODELS = {"unet2d": tiny_unet2d, "unet2d_condition": tiny_unet2d_condition, "dit": tiny_dit}


@pytest.fixture(scope="module")
def models():
    return {kind: make() for kind, make in _MODELS.items()}


def _call_ranges(cache: BlockIOCache) -> list[range]:
    starts = itertools.accumulate(cache.layout.call_sizes, initial=0)
    return [range(start, start + size) for start, size in zip(starts, cache.layout.call_sizes, strict=False)]


def _hook_counts(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


# --------------------------------------------------------------------------------------
# Capture on the three families
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, block_path, block_type",
    [
        ("unet2d", "down_blocks.0.resnets.0", ResnetBlock2D),  # (hidden_states, temb)
        ("unet2d_condition", "down_blocks.0.attentions.0", None),  # Transformer2DModel, tuple output
        ("unet2d_condition", "down_blocks.0.attentions.0.transformer_blocks.0", BasicTransformerBlock),
        ("dit", "transformer_blocks.1", BasicTransformerBlock),  # timestep / class_labels keywords
    ],
)
def test_cached_output_replays_bit_for_bit(models, kind, block_path, block_type):
    model = models[kind]
    block = model.get_submodule(block_path)
    if block_type is not None:
        assert isinstance(block, block_type)
    batches = _batches(kind)
    cache = capture_block_io(model, block, _runner(model, batches))
    assert len(cache) == sum(SIZES)
    assert cache.layout.call_sizes == SIZES
    assert cache.on_device and not cache.spilled and cache.device == torch.device("cpu")
    for rows in _call_ranges(cache):
        args, kwargs, target = cache.batch(rows)
        assert target.shape[0] == len(rows)
        with torch.no_grad():
            replay = block_output(block(*args, **kwargs))
        assert torch.equal(replay, target)


def test_resnet_block_stores_hidden_states_and_temb_per_sample(models):
    model = models["unet2d"]
    block = model.down_blocks[0].resnets[0]
    batches = _batches("unet2d")
    cache = capture_block_io(model, block, _runner(model, batches))
    assert [slot.kind for slot in cache.layout.args] == ["batched", "batched"]
    # the first resnet's input is conv_in(x): the cache holds what the block was really called with
    args, _, _ = cache.batch(range(0, 2))
    with torch.no_grad():
        assert torch.equal(args[0], model.conv_in(batches[0][0]))
    assert args[1].shape == (2, model.time_embedding.linear_2.out_features)


def test_dit_block_keywords(models):
    model = models["dit"]
    cache = capture_block_io(model, model.transformer_blocks[0], _runner(model, _batches("dit")))
    kwargs = dict(cache.layout.kwargs)
    assert kwargs["timestep"].kind == "batched" and kwargs["class_labels"].kind == "batched"
    assert kwargs["encoder_hidden_states"].kind == "const" and kwargs["encoder_hidden_states"].value is None
    _, call_kwargs, _ = cache.batch([5, 0])
    timesteps = torch.cat([t for _, t, _ in _batches("dit")])
    assert torch.equal(call_kwargs["timestep"], timesteps[[5, 0]])


def test_cross_attention_transformer_keeps_encoder_states_and_constants(models):
    model = models["unet2d_condition"]
    block = model.down_blocks[0].attentions[0]
    batches = _batches("unet2d_condition")
    cache = capture_block_io(model, block, _runner(model, batches))
    kwargs = dict(cache.layout.kwargs)
    assert kwargs["encoder_hidden_states"].kind == "batched"
    assert kwargs["return_dict"].kind == "const" and kwargs["return_dict"].value is False
    _, call_kwargs, _ = cache.batch(range(2, 5))
    assert torch.equal(call_kwargs["encoder_hidden_states"], batches[1][2]["encoder_hidden_states"])


def test_calibration_runner_feeds_a_calibration_set(models):
    model = models["unet2d"]
    batches = _batches("unet2d")
    calibration = CalibrationSet(
        samples=torch.cat([x for x, _, _ in batches]),
        timesteps=torch.cat([t for _, t, _ in batches]),
        step_indices=torch.zeros(sum(SIZES), dtype=torch.long),
        cond={"class_labels": torch.cat([c["class_labels"] for _, _, c in batches])},
        num_inference_steps=1,
    )
    block = model.down_blocks[0].resnets[0]
    cache = capture_block_io(model, block, calibration_runner(model, calibration, batch_size=4))
    assert cache.layout.call_sizes == (4, 2)
    reference = capture_block_io(model, block, _runner(model, batches))
    # other batch sizes: equal up to the kernels' batch-dependent rounding
    assert torch.allclose(cache.batch(range(6))[2], reference.batch(range(6))[2], atol=1e-5)
    quant_model = copy.deepcopy(model)
    with torch.no_grad():
        quant_model.conv_in.weight.mul_(1.01)
    pair = capture_paired_io(model, quant_model, "down_blocks.0.resnets.0", calibration, batch_size=4)
    quant_cache = capture_block_io(
        quant_model, quant_model.down_blocks[0].resnets[0], calibration_runner(quant_model, calibration, batch_size=4)
    )
    (fed, *_), _, target = pair.quantized_batch(range(6))
    assert torch.equal(fed, quant_cache.batch(range(6))[0][0]) and torch.equal(target, cache.batch(range(6))[2])


# --------------------------------------------------------------------------------------
# Early stop and clean-up
# --------------------------------------------------------------------------------------


def test_stop_after_block_skips_later_layers_and_leaves_no_hooks(models):
    model = models["unet2d"]
    block = model.down_blocks[0].resnets[0]
    calls = []
    counter = model.conv_out.register_forward_hook(lambda *_: calls.append(1))
    try:
        before = _hook_counts(model)
        outputs = []
        denoiser = Denoiser(model)

        def run():
            for x, t, cond in _batches("unet2d"):
                outputs.append(denoiser(x, t, cond))

        stopped = capture_block_io(model, block, run)
        assert calls == [] and outputs == [None, None, None]
        assert _hook_counts(model) == before and "forward" not in vars(model)
        full = capture_block_io(model, block, _runner(model, _batches("unet2d")), stop_after_block=False)
        assert len(calls) == len(SIZES)
        assert _hook_counts(model) == before
    finally:
        counter.remove()
    for key, tensor in stopped.tensors.items():
        assert torch.equal(tensor, full.tensors[key]), key
    assert model(*_batches("unet2d")[0][:2], **_batches("unet2d")[0][2]).sample.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("stop", [True, False])
def test_hooks_removed_when_run_batches_raises(models, stop):
    model = models["dit"]
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        capture_block_io(
            model, model.transformer_blocks[0], _runner(model, _batches("dit"), fail_after=1), stop_after_block=stop
        )
    assert _hook_counts(model) == before and "forward" not in vars(model)


def test_forward_wrapper_restores_an_existing_instance_forward(models):
    model = copy.deepcopy(models["unet2d"])
    original = model.forward
    model.forward = original  # an instance attribute, as accelerate's hooks set one
    capture_block_io(model, model.down_blocks[0].resnets[0], _runner(model, _batches("unet2d")))
    assert vars(model)["forward"] is original


def test_skipped_forward_placeholder():
    skipped = SkippedForward()
    assert skipped.sample is None and skipped[0] is None


def test_capture_errors(models):
    model = models["unet2d"]
    other = models["dit"]
    with pytest.raises(ModelError, match="not a submodule"):
        capture_block_io(model, other.transformer_blocks[0], _runner(model, _batches("unet2d")))
    with pytest.raises(CalibrationError, match="never ran"):
        capture_block_io(model, model.down_blocks[0].resnets[0], lambda: None)

    class Outer(nn.Module):  # holds the UNet, but run_batches calls the UNet directly
        def __init__(self):
            super().__init__()
            self.unet = model

    outer = Outer()
    with pytest.raises(ModelError, match="run_batches calls"):
        capture_block_io(outer, model.down_blocks[0].resnets[0], _runner(model, _batches("unet2d")))
    assert _hook_counts(outer) == _hook_counts(model) and "forward" not in vars(outer)


class _Toy(nn.Module):
    """A model whose block gets a varying non-tensor option / a varying shared tensor."""

    def __init__(self):
        super().__init__()
        self.block = _ToyBlock()

    def forward(self, x, scale, shared):
        return self.block(x, scale=scale, shared=shared)


class _ToyBlock(nn.Module):
    def forward(self, x, scale, shared):
        return x * scale + shared


def test_non_tensor_arguments_must_not_change():
    toy = _Toy()

    def run(scales, shareds):
        return lambda: [toy(torch.ones(2, 3), s, sh) for s, sh in zip(scales, shareds, strict=True)]

    cache = capture_block_io(toy, toy.block, run([2.0, 2.0], [torch.tensor(1.0)] * 2))
    assert dict(cache.layout.kwargs)["scale"].value == 2.0
    assert dict(cache.layout.kwargs)["shared"].kind == "shared"
    args, kwargs, target = cache.batch([3, 1])
    assert torch.equal(toy.block(*args, **kwargs), target)
    with pytest.raises(CalibrationError, match="changed between calls"):
        capture_block_io(toy, toy.block, run([2.0, 3.0], [torch.tensor(1.0)] * 2))
    with pytest.raises(CalibrationError, match="changed between"):
        capture_block_io(toy, toy.block, run([2.0, 2.0], [torch.tensor(1.0), torch.tensor(2.0)]))
    with pytest.raises(CalibrationError, match="inside a list"):
        capture_block_io(toy, toy.block, run([[torch.ones(1)]], [torch.tensor(1.0)]))
    assert _hook_counts(toy) == 0


# --------------------------------------------------------------------------------------
# Memory budget
# --------------------------------------------------------------------------------------


def test_tiny_budget_spills_to_host_with_same_contents(models):
    model = models["unet2d_condition"]
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    run = _runner(model, _batches("unet2d_condition"))
    whole = capture_block_io(model, block, run)
    spilled = capture_block_io(model, block, run, memory_budget_bytes=1)
    roomy = capture_block_io(model, block, run, memory_budget_bytes=whole.nbytes)
    assert whole.nbytes > 0 and spilled.nbytes == whole.nbytes
    assert spilled.spilled and not spilled.on_device
    assert roomy.on_device and not roomy.spilled
    assert all(tensor.device.type == "cpu" for tensor in spilled.tensors.values())
    indices = torch.tensor([4, 0, 5])
    a = whole.batch(indices)
    b = spilled.batch(indices)
    for x, y in zip(a[0], b[0], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    for name, value in a[1].items():
        assert value is b[1][name] if not isinstance(value, torch.Tensor) else torch.equal(value, b[1][name])
    assert torch.equal(a[2], b[2])


@pytest.mark.gpu
def test_spilled_cache_delivers_on_cuda(models):
    model = copy.deepcopy(models["unet2d"]).cuda()
    block = model.down_blocks[0].resnets[0]
    batches = [(x.cuda(), t.cuda(), {k: v.cuda() for k, v in c.items()}) for x, t, c in _batches("unet2d")]
    run = _runner(model, batches)
    on_gpu = capture_block_io(model, block, run)
    spilled = capture_block_io(model, block, run, memory_budget_bytes=1)
    assert on_gpu.on_device and all(t.device.type == "cuda" for t in on_gpu.tensors.values())
    assert spilled.spilled and all(t.device.type == "cpu" and t.is_pinned() for t in spilled.tensors.values())
    args, kwargs, target = spilled.batch([1, 4])
    assert target.device.type == "cuda" and all(a.device.type == "cuda" for a in args)
    assert torch.equal(target, on_gpu.batch([1, 4])[2])
    with torch.no_grad():
        assert torch.allclose(block(*args, **kwargs), target)


# --------------------------------------------------------------------------------------
# Batches, files, pairs
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_cache(models):
    model = models["unet2d"]
    return capture_block_io(model, model.down_blocks[0].resnets[0], _runner(model, _batches("unet2d")))


def test_sample_batches_are_deterministic_epochs(resnet_cache):
    def take(seed, n):
        g = torch.Generator().manual_seed(seed)
        return [b.tolist() for b in itertools.islice(resnet_cache.sample_batches(4, g), n)]

    assert take(1, 6) == take(1, 6)
    assert take(1, 6) != take(2, 6)
    batches = take(1, 6)
    assert [len(b) for b in batches] == [4, 2] * 3
    for epoch in range(3):
        assert sorted(batches[2 * epoch] + batches[2 * epoch + 1]) == list(range(6))
    one = list(resnet_cache.sample_batches(4, torch.Generator().manual_seed(1), epochs=1, drop_last=True))
    assert len(one) == 1 and one[0].tolist() == batches[0]
    with pytest.raises(ValueError):
        next(resnet_cache.sample_batches(0))
    with pytest.raises(IndexError):
        resnet_cache.batch([6])
    with pytest.raises(IndexError):
        resnet_cache.batch([-1])


def test_save_load_round_trip(resnet_cache, tmp_path):
    path = tmp_path / "cache.safetensors"
    save_cache(resnet_cache, path)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]
    loaded = load_cache(path)
    assert loaded.layout == resnet_cache.layout and loaded.nbytes == resnet_cache.nbytes
    assert loaded.tensors.keys() == resnet_cache.tensors.keys()
    for key, tensor in resnet_cache.tensors.items():
        assert torch.equal(loaded.tensors[key], tensor) and loaded.tensors[key].dtype == tensor.dtype
    spilled = load_cache(path, memory_budget_bytes=1)
    assert spilled.spilled and torch.equal(spilled.batch([2, 3])[2], resnet_cache.batch([2, 3])[2])


def test_round_trip_of_constants(models, tmp_path):
    model = models["unet2d_condition"]
    cache = capture_block_io(model, model.down_blocks[0].attentions[0], _runner(model, _batches("unet2d_condition")))
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors")
    assert loaded.layout == cache.layout


def test_unreadable_files_give_clear_errors(resnet_cache, tmp_path):
    with pytest.raises(CalibrationError, match="no block cache"):
        load_cache(tmp_path / "missing.safetensors")
    path = tmp_path / "cache.safetensors"
    save_cache(resnet_cache, path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="truncated.safetensors"):
        load_cache(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07not a safetensors file at all")
    with pytest.raises(CalibrationError, match="not a readable safetensors"):
        load_cache(tmp_path / "garbage.safetensors")
    calibration = CalibrationSet(  # a valid calibration set: a safetensors file of dmquant's, but no block cache
        samples=torch.zeros(1, 1, 1, 1),
        timesteps=torch.zeros(1),
        step_indices=torch.zeros(1, dtype=torch.long),
        cond={},
        num_inference_steps=1,
    )
    save_calibration(calibration, tmp_path / "calibration.safetensors")
    with pytest.raises(CalibrationError, match="not a dmquant block cache"):
        load_cache(tmp_path / "calibration.safetensors")


def test_paired_caches(models):
    fp_model = models["unet2d"]
    quant_model = copy.deepcopy(fp_model)
    with torch.no_grad():  # stands in for quantized earlier layers: the block's inputs differ
        quant_model.conv_in.weight.add_(0.01 * torch.randn_like(quant_model.conv_in.weight))
    path = "down_blocks.0.resnets.0"
    batches = _batches("unet2d")
    fp = capture_block_io(fp_model, fp_model.get_submodule(path), _runner(fp_model, batches))
    quant = capture_block_io(
        quant_model, quant_model.get_submodule(path), _runner(quant_model, batches), record_output=False
    )
    assert not quant.has_target and quant.nbytes < fp.nbytes
    pair = paired(fp, quant)
    assert len(pair) == sum(SIZES)
    quant_args, quant_kwargs, fp_args, fp_kwargs, target = pair.batch([0, 3])
    assert not torch.equal(quant_args[0], fp_args[0])
    assert torch.equal(quant_args[1], fp_args[1])  # temb does not depend on conv_in
    assert torch.equal(fp_args[0], fp.batch([0, 3])[0][0]) and torch.equal(target, fp.batch([0, 3])[2])
    assert next(pair.sample_batches(2)).tolist() == next(fp.sample_batches(2)).tolist()
    fed_args, fed_kwargs, fed_target = pair.quantized_batch([0, 3])  # what BRECQ feeds the quantized block
    assert all(torch.equal(a, b) for a, b in zip(fed_args, quant_args, strict=True) if isinstance(a, torch.Tensor))
    assert fed_kwargs.keys() == quant_kwargs.keys() and torch.equal(fed_target, target)

    with pytest.raises(CalibrationError, match="holds no output"):
        paired(quant, fp)
    fewer = capture_block_io(quant_model, quant_model.get_submodule(path), _runner(quant_model, batches[:2]))
    with pytest.raises(CalibrationError, match="samples"):
        paired(fp, fewer)
    regrouped = [
        (
            torch.cat([a[0] for a in batches[1:]]),
            torch.cat([a[1] for a in batches[1:]]),
            {"class_labels": torch.cat([a[2]["class_labels"] for a in batches[1:]])},
        ),
        batches[0],
    ]
    differently = capture_block_io(quant_model, quant_model.get_submodule(path), _runner(quant_model, regrouped))
    with pytest.raises(CalibrationError, match="differently sized calls"):
        paired(fp, differently)
    other_block = "up_blocks.1.resnets.0"  # same batching, other shapes
    other = capture_block_io(quant_model, quant_model.get_submodule(other_block), _runner(quant_model, batches))
    with pytest.raises(CalibrationError, match="different arguments"):
        paired(fp, other)
