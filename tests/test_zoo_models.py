"""The shipped reference zoo: GlyphNet, ddpm-glyphs32, model cards, quality judging and `dmquant zoo`."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from dmquant.cli import main
from dmquant.errors import ModelError
from dmquant.jobs import generate
from dmquant.models import load_model
from dmquant.zoo import reference
from dmquant.zoo.datasets import NUM_CLASSES, GlyphDataset
from dmquant.zoo.diffusion import CONDITION_DROPOUT
from dmquant.zoo.glyphnet import FEATURE_DIM, SPATIAL_CHANNELS, GlyphNet, load_glyphnet
from dmquant.zoo.quality import ReferenceSet, classifier_accuracy
from dmquant.zoo.reference import (
    GLYPHNET_FILE,
    MODEL_CARD_FILE,
    WEIGHTS_DIR,
    ZOO,
    denoising_loss,
    sampling_scheduler,
    training_scheduler,
    zoo_entry,
)
from dmquant.zoo.training import STATE_FILE
from dmquant.zoo_jobs import shipped_glyphnet

DDPM_DIR = WEIGHTS_DIR / "ddpm-glyphs32"
GLYPHNET_PATH = WEIGHTS_DIR / "glyphnet" / GLYPHNET_FILE
MiB = 2**20


def card(name: str) -> dict:
    return json.loads((WEIGHTS_DIR / name / MODEL_CARD_FILE).read_text())


@pytest.fixture(scope="module")
def glyphnet():
    return shipped_glyphnet()


@pytest.fixture(scope="module")
def held_out(glyphnet):
    """1000 test-split glyphs away from the indices the model cards and ReferenceSets use, and their features."""
    batch = GlyphDataset("test", 32).batch(20_000, 1000)
    with torch.inference_mode():
        features = glyphnet.features(batch.images)
    return batch, features


@pytest.fixture(scope="module")
def ddpm():
    return load_model("ddpm-glyphs32")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


# ------------------------------------------------------------------ GlyphNet


def test_shipped_glyphnet_classifies_held_out_glyphs(glyphnet, held_out):
    batch, features = held_out
    assert accuracy(features.logits, batch.labels) >= 0.97
    assert not glyphnet.training
    # Not a constant answer: the predictions use most of the classes.
    assert len(features.logits.argmax(1).unique()) > 55


def test_glyphnet_features_have_the_documented_shapes(glyphnet, held_out):
    _, features = held_out
    assert FEATURE_DIM == 192 and SPATIAL_CHANNELS == 32
    assert features.pooled.shape == (1000, 192)
    assert features.spatial.shape == (1000, 32 * 8 * 8)
    assert features.logits.shape == (1000, NUM_CLASSES)
    with torch.inference_mode():
        torch.testing.assert_close(features.logits, glyphnet.head(features.pooled))
        assert torch.equal(glyphnet(torch.zeros(2, 3, 32, 32)), glyphnet.features(torch.zeros(2, 3, 32, 32)).logits)


def test_glyphnet_resizes_other_resolutions(glyphnet):
    batch = GlyphDataset("test", 64).batch(30_000, 100)
    with torch.inference_mode():
        features = glyphnet.features(batch.images)
        resized = glyphnet.features(
            torch.nn.functional.interpolate(batch.images, size=(32, 32), mode="bilinear", antialias=True)
        )
    assert features.pooled.shape == (100, 192) and features.spatial.shape == (100, 2048)
    torch.testing.assert_close(features.logits, resized.logits)
    assert accuracy(features.logits, batch.labels) >= 0.95


def test_shipped_glyphnet_is_the_fp16_file_in_float32():
    net = load_glyphnet(GLYPHNET_PATH)
    stored = load_file(GLYPHNET_PATH)
    assert {v.dtype for k, v in stored.items() if "num_batches_tracked" not in k} == {torch.float16}
    for key, value in net.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
        assert torch.equal(value, stored[key].to(value.dtype)), key
    assert sum(p.numel() for p in net.parameters()) == card("glyphnet")["parameters"]


def test_load_glyphnet_refuses_what_is_not_glyphnet(tmp_path):
    with pytest.raises(ModelError, match="no GlyphNet weights here"):
        load_glyphnet(tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match="no GlyphNet weights here"):
        load_glyphnet(tmp_path)  # a directory
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_glyphnet(junk)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ModelError, match="not GlyphNet weights"):
        load_glyphnet(other)
    wrong_head = tmp_path / "ten-classes.safetensors"
    save_file(GlyphNet(num_classes=10).state_dict(), wrong_head)
    with pytest.raises(ModelError, match="not GlyphNet weights"):
        load_glyphnet(wrong_head)


# ------------------------------------------------------------------ ddpm-glyphs32


def test_shipped_ddpm_loads_as_a_class_conditional_float32_model(ddpm):
    assert isinstance(ddpm.denoiser, UNet2DModel)
    assert not ddpm.denoiser.training
    assert {p.dtype for p in ddpm.denoiser.parameters()} == {torch.float32}
    assert (ddpm.conditioning, ddpm.num_classes, ddpm.null_class) == ("class", 62, 62)
    assert ddpm.denoiser.config.num_class_embeds == 63 and ddpm.denoiser.config.sample_size == 32
    parameters = sum(p.numel() for p in ddpm.denoiser.parameters())
    assert parameters <= 4_000_000
    assert parameters == card("ddpm-glyphs32")["parameters"]
    assert parameters == sum(p.numel() for p in reference.ddpm_glyphs32().parameters())
    stored = load_file(DDPM_DIR / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    for key, value in ddpm.denoiser.state_dict().items():
        assert torch.equal(value, stored[key].float()), key


def test_shipped_ddpm_samples_with_ddim_over_its_training_schedule(ddpm):
    scheduler = ddpm.scheduler
    assert type(scheduler) is DDIMScheduler
    assert scheduler.config.clip_sample and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == 1000
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's linear schedule, by hand
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    for schedule in (scheduler, training_scheduler(), sampling_scheduler()):
        torch.testing.assert_close(schedule.alphas_cumprod.double(), alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_shipped_model_cards_record_training_and_quality():
    glyphnet_card = card("glyphnet")
    assert glyphnet_card["finished"] is True
    assert glyphnet_card["test_accuracy"] >= 0.97
    ddpm_card = card("ddpm-glyphs32")
    for name, entry in (("glyphnet", glyphnet_card), ("ddpm-glyphs32", ddpm_card)):
        training = entry["training"]
        assert entry["name"] == name
        assert training["device"] and training["torch"] and training["date"]
        assert training["steps_done"] > 0
        assert training["images_seen"] == training["steps_done"] * training["plan"]["batch_size"]
        assert training["weights"] == "EMA"
        assert training["plan"] == dataclasses.asdict(ZOO[name].plan), f"{name}: the card's plan is not the zoo's"
    quality = ddpm_card["quality"]
    assert quality["sampler"] == "DDIM" and quality["num_samples"] >= 1000 and quality["num_inference_steps"] > 0
    assert quality["results"] and quality["results"][0]["guidance_scale"] == 1.0
    for result in quality["results"]:
        assert result["class_accuracy"] >= 0.9
        assert math.isfinite(result["fid"]) and result["fid"] > result["fid_floor"] > 0
        assert result["sfid"] > result["sfid_floor"] > 0
        assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
        assert result["extractor"] == "glyphnet" and result["num_samples"] == quality["num_samples"]


def test_shipped_weights_stay_small():
    files = [path for path in WEIGHTS_DIR.rglob("*") if path.is_file()]
    total = sum(path.stat().st_size for path in files)
    assert total < 24 * MiB, f"zoo weights take {total / MiB:.1f} MiB"
    assert {path.parent.name for path in files} >= {"glyphnet", "ddpm-glyphs32", "glyph-vae", "unet", "transformer"}


def test_shipped_ddpm_draws_the_class_it_is_asked_for(ddpm, glyphnet):
    """16 classes spread over digits and both cases, 10 DDIM steps: GlyphNet reads most of them.

    Measured on seeds 0-5: 81-94 % (chance is 1/62); the threshold leaves a wide margin.
    """
    labels = list(range(0, 62, 4))
    images, conditioning = generate(ddpm, 16, num_inference_steps=10, seed=0, batch_size=16, labels=labels)
    assert images.shape == (16, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    asked = conditioning.cond["class_labels"]
    assert asked.tolist() == labels
    with torch.inference_mode():
        logits = glyphnet(images)
    assert accuracy(logits, asked) >= 0.5
    assert accuracy(logits, asked.roll(1)) <= 0.25  # the samples follow their own labels, not just any glyph


# ------------------------------------------------------------------ quality judging


def test_reference_set_judges_real_glyphs_as_real(glyphnet):
    references = ReferenceSet(glyphnet, 50, progress=False)
    first = GlyphDataset("test", 32).batch(0, 100)
    with torch.inference_mode():
        direct = glyphnet.features(first.images)
    torch.testing.assert_close(references.reference.pooled, direct.pooled[:50].double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(references.floor_reference.pooled, direct.pooled[50:].double(), rtol=1e-4, atol=1e-4)

    other = GlyphDataset("test", 32).batch(5_000, 50)
    real = references.judge(other.images, other.labels, progress=False)
    report = real.as_dict()
    assert report["class_accuracy"] >= 0.95
    for key in ("fid", "fid_floor", "sfid", "sfid_floor", "kid_mean", "inception_score", "precision", "recall"):
        assert math.isfinite(report[key]), key
    assert report["fid_floor"] > 0 and report["sfid_floor"] > 0 and report["num_samples"] == 50
    assert report["fid"] < 2 * report["fid_floor"]  # real vs real: about the floor

    noise = torch.randn(other.images.shape, generator=torch.Generator().manual_seed(0))
    noisy = references.judge((other.images + 0.3 * noise).clamp(-1, 1), other.labels, progress=False)
    assert noisy.distribution.fid > 3 * report["fid"]
    assert noisy.class_accuracy < 0.5


def test_classifier_accuracy_counts_correct_answers(glyphnet):
    assert classifier_accuracy(glyphnet, 200) >= 0.97
    untrained = GlyphNet().eval()
    assert classifier_accuracy(untrained, 200) < 0.2


# ------------------------------------------------------------------ losses and exports


def test_denoising_loss_is_ddpm_simple_loss_with_label_dropout():
    batch = GlyphDataset("train", 8).batch(0, 4000)
    seen = {}

    def stub(x_t, t, class_labels):
        seen.update(x_t=x_t, t=t, labels=class_labels)
        return SimpleNamespace(sample=torch.zeros_like(x_t))

    loss = denoising_loss(stub, batch, torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)  # the same draws, in the documented order
    t = torch.randint(0, 1000, (4000,), generator=generator)
    noise = torch.randn(batch.images.shape, generator=generator)
    dropped = torch.rand(4000, generator=generator) < CONDITION_DROPOUT
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    expected_x_t = alpha_bar.sqrt() * batch.images.double() + (1 - alpha_bar).sqrt() * noise.double()

    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"].double(), expected_x_t, rtol=1e-5, atol=1e-5)
    assert torch.equal(seen["labels"], torch.where(dropped, NUM_CLASSES, batch.labels))
    assert abs(dropped.double().mean().item() - CONDITION_DROPOUT) < 0.025
    assert loss.item() == pytest.approx(noise.square().mean().item(), rel=1e-6)


def test_zoo_entry_names():
    names = ["glyphnet", "ddpm-glyphs32", "glyph-vae", "ldm-glyphs64", "dit-glyphs"]
    assert list(ZOO) == names
    assert zoo_entry("glyphnet") is ZOO["glyphnet"]
    with pytest.raises(ModelError, match=f"unknown zoo model 'nope'; choose from {', '.join(names)}"):
        zoo_entry("nope")


@pytest.fixture
def small_plans(monkeypatch):
    """The zoo's plans with tiny batches, so `dmquant zoo train` runs in a second on a CPU."""
    measured = []

    def quick_accuracy(net):
        measured.append(classifier_accuracy(net.float().eval(), 100))
        return {"test_accuracy": measured[-1]}

    for name, batch_size in (("glyphnet", 16), ("ddpm-glyphs32", 2)):
        entry = ZOO[name]
        plan = dataclasses.replace(entry.plan, batch_size=batch_size, warmup_steps=1)
        measure = quick_accuracy if entry.measure is not None else None
        monkeypatch.setitem(ZOO, name, dataclasses.replace(entry, plan=plan, measure=measure))
    return measured


