"""Calibration data: timestep strategies, recording from FP trajectories, the set and its file."""

from __future__ import annotations

import pytest
import torch
from calibration_files import load_calibration, save_calibration
from diffusers import DDIMScheduler
from safetensors.torch import save_file

from dmquant.calib import CalibrationSet, get_strategy, record_calibration, uniform
from dmquant.calib.strategies import ndtc, nearest_steps, skew_normal
from dmquant.config import CalibrationConfig
from dmquant.errors import CalibrationError, ConfigError
from dmquant.sampling import Conditioning, StepHook, prepare_scheduler, sample
from dmquant.zoo.tiny import TINY_NUM_CLASSES, tiny_unet2d

STEPS = 5
BATCH = 2


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d(0, class_conditional=False)


@pytest.fixture(scope="module")
def class_unet():
    return tiny_unet2d(0, class_conditional=True)


def record(model, **kwargs) -> CalibrationSet:
    options = {"num_inference_steps": STEPS, "num_trajectories": BATCH, "batch_size": BATCH, "progress": False}
    return record_calibration(model, DDIMScheduler(), **(options | kwargs))


# --- strategies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "num_steps", "expected"),
    [
        ({}, 4, [0, 1, 2, 3]),
        ({"every": 3}, 10, [0, 3, 6, 9]),
        ({"count": 5}, 10, [0, 2, 4, 6, 8]),
        # Q-Diffusion's stride T // count: 10 // 4 = 2, so five steps
        ({"count": 4}, 10, [0, 2, 4, 6, 8]),
        ({"count": 20}, 4, [0, 1, 2, 3]),
    ],
)
def test_uniform_steps(options, num_steps, expected):
    assert uniform(**options)(num_steps) == expected
    assert get_strategy("uniform", **options)(num_steps) == expected


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("gaussian", {}, "unknown timestep strategy"),
        ("uniform", {"stride": 2}, "bad options"),
        ("uniform", {"every": 0}, "positive integer"),
        ("uniform", {"count": 2.5}, "positive integer"),
        ("uniform", {"count": 2, "every": 2}, "not both"),
    ],
)
def test_bad_strategies_are_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        get_strategy(name, **options)


# --- NDTC (PTQ4DM) -------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [0.0, 4.0, -2.0])
def test_skew_normal_has_the_asked_mean_std_and_the_theoretical_skewness(skew):
    draws = skew_normal(400_000, 0.3, 0.2, skew, seeded(1))
    assert draws.mean().item() == pytest.approx(0.3, abs=2e-3)
    assert draws.std().item() == pytest.approx(0.2, rel=1e-2)
    # Skewness of the skew-normal, (4 - π)/2 · (δ√(2/π))³ / (1 - 2δ²/π)^{3/2}: an independent formula.
    delta = skew / (1 + skew * skew) ** 0.5
    m = delta * (2 / torch.pi) ** 0.5
    expected = (4 - torch.pi) / 2 * m**3 / (1 - m * m) ** 1.5
    centred = (draws - draws.mean()) / draws.std()
    assert (centred**3).mean().item() == pytest.approx(expected, abs=0.02)


def test_skew_normal_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    skew, mean, std = 3.0, 0.5, 0.25
    draws = skew_normal(200_000, mean, std, skew, seeded(2)).numpy()
    delta = skew / (1 + skew**2) ** 0.5
    scale = std / (1 - 2 * delta**2 / torch.pi) ** 0.5
    loc = mean - scale * delta * (2 / torch.pi) ** 0.5
    assert stats.kstest(draws, stats.skewnorm(skew, loc=loc, scale=scale).cdf).statistic < 0.005


def test_nearest_steps_by_hand():
    timesteps = torch.tensor([900, 600, 300, 0])
    assert nearest_steps(torch.tensor([1000.0, 760.0, 740.0, 450.0, 10.0]), timesteps) == [0, 0, 1, 1, 3]


def test_ndtc_maps_diffusion_time_to_the_sampler_timestep_not_to_a_loop_index():
    """t/T = 0.4 on a 20-step DDIM over T = 1000 is timestep 400 (step 11), not loop index 0.4·20 = 8 (t = 550)."""
    scheduler = prepare_scheduler(DDIMScheduler(), 20)
    assignment = ndtc(mean=0.4, std=1e-4).assign(scheduler.timesteps, 1000, 50)
    assert set(assignment) == {11}
    assert scheduler.timesteps[11].item() == 400 and scheduler.timesteps[8].item() == 550


