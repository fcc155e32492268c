"""The zoo's jobs behind ``dmquant zoo``: train a reference network, measure a shipped one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import distributed
from .atomic import check_output
from .errors import ModelError
from .eval.features import FeatureExtractor
from .jobs import generate
from .models import DiffusionModel, load_model
from .provenance import environment
from .report import save_image_grid
from .sampling import Conditioning
from .zoo.glyphnet import GlyphNet, load_glyphnet
from .zoo.quality import ReferenceSet, Requests, held_out_requests
from .zoo.reference import (
    GLYPHNET_FILE,
    ZOO,
    read_model_card,
    training_card,
    write_model_card,
    zoo_entry,
)
from .zoo.training import TrainingResult, TrainingTask, train


def shipped_glyphnet(device: torch.device | str = "cpu") -> GlyphNet:
    """The GlyphNet that ships with dmquant (the feature network of every glyph FID-proxy)."""
    return load_glyphnet(ZOO["glyphnet"].directory / GLYPHNET_FILE, device)


def _exported_before(directory: Path, name: str) -> bool:
    """``directory`` holds an earlier export of zoo model ``name`` (its model card says so)."""
    try:
        return read_model_card(directory).get("name") == name
    except (OSError, ValueError, AttributeError):
        return False


def train_zoo_model(
    name: str,
    *,
    state_dir: str | Path,
    export_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    max_minutes: float | None = None,
    steps: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainingResult:
    """Train (or resume) zoo model ``name`` and export its weights and model card.

    The export happens whenever the run stops — finished or out of time — so a time-limited
    run still leaves usable (EMA) weights; the card says how many steps were done. An
    ``export_dir`` that exists is replaced only if it holds an earlier export of this model
    (its model card names it) or with ``overwrite``; that is checked before training.
    """
    entry = zoo_entry(name)
    if export_dir is not None and not _exported_before(Path(export_dir), name):
        check_output(Path(export_dir), overwrite=overwrite, replaceable=lambda _: True, what=f"an export of {name}")
    plan = entry.plan if steps is None else dataclasses.replace(entry.plan, steps=steps)
    entry = dataclasses.replace(entry, plan=plan)
    result = train(
        TrainingTask(name, entry.build(), entry.loss),
        plan,
        state_dir,
        device=device,
        max_minutes=max_minutes,
        progress=progress,
    )
    export = Path(export_dir) if export_dir is not None else entry.directory
    trained = result.ema if result.ema is not None else result.model
    card = training_card(entry, result) | {"finished": result.finished}
    if entry.measure is not None:
        card |= entry.measure(trained)
    entry.export(trained, export)
    write_model_card(export, card)
    return result


def sample_requests(model: DiffusionModel, requests: Requests, **options) -> tuple[torch.Tensor, Conditioning]:
    """Samples of ``model`` asked for ``requests``: their prompts (text models) or labels (class models)."""
    if model.conditioning == "text":
        if requests.prompts is None:
            raise ModelError(f"{model.name} is a text-to-image model: the requests need prompts")
        return generate(model, len(requests), prompts=requests.prompts, **options)
    return generate(model, len(requests), labels=requests.labels.tolist(), **options)


def evaluate_zoo_model(
    name: str,
    *,
    model_dir: str | Path | None = None,
    num_samples: int = 10_000,
    num_inference_steps: int = 100,
    guidance_scales: tuple[float, ...] = (1.0,),
    seed: int = 0,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    grid: str | Path | None = None,
    features: FeatureExtractor | None = None,
    progress: bool = True,
) -> dict:
    """Measure the FP quality of a zoo diffusion model and record it in its model card.

    Samples ``num_samples`` images with DDIM (eta 0) at each guidance scale, asking for the
    held-out glyphs' own classes (or, for the text-to-image model, their prompts), and judges
    them with the shipped GlyphNet against those held-out glyphs (with the real-vs-real floor at
    the same N); text models also get the foreground-colour accuracy. ``features`` replaces
    GlyphNet for the distribution metrics (e.g. the standard Inception network); the card then
    records them under ``quality_<extractor name>``. ``grid`` gets a PNG of the first 64 samples
    at the first guidance scale.

    Under a launcher of several processes the samples are spread over them as :func:`dmquant.jobs.generate`
    spreads them, every process judges them all, and the main process alone shows progress and writes.
    """
    main_process = distributed.is_main_process()
    progress = progress and main_process
    directory = Path(model_dir) if model_dir is not None else zoo_entry(name).directory
    resolution = zoo_entry(name).plan.resolution
    model = load_model(directory).to(device)
    glyphnet = shipped_glyphnet(device)
    references = ReferenceSet(glyphnet, num_samples, features=features, resolution=resolution, progress=progress)
    requests = held_out_requests(num_samples, resolution=resolution, text=model.conditioning == "text")
    results = []
    for scale in guidance_scales:
        images, _ = sample_requests(
            model,
            requests,
            num_inference_steps=num_inference_steps,
            seed=seed,
            batch_size=batch_size,
            guidance_scale=scale,
            progress=progress,
        )
        quality = references.judge(images, requests.labels, colours=requests.colours, progress=progress)
        results.append({"guidance_scale": scale, **quality.as_dict()})
        if grid is not None and scale == guidance_scales[0] and main_process:
            save_image_grid(images[:64].cpu(), grid, nrow=8)
    card = read_model_card(directory)
    section = "quality" if features is None else f"quality_{features.name}"
    card[section] = {
        "sampler": "DDIM",
        "eta": 0.0,
        "num_inference_steps": num_inference_steps,
        "num_samples": num_samples,
        "seed": seed,
        "reference": "held-out glyphs (test split), whose classes (or prompts) the samples are asked for; "
        "floors are real-vs-real at the same N",
        "features": references.features.name,
        "results": results,
        **environment(),
    }
    if main_process:
        write_model_card(directory, card)
    return card
