"""Diffusers pipelines with a quantized denoiser: quantized in one call, saved and loaded whole, per-step
methods applied inside ``pipe(...)``, and what would silently lose the quantization refused."""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import inspect
import json
import os

import pytest
import torch
from diffusers import DDIMScheduler

import dmquant
from dmquant import api, atomic, pipelines
from dmquant.cli import main
from dmquant.config import QuantConfig, load_recipe
from dmquant.errors import ConfigError, ModelError, OutputError
from dmquant.jobs import open_model
from dmquant.models import from_pipeline, load_model
from dmquant.sampling import sample
from dmquant.zoo.tiny import tiny_pipeline

PROMPTS = ["a red capital q on a blue background", "a green small a on a white background"]
STEPS = 3


def _per_step_recipe() -> QuantConfig:
    """PTQD's corrections and a W8A4-early / A8-late schedule on min-max ranges, small enough for a test."""
    recipe = load_recipe("minmax").with_bits(8, 4).to_dict()
    recipe["name"] = "ptqd-mixed-minmax"
    recipe["calibration"] |= {"num_inference_steps": STEPS, "num_trajectories": 2, "batch_size": 2}
    recipe["correction"] |= {"enabled": True, "num_samples": 2, "num_inference_steps": STEPS, "batch_size": 2}
    recipe["step_precision"] |= {"enabled": True, "num_inference_steps": STEPS, "late_bits": 8, "switch_step": 1}
    return QuantConfig.from_dict(recipe)


def _latents(pipe, **options):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS[:1], num_inference_steps=STEPS, generator=generator, output_type="latent", **options).images


@pytest.fixture(scope="module")
def quantized_sd():
    pipe = tiny_pipeline("sd")
    return dmquant.quantize_pipeline(pipe, _per_step_recipe(), prompts=PROMPTS, progress=False)


@pytest.mark.parametrize("eta", [0.0, 1.0])  # at eta 1 PTQD also takes the residual's variance out of the noise
def test_per_step_recipe_inside_pipe_matches_dmquants_own_loop(quantized_sd, eta):
    pipe = quantized_sd
    assert isinstance(pipe.scheduler, pipelines.HookedScheduler)
    model = from_pipeline(pipe, "tiny-sd")
    conditioning = model.make_conditioning(1, prompts=PROMPTS[:1], guidance_scale=7.5)
    own = sample(
        pipe.unet,
        pipe.scheduler.scheduler,
        batch_size=1,
        num_inference_steps=STEPS,
        conditioning=conditioning,
        generator=torch.Generator().manual_seed(0),
        eta=eta,
        hooks=dmquant.sampling_hooks(pipe.unet),
        progress=False,
    )
    assert torch.equal(_latents(pipe, eta=eta), own)
    unhooked = pipelines.hook_pipeline(tiny_pipeline("sd"))  # an FP pipeline needs no hooks
    assert not isinstance(unhooked.scheduler, pipelines.HookedScheduler)


