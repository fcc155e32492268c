"""quantize / save / load, and every way bad input is refused with a clear error."""

import dataclasses
import json
import os
import re
import stat

import pytest
import torch
from torch import nn

import dmquant.checkpoint as checkpoint_module
from dmquant import api
from dmquant.calib.record import CalibrationSet
from dmquant.checkpoint import MANIFEST_FILE, TENSORS_FILE
from dmquant.config import load_recipe
from dmquant.core.quantizer import set_step
from dmquant.denoiser import Denoiser
from dmquant.errors import CalibrationError, CheckpointError, ConfigError, ModelError, OutputError
from dmquant.zoo.tiny import tiny_unet2d


def _outputs(model, calibration):
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        return Denoiser(model)(x, t, cond)


@pytest.fixture(scope="module")
def quantized(unet, calibration):
    config = load_recipe("minmax").with_bits(4, 8)
    config = dataclasses.replace(config, per_step_activations=True)
    return api.quantize(unet.denoiser, config, calibration, progress=False)


@pytest.mark.parametrize("bits", [4, 3, "fp8_e4m3", "fp4_e2m1", 16])
def test_save_load_is_bit_identical(unet, calibration, tmp_path, bits):
    model = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(bits, 8), calibration, progress=False)
    api.save(model, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    assert torch.equal(_outputs(loaded, calibration), _outputs(model, calibration))
    assert api.info(loaded).report.rows() == api.info(model).report.rows()


def test_per_step_model_round_trips_and_selects_steps(quantized, calibration, tmp_path):
    assert api.info(quantized).num_steps == calibration.num_inference_steps
    assert len(api.sampling_hooks(quantized)) == 1
    api.save(quantized, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    for step in range(calibration.num_inference_steps):
        for model in (quantized, loaded):
            set_step(model, step)
        assert torch.equal(_outputs(loaded, calibration), _outputs(quantized, calibration))


def test_packed_codes_make_low_bit_checkpoints_small(unet, calibration, tmp_path):
    sizes = {}
    for bits in (8, 4, 2):
        model = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(bits, 8), calibration, progress=False)
        api.save(model, tmp_path / str(bits))
        sizes[bits] = (tmp_path / str(bits) / TENSORS_FILE).stat().st_size
    fp_bytes = sum(p.numel() * 4 for p in unet.denoiser.parameters())
    assert sizes[2] < sizes[4] < sizes[8] < fp_bytes / 3


def test_quantize_leaves_the_fp_model_alone(unet, calibration):
    before = _outputs(unet.denoiser, calibration)
    api.quantize(unet.denoiser, "minmax", calibration, progress=False)
    assert all(
        type(m) in (nn.Conv2d, nn.Linear) for m in unet.denoiser.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert torch.equal(_outputs(unet.denoiser, calibration), before)


def test_existing_directory_is_refused_unless_overwrite(quantized, tmp_path):
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        api.save(quantized, target)
    with pytest.raises(OutputError, match="dmquant did not write"):
        api.save(quantized, target, overwrite=True)  # overwrite replaces checkpoints, nothing else
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    (target / "keep.txt").unlink()
    api.save(quantized, target, overwrite=True)  # an empty directory may be replaced
    stamp = (target / MANIFEST_FILE).stat().st_mtime_ns
    api.save(quantized, target, overwrite=True)
    assert (target / MANIFEST_FILE).stat().st_mtime_ns >= stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging or retired directories left


def test_overwrite_refuses_a_checkpoint_directory_that_also_holds_other_files(quantized, tmp_path):
    target = api.save(quantized, tmp_path / "q")
    (target / "notes.txt").write_text("mine")
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    with pytest.raises(OutputError, match="dmquant did not write"):
        api.save(quantized, target, overwrite=True)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before


def test_a_diffusers_checkpoint_carries_its_config_json_and_overwrite_replaces_it(quantized, tmp_path):
    target = api.save(quantized, tmp_path / "q")
    assert sorted(path.name for path in target.iterdir()) == ["config.json", MANIFEST_FILE, TENSORS_FILE]
    api.save(quantized, target, overwrite=True)  # config.json is a checkpoint file: the directory is dmquant's
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q"]
    with pytest.raises(ValueError, match="not files a checkpoint holds"):  # extra files only of the known kinds
        checkpoint_module.write_checkpoint(tmp_path / "other", {}, {}, files={"notes.txt": "mine"})
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_gets_the_permissions_of_the_umask(quantized, tmp_path):
    previous = os.umask(0o022)
    try:
        target = api.save(quantized, tmp_path / "q")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(path.stat().st_mode) for path in target.iterdir()} == {0o644}


def test_leftovers_of_an_interrupted_save_are_cleaned_by_the_next_load_with_a_message(quantized, tmp_path, caplog):
    target = api.save(quantized, tmp_path / "q")
    partial = tmp_path / ".q.tmp-killed"
    partial.mkdir()
    (partial / TENSORS_FILE).write_bytes(b"partial")
    api.load(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q"]
    assert "removed .q.tmp-killed, left by an interrupted save" in caplog.text


def test_interrupted_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    def fail_midway(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        api.save(quantized, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def saved(quantized, tmp_path):
    return api.save(quantized, tmp_path / "q")


def test_truncated_checkpoint_is_refused(saved):
    tensors = saved / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        api.load(saved)


def test_tampered_checkpoint_is_refused(saved):
    tensors = saved / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-10] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        api.load(saved)


def test_checkpoint_for_another_architecture_is_refused(saved):
    other = tiny_unet2d(class_conditional=False)
    with pytest.raises(CheckpointError, match="another UNet2DModel configuration"):
        api.load(saved, model=other)
    with pytest.raises(CheckpointError, match="is for a UNet2DModel"):
        api.load(saved, model=nn.Linear(2, 2))
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["base"]["config"]["block_out_channels"] = [32, 32]
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not fit"):
        api.load(saved)


def test_missing_or_foreign_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a dmquant checkpoint"):
        api.load(tmp_path)


def test_empty_calibration_set_is_refused(unet, calibration):
    empty = CalibrationSet(
        samples=calibration.samples[:0],
        timesteps=calibration.timesteps[:0],
        step_indices=calibration.step_indices[:0],
        cond={k: v[:0] for k, v in calibration.cond.items()},
        num_inference_steps=calibration.num_inference_steps,
    )
    with pytest.raises(CalibrationError, match="empty"):
        api.quantize(unet.denoiser, "minmax", empty, progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("samples", lambda c: c.samples[:, :, 0], "samples: expected a float (N, C, H, W) tensor"),
        ("samples", lambda c: c.samples.to(torch.int64), "samples: expected a float"),
        ("samples", lambda c: c.samples.tolist(), "samples: expected a tensor with a row per sample, got a list"),
        ("samples", lambda c: c.samples[:, :1], "samples: 1 channels, the model takes 3"),
        ("samples", lambda c: c.samples[:, :, :8, :8], "samples: (8, 8) pixels, the model takes"),
        ("timesteps", lambda c: c.timesteps[:, None], "timesteps: expected a real (N,) tensor"),
        ("step_indices", lambda c: c.step_indices.float(), "step_indices: expected an integer (N,) tensor"),
        ("step_indices", lambda c: c.step_indices + 100, "step_indices: must lie in [0, 4)"),
        ("cond", lambda c: {k: 3 for k in c.cond}, "cond.class_labels: expected a tensor"),
        ("cond", lambda c: "labels", "cond: expected a mapping"),
        ("num_inference_steps", lambda c: "4", "num_inference_steps: expected an integer"),
    ],
)
def test_calibration_data_of_the_wrong_shape_dtype_or_rank_names_the_tensor(unet, calibration, field, value, message):
    fields = {name: getattr(calibration, name) for name in ("samples", "timesteps", "step_indices", "cond")}
    fields["num_inference_steps"] = calibration.num_inference_steps
    fields[field] = value(calibration)
    with pytest.raises(CalibrationError, match=re.escape(message)):
        api.quantize(unet.denoiser, "minmax", CalibrationSet(**fields), progress=False)


def test_a_packed_token_denoiser_takes_token_calibration_data_and_nothing_else():
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=[2, 2, 4],
    )  # fmt: skip
    rows, tokens = 2, 4
    fields = {
        "timesteps": torch.ones(rows),
        "step_indices": torch.zeros(rows, dtype=torch.long),
        "cond": {"encoder_hidden_states": torch.randn(rows, 3, 16), "pooled_projections": torch.randn(rows, 8)},
        "num_inference_steps": 1,
    }
    packed = CalibrationSet(samples=torch.randn(rows, tokens, 8), **fields)
    packed.check_fits(Denoiser(flux))  # (N, L, C) with C the model's in_channels
    with pytest.raises(CalibrationError, match=re.escape("samples: expected a float (N, L, C) tensor of tokens")):
        CalibrationSet(samples=torch.randn(rows, 8, 2, 2), **fields).check_fits(Denoiser(flux))
    with pytest.raises(CalibrationError, match="4 channels per token, the model takes 8"):
        CalibrationSet(samples=torch.randn(rows, tokens, 4), **fields).check_fits(Denoiser(flux))
    with pytest.raises(CalibrationError, match=re.escape("samples: expected a float (N, C, H, W) tensor")):
        packed.check_fits(Denoiser(tiny_unet2d()))  # tokens are no input of a UNet


def test_a_module_of_its_own_that_states_no_layout_takes_the_samples_it_is_given():
    class TokenBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, t):
            return self.proj(x)

    fields = {"timesteps": torch.ones(2), "step_indices": torch.zeros(2, dtype=torch.long), "cond": {}}
    fields["num_inference_steps"] = 1
    tokens = CalibrationSet(samples=torch.randn(2, 5, 8), **fields)
    tokens.check_fits(Denoiser(TokenBlock()))
    quantized = api.quantize(TokenBlock(), "minmax", tokens, progress=False)
    assert quantized(tokens.samples, tokens.timesteps).shape == (2, 5, 8)
    with pytest.raises(CalibrationError, match=re.escape("samples: expected a float (N, C, H, W) tensor")):
        tokens.check_fits(Denoiser(tiny_unet2d()))  # a model that states its layout still has it checked


