"""bench/peers.py: the torchao / optimum-quanto adapters the quality benchmark compares against."""

from __future__ import annotations

import importlib.util
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from bench import peers
from bench.peers import PEERS, PeerUnavailable, apply_peer, cast_floating, count_layers
from dmquant.denoiser import Denoiser
from dmquant.zoo import tiny

BUILDERS = {
    "unet2d": tiny.tiny_unet2d,
    "unet2d_condition": tiny.tiny_unet2d_condition,
    "dit": tiny.tiny_dit,
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(model: torch.nn.Module, seed: int, device: torch.device | str = "cpu", size: int = 4):
    g = torch.Generator().manual_seed(seed)
    d = Denoiser(model)
    x = torch.randn(size, d.in_channels, d.sample_size, d.sample_size, generator=g)
    t = torch.randint(0, 1000, (size,), generator=g)
    if d.kind == "unet2d_condition":
        cond = {"encoder_hidden_states": torch.randn(size, 5, tiny.TINY_TEXT_DIM, generator=g)}
    else:
        cond = {"class_labels": torch.randint(0, tiny.TINY_NUM_CLASSES, (size,), generator=g)}
    return x.to(device), t.to(device), {key: value.to(device) for key, value in cond.items()}


def _calibrator(batches):
    def calibrate(model: torch.nn.Module) -> None:
        denoiser, dtype = Denoiser(model), peers.model_dtype(model)
        with torch.no_grad():
            for x, t, cond in batches:
                denoiser(x.to(dtype), t, cast_floating(cond, dtype))

    return calibrate


def _relative_error(model: torch.nn.Module, quantized: torch.nn.Module, dtype: torch.dtype, device="cpu") -> float:
    x, t, cond = _batch(model, seed=0, device=device)
    with torch.no_grad():
        reference = Denoiser(model)(x, t, cond).float()
        output = Denoiser(quantized)(x.to(dtype), t, cast_floating(cond, dtype)).float()
    return ((output - reference).norm() / reference.norm()).item()


def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    state = {key: value.clone() for key, value in model.state_dict().items()}
    types = {name: type(module) for name, module in model.named_modules()}
    return state, types


def _assert_unchanged(model: torch.nn.Module, snapshot: tuple[dict, dict]) -> None:
    state, types = snapshot
    assert {name: type(module) for name, module in model.named_modules()} == types
    current = model.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        assert type(current[key]) is torch.Tensor or isinstance(current[key], torch.nn.Parameter)
        assert current[key].dtype == value.dtype and torch.equal(current[key], value), key


def _assert_counts_add_up(result: peers.PeerResult, model: torch.nn.Module) -> None:
    total = count_layers(model)
    kinds = set(result.quantized) | set(result.skipped)
    assert {kind: result.quantized.get(kind, 0) + result.skipped.get(kind, 0) for kind in kinds} == total
    assert len(result.skipped_layers) == sum(result.skipped.values())


def test_specs_are_complete():
    assert set(PEERS) == {
        "torchao-int8-dynamic",
        "torchao-int4-weight-only",
        "torchao-fp8-dynamic",
        "quanto-w8a8",
        "quanto-w4a8",
    }
    for name, spec in PEERS.items():
        assert spec.name == name and spec.library in ("torchao", "optimum-quanto")
        assert spec.bits in ("W8A8", "W4A16", "W4A8") and spec.description
    assert PEERS["torchao-fp8-dynamic"].needs.min_capability == (8, 9)
    assert PEERS["torchao-int4-weight-only"].needs.compute_dtype == torch.bfloat16
    assert "CUDA sm >= 8.9" in str(PEERS["torchao-fp8-dynamic"].needs)


def test_helpers():
    cond = {"encoder_hidden_states": torch.ones(2, 3), "class_labels": torch.tensor([1, 2])}
    cast = cast_floating(cond, torch.bfloat16)
    assert cast["encoder_hidden_states"].dtype == torch.bfloat16 and cast["class_labels"].dtype == torch.int64
    Pair = namedtuple("Pair", "a b")
    assert cast_floating(Pair(torch.ones(1), 3), torch.float16).a.dtype == torch.float16
    assert count_layers(tiny.tiny_dit()) == {"Conv2d": 1, "Linear": 20}
    assert peers.model_dtype(tiny.tiny_dit().to(torch.bfloat16)) == torch.bfloat16
    assert set(peers.peer_versions()) == {"torchao", "optimum-quanto"}


def test_unknown_peer_and_missing_package(monkeypatch):
    with pytest.raises(KeyError, match="unknown peer"):
        apply_peer("bitsandbytes-nf4", tiny.tiny_dit())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a)
    )
    with pytest.raises(PeerUnavailable, match="needs the Python package 'torchao'.*pip install torchao"):
        apply_peer("torchao-int8-dynamic", tiny.tiny_dit())


