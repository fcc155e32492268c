"""The jobs behind the CLI, usable from Python: generate, compare, and opening a model or a checkpoint to run them on.

Quantizing is :func:`dmquant.api.quantize` itself."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .api import info, load, same_architecture, sampling_hooks
from .checkpoint import MANIFEST_FILE
from .errors import CheckpointError, ModelError
from .eval.cost import model_size
from .eval.images import psnr, ssim, to_unit_range
from .eval.noise import noise_estimate_error
from .models import DiffusionModel, from_pipeline, load_model
from .precision.step_schedule import trajectory_bops
from .sampling import Conditioning, probe_call, sample


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
    call = probe_call(model.denoiser, conditioning.slice(0, 1))
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