@pytest.mark.parametrize(
    ("granularity", "message"),
    [("channel:9", "channel axis 9 is out of range"), ("group:7", "group_size 7 does not divide")],
)
def test_a_granularity_that_does_not_fit_a_layer_is_a_config_error(unet, calibration, granularity, message):
    config = load_recipe("minmax")
    config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, granularity=granularity))
    with pytest.raises(ConfigError, match=f"granularity: .* does not fit conv_in.weight_quantizer .*{message}"):
        api.quantize(unet.denoiser, config, calibration, progress=False)


def test_non_finite_calibration_activation_names_layer_and_step(unet, calibration):
    poisoned = CalibrationSet(
        samples=calibration.samples.clone(),
        timesteps=calibration.timesteps,
        step_indices=calibration.step_indices,
        cond=calibration.cond,
        num_inference_steps=calibration.num_inference_steps,
    )
    last_step = int(calibration.step_indices.max())
    poisoned.samples[calibration.step_indices == last_step] = float("inf")
    with pytest.raises(CalibrationError, match=rf"conv_in\.input_quantizer at sampling step {last_step}"):
        api.quantize(unet.denoiser, "minmax", poisoned, progress=False)


def test_model_with_nothing_to_quantize_is_refused(calibration):
    class NoLayers(nn.Module):
        def forward(self, x, t):
            return torch.relu(x)

    with pytest.raises(ModelError, match="NoLayers has no Linear, Conv2d or attention layer"):
        api.quantize(NoLayers(), "minmax", calibration, progress=False)


def test_generic_module_quantizes_saves_and_loads_with_model_argument(calibration, tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.proj = nn.Linear(16, 16)
            self.out = nn.Conv2d(8, 3, 1)

        def forward(self, x, t):
            return self.out(torch.relu(self.proj(self.conv(x))))

    torch.manual_seed(0)
    data = CalibrationSet(
        samples=calibration.samples,
        timesteps=calibration.timesteps,
        step_indices=calibration.step_indices,
        cond={},
        num_inference_steps=calibration.num_inference_steps,
    )
    model = api.quantize(Tiny(), load_recipe("minmax").with_bits(4, 8), data, progress=False)
    api.save(model, tmp_path / "q")
    with pytest.raises(CheckpointError, match="pass an instance of it"):
        api.load(tmp_path / "q")
    loaded = api.load(tmp_path / "q", model=Tiny())
    x = calibration.samples[:2]
    assert torch.equal(loaded(x, None), model(x, None))


def test_info_of_an_fp_model_is_an_error(unet):
    with pytest.raises(ModelError, match="not quantized by dmquant"):
        api.info(unet.denoiser)
