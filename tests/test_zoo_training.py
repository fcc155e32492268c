"""The zoo's training loop: schedules, EMA, determinism, resume, time limits and the state on disk."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dmquant.errors import CheckpointError
from dmquant.zoo.datasets import NUM_CLASSES, GlyphDataset
from dmquant.zoo.training import (
    LOG_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    TrainingPlan,
    TrainingTask,
    ema_decay,
    learning_rate,
    step_generator,
    train,
    update_ema,
)

PLAN = TrainingPlan(
    steps=4,
    batch_size=8,
    learning_rate=1e-2,
    warmup_steps=3,
    weight_decay=0.01,
    ema_decay=0.9,
    resolution=16,
    log_every=1,
    save_every=100,
)


class TinyClassifier(nn.Module):
    """Two convolutions (one with batch norm, whose buffers the EMA copies) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, images):
        x = torch.relu(self.norm(self.conv1(images)))
        return self.head(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


def noisy_classifier_loss(model, batch, generator):
    """Cross-entropy on images with noise from the step's generator, so the generator matters too."""
    noise = torch.randn(batch.images.shape, generator=generator)
    return nn.functional.cross_entropy(model(batch.images + 0.1 * noise), batch.labels)


def make_task(name: str = "tiny", seed: int = 0, loss=noisy_classifier_loss) -> TrainingTask:
    torch.manual_seed(seed)
    return TrainingTask(name, TinyClassifier(), loss)


def run(directory, plan=PLAN, task=None, **kwargs):
    return train(task or make_task(), plan, directory, progress=False, **kwargs)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------ schedules


def test_learning_rate_warms_up_linearly_then_stays():
    plan = TrainingPlan(steps=10, batch_size=1, learning_rate=1e-3, warmup_steps=4)
    assert [learning_rate(plan, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate(plan, 10_000) == pytest.approx(1e-3)
    no_warmup = dataclasses.replace(plan, warmup_steps=0)
    assert learning_rate(no_warmup, 0) == pytest.approx(1e-3)


def test_ema_decay_warms_up_to_its_ceiling():
    plan = TrainingPlan(steps=10, batch_size=1, learning_rate=1e-3, ema_decay=0.999)
    assert ema_decay(plan, 0) == pytest.approx(0.1)
    assert ema_decay(plan, 10) == pytest.approx(11 / 20)
    assert ema_decay(plan, 1000) == pytest.approx(1001 / 1010)
    assert ema_decay(plan, 10_000) == pytest.approx(0.999)  # (1 + s) / (10 + s) reaches 0.999 at s = 8990
    assert ema_decay(plan, 8989) < 0.999
    decays = [ema_decay(plan, s) for s in range(0, 20_000, 500)]
    assert decays == sorted(decays)


def test_update_ema_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model, ema = TinyClassifier(), TinyClassifier()
    model.norm.running_mean.uniform_()
    model.norm.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    current = {k: v.clone() for k, v in model.state_dict().items()}

    update_ema(ema, model, 0.75)

    parameter_names = {name for name, _ in ema.named_parameters()}
    for key, value in ema.state_dict().items():
        if key in parameter_names:
            torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * current[key])
        else:
            assert torch.equal(value, current[key]), key
    for key, value in model.state_dict().items():  # the model is untouched
        assert torch.equal(value, current[key]), key


def test_step_generator_depends_on_seed_and_step():
    draw = [torch.rand(4, generator=step_generator(seed, step, torch.device("cpu"))) for seed, step in [(0, 0)] * 2]
    assert torch.equal(*draw)
    others = [(0, 1), (1, 0), (1, 1)]
    base = draw[0]
    for seed, step in others:
        assert not torch.equal(torch.rand(4, generator=step_generator(seed, step, torch.device("cpu"))), base)


# ------------------------------------------------------------------ the loop


def test_each_step_sees_its_own_glyphs_and_generator(tmp_path):
    seen = []

    def recording_loss(model, batch, generator):
        seen.append((batch.labels.clone(), batch.images.clone(), torch.rand(3, generator=generator)))
        return noisy_classifier_loss(model, batch, generator)

    plan = dataclasses.replace(PLAN, steps=3, seed=5)
    run(tmp_path, plan, make_task(loss=recording_loss))

    dataset = GlyphDataset("train", 16)
    assert len(seen) == 3
    for step, (labels, images, draws) in enumerate(seen):
        expected = dataset.batch(step * plan.batch_size, plan.batch_size)
        assert torch.equal(labels, expected.labels)
        torch.testing.assert_close(images, expected.images, rtol=0, atol=1e-6)
        assert torch.equal(draws, torch.rand(3, generator=step_generator(5, step, torch.device("cpu"))))


def test_first_step_uses_the_warmed_up_rate_and_starts_the_ema(tmp_path):
    """Adam's first step moves each weight by about lr·sign(grad); the EMA's first decay is 0.1."""
    plan = dataclasses.replace(PLAN, steps=1, weight_decay=0.0)
    task = make_task()
    initial = {k: v.clone() for k, v in task.model.state_dict().items()}
    result = run(tmp_path, plan, task)

    first_lr = plan.learning_rate / plan.warmup_steps
    moved = torch.cat([(p.detach() - initial[n]).abs().flatten() for n, p in result.model.named_parameters()])
    assert moved.max().item() == pytest.approx(first_lr, rel=1e-3)
    assert (moved > 0.5 * first_lr).float().mean() > 0.9
    for name, averaged in result.ema.named_parameters():
        expected = 0.1 * initial[name] + 0.9 * dict(result.model.named_parameters())[name].detach()
        torch.testing.assert_close(averaged, expected)
    assert not any(p.requires_grad for p in result.ema.parameters())
    assert torch.equal(result.ema.norm.running_mean, result.model.norm.running_mean)
    assert not result.model.training and not result.ema.training


def test_resuming_continues_exactly_where_the_run_stopped(tmp_path):
    whole = run(tmp_path / "whole")
    assert (whole.step, whole.finished) == (4, True)

    half = run(tmp_path / "split", dataclasses.replace(PLAN, steps=2))
    assert (half.step, half.finished) == (2, True)
    # A different initialisation proves the resumed run takes everything from the saved state.
    resumed = run(tmp_path / "split", task=make_task(seed=123))
    assert (resumed.step, resumed.finished) == (4, True)

    assert_same_state(resumed.model, whole.model)
    assert_same_state(resumed.ema, whole.ema)
    assert not torch.equal(half.model.head.weight, whole.model.head.weight)
    saved = load_file(tmp_path / "split" / STATE_FILE)
    reference = load_file(tmp_path / "whole" / STATE_FILE)
    assert saved.keys() == reference.keys()
    for key in saved:  # optimizer moments included
        assert torch.equal(saved[key], reference[key]), key

    logs = [json.loads(line) for line in (tmp_path / "split" / LOG_FILE).read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    whole_logs = [json.loads(line) for line in (tmp_path / "whole" / LOG_FILE).read_text().splitlines()]
    assert [e["loss"] for e in logs] == [e["loss"] for e in whole_logs]


def test_a_crash_keeps_the_last_saved_step_and_resume_replays_the_rest(tmp_path):
    calls = []

    def failing_loss(model, batch, generator):
        calls.append(1)
        loss = noisy_classifier_loss(model, batch, generator)
        return loss * math.nan if len(calls) == 3 else loss

    plan = dataclasses.replace(PLAN, save_every=2)
    with pytest.raises(FloatingPointError, match="tiny: loss is nan at step 2"):
        run(tmp_path / "crash", plan, make_task(loss=failing_loss))
    assert json.loads((tmp_path / "crash" / MANIFEST_FILE).read_text())["step"] == 2

    resumed = run(tmp_path / "crash", plan)
    whole = run(tmp_path / "whole", plan)
    assert_same_state(resumed.model, whole.model)
    assert_same_state(resumed.ema, whole.ema)


def test_resume_refuses_another_plan_or_task(tmp_path):
    run(tmp_path, dataclasses.replace(PLAN, steps=1))
    with pytest.raises(CheckpointError, match="different plan.*learning_rate"):
        run(tmp_path, dataclasses.replace(PLAN, learning_rate=1e-3))
    with pytest.raises(CheckpointError, match="different plan.*batch_size"):
        run(tmp_path, dataclasses.replace(PLAN, batch_size=4))
    with pytest.raises(CheckpointError, match="holds a tiny run, not other"):
        run(tmp_path, task=make_task(name="other"))
    # Steps and the logging/saving cadence may change between calls.
    result = run(tmp_path, dataclasses.replace(PLAN, steps=2, log_every=7, save_every=9))
    assert result.step == 2


def test_without_ema_decay_there_is_no_ema(tmp_path):
    result = run(tmp_path, dataclasses.replace(PLAN, steps=1, ema_decay=None))
    assert result.ema is None
    assert not any(key.startswith("ema.") for key in load_file(tmp_path / STATE_FILE))


def test_time_limit_stops_after_one_step_and_saves(tmp_path):
    plan = dataclasses.replace(PLAN, log_every=50)
    result = run(tmp_path, plan, max_minutes=0)
    assert (result.step, result.finished) == (1, False)
    assert result.elapsed_s > 0
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["step"] == 1 and manifest["task"] == "tiny"
    assert manifest["elapsed_s"] == pytest.approx(result.elapsed_s, abs=0.5)

    again = run(tmp_path, plan, max_minutes=0)  # each call makes progress
    assert (again.step, again.finished) == (2, False)
    assert again.elapsed_s >= manifest["elapsed_s"]


def test_state_on_disk_is_safetensors_json_and_a_jsonl_log(tmp_path):
    result = run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_FILE, MANIFEST_FILE, LOG_FILE])

    raw = (tmp_path / STATE_FILE).read_bytes()
    header_size = int.from_bytes(raw[:8], "little")  # the safetensors layout: u64 size, JSON header, data
    header = json.loads(raw[8 : 8 + header_size])
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # neither pickle nor a torch zip
    tensors = load_file(tmp_path / STATE_FILE)
    assert set(header) - {"__metadata__"} == set(tensors)
    model_keys = {f"model.{k}" for k in result.model.state_dict()}
    ema_keys = {f"ema.{k}" for k in result.ema.state_dict()}
    optimizer_keys = {k for k in tensors if k.startswith("optimizer.")}
    assert set(tensors) == model_keys | ema_keys | optimizer_keys
    moments = ("step", "exp_avg", "exp_avg_sq")
    num_parameters = len(list(result.model.parameters()))
    assert optimizer_keys == {f"optimizer.{i}.{m}" for i in range(num_parameters) for m in moments}
    for key, value in result.model.state_dict().items():
        assert torch.equal(tensors[f"model.{key}"], value)

    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["plan"] == dataclasses.asdict(PLAN)
    assert manifest["step"] == 4

    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    for entry in entries:
        assert {"step", "loss", "lr", "elapsed_s"} <= entry.keys()
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
        assert entry["lr"] == pytest.approx(learning_rate(PLAN, entry["step"] - 1))
    assert entries[0]["loss"] == pytest.approx(math.log(NUM_CLASSES), rel=0.2)  # an untrained head is near uniform
