"""The end-to-end jobs behind the CLI, usable from Python: calibrate, quantize, generate, compare."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .api import info, load, measure_noise, quantize, same_architecture, sampling_hooks
from .calib.record import CalibrationSet, record_calibration
from .calib.strategies import get_strategy
from .checkpoint import MANIFEST_FILE
from .config import CalibrationConfig, QuantConfig
from .denoiser import Denoiser
from .errors import CheckpointError, ModelError
from .eval.cost import model_size
from .eval.images import psnr, ssim, to_unit_range
from .eval.noise import noise_estimate_error
from .models import DiffusionModel, from_pipeline, load_model
from .offload import offload_for, refuse_unoffloaded_probes, running
from .precision.hybrid import plan_hybrid, promotion_rules
from .precision.sqnr import analyze_sensitivity
from .precision.step_schedule import choose_switch_step, trajectory_bops
from .sampling import Conditioning, sample


def record_for(model: DiffusionModel, config: CalibrationConfig, *, progress: bool = True) -> CalibrationSet:
    """Record calibration data from ``model``'s own FP trajectories as ``config`` says."""
    strategy = get_strategy(config.strategy, **config.strategy_options)
    return record_calibration(
        model.denoiser,
        model.scheduler,
        num_inference_steps=config.num_inference_steps,
        steps=strategy,
        num_trajectories=config.num_trajectories,
        conditioning=lambda n: model.make_conditioning(n, guidance_scale=config.guidance_scale),
        batch_size=config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        eta=config.eta,
        progress=progress,
    )


#: FP trajectories along which the SQNR that chooses the step-aware precision switch is measured.
SWITCH_TRAJECTORIES = 16


def choose_precision_switch(model: DiffusionModel, config: QuantConfig, calibration: CalibrationSet) -> int:
    """PTQD's switch step: quantize at the early bits everywhere (ranges only, no reconstruction)
    and find where the per-step SQNR of the noise estimate drops below the threshold for good."""
    schedule = config.step_precision
    early = config.ranges_only()
    probe = quantize(model.denoiser, early, calibration, batch_size=config.calibration.batch_size, progress=False)
    rows = noise_estimate_error(
        model.denoiser,
        probe,
        model.scheduler,
        num_inference_steps=schedule.num_inference_steps,
        batch_size=SWITCH_TRAJECTORIES,
        conditioning=model.make_conditioning(SWITCH_TRAJECTORIES, guidance_scale=model.guidance_scale),
        generator=torch.Generator().manual_seed(config.calibration.seed),
        progress=False,
    )
    return choose_switch_step([row["sqnr_db"] for row in rows], schedule.snr_threshold_db)


def most_sensitive_modules(
    model: DiffusionModel, config: QuantConfig, calibration: CalibrationSet, *, progress: bool = True
) -> list[str]:
    """The ``config.smoothing.most_sensitive`` layers with the lowest SQNR on their own input
    (:func:`dmquant.precision.sqnr.analyze_sensitivity` of the recipe's ranges)."""
    smoothing = config.smoothing
    probe = quantize(model.denoiser, config.ranges_only(), calibration, progress=False)
    sensitivity = analyze_sensitivity(
        model.denoiser,
        probe,
        model.scheduler,
        num_inference_steps=smoothing.num_inference_steps,
        conditioning=model.make_conditioning(smoothing.num_samples, guidance_scale=model.guidance_scale),
        generator=torch.Generator().manual_seed(config.calibration.seed),
        progress=progress,
    )
    return [name for name, _ in sensitivity.module_ranking()[: smoothing.most_sensitive]]


