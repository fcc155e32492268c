"""load_model on the directories diffusers writes: model directories, pipelines, dmquant_model.json."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dmquant.errors import ModelError
from dmquant.jobs import generate
from dmquant.models import MODEL_INFO_FILE, SCHEDULERS, DiffusionModel, load_model
from dmquant.zoo.tiny import tiny_dit, tiny_unet2d, tiny_unet2d_condition, tiny_vae

NO_SCHEDULER_MESSAGE = "no scheduler_config.json"


def custom_ddim() -> DDIMScheduler:
    """A DDIM scheduler whose configuration differs from every default that matters here."""
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        clip_sample=False,
        steps_offset=1,
    )


def save_unet_dir(path, unet=None, *, scheduler_at=("scheduler",)):
    """A diffusers model directory: the UNet's config.json and weights, and a scheduler where asked."""
    (unet if unet is not None else tiny_unet2d()).save_pretrained(path)
    if scheduler_at is not None:
        custom_ddim().save_pretrained(path.joinpath(*scheduler_at))
    return path


def write_info(path, info: dict) -> None:
    (path / MODEL_INFO_FILE).write_text(json.dumps(info))


def to_numpy_image(x: torch.Tensor) -> np.ndarray:
    """What the diffusers pipelines make of a final sample in [-1, 1] with output_type="np"."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return save_unet_dir(tmp_path_factory.mktemp("models") / "class-unet")


@pytest.fixture(scope="module")
def unet_model(unet_dir):
    return load_model(unet_dir)


# ------------------------------------------------------------------ model directories


@pytest.mark.parametrize("scheduler_at", [("scheduler",), ()], ids=["scheduler-subdir", "scheduler-in-root"])
def test_model_dir_loads_weights_scheduler_and_class_conditioning(tmp_path, scheduler_at):
    unet = tiny_unet2d(seed=3)
    model = load_model(save_unet_dir(tmp_path / "my-unet", unet, scheduler_at=scheduler_at))

    assert model.name == "my-unet"
    assert isinstance(model.denoiser, UNet2DModel)
    assert not model.denoiser.training
    saved = unet.state_dict()
    for key, tensor in model.denoiser.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    assert type(model.scheduler) is DDIMScheduler
    config = model.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.timestep_spacing, config.clip_sample, config.steps_offset) == ("trailing", False, 1)
    assert model.conditioning == "class"
    assert (model.num_classes, model.null_class) == (10, 10)
    assert model.vae is None


def test_class_conditioning_follows_num_class_embeds(tmp_path):
    unet = UNet2DModel.from_config({**tiny_unet2d().config, "num_class_embeds": 7})
    model = load_model(save_unet_dir(tmp_path / "seven", unet))

    assert (model.conditioning, model.num_classes, model.null_class) == ("class", 6, 6)
    conditioning = model.make_conditioning(8, guidance_scale=2.0)
    assert conditioning.cond["class_labels"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert conditioning.uncond["class_labels"].tolist() == [6] * 8


def test_unconditional_model_dir(tmp_path):
    model = load_model(save_unet_dir(tmp_path / "plain", tiny_unet2d(class_conditional=False)))

    assert model.conditioning == "none"
    assert model.num_classes is None and model.null_class is None
    assert model.make_conditioning(3).cond == {}


def test_model_dir_without_scheduler_warns_and_uses_linear_ddim(tmp_path):
    path = save_unet_dir(tmp_path / "bare", scheduler_at=None)

    with pytest.warns(UserWarning, match=NO_SCHEDULER_MESSAGE) as caught:
        model = load_model(path)

    message = next(str(w.message) for w in caught if NO_SCHEDULER_MESSAGE in str(w.message))
    assert "DDIM" in message and "linear" in message and "1000" in message
    assert type(model.scheduler) is DDIMScheduler
    assert model.scheduler.config.beta_schedule == "linear"
    assert model.scheduler.config.num_train_timesteps == 1000


def test_model_dir_with_scheduler_does_not_warn(unet_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(unet_dir)
    assert not [w for w in caught if NO_SCHEDULER_MESSAGE in str(w.message)]


@pytest.mark.parametrize(
    ("class_name", "value", "message"),
    [
        ("DiffusionPipeline", None, "names 'DiffusionPipeline', not a scheduler"),
        ("__version__", None, "not a scheduler"),
        ("DDIMScheduler", {"beta_schedule": "nope"}, "cannot build the DDIMScheduler"),
    ],
)
def test_a_scheduler_config_that_names_no_scheduler_is_refused(unet_dir, tmp_path, class_name, value, message):
    model_dir = shutil.copytree(unet_dir, tmp_path / "unet")
    path = model_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) | {"_class_name": class_name} | (value or {})
    path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message):
        load_model(model_dir)


def test_model_info_file_overrides_inferred_conditioning(tmp_path):
    path = save_unet_dir(tmp_path / "override")
    write_info(path, {"conditioning": "class", "num_classes": 3, "null_class": 10, "guidance_scale": 2.5})

    model = load_model(path)

    assert (model.conditioning, model.num_classes, model.null_class) == ("class", 3, 10)
    assert model.guidance_scale == 2.5
    conditioning = model.make_conditioning(5)
    assert conditioning.guidance_scale == 2.5
    assert conditioning.cond["class_labels"].tolist() == [0, 1, 2, 0, 1]
    assert conditioning.uncond["class_labels"].tolist() == [10] * 5
    with pytest.raises(ModelError):
        model.make_conditioning(1, labels=[3])


def test_model_info_file_unknown_keys_are_named(tmp_path):
    path = save_unet_dir(tmp_path / "typo")
    write_info(path, {"conditioning": "class", "num_clases": 3, "colour": "red"})

    with pytest.raises(ModelError, match="unknown keys") as error:
        load_model(path)
    assert "num_clases" in str(error.value) and "colour" in str(error.value)
    assert MODEL_INFO_FILE in str(error.value)


@pytest.mark.parametrize(
    "info", [{"conditioning": "klass"}, {"conditioning": "class"}], ids=["unknown-conditioning", "class-without-count"]
)
def test_model_info_file_impossible_values_are_refused(tmp_path, info):
    path = save_unet_dir(tmp_path / "bad-values", tiny_unet2d(class_conditional=False))
    write_info(path, info)

    with pytest.raises(ModelError, match="conditioning|num_classes"):
        load_model(path)


@pytest.mark.filterwarnings("ignore:.*no scheduler_config.json:UserWarning")
def test_text_conditioned_unet_alone_needs_its_text_encoder(tmp_path):
    path = tmp_path / "cond-unet"
    tiny_unet2d_condition().save_pretrained(path)

    with pytest.raises(ModelError, match="text encoder") as error:
        load_model(path)
    assert "UNet2DConditionModel" in str(error.value)
    assert "pipeline" in str(error.value)


def test_directory_without_configs_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json") as error:
        load_model(tmp_path / "empty")
    assert "config.json" in str(error.value)


def test_missing_path_is_refused(tmp_path):
    missing = tmp_path / "not-there"
    with pytest.raises(ModelError, match="not-there") as error:
        load_model(missing)
    assert "tiny-unet" in str(error.value)  # the built-in names are offered


def test_config_of_a_foreign_class_is_refused(tmp_path):
    path = tmp_path / "bert"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "BertModel", "hidden_size": 8}))

    with pytest.raises(ModelError, match="BertModel") as error:
        load_model(path)
    assert "not a denoiser dmquant loads" in str(error.value)


def _vae_dir(path):
    tiny_vae().save_pretrained(path)


def _scheduler_named_in_config_json(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))


def _unet_config_without_weights(path):
    tiny_unet2d().save_pretrained(path)
    for weights in path.glob("diffusion_pytorch_model*"):
        weights.unlink()


@pytest.mark.filterwarnings("ignore:.*no scheduler_config.json:UserWarning")
@pytest.mark.parametrize(
    "make",
    [_vae_dir, _scheduler_named_in_config_json, _unet_config_without_weights],
    ids=["autoencoder", "scheduler-class", "missing-weights"],
)
def test_directory_that_holds_no_loadable_denoiser_is_refused(tmp_path, make):
    make(tmp_path / "model")
    with pytest.raises(ModelError):
        load_model(tmp_path / "model")


# ------------------------------------------------------------------ pipeline directories


@pytest.fixture(scope="module")
def ddpm_pipeline_dir(tmp_path_factory):
    pipeline = DDPMPipeline(unet=tiny_unet2d(seed=1, class_conditional=False), scheduler=DDPMScheduler())
    path = tmp_path_factory.mktemp("pipelines") / "ddpm"
    pipeline.save_pretrained(path)
    return path


def test_ddpm_pipeline_loads_as_unconditional(ddpm_pipeline_dir):
    model = load_model(ddpm_pipeline_dir)

    assert model.name == "ddpm"
    assert model.conditioning == "none"
    assert isinstance(model.denoiser, UNet2DModel)
    assert type(model.scheduler) is DDPMScheduler
    assert model.vae is None
    with pytest.raises(ModelError, match="unconditional"):
        model.make_conditioning(2, labels=[1, 2])


def test_generate_reproduces_ddpm_pipeline(ddpm_pipeline_dir):
    model = load_model(ddpm_pipeline_dir)
    pipeline = quiet(DDPMPipeline.from_pretrained(ddpm_pipeline_dir))

    images, _ = generate(model, 2, num_inference_steps=4, seed=7, batch_size=2, progress=False)
    expected = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=4, output_type="np"
    ).images

    assert images.shape == (2, 3, 16, 16)
    ours = to_numpy_image(images)
    # the comparison is meaningful only where the pipeline's clamp to [0, 1] leaves values alone
    assert ((expected > 0) & (expected < 1)).mean() > 0.3
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_generate_seeds_each_batch_with_seed_plus_index(ddpm_pipeline_dir):
    model = load_model(ddpm_pipeline_dir)
    pipeline = quiet(DDPMPipeline.from_pretrained(ddpm_pipeline_dir))

    images, _ = generate(model, 4, num_inference_steps=3, seed=7, batch_size=2, progress=False)

    for index, seed in enumerate((7, 8)):
        expected = pipeline(
            batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=3, output_type="np"
        ).images
        ours = to_numpy_image(images[2 * index : 2 * index + 2])
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def dit_pipeline_dir(tmp_path_factory):
    pipeline = DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDIMScheduler())
    path = tmp_path_factory.mktemp("pipelines") / "dit"
    pipeline.save_pretrained(path)
    return path


def test_dit_pipeline_loads_as_class_conditional_latent_model(dit_pipeline_dir):
    model = load_model(dit_pipeline_dir)

    assert isinstance(model.denoiser, DiTTransformer2DModel)
    assert type(model.scheduler) is DDIMScheduler
    assert (model.conditioning, model.num_classes, model.null_class) == ("class", 1000, 1000)
    assert model.guidance_scale > 1
    conditioning = model.make_conditioning(2, labels=[3, 999])
    assert conditioning.guided
    assert conditioning.cond["class_labels"].tolist() == [3, 999]
    assert conditioning.uncond["class_labels"].tolist() == [1000, 1000]

    assert model.vae is not None
    images = model.decode(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all()


def test_generate_reproduces_dit_pipeline(dit_pipeline_dir):
    model = load_model(dit_pipeline_dir)
    pipeline = quiet(DiTPipeline.from_pretrained(dit_pipeline_dir))

    images, _ = generate(model, 2, num_inference_steps=3, seed=5, batch_size=2, labels=[3, 999], progress=False)
    expected = pipeline(
        class_labels=[3, 999],
        num_inference_steps=3,
        guidance_scale=model.guidance_scale,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images

    assert images.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(to_numpy_image(images), expected, atol=1e-5, rtol=0)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=False))


def tiny_clip_tokenizer(directory) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (every byte alone and as a word end) and the two special tokens."""
    directory.mkdir()
    alphabet = list(_bytes_to_unicode().values())
    tokens = [*alphabet, *(char + "</w>" for char in alphabet), "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    tokenizer = tiny_clip_tokenizer(root / "clip-tokenizer")
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(config).eval()
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet2d_condition(),
        scheduler=custom_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = root / "sd"
    pipeline.save_pretrained(path)
    return pipeline, path


def test_tiny_clip_tokenizer_covers_the_prompts(sd_pipeline):
    pipeline, _ = sd_pipeline
    tokenizer = pipeline.tokenizer
    ids = tokenizer(["a", "b", ""]).input_ids
    assert ids[0][0] == ids[1][0] == ids[2][0] == tokenizer.bos_token_id
    assert ids[0][-1] == ids[1][-1] == ids[2][-1] == tokenizer.eos_token_id
    assert len(ids[0]) == len(ids[1]) == 3 and ids[0][1] != ids[1][1]
    assert tokenizer.unk_token_id not in ids[0][1:-1] + ids[1][1:-1]


def test_stable_diffusion_pipeline_loads_as_text_conditioned(sd_pipeline):
    _, path = sd_pipeline
    model = load_model(path)

    assert model.conditioning == "text"
    assert isinstance(model.denoiser, UNet2DConditionModel)
    assert type(model.scheduler) is DDIMScheduler
    assert model.scheduler.config.beta_schedule == "scaled_linear"
    assert model.vae is not None
    assert model.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(sd_pipeline):
    pipeline, path = sd_pipeline
    model = load_model(path)

    conditioning = model.make_conditioning(2, prompts=["a", "b"], guidance_scale=3)

    assert conditioning.guided and conditioning.guidance_scale == 3
    states = conditioning.cond["encoder_hidden_states"]
    negative = conditioning.uncond["encoder_hidden_states"]
    assert states.shape == negative.shape == (2, 77, 32)
    with torch.no_grad():
        expected, expected_negative = pipeline.encode_prompt(["a", "b"], torch.device("cpu"), 1, True)
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(negative, expected_negative, rtol=0, atol=1e-6)
    assert not torch.allclose(states[0], states[1])  # the prompts do reach the embeddings


def test_default_prompts_from_model_info_file(sd_pipeline, tmp_path):
    _, path = sd_pipeline
    copy = shutil.copytree(path, tmp_path / "sd-with-prompts")
    write_info(copy, {"default_prompts": ["a", "b"], "guidance_scale": 2.0})
    model = load_model(copy)

    conditioning = model.make_conditioning(4)

    assert conditioning.guidance_scale == 2.0
    explicit = model.make_conditioning(4, prompts=["a", "b", "a", "b"])
    torch.testing.assert_close(conditioning.cond, explicit.cond, rtol=0, atol=0)


def test_text_conditioning_without_prompts_is_usable_or_a_model_error(sd_pipeline):
    _, path = sd_pipeline
    model = load_model(path)
    try:
        conditioning = model.make_conditioning(2)
    except ModelError as error:
        assert "prompt" in str(error)
    else:
        assert conditioning.cond["encoder_hidden_states"].shape == (2, 77, 32)


# ------------------------------------------------------------------ schedulers and conditioning checks


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_with_scheduler_builds_the_named_scheduler_from_the_same_config(unet_model, name):
    switched = unet_model.with_scheduler(name)

    assert type(switched.scheduler) is SCHEDULERS[name]
    assert switched.denoiser is unet_model.denoiser
    assert (switched.conditioning, switched.num_classes) == (unet_model.conditioning, unet_model.num_classes)
    assert type(unet_model.scheduler) is DDIMScheduler  # the original bundle is untouched
    original = unet_model.scheduler.config
    shared = set(original) & set(switched.scheduler.config) - {"_class_name", "_diffusers_version"}
    assert {"beta_schedule", "beta_start", "beta_end", "timestep_spacing", "steps_offset"} <= shared
    for key in shared:
        assert switched.scheduler.config[key] == original[key], key


def test_generate_samples_with_the_switched_scheduler(unet_model):
    switched = unet_model.with_scheduler("dpm-solver")
    options = dict(num_inference_steps=3, seed=0, labels=[1], progress=False)

    ddim_images, _ = generate(unet_model, 1, **options)
    dpm_images, _ = generate(switched, 1, **options)
    again, _ = generate(switched, 1, **options)

    assert torch.isfinite(dpm_images).all()
    assert torch.equal(dpm_images, again)
    assert not torch.allclose(dpm_images, ddim_images, atol=1e-3)


def test_with_scheduler_does_not_depend_on_where_the_scheduler_came_from(tmp_path):
    builtin = load_model("tiny-unet")
    builtin.scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    from_disk = DiffusionModel("from-disk", builtin.denoiser, loaded)

    for name in SCHEDULERS:
        ours = builtin.with_scheduler(name).scheduler.config
        theirs = from_disk.with_scheduler(name).scheduler.config
        for key in set(ours) - {"_use_default_values"}:
            assert ours[key] == theirs[key], (name, key)


def test_unknown_scheduler_is_refused(unet_model):
    with pytest.raises(ModelError, match="euler") as error:
        unet_model.with_scheduler("euler")
    for name in SCHEDULERS:
        assert name in str(error.value)


@pytest.mark.parametrize("labels", [[10], [0, 11], [-1]], ids=["null-class", "too-large", "negative"])
def test_class_labels_out_of_range_are_refused(unet_model, labels):
    with pytest.raises(ModelError, match=r"\[0, 10\)"):
        unet_model.make_conditioning(2, labels=labels)


def test_class_labels_in_range_are_used(unet_model):
    conditioning = unet_model.make_conditioning(3, labels=[9, 0])
    assert conditioning.cond["class_labels"].tolist() == [9, 0, 9]


def test_dit_null_class_is_not_a_label(dit_pipeline_dir):
    model = load_model(dit_pipeline_dir)
    with pytest.raises(ModelError):
        model.make_conditioning(1, labels=[1000])


@pytest.mark.parametrize("given", [{"labels": [0]}, {"prompts": ["a"]}], ids=["labels", "prompts"])
def test_unconditional_model_refuses_labels_and_prompts(tmp_path, given):
    model = load_model(save_unet_dir(tmp_path / "plain", tiny_unet2d(class_conditional=False)))
    with pytest.raises(ModelError, match="unconditional"):
        model.make_conditioning(2, **given)