@pytest.mark.parametrize("name", ["torchao-int4-weight-only", "torchao-fp8-dynamic"])
def test_cuda_peers_unavailable_on_cpu(name):
    pytest.importorskip("torchao")
    model = tiny.tiny_dit()
    snapshot = _snapshot(model)
    with pytest.raises(PeerUnavailable, match=f"{name} (needs a CUDA GPU|runs only on CUDA)"):
        apply_peer(name, model)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_quanto_w8a8_close_to_fp_and_counts(kind):
    pytest.importorskip("optimum.quanto")
    model = BUILDERS[kind]()
    snapshot = _snapshot(model)
    result = apply_peer("quanto-w8a8", model, _calibrator([_batch(model, seed) for seed in (1, 2)]))
    _assert_unchanged(model, snapshot)
    _assert_counts_add_up(result, model)
    # quanto swaps every Linear and Conv2d; convs quantize only their outputs, so their inputs stay float
    assert result.quantized == count_layers(model) and result.skipped == {}
    assert result.unquantized_inputs.get("Conv2d") == count_layers(model)["Conv2d"]
    assert "Linear" not in result.unquantized_inputs
    assert any("weight-only in effect" in note for note in result.notes)
    assert result.compute_dtype == "float32" and result.dtype == torch.float32
    assert result.model is not model
    assert _relative_error(model, result.model, result.dtype) < 0.1


def test_quanto_needs_a_calibration_that_runs():
    pytest.importorskip("optimum.quanto")
    model = tiny.tiny_dit()
    with pytest.raises(ValueError, match="calibrate"):
        apply_peer("quanto-w8a8", model)
    with pytest.raises(ValueError, match="ran no forward pass"):
        apply_peer("quanto-w8a8", model, calibrate=lambda quantized: None)


@pytest.mark.slow
def test_quanto_w4a8_on_dit():
    pytest.importorskip("optimum.quanto")
    if not _quanto_int4_extension_built():
        pytest.skip("quanto's int4 unpack extension is not built yet (its first use compiles it for minutes)")
    model = tiny.tiny_dit()
    result = apply_peer("quanto-w4a8", model, _calibrator([_batch(model, 1)]))
    _assert_counts_add_up(result, model)
    assert result.quantized == count_layers(model)
    assert any("int4 weight groups" in note for note in result.notes)
    assert _relative_error(model, result.model, result.dtype) < 0.3


def _quanto_int4_extension_built() -> bool:
    origin = Path(importlib.util.find_spec("optimum.quanto").origin).parent
    return (origin / "library" / "extensions" / "cpp" / "build" / "pytorch_version.txt").exists()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_torchao_int8_dynamic_quantizes_linears_only(kind):
    pytest.importorskip("torchao")
    model = BUILDERS[kind]()
    snapshot = _snapshot(model)
    result = apply_peer("torchao-int8-dynamic", model, calibrate=None)
    _assert_unchanged(model, snapshot)
    _assert_counts_add_up(result, model)
    layers = count_layers(model)
    assert result.quantized == {"Linear": layers["Linear"]}
    assert result.skipped == {"Conv2d": layers["Conv2d"]}
    assert any(note.startswith(f"Conv2d x{layers['Conv2d']} not quantized") for note in result.notes)
    assert all("convolutions" in reason for reason in result.skipped_layers.values())
    assert _relative_error(model, result.model, result.dtype) < 0.1


def test_torchao_filters_report_shape_skips():
    pytest.importorskip("torchao")
    linear, cuda = torch.nn.Linear(48, 40), torch.device("cuda")
    assert "not a multiple of 32" in peers._torchao_reason("torchao-int4-weight-only", linear, cuda)
    assert "multiples of 16" in peers._torchao_reason("torchao-fp8-dynamic", linear, cuda)
    assert peers._torchao_reason("torchao-int8-dynamic", linear, cuda) is None
    assert peers._int4_group_size(192) == 64 and peers._int4_group_size(256) == 128


def test_int8_filter_leaves_out_products_of_16_rows_or_fewer_on_cuda_only():
    linear, cuda, cpu = torch.nn.Linear(64, 64), torch.device("cuda"), torch.device("cpu")
    assert peers._torchao_reason("torchao-int8-dynamic", linear, cuda, rows=2) == (
        "torch._int_mm needs more than 16 rows on CUDA; this layer sees M=2"
    )
    assert "M=16" in peers._torchao_reason("torchao-int8-dynamic", linear, cuda, rows=16)
    assert peers._torchao_reason("torchao-int8-dynamic", linear, cuda, rows=17) is None
    assert peers._torchao_reason("torchao-int8-dynamic", linear, cpu, rows=2) is None  # the CPU kernel takes any M
    # fp8 _scaled_mm (row-wise scales) and int4 tinygemm have no row limit
    for name in ("torchao-fp8-dynamic", "torchao-int4-weight-only"):
        assert peers._torchao_reason(name, linear, cuda, rows=2) is None