def quantize_model(
    model: DiffusionModel,
    config: QuantConfig,
    *,
    progress: bool = True,
    state_dir: str | Path | None = None,
    offload: str | None = None,
) -> DiffusionModel:
    """Calibrate on ``model``'s trajectories and quantize its denoiser; returns the quantized bundle.

    ``state_dir`` keeps the reconstruction's progress (see :func:`dmquant.api.quantize`). A
    step-aware precision schedule without a switch step gets one from
    :func:`choose_precision_switch` first (saved in the checkpoint's recipe); hybrid precision
    first plans its promotions (:func:`dmquant.precision.hybrid.plan_hybrid`), added to the
    recipe's rules and kept in the model's info. ``offload`` (an execution device) keeps the denoiser's
    weights in host memory while calibration is recorded and the model quantized (:mod:`dmquant.offload`).
    """
    started = time.perf_counter()
    place = offload_for(offload, model.denoiser)
    if place is not None:
        refuse_unoffloaded_probes(config)
    with running(place, model.denoiser):
        calibration = record_for(model, config.calibration, progress=progress)
    schedule = config.step_precision
    if schedule.enabled and schedule.switch_step is None:
        switch = choose_precision_switch(model, config, calibration)
        config = dataclasses.replace(config, step_precision=dataclasses.replace(schedule, switch_step=switch))
    smoothing = config.smoothing
    if smoothing.enabled and smoothing.most_sensitive:
        flagged = most_sensitive_modules(model, config, calibration, progress=progress)
        config = dataclasses.replace(
            config, smoothing=dataclasses.replace(smoothing, patterns=[*smoothing.patterns, *flagged], most_sensitive=0)
        )
    hybrid = None
    if config.hybrid.enabled:
        conditioning = model.make_conditioning(config.hybrid.num_samples, guidance_scale=model.guidance_scale)
        hybrid = plan_hybrid(
            model.denoiser,
            config,
            calibration,
            model.scheduler,
            conditioning,
            seed=config.calibration.seed,
            progress=progress,
        )
        rules = promotion_rules(hybrid["promoted"], config.hybrid.weight_bits, config.hybrid.activation_bits)
        config = dataclasses.replace(config, rules=[*config.rules, *rules])
    denoiser = quantize(
        model.denoiser,
        config,
        calibration,
        batch_size=config.calibration.batch_size,
        progress=progress,
        source=model.source or model.name,
        state_dir=state_dir,
        offload=offload or False,
    )
    if config.correction.enabled:  # on the estimate sampling uses: at the model's own guidance scale
        guidance = model.guidance_scale
        measure_noise(
            denoiser,
            model.denoiser,
            model.scheduler,
            lambda n: model.make_conditioning(n, guidance_scale=guidance),
            progress=progress,
        )
    info(denoiser).extra.update(
        {"calibration_samples": len(calibration), "calibration_seconds": round(time.perf_counter() - started, 2)}
    )
    if hybrid is not None:
        info(denoiser).extra["hybrid"] = hybrid
    return model.with_denoiser(denoiser)