def test_zoo_train_glyphnet_exports_the_ema_in_fp16(tmp_path, capsys, small_plans):
    state, export = tmp_path / "state", tmp_path / "export"
    code = main(["zoo", "train", "glyphnet", "--steps", "2", "--state", str(state), "--export", str(export), "-q"])
    assert code == 0
    assert "glyphnet: finished at step 2" in capsys.readouterr().out

    saved = load_file(state / STATE_FILE)
    exported = load_glyphnet(export / GLYPHNET_FILE)
    for key, value in exported.state_dict().items():
        ema = saved[f"ema.{key}"]
        expected = ema.half().float() if ema.is_floating_point() else ema
        assert torch.equal(value, expected), key
    assert not torch.equal(saved["ema.head.weight"], saved["model.head.weight"])

    written = json.loads((export / MODEL_CARD_FILE).read_text())
    assert written["finished"] is True and written["name"] == "glyphnet"
    assert written["training"]["steps_done"] == 2 and written["training"]["images_seen"] == 32
    assert written["training"]["plan"]["steps"] == 2 and written["training"]["plan"]["batch_size"] == 16
    assert written["parameters"] == card("glyphnet")["parameters"]
    assert written["test_accuracy"] == small_plans[0]


def test_zoo_train_refuses_an_existing_export_directory_of_something_else(tmp_path, capsys, small_plans):
    state, export = tmp_path / "state", tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    argv = ["zoo", "train", "glyphnet", "--steps", "1", "--state", str(state), "--export", str(export), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert not state.exists()  # refused before any training
    assert [p.name for p in export.iterdir()] == ["notes.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert (export / MODEL_CARD_FILE).exists()


def test_zoo_train_ddpm_exports_a_loadable_model(tmp_path, capsys, small_plans):
    state, export = tmp_path / "state", tmp_path / "export"
    args = ["zoo", "train", "ddpm-glyphs32", "--state", str(state), "--export", str(export), "-q"]
    assert main([*args, "--steps", "1"]) == 0
    assert "ddpm-glyphs32: finished at step 1" in capsys.readouterr().out

    model = load_model(export)
    assert (model.conditioning, model.num_classes, model.null_class) == ("class", 62, 62)
    assert type(model.scheduler) is DDIMScheduler and model.scheduler.config.clip_sample
    saved = load_file(state / STATE_FILE)
    for key, value in model.denoiser.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, saved[f"ema.{key}"].half().float()), key
    written = json.loads((export / MODEL_CARD_FILE).read_text())
    assert written["training"]["steps_done"] == 1 and "test_accuracy" not in written

    assert main([*args, "--steps", "2"]) == 0  # the same command resumes
    assert json.loads((export / MODEL_CARD_FILE).read_text())["training"]["steps_done"] == 2
    assert json.loads((state / "state.json").read_text())["step"] == 2


def test_zoo_evaluate_writes_the_quality_section(tmp_path, capsys):
    model_dir = tmp_path / "ddpm"
    shutil.copytree(DDPM_DIR, model_dir)
    shipped_card = (DDPM_DIR / MODEL_CARD_FILE).read_bytes()
    args = ["zoo", "evaluate", "ddpm-glyphs32", "--model-dir", str(model_dir), "--num-samples", "10"]
    assert main([*args, "--steps", "2", "--batch-size", "10", "--guidance", "1", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "guidance_scale" in out and "fid_floor" in out

    written = json.loads((model_dir / MODEL_CARD_FILE).read_text())
    assert written["training"] == card("ddpm-glyphs32")["training"]  # the rest of the card is kept
    quality = written["quality"]
    assert (quality["num_samples"], quality["num_inference_steps"], quality["sampler"]) == (10, 2, "DDIM")
    assert [r["guidance_scale"] for r in quality["results"]] == [1.0, 2.0]
    for result in quality["results"]:
        assert result["num_samples"] == 10 and 0 <= result["class_accuracy"] <= 1
        assert math.isfinite(result["fid"]) and math.isfinite(result["fid_floor"])
    assert (DDPM_DIR / MODEL_CARD_FILE).read_bytes() == shipped_card  # the shipped card is untouched


# ------------------------------------------------------------------ dmquant zoo


def test_zoo_list_shows_both_shipped_models(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"glyphnet", "ddpm-glyphs32"} <= rows.keys()
    assert "| yes |" in rows["glyphnet"] and "| yes |" in rows["ddpm-glyphs32"]
    quality = card("ddpm-glyphs32")["quality"]["results"][0]
    assert f"{quality['fid']:.2f} ({quality['fid_floor']:.2f})" in rows["ddpm-glyphs32"]


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_unknown_zoo_model_is_a_one_line_error(tmp_path, capsys, command):
    args = ["zoo", command, "nope", "-q"]
    if command == "train":
        args += ["--state", str(tmp_path / "state"), "--export", str(tmp_path / "export")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"dmquant zoo: error: unknown zoo model 'nope'; choose from {', '.join(ZOO)}"
    assert not (tmp_path / "state").exists() and not (tmp_path / "export").exists()