class _TwiceLinear(torch.nn.Module):
    """One Linear applied to a sequence and to its mean token, and one never called."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shared(tokens) + self.shared(tokens.mean(dim=1, keepdim=True))


def test_linear_rows_are_batch_times_tokens_the_fewest_over_calls():
    model = _TwiceLinear()
    tokens = torch.randn(3, 5, 8)
    assert peers.linear_rows(model, lambda: model(tokens)) == {"shared": 3}  # 3 x 5 and 3 x 1 rows
    assert not model.shared._forward_pre_hooks  # the hooks are removed
    dit = tiny.tiny_dit()
    x, t, cond = _batch(dit, seed=0, size=2)
    rows = peers.linear_rows(dit, lambda: dit(x, t, **cond))
    tokens_per_image = (dit.config.sample_size // dit.config.patch_size) ** 2
    assert rows["proj_out_1"] == rows["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] == 2
    assert rows["transformer_blocks.0.attn1.to_q"] == 2 * tokens_per_image
    assert set(rows) == {name for name, module in dit.named_modules() if isinstance(module, torch.nn.Linear)}


def test_int8_peer_given_rows_excludes_the_small_products_of_a_cuda_model(monkeypatch):
    pytest.importorskip("torchao")
    model = tiny.tiny_dit()
    x, t, cond = _batch(model, seed=0, size=2)
    rows = peers.linear_rows(model, lambda: model(x, t, **cond))
    linears = count_layers(model)["Linear"]
    assert apply_peer("torchao-int8-dynamic", model, rows=rows).quantized == {"Linear": linears}  # on the CPU
    # the same model, taken for a CUDA one: the layers of M = 2 stay in full precision, with the reason
    monkeypatch.setattr(peers, "_device", lambda module: torch.device("cuda"))
    result = apply_peer("torchao-int8-dynamic", model, rows=rows)
    _assert_counts_add_up(result, model)
    small = {name for name, m in rows.items() if m <= 16}
    reason = "torch._int_mm needs more than 16 rows on CUDA; this layer sees M=2"
    assert small and {name for name, why in result.skipped_layers.items() if why == reason} == small
    assert result.quantized == {"Linear": linears - len(small)}
    assert f"Linear x{len(small)} not quantized: {reason}" in result.notes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", sorted(PEERS))
def test_every_peer_on_gpu(name):
    spec = PEERS[name]
    pytest.importorskip(spec.needs.package)
    model = tiny.tiny_unet2d().cuda()
    snapshot = _snapshot(model)
    try:
        result = apply_peer(name, model, _calibrator([_batch(model, seed, "cuda") for seed in (1, 2)]))
    except PeerUnavailable as why:
        pytest.skip(str(why))
    _assert_unchanged(model, snapshot)
    _assert_counts_add_up(result, model)
    assert sum(result.quantized.values()) > 0
    if spec.needs.compute_dtype is not None:
        assert result.dtype == spec.needs.compute_dtype == peers.model_dtype(result.model)
    bound = 0.3 if spec.bits.startswith("W4") else 0.1
    assert _relative_error(model, result.model, result.dtype, device="cuda") < bound


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        ("torchao-int4-weight-only", {"2"}),  # in_features 40: no group size (128, 64, 32) divides it
        ("torchao-fp8-dynamic", {"0", "2"}),  # 40 is not a multiple of 16, as _scaled_mm needs
    ],
)
def test_gpu_shape_skips_are_reported(name, skipped):
    pytest.importorskip("torchao")
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.GELU(), torch.nn.Linear(40, 64)).cuda()
    try:
        result = apply_peer(name, model)
    except PeerUnavailable as why:
        pytest.skip(str(why))
    assert set(result.skipped_layers) == skipped
    assert result.skipped == {"Linear": len(skipped)} and result.quantized.get("Linear", 0) == 2 - len(skipped)
    skip_notes = [note for note in result.notes if note.startswith("Linear x")]
    assert sum(int(note.split()[1][1:]) for note in skip_notes) == len(skipped)
    assert all(("group size" in note) or ("multiples of 16" in note) for note in skip_notes)
    x = torch.randn(4, 64, device="cuda")
    with torch.no_grad():
        reference = model(x)
        error = (result.model(x.to(result.dtype)).float() - reference).norm() / reference.norm()
    assert error < 0.1


class _PooledAndTokens(torch.nn.Module):
    """A Linear on a pooled vector (one row per image, like a timestep embedding) and one on tokens."""

    def __init__(self):
        super().__init__()
        self.pooled = torch.nn.Linear(64, 64)
        self.tokens = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) + self.pooled(x.mean(dim=1))[:, None]


@pytest.mark.gpu
@needs_cuda
def test_gpu_int8_peer_compiles_once_the_small_products_are_left_out():
    pytest.importorskip("torchao")
    model = _PooledAndTokens().cuda()
    x = torch.randn(2, 32, 64, device="cuda")
    rows = peers.linear_rows(model, lambda: model(x))
    assert rows == {"pooled": 2, "tokens": 64}
    result = apply_peer("torchao-int8-dynamic", model, rows=rows)
    assert set(result.skipped_layers) == {"pooled"} and result.quantized == {"Linear": 1}
    compiled = torch.compile(result.model, dynamic=False)
    with torch.no_grad():
        reference = model(x)
        error = (compiled(x) - reference).norm() / reference.norm()
    assert error < 0.1
