"""Whole-model reconstruction: passes, what it buys, determinism, resuming a killed run, the recipes."""

import dataclasses

import pytest
import torch
from reconstruction_settings import FAST, SMALL, reconstruction_config

import dmquant.recon.model as recon_model
from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import ReconstructionConfig, load_recipe
from dmquant.core.layers import activation_quantizers
from dmquant.denoiser import Denoiser
from dmquant.errors import CalibrationError, ConfigError
from dmquant.recon.model import plan_passes
from dmquant.recon.state import remove_state


@pytest.fixture(scope="module")
def calibration(unet):
    return record_for(unet, SMALL, progress=False)


def _quantize(unet, calibration, state_dir=None, **reconstruction):
    return api.quantize(
        unet.denoiser, reconstruction_config(**reconstruction), calibration, progress=False, state_dir=state_dir
    )


def _error(model, unet, calibration):
    x, t, cond, _ = next(calibration.batches(len(calibration)))
    with torch.no_grad():
        return float((Denoiser(model)(x, t, cond) - Denoiser(unet.denoiser)(x, t, cond)).pow(2).mean())


def _same_state(a, b):
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_passes_follow_the_activation_scale_mode():
    after = plan_passes(FAST)
    assert [(p.name, p.learn_rounding, p.learn_activation_scales, p.activations_quantized) for p in after] == [
        ("weights", True, False, False),
        ("activations", False, True, True),
    ]
    assert after[1].recalibrate_first and after[1].iterations == FAST.activation_iterations
    assert [p.name for p in plan_passes(dataclasses.replace(FAST, activation_iterations=0))] == ["weights"]
    (joint,) = plan_passes(dataclasses.replace(FAST, activation_scales="jointly"))
    assert joint.learn_rounding and joint.learn_activation_scales and joint.activations_quantized
    (fixed,) = plan_passes(dataclasses.replace(FAST, activation_scales="fixed"))
    assert fixed.learn_rounding and not fixed.learn_activation_scales and fixed.activations_quantized


@pytest.mark.parametrize(
    "options",
    [{"activation_scales": "after"}, {"activation_scales": "jointly"}, {"inner_loss_weight": 0.8}],
    ids=["q-diffusion", "qdrop-joint", "fbr"],
)
def test_reconstruction_lowers_the_output_error_of_round_to_nearest(unet, calibration, options):
    rtn = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(4, 8), calibration, progress=False)
    reconstructed = _quantize(unet, calibration, iterations=60, **options)
    mode = options.get("activation_scales")
    assert _error(reconstructed, unet, calibration) < 0.9 * _error(rtn, unet, calibration)
    records = api.info(reconstructed).extra["reconstruction"]
    units = {r["unit"] for r in records}
    assert {"conv_in", "conv_out", "mid_block.attentions.0", "up_blocks.0.resnets.0"} <= units
    weight_records = [r for r in records if r["changed_fraction"] is not None]
    assert any(r["changed_fraction"] > 0 for r in weight_records)
    assert all(r["changed_fraction"] < 0.5 for r in weight_records)
    if mode == "jointly":
        assert all(r["learned_scales"] >= 1 for r in records)


