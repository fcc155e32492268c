"""The sampling loop: parity with diffusers' pipelines, guidance, scheduler isolation and hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
)
from torch import nn

from dmquant.denoiser import Denoiser
from dmquant.errors import ConfigError
from dmquant.sampling import (
    Conditioning,
    StepContext,
    StepHook,
    copy_scheduler,
    guided_noise_estimate,
    prepare_scheduler,
    sample,
)
from dmquant.zoo.tiny import TINY_NUM_CLASSES, tiny_dit, tiny_unet2d, tiny_unet2d_condition, tiny_vae

STEPS = 4
BATCH = 2
#: DiTPipeline's hard-coded null class.
DIT_NULL_CLASS = 1000


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def to_numpy_image(x: torch.Tensor) -> np.ndarray:
    """The pipelines' post-processing of a final sample in [-1, 1]."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d(0, class_conditional=False)


@pytest.fixture(scope="module")
def class_unet():
    return tiny_unet2d(0, class_conditional=True)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(0)


# --- parity with diffusers' pipelines -------------------------------------------------------


@pytest.mark.parametrize(
    ("pipeline_type", "scheduler_type", "eta"),
    [
        (DDPMPipeline, DDPMScheduler, None),
        (DDIMPipeline, DDIMScheduler, 0.0),
        (DDIMPipeline, DDIMScheduler, 0.5),
        (DDPMPipeline, DPMSolverMultistepScheduler, None),
    ],
)
def test_matches_unconditional_pipelines(unet, pipeline_type, scheduler_type, eta):
    scheduler = scheduler_type()
    eta_kwargs = {} if eta is None else {"eta": eta}
    pipeline = quiet(pipeline_type(unet=unet, scheduler=scheduler))
    expected = pipeline(
        batch_size=BATCH, generator=seeded(), num_inference_steps=STEPS, output_type="np", **eta_kwargs
    ).images
    x0 = sample(
        unet, scheduler, batch_size=BATCH, num_inference_steps=STEPS, generator=seeded(), progress=False, **eta_kwargs
    )
    np.testing.assert_allclose(to_numpy_image(x0), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler_type", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_matches_dit_pipeline_with_guidance(vae, scheduler_type):
    # DiTPipeline batches [cond, uncond] (we batch [uncond, cond]), uses the null class 1000, steps
    # the scheduler on the doubled batch without a generator and does not multiply by
    # init_noise_sigma (1 for these schedulers): deterministic schedulers make the runs comparable.
    dit = tiny_dit(0)
    scheduler = scheduler_type()
    labels = [1, 7]
    pipeline = quiet(DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler))
    expected = pipeline(
        class_labels=labels, guidance_scale=4.0, generator=seeded(), num_inference_steps=STEPS, output_type="np"
    ).images
    conditioning = Conditioning.classes(labels, null_label=DIT_NULL_CLASS, guidance_scale=4.0)
    latents = sample(
        dit,
        scheduler,
        batch_size=BATCH,
        num_inference_steps=STEPS,
        conditioning=conditioning,
        generator=seeded(),
        progress=False,
    )
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample
    np.testing.assert_allclose(to_numpy_image(images), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("scheduler_type", "eta"),
    [
        # default config: the pipeline patches steps_offset and clip_sample on the object itself
        (DDIMScheduler, 0.5),
        # init_noise_sigma != 1, a non-trivial scale_model_input and generator-consuming steps
        (EulerAncestralDiscreteScheduler, 0.0),
    ],
)
def test_matches_stable_diffusion_pipeline_with_guidance(vae, scheduler_type, eta):
    unet = tiny_unet2d_condition(0)
    pipeline = quiet(
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=scheduler_type(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )
    embeddings = torch.randn(2, BATCH, 7, 32, generator=seeded(1))
    expected = pipeline(
        prompt_embeds=embeddings[0],
        negative_prompt_embeds=embeddings[1],
        guidance_scale=4.0,
        eta=eta,
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="latent",
    ).images
    conditioning = Conditioning.embeddings(embeddings[0], negative=embeddings[1], guidance_scale=4.0)
    latents = sample(
        unet,
        pipeline.scheduler,
        batch_size=BATCH,
        num_inference_steps=STEPS,
        conditioning=conditioning,
        generator=seeded(),
        eta=eta,
        progress=False,
    )
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)


