"""PTQD: noise statistics, the step coefficients they rely on, and the corrected sampler step."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, CorrectionConfig, load_recipe
from dmquant.correct.statistics import ErrorMoments, NoiseStatistics, collect_noise_statistics
from dmquant.correct.step import MIN_CORRELATION, NoiseCorrection
from dmquant.errors import CalibrationError, ModelError
from dmquant.models import load_model
from dmquant.sampling import Conditioning, StepContext, StepHook, sample
from dmquant.step_coefficients import eps_coefficient, noise_std


def _synthetic(k, bias, sigma, shape=(64, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    eps_fp = torch.randn(shape, generator=g) + torch.tensor([0.5, -0.3, 0.0]).reshape(1, 3, 1, 1)
    noise = torch.randn(shape, generator=g) * sigma
    eps_q = (1 + k) * eps_fp + torch.tensor(bias).reshape(1, 3, 1, 1) + noise
    return eps_fp, eps_q


@pytest.mark.parametrize("k", [0.15, -0.2])
def test_moments_recover_slope_bias_and_residual_spread(k):
    bias, sigma = [0.05, -0.1, 0.02], 0.07
    eps_fp, eps_q = _synthetic(k, bias, sigma, shape=(256, 3, 16, 16))
    moments = ErrorMoments()
    for f, q in zip(eps_fp.chunk(5), eps_q.chunk(5), strict=True):  # streamed in batches
        moments.update(f, q)
    slope, spread, channel_bias = moments.solve()
    assert slope == pytest.approx(k, abs=2e-3)
    assert channel_bias == pytest.approx(bias, abs=2e-3)
    assert spread == pytest.approx(sigma, rel=0.01)
    # the same numbers computed directly: least squares with one slope and an intercept per channel
    f, d = eps_fp.double().numpy(), (eps_q - eps_fp).double().numpy()
    channels = np.zeros((f.size, 3))
    channels[np.arange(f.size), np.broadcast_to(np.arange(3).reshape(1, 3, 1, 1), f.shape).ravel()] = 1
    solution, *_ = np.linalg.lstsq(np.column_stack([f.ravel(), channels]), d.ravel(), rcond=None)
    direct_slope = solution[0]
    residual = d - direct_slope * f
    direct_bias = residual.mean(axis=(0, 2, 3))
    direct_spread = (residual - direct_bias.reshape(1, 3, 1, 1)).std()
    assert slope == pytest.approx(direct_slope, rel=1e-9)
    assert channel_bias == pytest.approx(direct_bias.tolist(), abs=1e-10)
    assert spread == pytest.approx(direct_spread, rel=1e-9)


def test_residual_spread_is_taken_about_the_channel_biases_not_each_sample_mean():
    """σ_res is the pooled spread left after the bias; PTQD's analysis script averages each sample's
    standard deviation about its own mean, which also counts the spread of the channel biases."""
    bias, sigma = [0.3, -0.3, 0.0], 0.1
    eps_fp, eps_q = _synthetic(0.1, bias, sigma, shape=(128, 3, 16, 16))
    moments = ErrorMoments()
    moments.update(eps_fp, eps_q)
    slope, spread, _ = moments.solve()
    residual = (eps_q - eps_fp - slope * eps_fp).double()
    reference = torch.stack([sample.std() for sample in residual]).mean().item()
    assert spread == pytest.approx(sigma, rel=0.02)
    # the biases' population variance, (0.09 + 0.09 + 0) / 3 = 0.06, joins σ² in the reference's
    assert reference == pytest.approx(math.sqrt(sigma**2 + 0.06), rel=0.02)


def test_no_recorded_estimates_is_an_error():
    with pytest.raises(CalibrationError, match="no noise estimates"):
        ErrorMoments().solve()


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False),
    "ddpm": lambda: DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
}


def _prepared(name, steps=20):
    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize(("name", "eta"), [("ddim", 0.0), ("ddim", 0.6), ("ddim", 1.0), ("ddpm", 0.0)])
def test_step_coefficients_match_the_schedulers(name, eta):
    """c_t by finite differences through scheduler.step, σ_t from the noise it adds."""
    scheduler = _prepared(name)
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    delta = torch.full_like(eps, 0.01)
    for t in scheduler.timesteps[[0, 7, -1]]:

        def step(e, noise_seed, t=t):
            g = torch.Generator().manual_seed(noise_seed)
            kwargs = {"eta": eta, "generator": g} if name == "ddim" else {"generator": g}
            return scheduler.step(e, t, x, **kwargs).prev_sample

        measured_c = ((step(eps + delta, 1) - step(eps, 1)) / delta).mean().item()
        assert eps_coefficient(scheduler, int(t), eta) == pytest.approx(measured_c, rel=1e-6, abs=1e-9)
        if name == "ddim":
            zero = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
            unit = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.ones_like(x)).prev_sample
            measured_sigma = (unit - zero).mean().item()
        else:
            measured_sigma = float(scheduler._get_variance(int(t))) ** 0.5 if int(t) > 0 else 0.0
        assert noise_std(scheduler, int(t), eta) == pytest.approx(measured_sigma, rel=1e-6, abs=1e-9)


def _statistics(k, bias, residual, steps, timesteps):
    return NoiseStatistics(
        num_inference_steps=steps,
        timesteps=[int(t) for t in timesteps],
        correlation=[k] * steps,
        residual_std=[residual] * steps,
        bias=[bias] * steps,
        num_samples=1,
    )


def _context(scheduler, step, x, eta):
    t = scheduler.timesteps[step]
    return StepContext(step, len(scheduler.timesteps), t, x, x, t.expand(len(x)), {}, 1.0, scheduler, eta)


@pytest.mark.parametrize(("name", "eta"), [("ddim", 1.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_corrected_step_matches_the_fp_step_in_mean_and_variance(name, eta):
    """ε_q = (1+k) ε_fp + b + noise: after CNC, BC and VSC, x_{t-1} has the FP step's mean and variance."""
    scheduler = _prepared(name)
    step_index, k, bias, residual = 5, 0.2, [0.1, -0.05, 0.03], 0.3
    hook = NoiseCorrection(_statistics(k, bias, residual, 20, scheduler.timesteps))
    n = 400_000
    x = torch.full((n, 3, 1, 1), 0.4, dtype=torch.float64)
    eps_fp = torch.full_like(x, -0.7)
    g = torch.Generator().manual_seed(0)
    eps_q = (1 + k) * eps_fp + torch.tensor(bias, dtype=torch.float64).reshape(1, 3, 1, 1)
    eps_q = eps_q + residual * torch.randn(x.shape, generator=g, dtype=torch.float64)
    ctx = _context(scheduler, step_index, x, eta)
    t = scheduler.timesteps[step_index]
    sigma = noise_std(scheduler, int(t), eta)
    scale = hook.noise_scale(ctx)
    assert 0 < scale < 1
    corrected_eps = hook.noise_estimate(ctx, eps_q)
    # the step with the injected noise scaled (as the sampling loop takes it), and the FP step
    z_fp, z_q = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    if name == "ddim":
        fp = scheduler.step(eps_fp, t, x, eta=eta, variance_noise=z_fp).prev_sample
        corrected = scheduler.step(corrected_eps, t, x, eta=eta, variance_noise=scale * z_q).prev_sample
    else:  # x_{t-1} = a_t x_t + c_t ε + σ_t z, with a_t x_t the step's mean at ε = 0
        c, a_x = eps_coefficient(scheduler, int(t)), _ddpm_mean(scheduler, t, x, torch.zeros_like(x))
        fp = a_x + c * eps_fp + sigma * z_fp
        corrected = a_x + c * corrected_eps + scale * sigma * z_q
    assert corrected.mean().item() == pytest.approx(fp.mean().item(), abs=2e-3)
    assert corrected.var().item() == pytest.approx(fp.var().item(), rel=0.01)
    uncorrected_var = (fp - fp.mean()).var().item() + (eps_coefficient(scheduler, int(t), eta) * residual) ** 2
    assert uncorrected_var > 1.05 * corrected.var().item()