def test_learned_step_sizes_are_kept_as_buffers_and_saved(unet, calibration, tmp_path):
    model = _quantize(unet, calibration, activation_scales="jointly")
    calibrated = api.quantize(unet.denoiser, reconstruction_config(enabled=False), calibration, progress=False)
    moved = [
        not torch.equal(a.scale, b.scale)
        for a, b in zip(activation_quantizers(model), activation_quantizers(calibrated), strict=True)
    ]
    assert any(moved)
    assert not any(isinstance(q.scale, torch.nn.Parameter) for q in activation_quantizers(model))
    api.save(model, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    x, t, cond, _ = next(calibration.batches(4))
    with torch.no_grad():
        assert torch.equal(Denoiser(loaded)(x, t, cond), Denoiser(model)(x, t, cond))


def test_reconstruction_is_deterministic_for_a_seed(unet, calibration):
    first = _quantize(unet, calibration, drop_probability=0.5, activation_scales="jointly")
    second = _quantize(unet, calibration, drop_probability=0.5, activation_scales="jointly")
    other = _quantize(unet, calibration, drop_probability=0.5, activation_scales="jointly", seed=1)
    assert _same_state(first, second)
    assert not _same_state(first, other)


def test_a_killed_run_resumes_where_it_stopped_and_ends_identical(unet, calibration, tmp_path, monkeypatch):
    uninterrupted = _quantize(unet, calibration)
    reconstruct = recon_model.reconstruct
    calls = []

    def dies_after_five_units(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(kwargs["desc"])
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(recon_model, "reconstruct", dies_after_five_units)
    with pytest.raises(KeyboardInterrupt):
        _quantize(unet, calibration, state_dir=tmp_path)
    monkeypatch.setattr(recon_model, "reconstruct", reconstruct)
    done_before = list(calls)

    redone = []

    def counts(*args, **kwargs):
        redone.append(kwargs["desc"])
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(recon_model, "reconstruct", counts)
    resumed = _quantize(unet, calibration, state_dir=tmp_path)
    total = len(api.info(uninterrupted).extra["reconstruction"])
    assert len(done_before) == 5 and len(redone) == total - 5
    assert _same_state(resumed, uninterrupted)

    def without_timing(model):
        records = api.info(model).extra["reconstruction"]
        return [{k: v for k, v in r.items() if k not in ("seconds", "restored")} for r in records]

    assert without_timing(resumed) == without_timing(uninterrupted)
    restored = [r["restored"] for r in api.info(resumed).extra["reconstruction"]]
    assert restored == [True] * 5 + [False] * (total - 5)  # what an earlier run spent stays counted apart


def test_a_state_directory_of_another_run_is_refused(unet, calibration, tmp_path):
    _quantize(unet, calibration, state_dir=tmp_path, activation_iterations=0)
    with pytest.raises(CalibrationError, match="another reconstruction"):
        _quantize(unet, calibration, state_dir=tmp_path, iterations=13, activation_iterations=0)


def test_a_damaged_unit_is_refused_by_its_checksum_not_restored(unet, calibration, tmp_path):
    _quantize(unet, calibration, state_dir=tmp_path, activation_iterations=0)
    unit = sorted(tmp_path.glob("*.safetensors"))[0]
    data = bytearray(unit.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in a tensor: still a readable safetensors file
    unit.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match="checksum mismatch"):
        _quantize(unet, calibration, state_dir=tmp_path, activation_iterations=0)


def test_a_directory_that_is_not_dmquant_progress_is_neither_used_nor_removed(unet, calibration, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CalibrationError, match="not the reconstruction progress"):
        _quantize(unet, calibration, state_dir=tmp_path, activation_iterations=0)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(CalibrationError, match="not the reconstruction progress"):
        remove_state(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_removing_the_progress_removes_only_what_it_wrote(unet, calibration, tmp_path):
    state = tmp_path / "state"
    _quantize(unet, calibration, state_dir=state, activation_iterations=0)
    written = sorted(p.name for p in state.iterdir())
    assert "progress.json" in written and len(written) > 2
    (state / "notes.txt").write_text("mine")
    remove_state(state)
    assert [p.name for p in state.iterdir()] == ["notes.txt"]
    (state / "notes.txt").unlink()
    _quantize(unet, calibration, state_dir=state, activation_iterations=0)
    remove_state(state)
    assert not state.exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("activation_scales", "later", "activation_scales"),
        ("drop_probability", 1.0, "drop_probability"),
        ("iterations", 0, "iterations"),
        ("beta_end", 30.0, "beta_end"),
    ],
)
def test_bad_reconstruction_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ReconstructionConfig(**{field: value})


def test_reconstruction_with_per_step_ranges_is_refused():
    with pytest.raises(ConfigError, match="per_step_activations"):
        dataclasses.replace(reconstruction_config(), per_step_activations=True)


@pytest.mark.parametrize("name", ["q-diffusion", "ptq4dm"])
def test_the_paper_recipes_load_and_run(unet, name):
    config = load_recipe(name).with_bits(4, 8)
    assert config.reconstruction.enabled and config.split_shortcut
    small = dataclasses.replace(
        config,
        calibration=dataclasses.replace(config.calibration, num_inference_steps=4, num_trajectories=4, batch_size=8),
        reconstruction=dataclasses.replace(
            config.reconstruction, num_samples=16, iterations=4, activation_iterations=2
        ),
    )
    options = {k: v for k, v in small.calibration.strategy_options.items() if k != "count"}
    small = dataclasses.replace(small, calibration=dataclasses.replace(small.calibration, strategy_options=options))
    calibration = record_for(unet, small.calibration, progress=False)
    model = api.quantize(unet.denoiser, small, calibration, progress=False)
    passes = {r["pass_name"] for r in api.info(model).extra["reconstruction"]}
    assert passes == ({"weights", "activations"} if name == "q-diffusion" else {"joint"})