def test_saved_pipeline_loads_and_generates_the_same(quantized_sd, tmp_path):
    target = dmquant.save_pipeline(quantized_sd, tmp_path / "pipe")
    assert (target / "unet" / "config.json").exists() and (target / "model_index.json").exists()
    loaded = dmquant.load_pipeline(target)
    assert torch.equal(_latents(loaded), _latents(quantized_sd))
    with pytest.raises(OutputError, match="exists"):
        dmquant.save_pipeline(quantized_sd, target)
    dmquant.save_pipeline(quantized_sd, target, overwrite=True)
    bf16 = dmquant.load_pipeline(target, torch_dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and torch.isfinite(_latents(bf16).float()).all()


def test_overwrite_replaces_what_save_pipeline_wrote_and_nothing_else(quantized_sd, tmp_path):
    target = dmquant.save_pipeline(quantized_sd, tmp_path / "pipe")
    recorded = json.loads((target / pipelines.PIPELINE_RECORD).read_text())
    # what diffusers' save_pretrained wrote is recorded as written by dmquant, and the checkpoint too
    written = sorted(path.relative_to(target).as_posix() for path in target.rglob("*") if path.is_file())
    assert recorded["writing"] is None and sorted([*recorded["files"], pipelines.PIPELINE_RECORD]) == written
    assert {"unet/dmquant.json", "unet/config.json", "scheduler/scheduler_config.json", "model_index.json"} <= set(
        recorded["files"]
    )
    dmquant.save_pipeline(quantized_sd, target, overwrite=True)  # a second save replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no staging directory or lock left

    (target / "vae" / "notes.txt").write_text("mine")  # a file dmquant did not write, however deep
    with pytest.raises(OutputError, match="dmquant did not write"):
        dmquant.save_pipeline(quantized_sd, target, overwrite=True)
    assert (target / "vae" / "notes.txt").read_text() == "mine"
    (target / "vae" / "notes.txt").unlink()
    (target / pipelines.PIPELINE_RECORD).unlink()  # without the record nothing in it is known as dmquant's
    with pytest.raises(OutputError, match="dmquant did not write"):
        dmquant.save_pipeline(quantized_sd, target, overwrite=True)
    plain = tmp_path / "plain"
    tiny_pipeline("sd").save_pretrained(plain)  # a pipeline directory dmquant did not write
    with pytest.raises(OutputError, match="dmquant did not write"):
        dmquant.save_pipeline(quantized_sd, plain, overwrite=True)


def test_a_pipeline_save_killed_midway_is_cleaned_up_by_the_next_one(quantized_sd, tmp_path, monkeypatch):
    target = tmp_path / "pipe"
    save_pretrained = type(quantized_sd.vae).save_pretrained

    def killed(self, directory, *args, **kwargs):
        save_pretrained(self, directory, *args, **kwargs)
        raise KeyboardInterrupt  # as if killed while diffusers wrote a component

    monkeypatch.setattr(type(quantized_sd.vae), "save_pretrained", killed)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *args, **kwargs: None)  # a kill cleans nothing
    with pytest.raises(KeyboardInterrupt):
        dmquant.save_pipeline(quantized_sd, target)
    monkeypatch.undo()
    (staging,) = atomic.leftovers(target)  # the staging directory a kill leaves behind
    assert json.loads((staging / pipelines.PIPELINE_RECORD).read_text())["writing"] == "vae"
    assert any((staging / "vae").iterdir())
    dmquant.save_pipeline(quantized_sd, target)  # recognised as dmquant's from its record, and removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    assert torch.equal(_latents(dmquant.load_pipeline(target)), _latents(quantized_sd))


def test_a_failed_save_leaves_nothing_behind(quantized_sd, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipelines, "save", broken)
    with pytest.raises(OSError):
        dmquant.save_pipeline(quantized_sd, tmp_path / "pipe")
    assert list(tmp_path.iterdir()) == []