def generate(
    model: DiffusionModel,
    num_samples: int,
    *,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 16,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> tuple[torch.Tensor, Conditioning]:
    """``num_samples`` images in [-1, 1] and their conditioning; batch ``i`` uses seed ``seed + i``.

    ``desc`` is what the progress bars say they run (``"FP"``, ``"W8A8"``, ...). Under a launcher of several
    processes each samples every N-th batch and every process returns all the images, the ones a single process
    samples (:mod:`dmquant.distributed`); progress shows on the main process."""
    conditioning = model.make_conditioning(num_samples, labels=labels, prompts=prompts, guidance_scale=guidance_scale)
    num_batches = math.ceil(num_samples / batch_size)
    mine = distributed.shard(num_batches, f"sampling {num_samples} images in batches of {batch_size}")
    images = {}
    for index in mine:
        start, stop = index * batch_size, min((index + 1) * batch_size, num_samples)
        x0 = sample(
            model.denoiser,
            model.scheduler,
            batch_size=stop - start,
            num_inference_steps=num_inference_steps,
            conditioning=conditioning.slice(start, stop),
            generator=torch.Generator().manual_seed(seed + index),
            eta=eta,
            hooks=sampling_hooks(model.denoiser),
            progress=progress and distributed.is_main_process(),
            desc=f"{desc} {index + 1}/{num_batches}",
        )
        images[index] = model.decode(x0)
    device = images[mine[0]].device
    return torch.cat([image.to(device) for image in distributed.gather(images, num_batches)]), conditioning


def forward_cost(model: DiffusionModel, conditioning: Conditioning, num_steps: int = 1) -> dict[str, Any]:
    """MACs and BOPs of a denoiser call on a single sample (both CFG branches when guided).

    ``bops`` is the mean over a trajectory of ``num_steps`` steps (they differ between steps under
    step-aware mixed precision); ``trajectory_bops`` their sum.
    """
    denoiser = Denoiser(model.denoiser)
    one = conditioning.slice(0, 1)
    copies = 2 if one.guided else 1
    device = denoiser.device
    x = torch.zeros(copies, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size, device=device)
    t = torch.full((copies,), 500, device=device)
    cond = one.to(device).model_cond()
    call = lambda: denoiser(x, t, cond)  # noqa: E731
    trajectory = trajectory_bops(model.denoiser, call, num_steps)
    return trajectory["first_step"] | {
        "bops": trajectory["trajectory_bops"] / num_steps,
        "trajectory_bops": trajectory["trajectory_bops"],
    }


def compare(
    fp: DiffusionModel,
    quantized: DiffusionModel,
    *,
    num_samples: int = 16,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 16,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    progress: bool = True,
    fp_samples: tuple[torch.Tensor, Conditioning] | None = None,
    sqnr_trajectories: int = 16,
    label: str = "quantized",
) -> dict[str, Any]:
    """Quantized vs FP: per-step noise-estimate error, final-sample PSNR/SSIM, size and BOPs.

    Both sample from the same initial and per-step noise (same seeds), so PSNR/SSIM measure
    what quantization changed, not sampling randomness. ``fp_samples`` — the output of
    :func:`generate` on ``fp`` with the same options — saves sampling FP again when one FP
    model is compared with several quantized ones. The per-step SQNR is measured on the first
    ``sqnr_trajectories`` FP trajectories (pooled over all their elements). ``label`` names the quantized
    model in the progress bars.

    Under a launcher of several processes the images are sampled as :func:`generate` spreads them, the
    per-step SQNR is traced on the main process, and every process returns the same results.
    """
    options = dict(
        num_inference_steps=num_inference_steps,
        seed=seed,
        batch_size=batch_size,
        guidance_scale=guidance_scale,
        eta=eta,
        progress=progress,
    )
    fp_images, conditioning = fp_samples if fp_samples is not None else generate(fp, num_samples, desc="FP", **options)
    if fp_images.shape[0] != num_samples:
        raise ValueError(f"fp_samples holds {fp_images.shape[0]} images, not num_samples={num_samples}")
    started = time.perf_counter()
    q_images, _ = generate(quantized, num_samples, desc=label, **options)
    sample_seconds = time.perf_counter() - started
    traced = min(sqnr_trajectories, batch_size, num_samples)
    steps = None
    if distributed.is_main_process():  # one batch: traced on the main process, its rows sent to the others
        steps = noise_estimate_error(
            fp.denoiser,
            quantized.denoiser,
            fp.scheduler,
            num_inference_steps=num_inference_steps,
            batch_size=traced,
            conditioning=conditioning.slice(0, traced),
            generator=torch.Generator().manual_seed(seed),
            eta=eta,
            test_hooks=sampling_hooks(quantized.denoiser),
            progress=progress,
        )
    steps = distributed.broadcast(steps)
    reference, test = to_unit_range(fp_images), to_unit_range(q_images)
    size, fp_size = model_size(quantized.denoiser), model_size(fp.denoiser)
    cost = forward_cost(quantized, conditioning, num_inference_steps)
    fp_cost = forward_cost(fp, conditioning, num_inference_steps)
    finite = [row["sqnr_db"] for row in steps if math.isfinite(row["sqnr_db"])]
    return {
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps,
        "sample_seconds": sample_seconds,
        "psnr_db": float(psnr(reference, test)),
        "ssim": float(ssim(reference, test)),
        "sqnr_db_mean": sum(finite) / len(finite) if finite else math.inf,
        "sqnr_db_min": min(finite) if finite else math.inf,
        "size_bytes": size.total_bytes,
        "fp_size_bytes": fp_size.total_bytes,
        "compression": fp_size.total_bytes / max(size.total_bytes, 1),
        "gbops_per_call": cost["bops"] / 1e9,
        "gbops_per_trajectory": cost["trajectory_bops"] / 1e9,
        "fp_gbops_per_call": fp_cost["bops"] / 1e9,
        "steps": steps,
        "images": {"fp": fp_images, "quantized": q_images},
    }


def quantized_checkpoint(path: Path) -> Path | None:
    """The checkpoint in ``path``: ``path`` itself, or the denoiser folder of a pipeline directory written by
    :func:`dmquant.save_pipeline`; ``None`` when there is none."""
    from .pipelines import DENOISER_COMPONENTS

    folders = [path] + ([path / n for n in DENOISER_COMPONENTS] if (path / "model_index.json").exists() else [])
    return next((folder for folder in folders if (folder / MANIFEST_FILE).exists()), None)


def open_model(source: str, *, base: str | None = None) -> DiffusionModel:
    """A built-in name, a diffusers directory, or a dmquant checkpoint (with the FP model it came from).

    A checkpoint is a directory written by :func:`dmquant.save` or a pipeline directory written by
    :func:`dmquant.save_pipeline`. Its scheduler, conditioning and decoder come from ``base`` or, by
    default, from the source model recorded when it was quantized (for a pipeline directory without
    one, from the pipeline itself).
    """
    checkpoint = quantized_checkpoint(Path(source))
    if checkpoint is None:
        return load_model(source)
    denoiser = load(checkpoint)
    origin = base or info(denoiser).source
    if origin is None and checkpoint != Path(source):
        from .pipelines import load_pipeline

        return from_pipeline(load_pipeline(source), Path(source).name)
    if origin is None:
        raise ModelError(f"{source}: the checkpoint does not record its source model; pass the FP model with --base")
    try:
        fp = load_model(origin)
    except ModelError as error:
        if base is not None:
            raise
        raise CheckpointError(f"{source}: its source {origin!r} is no model here ({error}); pass --base") from None
    if not same_architecture(fp.denoiser, denoiser):
        named = f"--base {origin}" if base is not None else f"its recorded source {origin!r}"
        raise CheckpointError(f"{source}: {named} is another model than the one the checkpoint was made from")
    return fp.with_denoiser(denoiser)
