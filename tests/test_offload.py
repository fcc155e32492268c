"""Offloading (:mod:`dmquant.offload`): the weights wait in host memory and only the running block's are on the
execution device; quantizing with it (calibration recording included) gives the model quantizing without it
gives, bit for bit; a model elsewhere, and recipe parts it does not cover, are refused; on a GPU, reconstruction's
peak memory stays below the model's weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from reconstruction_settings import SMALL, reconstruction_config
from torch import nn

import dmquant.offload as offload_module
from dmquant import api
from dmquant.calib.record import CalibrationSet, record_for
from dmquant.cli import build_parser, main
from dmquant.config import load_recipe
from dmquant.core.quantizer import Quantizer
from dmquant.denoiser import Denoiser
from dmquant.errors import ConfigError
from dmquant.offload import Offload, moved_modules
from dmquant.recon.capture import capture_block_io


@pytest.fixture(scope="module")
def calibration(unet):
    return record_for(unet, SMALL, progress=False)


def _untouched(model: nn.Module) -> bool:
    """No hook, no forward attribute left behind, every tensor in host memory."""
    return not any(hasattr(m, "_hf_hook") or "forward" in vars(m) for m in model.modules()) and all(
        t.device.type == "cpu" for t in (*model.parameters(), *model.buffers())
    )


@pytest.mark.parametrize(
    "options",
    [
        {"activation_scales": "after"},
        {"activation_scales": "jointly", "drop_probability": 0.5, "inner_loss_weight": 0.8},
    ],
    ids=["q-diffusion", "qdrop-fbr"],
)
def test_offloaded_quantization_is_the_resident_one_bit_for_bit(unet, calibration, options):
    config = dataclasses.replace(reconstruction_config(**options), split_shortcut=True)
    resident = api.quantize(unet.denoiser, config, calibration, progress=False)
    offloaded = api.quantize(unet.denoiser, config, calibration, progress=False, offload="cpu")
    one, two = resident.state_dict(), offloaded.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    assert (
        api.info(offloaded).extra["reconstruction"][0]["final_mse"]
        == (api.info(resident).extra["reconstruction"][0]["final_mse"])
    )
    assert _untouched(offloaded) and _untouched(unet.denoiser)


def _recorded_offload(monkeypatch) -> tuple[Offload, dict[int, torch.device]]:
    """An offload whose moves are recorded: where each parameter (by id) was last moved. Its execution device is
    another name for host memory, so the moves can be told apart without a GPU."""
    offload = Offload(torch.device("cpu", 0))
    where: dict[int, torch.device] = {}
    move = offload_module._move

    def recorded_move(module: nn.Module, device: torch.device, whole: bool) -> None:
        move(module, device, whole)
        for owner in module.modules() if whole else (module,):
            where.update({id(p): device for p in owner.parameters(recurse=False)})

    monkeypatch.setattr(offload_module, "_move", recorded_move)
    return offload, where


def test_only_the_running_blocks_weights_are_on_the_device(unet, calibration, monkeypatch):
    """Every quantizer call checks where the parameters are: its own layer's on the execution device, and
    none outside the outermost moved block around it (the model's own tensors excepted); a capture stopped
    inside a block leaves nothing behind for the next call."""
    model = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(4, 8), calibration, progress=False)
    offload, where = _recorded_offload(monkeypatch)
    names = {id(m): name for name, m in model.named_modules()}
    whole = [names[id(moved.module)] for moved in moved_modules(model) if moved.whole]  # outermost first
    checked = []

    def check(quantizer: Quantizer, args: tuple) -> None:
        layer = quantizer.name.rsplit(".", 1)[0]  # the quantized layer or attention the quantizer hangs off
        block = next(name for name in whole if layer == name or layer.startswith(name + "."))
        on_device = {name for name, p in model.named_parameters() if where.get(id(p)) == offload.device}
        assert {name for name, _ in model.get_submodule(layer).named_parameters(prefix=layer)} <= on_device
        assert all(name.startswith(block + ".") or "." not in name for name in on_device), (layer, on_device)
        checked.append(layer)

    denoiser = Denoiser(model)
    x, t, cond, _ = next(calibration.batches(4))
    expected = denoiser(x, t, cond)
    handles = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, Quantizer)]
    try:
        with offload.running(model):
            stopped_in = model.get_submodule("mid_block.attentions.0.to_q")
            capture_block_io(model, stopped_in, lambda: denoiser(x, t, cond))
            assert any(where[id(p)] == offload.device for p in model.mid_block.attentions[0].parameters())
            assert torch.equal(denoiser(x, t, cond), expected)
    finally:
        for handle in handles:
            handle.remove()
    assert {"conv_in", "mid_block.attentions.0.to_q", "conv_out"} <= set(checked)
    assert all(device == offload.host for device in where.values()) and _untouched(model)


def test_a_part_of_a_block_the_model_calls_outside_the_block_moves_for_its_call(monkeypatch):
    """diffusers' DiT computes its conditioning with ``transformer_blocks[0].norm1.emb`` before it runs the blocks:
    that embedding's layers come to the device for the call although their block is not there."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                  sample_size=4, patch_size=2, num_embeds_ada_norm=10).eval()  # fmt: skip
    offload, where = _recorded_offload(monkeypatch)
    called = []
    linear = nn.functional.linear

    def linear_on_device(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        assert where.get(id(weight)) == offload.device, weight.shape  # checked inside the layer's forward
        called.append(id(weight))
        return linear(x, weight, bias)

    monkeypatch.setattr(nn.functional, "linear", linear_on_device)
    x, t, labels = torch.randn(2, 4, 4, 4), torch.tensor([3, 7]), torch.tensor([1, 2])
    with torch.no_grad(), offload.running(model):
        model(x, timestep=t, class_labels=labels)
    assert id(model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.weight) in called
    assert id(model.transformer_blocks[1].ff.net[2].weight) in called
    assert all(device == offload.host for device in where.values()) and _untouched(model)


def test_a_model_not_in_host_memory_is_refused(unet, calibration):
    meta = copy.deepcopy(unet.denoiser).to("meta")
    with pytest.raises(ConfigError, match="keeps the UNet2DModel's weights in host memory, but some are on meta"):
        api.quantize(meta, reconstruction_config(), calibration, progress=False, offload="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available; name an execution device"):
            api.quantize(unet.denoiser, reconstruction_config(), calibration, progress=False, offload=True)


def _dit_job(heads: int, head_dim: int, layers: int, rows: int) -> tuple[nn.Module, CalibrationSet]:
    """A class-conditional DiT on 8×8 latents in host memory and ``rows`` random calibration rows for it."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, num_layers=layers, sample_size=8,
        patch_size=2,
    ).eval()  # fmt: skip
    calibration = CalibrationSet(
        samples=torch.randn(rows, 4, 8, 8),
        timesteps=torch.randint(0, 1000, (rows,)),
        step_indices=torch.zeros(rows, dtype=torch.long),
        cond={"class_labels": torch.randint(0, 1000, (rows,))},
        num_inference_steps=1,
    )
    return model, calibration


@pytest.mark.gpu
def test_offloaded_reconstruction_holds_less_than_the_model_on_the_gpu():
    """A DiT of 12 blocks of width 1024 (about 0.9 GB of float32 weights) reconstructed with its weights in host
    memory: the GPU holds one block, its cached inputs and outputs, and the optimiser's state at a time."""
    rows = 8
    model, calibration = _dit_job(heads=16, head_dim=64, layers=12, rows=rows)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = reconstruction_config(num_samples=rows, iterations=4, activation_iterations=2, batch_size=4)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    quantized = api.quantize(model, config, calibration, inplace=True, progress=False, offload=True)
    peak = torch.cuda.max_memory_allocated() - before  # what this quantization added, not earlier tests' tensors
    left = torch.cuda.memory_allocated() - before
    mib = 2**20
    message = f"peak {peak / mib:.0f} MiB over {before / mib:.0f} MiB held before, weights {weights / mib:.0f} MiB"
    assert peak < weights, f"{message}, left {left / mib:.0f} MiB"
    assert _untouched(quantized)


def test_an_offloaded_quantization_leaves_no_model_for_the_garbage_collector():
    """After ``quantize(..., offload=...)`` returns, nothing of the job holds a model through a reference cycle: the
    FP copy that reconstruction compares against is freed when the job ends, not when the collector next runs (a
    recursive closure in the walk over the blocks kept it, and with it a model's worth of memory)."""
    import gc

    from diffusers import DiTTransformer2DModel

    rows = 4
    model, calibration = _dit_job(heads=2, head_dim=16, layers=2, rows=rows)
    config = reconstruction_config(num_samples=rows, iterations=2, activation_iterations=1, batch_size=2)
    gc.collect()
    gc.disable()
    try:
        quantized = api.quantize(model, config, calibration, inplace=True, progress=False, offload="cpu")
        others = [o for o in gc.get_objects() if isinstance(o, DiTTransformer2DModel) and o is not quantized]
    finally:
        gc.enable()
    assert not others, f"{len(others)} other DiT model(s) alive until the garbage collector runs"


def test_an_offloaded_job_records_its_calibration_block_by_block_too(unet):
    """``quantize`` of a DiffusionModel samples the calibration trajectories with the hooks on (the sampling loop on
    the host, the model's output returned there): the same calibration set and model as without offloading."""
    config = dataclasses.replace(
        reconstruction_config(num_samples=8, iterations=4, activation_iterations=2), calibration=SMALL
    )
    resident = api.quantize(unet, config, progress=False)
    offloaded = api.quantize(unet, config, progress=False, offload="cpu")
    one, two = resident.denoiser.state_dict(), offloaded.denoiser.state_dict()
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert _untouched(offloaded.denoiser) and _untouched(unet.denoiser)


def test_what_offloading_does_not_cover_is_refused(unet, tmp_path, capsys):
    with pytest.raises(ConfigError, match="uses correction .* which offloading does not cover yet"):
        api.quantize(unet, load_recipe("ptqd"), progress=False, offload="cpu")
    assert main(["quantize", "tiny-unet", "-o", str(tmp_path / "q"), "--offload", "-q"]) != 0
    assert "--offload moves the denoiser's blocks to --device: give a GPU" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_the_commands_offload_reaches_the_interpreter(tmp_path, monkeypatch):
    """``dmquant quantize --offload`` hands ``quantize`` the denoiser in host memory and --device to run blocks on."""
    seen = {}

    class Stop(Exception):
        pass

    def recorded(model, config, calibration=None, **kwargs):
        seen.update(kwargs, hosted=all(t.device.type == "cpu" for t in model.denoiser.parameters()))
        raise Stop

    monkeypatch.setattr(api, "quantize", recorded)  # the command imports quantize from dmquant.api when it runs
    args = build_parser().parse_args(
        ["quantize", "tiny-unet", "-o", str(tmp_path / "q"), "--offload", "--device", "cuda:0"]
    )
    with pytest.raises(Stop):  # the command itself: main() first checks that the device exists
        args.run(args)
    assert seen["offload"] == "cuda:0" and seen["hosted"]