def test_what_would_drop_per_step_parts_or_quantization_is_refused(quantized_sd, tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.unet = quantized_sd.unet  # set by hand, not hooked: refused, not run at step 0
    with pytest.raises(ModelError, match="hook_pipeline"):
        _latents(pipe)
    assert torch.equal(_latents(dmquant.hook_pipeline(pipe)), _latents(quantized_sd))
    with pytest.raises(ModelError, match="save_pipeline"):
        pipe.save_pretrained(tmp_path / "plain")


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_pipelines_dmquant_does_not_sample_calibrate_by_running_themselves(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    recipe = load_recipe("minmax").to_dict()
    recipe["calibration"] |= {"num_inference_steps": STEPS, "num_trajectories": 2, "batch_size": 2}
    dmquant.quantize_pipeline(pipe, QuantConfig.from_dict(recipe), prompts=PROMPTS, progress=False)
    denoiser = getattr(pipe, pipelines.denoiser_component(pipe))
    assert api.info(denoiser).report.num_quantized > 0
    dmquant.save_pipeline(pipe, tmp_path / kind)
    loaded = dmquant.load_pipeline(tmp_path / kind)
    assert torch.equal(_latents(loaded), _latents(pipe))
    with pytest.raises(ConfigError, match="dmquant's own loop"):
        dmquant.quantize_pipeline(tiny_pipeline(kind), _per_step_recipe(), prompts=PROMPTS, progress=False)


def test_forward_loop_calibrates_from_any_code_that_runs_the_model():
    pipe = tiny_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    config = load_recipe("minmax")
    config = dataclasses.replace(config, per_step_activations=True)
    unet = dmquant.quantize(
        pipe.unet, config, lambda unet: pipe(PROMPTS, num_inference_steps=STEPS, output_type="latent"), progress=False
    )
    assert api.info(unet).num_steps == STEPS  # one range per step, steps told apart by their timesteps
    pipe.unet = unet
    assert torch.isfinite(_latents(dmquant.hook_pipeline(pipe))).all()


# ---------------------------------------------------------------- the command line and provenance


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_quantizes_a_pipeline_on_prompts_from_a_file_and_the_result_moves_with_its_model(tmp_path, capsys):
    source = tmp_path / "work" / "tiny-sd"
    tiny_pipeline("sd").save_pretrained(source)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n\n")
    output = tmp_path / "work" / "tiny-sd-w8a8"
    argv = ["quantize", str(source), "-o", str(output), "--recipe", "minmax", "--prompts", str(prompt_file)]
    code, out, err = _cli(
        [*argv, "--prompt", "a blue digit 7", "--calib-trajectories", "3", "--calib-steps", "2", "-q"], capsys
    )
    assert code == 0, err
    manifest = json.loads((output / "unet" / "dmquant.json").read_text())
    assert manifest["source"] == str(source.resolve())  # absolute, not a basename
    assert manifest["extra"]["calibration_samples"] % (3 * 2) == 0  # trajectories x guidance copies, per step
    assert torch.isfinite(_latents(dmquant.load_pipeline(output))).all()

    moved = tmp_path / "elsewhere"
    (tmp_path / "work").rename(moved)  # checkpoint and model moved together
    assert api.info(api.load(moved / "tiny-sd-w8a8" / "unet")).source == str((moved / "tiny-sd").resolve())
    assert open_model(str(moved / "tiny-sd-w8a8")).conditioning == "text"
    code, out, err = _cli(["eval", str(moved / "tiny-sd-w8a8"), "--num-samples", "1", "--steps", "2", "-q"], capsys)
    assert code == 0, err
    assert out.startswith(f"{moved / 'tiny-sd-w8a8'} vs FP {(moved / 'tiny-sd').resolve()}") and "verdict: " in out


def test_cli_quantizing_a_pipeline_onto_an_output_another_process_is_writing_fails_before_calibrating(
    tmp_path, capsys, monkeypatch
):
    source = tmp_path / "tiny-sd"
    tiny_pipeline("sd").save_pretrained(source)
    calibrated = []
    monkeypatch.setattr(pipelines, "quantize_pipeline", lambda *args, **kwargs: calibrated.append(args))
    descriptor = os.open(tmp_path / ".q.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as another dmquant process holds it
    try:
        code, _, err = _cli(["quantize", str(source), "-o", str(tmp_path / "q"), "--prompt", "a red q", "-q"], capsys)
    finally:
        os.close(descriptor)
    assert code == 2 and "another process is writing it" in err
    assert calibrated == [] and not (tmp_path / "q").exists()


def test_cli_refuses_calibration_inputs_a_model_does_not_take(tmp_path, capsys):
    code, _, err = _cli(["quantize", "tiny-dit", "-o", str(tmp_path / "q"), "--prompt", "a red q", "-q"], capsys)
    assert code == 2 and "takes no prompts" in err
    code, _, err = _cli(
        ["quantize", "tiny-dit", "-o", str(tmp_path / "q"), "--prompts", str(tmp_path / "none.txt")], capsys
    )
    assert code == 2 and "cannot read it" in err
    assert not (tmp_path / "q").exists()


def test_prompts_and_labels_choose_what_models_calibrate_on():
    model = load_model("tiny-dit").with_defaults(labels=[3, 7])
    assert model.make_conditioning(4).cond["class_labels"].tolist() == [3, 7, 3, 7]
    with pytest.raises(ModelError, match="must lie in"):
        model.with_defaults(labels=[99])
    text = load_model("tiny-unet-text")
    states = text.with_defaults(prompts=PROMPTS).make_conditioning(2).cond["encoder_hidden_states"]
    assert torch.equal(states, text.encode_prompts(PROMPTS))


def test_a_hooked_scheduler_copies_whole_and_keeps_the_signatures_pipelines_inspect():
    hooked = pipelines.HookedScheduler(DDIMScheduler(), [])
    copied = copy.deepcopy(hooked)
    copied.set_timesteps(3)
    assert len(copied.timesteps) == 3 and hooked.scheduler.num_inference_steps is None
    assert {"eta", "generator"} <= set(inspect.signature(hooked.step).parameters)