def test_variance_calibration_keeps_the_direction_term_of_the_asked_sampler():
    """VSC scales only the injected noise: the DDIM step's direction term keeps σ_t (PTQD's code
    puts σ'_t there too, which moves x_{t-1} itself)."""
    scheduler, step_index, eta = _prepared("ddim"), 3, 1.0
    t = scheduler.timesteps[step_index]
    sigma, c = noise_std(scheduler, int(t), eta), eps_coefficient(scheduler, int(t), eta)
    residual = 0.8 * sigma / abs(c)  # leaves σ' = sqrt(σ² − c² residual²) = 0.6 σ
    hook = NoiseCorrection(_statistics(0.0, [0.0] * 3, residual, 20, scheduler.timesteps))
    x = torch.full((1, 3, 1, 1), 0.4, dtype=torch.float64)
    eps = torch.full_like(x, -0.7)
    scale = hook.noise_scale(_context(scheduler, step_index, x, eta))
    assert scale == pytest.approx(0.6, rel=1e-9)
    stepped = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    # DDIM by hand, x_{t-1} = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev − s²) ε, with s = σ and with s = σ'
    alpha = float(scheduler.alphas_cumprod[int(t)])
    alpha_prev = float(scheduler.alphas_cumprod[int(t) - 1000 // 20])
    x0 = (0.4 + 0.7 * math.sqrt(1 - alpha)) / math.sqrt(alpha)
    ours = math.sqrt(alpha_prev) * x0 - 0.7 * math.sqrt(1 - alpha_prev - sigma**2)
    theirs = math.sqrt(alpha_prev) * x0 - 0.7 * math.sqrt(1 - alpha_prev - (scale * sigma) ** 2)
    assert stepped.flatten().tolist() == pytest.approx([ours] * 3, rel=1e-6)  # the schedule is float32
    assert abs(theirs - ours) > 0.05


def _ddpm_mean(scheduler, t, x, eps):
    """The DDPM posterior mean for ε = ``eps``: the step with its noise taken out again."""
    g = torch.Generator().manual_seed(7)
    replay = torch.Generator().manual_seed(7)
    prev = scheduler.step(eps, t, x, generator=g).prev_sample
    z = torch.randn(x.shape, generator=replay, dtype=x.dtype)
    return prev - noise_std(scheduler, int(t)) * z


def test_variance_calibration_never_goes_negative_and_skips_deterministic_steps():
    scheduler = _prepared("ddim")
    x = torch.zeros(1, 3, 1, 1)
    huge = NoiseCorrection(_statistics(0.0, [0.0] * 3, 50.0, 20, scheduler.timesteps))
    assert huge.noise_scale(_context(scheduler, 3, x, 1.0)) == 0.0
    assert huge.noise_scale(_context(scheduler, 3, x, 0.0)) == 1.0  # η = 0: nothing to absorb
    off = NoiseCorrection(_statistics(0.0, [0.0] * 3, 0.3, 20, scheduler.timesteps), variance=False)
    assert off.noise_scale(_context(scheduler, 3, x, 1.0)) == 1.0


def test_switches_and_the_floor_on_the_correlation():
    scheduler = _prepared("ddim")
    eps = torch.ones(2, 3, 2, 2)
    ctx = _context(scheduler, 0, eps, 0.0)
    stats = _statistics(0.25, [0.5, 0.0, 0.0], 0.1, 20, scheduler.timesteps)
    both = NoiseCorrection(stats).noise_estimate(ctx, eps)
    assert torch.allclose(both[:, 0], torch.full_like(both[:, 0], 0.5 / 1.25))
    assert torch.allclose(both[:, 1], torch.full_like(both[:, 1], 1 / 1.25))
    assert torch.equal(NoiseCorrection(stats, correlation=False, bias=False).noise_estimate(ctx, eps), eps)
    broken = NoiseCorrection(_statistics(-0.99, [0.0] * 3, 0.1, 20, scheduler.timesteps), bias=False)
    assert torch.allclose(broken.noise_estimate(ctx, eps), eps / (1 + MIN_CORRELATION))


def test_statistics_for_another_sampler_are_refused():
    scheduler = _prepared("ddim", steps=20)
    hook = NoiseCorrection(_statistics(0.1, [0.0] * 3, 0.1, 10, range(10)))
    with pytest.raises(CalibrationError, match="measure them for this sampler"):
        hook.begin_step(_context(scheduler, 0, torch.zeros(1, 3, 1, 1), 0.0))


def _with_synthetic_error(unet, k, bias, sigma):
    """A copy of ``unet`` whose output is ``(1+k)·ε + b + σ·noise``: a stand-in quantized model."""
    noisy = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(11)

    def hook(module, args, kwargs, output):
        eps = output.sample
        offset = torch.tensor(bias).reshape(1, -1, 1, 1)
        output.sample = (1 + k) * eps + offset + sigma * torch.randn(eps.shape, generator=generator)
        return output

    noisy.register_forward_hook(hook, with_kwargs=True)
    return noisy


def test_collected_statistics_recover_a_known_error_and_correction_pulls_samples_back():
    model = load_model("tiny-unet")
    k, bias, sigma = 0.1, [0.05, -0.04, 0.02], 0.02
    quantized = _with_synthetic_error(model.denoiser, k, bias, sigma)
    labels = lambda n: Conditioning.classes(torch.arange(n) % 4)  # noqa: E731
    stats = collect_noise_statistics(
        model.denoiser,
        quantized,
        model.scheduler,
        num_inference_steps=6,
        num_samples=8,
        conditioning=labels,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert stats.num_inference_steps == 6 and len(stats.bias[0]) == 3
    assert stats.correlation == pytest.approx([k] * 6, abs=0.01)
    assert np.array(stats.bias) == pytest.approx(np.array([bias] * 6), abs=0.01)
    assert stats.residual_std == pytest.approx([sigma] * 6, rel=0.1)
    assert NoiseStatistics.from_json(stats.to_json()) == stats

    def draw(denoiser, hooks=()):
        return sample(
            denoiser,
            model.scheduler,
            batch_size=4,
            num_inference_steps=6,
            conditioning=labels(4),
            generator=torch.Generator().manual_seed(5),
            hooks=hooks,
            progress=False,
        )

    fp = draw(model.denoiser)
    raw = draw(quantized)
    corrected = draw(quantized, [NoiseCorrection(stats)])
    assert math.isfinite(corrected.abs().max().item())
    assert (corrected - fp).pow(2).mean() < 0.5 * (raw - fp).pow(2).mean()


class _NoiseScale(StepHook):
    def __init__(self, scale):
        self.scale = scale

    def noise_scale(self, ctx):
        return self.scale


@pytest.mark.parametrize(("name", "eta"), [("ddim", 1.0), ("ddpm", 0.0)])
def test_sampling_loop_scales_the_injected_noise(name, eta):
    """Scale 0 removes the noise exactly (the result no longer depends on the generator); 0.5 halves it."""
    model = load_model("tiny-unet")
    scheduler = SCHEDULERS[name]()
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def draw(seed, scale):
        return sample(
            model.denoiser,
            scheduler,
            batch_size=2,
            num_inference_steps=4,
            conditioning=Conditioning.classes([0, 1]),
            generator=torch.Generator().manual_seed(seed),
            eta=eta,
            latents=latents,
            hooks=[_NoiseScale(scale)],
            progress=False,
        )

    assert torch.allclose(draw(1, 0.0), draw(2, 0.0), atol=1e-5)
    assert not torch.allclose(draw(1, 1.0), draw(2, 1.0), atol=1e-3)
    full, half, none = draw(1, 1.0), draw(1, 0.5), draw(1, 0.0)
    # the rescaling path draws the noise the scheduler itself would draw
    assert torch.allclose(draw(1, 1.0 - 1e-7), full, atol=1e-4)
    assert (half - none).abs().mean() < (full - none).abs().mean()


def test_measured_statistics_travel_with_the_checkpoint_and_drive_sampling(tmp_path):
    model = load_model("tiny-unet")
    config = load_recipe("minmax").with_bits(4, 8)
    config = dataclasses.replace(
        config, correction=CorrectionConfig(enabled=True, num_samples=4, num_inference_steps=5, batch_size=4)
    )
    calibration = record_for(model, CalibrationConfig(num_inference_steps=5, num_trajectories=2), progress=False)
    quantized = api.quantize(model.denoiser, config, calibration, progress=False)
    with pytest.raises(ModelError, match="no noise statistics were measured"):
        api.sampling_hooks(quantized)
    labels = lambda n: Conditioning.classes(torch.arange(n) % 4)  # noqa: E731
    stats = api.measure_noise(quantized, model.denoiser, model.scheduler, labels, progress=False)
    selector, hook = api.sampling_hooks(quantized)  # the selector marks the steps as driven
    assert isinstance(selector, api.StepSelector)
    assert isinstance(hook, NoiseCorrection) and hook.statistics == stats
    api.save(quantized, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    _, hook = api.sampling_hooks(loaded)
    assert hook.statistics == stats

    def draw(denoiser, steps=5):
        return sample(
            denoiser,
            model.scheduler,
            batch_size=2,
            num_inference_steps=steps,
            conditioning=labels(2),
            generator=torch.Generator().manual_seed(0),
            hooks=api.sampling_hooks(denoiser),
            progress=False,
        )

    assert torch.equal(draw(loaded), draw(quantized))
    with pytest.raises(CalibrationError, match="measure them for this sampler"):
        draw(loaded, steps=4)


def test_the_ptqd_recipe_measures_while_quantizing():
    model = load_model("tiny-unet")
    config = load_recipe("ptqd").with_bits(4, 8)
    config = dataclasses.replace(
        config, calibration=CalibrationConfig(num_inference_steps=4, num_trajectories=2, batch_size=4)
    )
    config = dataclasses.replace(config, reconstruction=dataclasses.replace(config.reconstruction, enabled=False))
    config = dataclasses.replace(
        config, correction=dataclasses.replace(config.correction, num_samples=2, num_inference_steps=4)
    )
    quantized = api.quantize(model, config, progress=False)
    stats = api.info(quantized.denoiser).extra["noise_statistics"]
    assert stats["num_inference_steps"] == 4 and stats["num_samples"] == 2


def test_the_log_says_when_variance_calibration_has_nothing_to_absorb(caplog):
    scheduler = _prepared("ddim")
    hook = NoiseCorrection(_statistics(0.1, [0.0] * 3, 0.2, 20, scheduler.timesteps))
    with caplog.at_level("INFO", logger="dmquant"):
        hook.noise_scale(_context(scheduler, 0, torch.zeros(1, 3, 1, 1), 0.0))
    assert "injects no noise" in caplog.text and "VSC does nothing" in caplog.text