def test_ndtc_draws_are_truncated_to_the_trajectory_and_centred_where_asked():
    scheduler = prepare_scheduler(DDIMScheduler(), 50)
    steps = ndtc(mean=0.4, std=0.1).assign(scheduler.timesteps, 1000, 4000)
    recorded = scheduler.timesteps[steps].double()
    assert recorded.mean().item() == pytest.approx(400, abs=8)
    assert recorded.std().item() == pytest.approx(100, rel=0.08)
    # The released-code default (mean 0.4, std 0.4) puts 16 % of the mass below 0: redrawn, never an index < 0.
    wide = ndtc().assign(scheduler.timesteps, 1000, 4000)
    assert min(wide) >= 0 and max(wide) <= 49
    assert ndtc(seed=3).assign(scheduler.timesteps, 1000, 64) == ndtc(seed=3).assign(scheduler.timesteps, 1000, 64)
    assert ndtc(seed=3).assign(scheduler.timesteps, 1000, 64) != ndtc(seed=4).assign(scheduler.timesteps, 1000, 64)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"std": 0.0}, "std must be > 0"), ({"mean": float("nan")}, "finite"), ({"sigma": 1.0}, "bad options")],
)
def test_bad_ndtc_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        get_strategy("ndtc", **options)
    with pytest.raises(ConfigError, match="strategy"):
        CalibrationConfig(strategy="ndtc", strategy_options=options)


# --- recording ----------------------------------------------------------------------------------------


class Inputs(StepHook):
    """What a plain sampling run feeds the model, per step."""

    def __init__(self):
        self.model_inputs: list[torch.Tensor] = []

    def begin_step(self, ctx):
        self.model_inputs.append(ctx.model_input)


def test_records_the_inputs_of_a_plain_run(unet):
    steps = [0, 2, 4]
    calibration = record(unet, steps=steps, generator=seeded())
    plain = Inputs()
    sample(
        unet,
        DDIMScheduler(),
        batch_size=BATCH,
        num_inference_steps=STEPS,
        hooks=[plain],
        generator=seeded(),
        progress=False,
    )
    timesteps = prepare_scheduler(DDIMScheduler(), STEPS).timesteps

    assert len(calibration) == BATCH * len(steps)
    assert calibration.steps() == steps and calibration.num_inference_steps == STEPS
    assert calibration.cond == {}
    for step in steps:
        part = calibration.select_steps([step])
        assert part.step_indices.tolist() == [step] * BATCH
        assert part.timesteps.tolist() == [timesteps[step].item()] * BATCH
        torch.testing.assert_close(part.samples, plain.model_inputs[step], rtol=0, atol=0)


def test_strategies_select_the_recorded_steps(unet):
    calibration = record(unet, steps=get_strategy("uniform", count=2), generator=seeded())
    assert calibration.steps() == [0, 2, 4]


def test_single_step_calibration_records_the_noisiest_step_only(unet):
    calibration = record(unet, steps=get_strategy("single_step"), generator=seeded())
    timesteps = prepare_scheduler(DDIMScheduler(), STEPS).timesteps
    assert calibration.steps() == [0] and len(calibration) == BATCH
    assert calibration.timesteps.tolist() == [timesteps.max().item()] * BATCH


def test_ndtc_records_each_trajectory_once_at_its_own_step(class_unet):
    """Each trajectory's row equals what a plain run fed the model at that trajectory's step."""
    num = 5
    strategy = ndtc(mean=0.5, std=0.3, seed=7)
    timesteps = prepare_scheduler(DDIMScheduler(), STEPS).timesteps
    assignment = strategy.assign(timesteps, 1000, num)
    labels = [1, 2, 3, 4, 5]
    conditioning = Conditioning.classes(labels, null_label=TINY_NUM_CLASSES, guidance_scale=2.0)
    calibration = record(
        class_unet, steps=strategy, num_trajectories=num, batch_size=2, conditioning=conditioning, generator=seeded()
    )
    everything = record(
        class_unet,
        steps=list(range(STEPS)),
        num_trajectories=num,
        batch_size=2,
        conditioning=conditioning,
        generator=seeded(),
    )
    assert len(calibration) == 2 * num  # one row per trajectory, twice under guidance
    for step in sorted(set(assignment)):
        part, full = calibration.select_steps([step]), everything.select_steps([step])
        mine = [j for j in range(num) if assignment[j] == step]
        expected_labels = [TINY_NUM_CLASSES] * len(mine) + [labels[j] for j in mine]
        assert sorted(part.cond["class_labels"].tolist()) == sorted(expected_labels)
        assert set(part.timesteps.tolist()) == {timesteps[step].item()}
        conditional, full_conditional = (
            part.cond["class_labels"] != TINY_NUM_CLASSES,
            full.cond["class_labels"] != TINY_NUM_CLASSES,
        )
        full_labels = full.cond["class_labels"][full_conditional].tolist()
        for row, label in zip(part.samples[conditional], part.cond["class_labels"][conditional], strict=True):
            expected = full.samples[full_conditional][full_labels.index(label.item())]
            torch.testing.assert_close(row, expected, rtol=0, atol=0)