# --- guidance and conditioning ----------------------------------------------------------------


def test_guidance_scale_one_is_the_unguided_run(class_unet):
    labels = torch.tensor([3, 5])

    def run(conditioning: Conditioning) -> torch.Tensor:
        return sample(
            class_unet,
            DDIMScheduler(),
            batch_size=BATCH,
            num_inference_steps=STEPS,
            conditioning=conditioning,
            generator=seeded(),
            progress=False,
        )

    unguided = run(Conditioning.classes(labels))
    guided_at_one = run(Conditioning.classes(labels, null_label=TINY_NUM_CLASSES, guidance_scale=1.0))
    torch.testing.assert_close(guided_at_one, unguided, rtol=0, atol=0)
    guided = run(Conditioning.classes(labels, null_label=TINY_NUM_CLASSES, guidance_scale=3.0))
    assert not torch.allclose(guided, unguided)


class LabelEcho(nn.Module):
    """``eps = x * (1 + class_label)``: makes the guidance combination checkable by hand."""

    def forward(self, x, t, class_labels):
        return x * (1 + class_labels.float()).view(-1, 1, 1, 1)


def test_guided_noise_estimate_combines_uncond_first():
    x = torch.ones(2, 1, 1, 1)
    labels = torch.tensor([0, 0, 2, 4])  # [uncond, uncond, cond, cond]
    cond = {"class_labels": labels}
    eps = guided_noise_estimate(Denoiser(LabelEcho()), x.repeat(2, 1, 1, 1), torch.zeros(4), cond, guidance_scale=3.0)
    # eps_u = 1, eps_c = 3 and 5: 1 + 3 * (3 - 1) = 7, 1 + 3 * (5 - 1) = 13
    torch.testing.assert_close(eps.flatten(), torch.tensor([7.0, 13.0]))


def test_conditioning_is_validated():
    with pytest.raises(ConfigError, match="unconditional"):
        Conditioning.classes([1, 2], guidance_scale=2.0)
    with pytest.raises(ConfigError, match="keys"):
        Conditioning({"class_labels": torch.tensor([1])}, {"encoder_hidden_states": torch.zeros(1, 2, 3)}, 2.0)
    with pytest.raises(ConfigError, match="shapes"):
        Conditioning.embeddings(torch.zeros(2, 7, 32), negative=torch.zeros(1, 7, 32), guidance_scale=2.0)
    with pytest.raises(ConfigError, match="batch size"):
        Conditioning({"a": torch.zeros(2), "b": torch.zeros(3)})


def test_conditioning_slices_and_doubles():
    conditioning = Conditioning.classes([1, 2, 3], null_label=10, guidance_scale=2.0)
    assert conditioning.batch_size == 3 and Conditioning.unconditional().batch_size is None
    part = conditioning.slice(1, 3)
    assert part.batch_size == 2 and part.guidance_scale == 2.0
    assert part.model_cond()["class_labels"].tolist() == [10, 10, 2, 3]
    assert Conditioning.classes([1, 2], null_label=10).model_cond()["class_labels"].tolist() == [1, 2]


def test_batch_size_must_match_the_conditioning(class_unet):
    with pytest.raises(ConfigError, match="batch_size"):
        sample(
            class_unet,
            DDIMScheduler(),
            batch_size=3,
            num_inference_steps=STEPS,
            conditioning=Conditioning.classes([1, 2]),
            progress=False,
        )


# --- scheduler isolation, shapes, initial noise ---------------------------------------------


def test_scheduler_is_not_mutated_and_runs_are_independent(unet):
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(7)
    config, timesteps = dict(scheduler.config), scheduler.timesteps.clone()
    runs = [
        sample(unet, scheduler, batch_size=BATCH, num_inference_steps=STEPS, generator=seeded(), progress=False)
        for _ in range(2)
    ]
    assert dict(scheduler.config) == config
    torch.testing.assert_close(scheduler.timesteps, timesteps, rtol=0, atol=0)
    assert scheduler.model_outputs == [None] * scheduler.config.solver_order
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_copy_keeps_a_config_patched_after_construction():
    scheduler = DDIMScheduler()
    scheduler.register_to_config(steps_offset=1, clip_sample=False)
    copy = copy_scheduler(scheduler)
    assert (copy.config.steps_offset, copy.config.clip_sample) == (1, False)
    assert prepare_scheduler(scheduler, 5).timesteps.tolist() == [801, 601, 401, 201, 1]


