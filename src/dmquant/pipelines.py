"""Diffusers pipelines with a quantized denoiser: quantized in one call, saved and loaded whole, and run
by ``pipe(...)`` with the per-step parts of a recipe applied.

A pipeline directory written by :func:`save_pipeline` is a diffusers pipeline directory whose denoiser
folder (``unet/`` or ``transformer/``) holds a dmquant checkpoint — codes and scales, the manifest, and a
``config.json`` that names the architecture and ``quant_method: dmquant`` — and whose other components
are written by their own ``save_pretrained``. :func:`load_pipeline` loads the checkpoint and lets
diffusers load the rest.

Per-step parts (per-step activation ranges, a step-aware bit schedule, PTQD's noise corrections) need to
know the sampling step. dmquant's own loop tells them through step hooks; inside ``pipe(...)`` the
:class:`HookedScheduler` that :func:`hook_pipeline` installs does, from the scheduler calls every
diffusers pipeline makes: ``set_timesteps`` starts a trajectory, ``step`` ends a step (and takes the
noise estimate the corrections adjust).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from .api import info, load, quantize, sampling_hooks, save
from .atomic import (
    check_output,
    directory_written_atomically,
    only_recorded_files,
    record_files,
    recorded_complete,
    recover_when_free,
)
from .calib.record import record_forward_loop
from .calib.strategies import get_strategy
from .checkpoint import MANIFEST_FILE
from .config import QuantConfig, load_recipe
from .errors import CheckpointError, ConfigError, ModelError
from .models import from_pipeline
from .recipe_passes import wanted_passes
from .scheduler_hooks import HookedScheduler, plain_scheduler

#: Pipeline components that hold the denoiser, in the order they are looked for.
DENOISER_COMPONENTS = ("unet", "transformer")
#: Trajectories a pipeline is run for when it calibrates by running itself (one per prompt, cycled).
DEFAULT_CALIBRATION_TRAJECTORIES = 8


def denoiser_component(pipe: diffusers.DiffusionPipeline) -> str:
    """Name of the component of ``pipe`` that holds its denoiser (``"unet"`` or ``"transformer"``)."""
    for name in DENOISER_COMPONENTS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise ModelError(f"{type(pipe).__name__} has no {' or '.join(DENOISER_COMPONENTS)} to quantize")


def hook_pipeline(pipe: diffusers.DiffusionPipeline) -> diffusers.DiffusionPipeline:
    """Make ``pipe(...)`` apply its quantized denoiser's per-step parts; returns ``pipe``.

    Installs a :class:`HookedScheduler` around ``pipe.scheduler`` with :func:`dmquant.sampling_hooks` of
    the denoiser (or removes it when the denoiser needs none). :func:`quantize_pipeline` and
    :func:`load_pipeline` call it; call it yourself after ``pipe.unet = quantized`` or after replacing
    ``pipe.scheduler`` (a quantized denoiser with per-step parts refuses to run unhooked).
    """
    denoiser = getattr(pipe, denoiser_component(pipe))
    scheduler = plain_scheduler(pipe.scheduler)
    hooks = sampling_hooks(denoiser)
    # set past DiffusionPipeline.__setattr__: the pipeline's config keeps naming the diffusers scheduler
    object.__setattr__(pipe, "scheduler", HookedScheduler(scheduler, hooks) if hooks else scheduler)
    return pipe


def _run_pipeline(pipe: diffusers.DiffusionPipeline, prompts: list[str], config: QuantConfig) -> None:
    """Sample the pipeline's calibration trajectories: ``config.calibration``'s count and steps, the prompts cycled."""
    calibration = config.calibration
    count = calibration.num_trajectories
    batch_size = max(1, min(calibration.batch_size, count))
    generator = torch.Generator().manual_seed(calibration.seed)
    for start in range(0, count, batch_size):
        batch = [prompts[(start + i) % len(prompts)] for i in range(min(batch_size, count - start))]
        pipe(
            prompt=batch, num_inference_steps=calibration.num_inference_steps, generator=generator, output_type="latent"
        )


def quantize_pipeline(
    pipe: diffusers.DiffusionPipeline,
    config: QuantConfig | str | Path,
    *,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,
) -> diffusers.DiffusionPipeline:
    """Quantize ``pipe``'s denoiser in place, calibrated on the user's ``prompts`` (or class ``labels``).

    Pipelines dmquant's own loop drives (DDPM/DDIM, DiT, Stable-Diffusion-style) are quantized as a
    :class:`~dmquant.models.DiffusionModel` by :func:`dmquant.api.quantize`, so every recipe works (PTQD's
    noise statistics and bit-schedule switch included); the prompts or labels replace the model's defaults
    for calibration. Any other text-to-image pipeline (SDXL, SD3, FLUX) calibrates by running itself on the
    prompts (``config.calibration``'s trajectories and steps) while its denoiser's calls are recorded; recipes that
    sample with dmquant's loop (corrections, bit schedules, hybrid precision, sensitivity-chosen smoothing)
    are refused there. The pipeline is then hooked (:func:`hook_pipeline`).
    """
    if isinstance(config, (str, Path)):
        config = load_recipe(config)
    name = denoiser_component(pipe)
    try:
        model = from_pipeline(pipe, type(pipe).__name__)
    except ModelError:
        model = None
    if model is not None:
        model = dataclasses.replace(model.with_defaults(prompts=prompts, labels=labels), source=_source(pipe))
        quantized = quantize(model, config, progress=progress, state_dir=state_dir).denoiser
    else:
        needs_loop = [p.asks for p in wanted_passes(config) if p.samples]
        if config.step_precision.enabled and "step_precision" not in needs_loop:
            needs_loop.append("step_precision")  # its formats are calibrated on the steps of dmquant's loop
        if needs_loop:
            raise ConfigError(
                f"recipe {config.name!r} uses {needs_loop}, which sample with dmquant's own loop; "
                f"it does not drive a {type(getattr(pipe, name)).__name__}"
            )
        if not prompts or labels:
            raise ConfigError(f"{type(pipe).__name__}: give the prompts to calibrate on (it takes no class labels)")
        denoiser = getattr(pipe, name)
        calibration = record_forward_loop(denoiser, lambda _: _run_pipeline(pipe, list(prompts), config))
        strategy = get_strategy(config.calibration.strategy, **config.calibration.strategy_options)
        if not callable(strategy):  # ndtc / tdac choose steps per trajectory, sampling themselves
            raise ConfigError(f"calibration strategy {config.calibration.strategy!r} samples with dmquant's own loop")
        calibration = calibration.select_steps(strategy(calibration.num_inference_steps))
        quantized = quantize(
            denoiser,
            config,
            calibration,
            batch_size=config.calibration.batch_size,
            progress=progress,
            state_dir=state_dir,
            source=_source(pipe),
        )
    setattr(pipe, name, quantized)
    return hook_pipeline(pipe)


def _source(pipe: diffusers.DiffusionPipeline) -> str | None:
    """Where ``pipe`` was loaded from: an absolute directory, a hub name, or ``None`` for one built in code."""
    where = pipe.config.get("_name_or_path")
    if where and Path(where).is_dir():
        return str(Path(where).resolve())
    return where or None


#: The record of every file :func:`save_pipeline` wrote into a pipeline directory (its own checkpoint and
#: what the components' ``save_pretrained`` wrote): ``--overwrite`` replaces a directory holding nothing else.
PIPELINE_RECORD = "dmquant_files.json"
PIPELINE = "a pipeline directory written by dmquant"


def _is_ours(directory: Path) -> bool:
    """Every file below ``directory`` is one :func:`save_pipeline` recorded as written there."""
    return only_recorded_files(directory, PIPELINE_RECORD)


def _is_complete(directory: Path) -> bool:
    return recorded_complete(directory, PIPELINE_RECORD) and (directory / "model_index.json").is_file()


def check_pipeline_target(directory: str | Path, *, overwrite: bool) -> Path:
    """``directory`` if a pipeline can be saved there: see :func:`~dmquant.atomic.check_output`.

    With ``overwrite`` an existing directory is replaced only if it is empty or holds nothing but the files
    an earlier :func:`save_pipeline` recorded as written there; anything else might be the user's.
    """
    return check_output(Path(directory), overwrite=overwrite, replaceable=_is_ours, what=PIPELINE)


def save_pipeline(pipe: diffusers.DiffusionPipeline, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``pipe`` with its quantized denoiser to ``directory``; :func:`load_pipeline` reads it.

    The denoiser is written by :func:`dmquant.save` into its component folder, every other component by its
    own ``save_pretrained``, and ``model_index.json`` by the pipeline; ``dmquant_files.json`` records every
    file written. The directory is written as a checkpoint is (:func:`dmquant.atomic.directory_written_atomically`:
    staged beside it, swapped in whole, under its lock, leftovers of an interrupted save recovered). An
    existing ``directory`` is refused unless ``overwrite``, which replaces only an empty directory or one
    holding nothing but what an earlier ``save_pipeline`` recorded.
    """
    name = denoiser_component(pipe)
    denoiser = getattr(pipe, name)
    info(denoiser)  # a quantized denoiser, or a clear error
    target = Path(directory)
    with directory_written_atomically(
        target, overwrite=overwrite, ours=_is_ours, complete=_is_complete, what=PIPELINE
    ) as staging:
        for component_name, component in pipe.components.items():
            # recorded before each component is written, so that a kill mid-save leaves a staging
            # directory that the next save recognises as dmquant's and removes
            record_files(staging, PIPELINE_RECORD, writing=component_name)
            if component is denoiser:
                save(denoiser, staging / component_name)
            elif hasattr(component, "save_pretrained"):
                plain_scheduler(component).save_pretrained(staging / component_name)
        pipe.save_config(staging)
        record_files(staging, PIPELINE_RECORD)
    return target


def load_pipeline(
    directory: str | Path, *, torch_dtype: torch.dtype | None = None, **kwargs: Any
) -> diffusers.DiffusionPipeline:
    """The pipeline :func:`save_pipeline` wrote, hooked and ready: ``pipe(...)`` gives what the saved one gave.

    ``torch_dtype`` applies to every component, the quantized denoiser included (its quantization
    parameters stay float32); other keywords go to ``DiffusionPipeline.from_pretrained`` (local files only).
    """
    directory = Path(directory)
    recover_when_free(directory, ours=_is_ours, complete=_is_complete)
    name = next((n for n in DENOISER_COMPONENTS if (directory / n / MANIFEST_FILE).exists()), None)
    if not (directory / "model_index.json").exists() or name is None:
        raise CheckpointError(
            f"{directory}: not a pipeline written by dmquant.save_pipeline (needs model_index.json and "
            f"{' or '.join(f'{n}/{MANIFEST_FILE}' for n in DENOISER_COMPONENTS)})"
        )
    denoiser = load(directory / name)
    if torch_dtype is not None:
        denoiser.to(torch_dtype)
    index = json.loads((directory / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"], diffusers.DiffusionPipeline)
    # components saved as absent (SD3 without its T5) are passed as absent: diffusers would ask for them
    absent = {key: None for key, entry in index.items() if entry == [None, None]}
    pipe = pipeline_class.from_pretrained(
        directory, **(absent | kwargs | {name: denoiser}), torch_dtype=torch_dtype, local_files_only=True
    )
    return hook_pipeline(pipe)