def test_guided_runs_record_both_copies(class_unet):
    conditioning = Conditioning.classes([3, 8], null_label=TINY_NUM_CLASSES, guidance_scale=3.0)
    calibration = record(class_unet, steps=[1, 3], conditioning=conditioning, generator=seeded())
    assert len(calibration) == 2 * BATCH * 2
    for step in (1, 3):
        part = calibration.select_steps([step])
        assert part.cond["class_labels"].tolist() == [TINY_NUM_CLASSES] * BATCH + [3, 8]
        uncond, cond = part.samples.chunk(2)
        torch.testing.assert_close(uncond, cond, rtol=0, atol=0)


def test_trajectories_are_batched_and_conditioning_is_sliced(class_unet):
    conditioning = Conditioning.classes([1, 2, 3], null_label=TINY_NUM_CLASSES, guidance_scale=2.0)
    calibration = record(class_unet, steps=[0], num_trajectories=3, conditioning=conditioning, generator=seeded())
    assert calibration.cond["class_labels"].tolist() == [10, 10, 1, 2, 10, 3]


def test_conditioning_can_be_made_per_batch(class_unet):
    sizes: list[int] = []

    def make(n: int) -> Conditioning:
        sizes.append(n)
        return Conditioning.classes(torch.full((n,), 7))

    calibration = record(class_unet, steps=[0], num_trajectories=3, conditioning=make, generator=seeded())
    assert sizes == [2, 1]
    assert calibration.cond["class_labels"].tolist() == [7, 7, 7]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": []}, CalibrationError, "no sampling step"),
        ({"steps": get_strategy("uniform", count=1), "num_trajectories": 0}, CalibrationError, "empty"),
        ({"steps": [0, STEPS]}, ConfigError, "outside"),
        ({"steps": [-1]}, ConfigError, "outside"),
        ({"steps": [0.5]}, ConfigError, "integers"),
        ({"steps": [0], "conditioning": Conditioning.classes([1, 2, 3])}, ConfigError, "num_trajectories"),
    ],
)
def test_recording_errors(unet, kwargs, error, message):
    with pytest.raises(error, match=message):
        record(unet, **kwargs)


# --- the calibration set ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(class_unet) -> CalibrationSet:
    conditioning = Conditioning.classes([4, 5], null_label=TINY_NUM_CLASSES, guidance_scale=2.0)
    return record(class_unet, steps=[0, 3], conditioning=conditioning, generator=seeded())


def assert_same(a: CalibrationSet, b: CalibrationSet) -> None:
    assert a.num_inference_steps == b.num_inference_steps and a.cond.keys() == b.cond.keys()
    for name in ("samples", "timesteps", "step_indices"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for name in a.cond:
        torch.testing.assert_close(a.cond[name], b.cond[name], rtol=0, atol=0)


def test_batches_cover_every_row_once(calibration):
    batches = list(calibration.batches(3))
    assert [len(x) for x, _, _, _ in batches] == [3, 3, 2]
    torch.testing.assert_close(torch.cat([x for x, _, _, _ in batches]), calibration.samples)
    shuffled = list(calibration.batches(3, shuffle=True, generator=seeded(1)))
    order = torch.randperm(len(calibration), generator=seeded(1))
    torch.testing.assert_close(torch.cat([x for x, _, _, _ in shuffled]), calibration.samples[order])
    torch.testing.assert_close(
        torch.cat([cond["class_labels"] for _, _, cond, _ in shuffled]), calibration.cond["class_labels"][order]
    )
    with pytest.raises(ConfigError):
        next(calibration.batches(0))


def test_select_steps(calibration):
    part = calibration.select_steps([3])
    assert len(part) == 4 and part.steps() == [3]
    assert_same(CalibrationSet.concatenate([calibration.select_steps([0]), part]), calibration)
    with pytest.raises(CalibrationError, match="not recorded"):
        calibration.select_steps([1])


def test_save_load_round_trip(calibration, tmp_path):
    path = tmp_path / "calibration.safetensors"
    save_calibration(calibration, path)
    assert_same(load_calibration(path), calibration)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_loading_something_else_is_a_calibration_error(tmp_path):
    foreign = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CalibrationError, match="not a dmquant calibration set"):
        load_calibration(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="not a readable safetensors file"):
        load_calibration(garbage)


def test_inconsistent_sets_are_rejected():
    with pytest.raises(CalibrationError, match="rows"):
        CalibrationSet(torch.zeros(2, 1, 1, 1), torch.zeros(3), torch.zeros(2, dtype=torch.long), {}, 5)