def test_given_latents_are_the_initial_noise(unet):
    noise = torch.randn(BATCH, 3, 16, 16, generator=seeded())
    options = {"batch_size": BATCH, "num_inference_steps": STEPS, "progress": False}
    drawn = sample(unet, DDIMScheduler(), generator=seeded(), **options)
    given = sample(unet, DDIMScheduler(), latents=noise, **options)
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="latents"):
        sample(unet, DDIMScheduler(), batch_size=3, num_inference_steps=STEPS, latents=noise, progress=False)


class Halve(nn.Module):
    def forward(self, x, t):
        return 0.5 * x


def test_generic_models_need_or_take_a_sample_shape():
    with pytest.raises(ConfigError, match="sample_shape"):
        sample(Halve(), DDIMScheduler(), batch_size=BATCH, num_inference_steps=STEPS, progress=False)
    x0 = sample(
        Halve(), DDIMScheduler(), batch_size=BATCH, num_inference_steps=STEPS, sample_shape=(2, 3, 5), progress=False
    )
    assert x0.shape == (BATCH, 2, 3, 5)


# --- hooks ---------------------------------------------------------------------------------------


class Trace(StepHook):
    def __init__(self, events: list, name: str):
        self.events, self.name = events, name
        self.contexts: list[StepContext] = []

    def begin_step(self, ctx):
        self.contexts.append(ctx)
        self.events.append((self.name, "begin", ctx.step_index))

    def noise_estimate(self, ctx, eps):
        self.events.append((self.name, "eps", ctx.step_index))
        return eps

    def end_step(self, ctx, prev_sample):
        self.events.append((self.name, "end", ctx.step_index))


def test_hooks_are_called_in_order_with_step_indices(class_unet):
    events: list = []
    first, second = Trace(events, "a"), Trace(events, "b")
    conditioning = Conditioning.classes([4, 6], null_label=TINY_NUM_CLASSES, guidance_scale=2.0)
    sample(
        class_unet,
        DDIMScheduler(),
        batch_size=BATCH,
        num_inference_steps=STEPS,
        conditioning=conditioning,
        hooks=[first, second],
        generator=seeded(),
        progress=False,
    )
    expected = [
        (name, event, step) for step in range(STEPS) for event in ("begin", "eps", "end") for name in ("a", "b")
    ]
    assert events == expected
    scheduler = prepare_scheduler(DDIMScheduler(), STEPS)
    for step, ctx in enumerate(first.contexts):
        assert (ctx.step_index, ctx.num_steps, ctx.guidance_scale) == (step, STEPS, 2.0)
        assert ctx.timestep == scheduler.timesteps[step]
        assert ctx.model_input.shape == (2 * BATCH, 3, 16, 16)
        torch.testing.assert_close(ctx.model_input, torch.cat([ctx.sample, ctx.sample]))
        assert ctx.model_timestep.tolist() == [int(ctx.timestep)] * 2 * BATCH
        assert ctx.model_cond["class_labels"].tolist() == [10, 10, 4, 6]


class ZeroNoise(StepHook):
    def noise_estimate(self, ctx, eps):
        return torch.zeros_like(eps)


def test_a_hook_that_changes_eps_changes_the_result(unet):
    def run(hooks: list[StepHook]) -> torch.Tensor:
        return sample(
            unet,
            DDIMScheduler(),
            batch_size=BATCH,
            num_inference_steps=STEPS,
            hooks=hooks,
            generator=seeded(),
            progress=False,
        )

    plain, observed, altered = run([]), run([StepHook()]), run([ZeroNoise()])
    torch.testing.assert_close(observed, plain, rtol=0, atol=0)
    assert not torch.allclose(altered, plain)
