"""A converted model on the GPU it will run on: its layers' kernel paths chosen on calls shaped like the user's,
and its denoiser call timed against the full-precision model's.

Both need a call of the denoiser as sampling makes it — ``batch_size`` samples, twice that under classifier-free
guidance, the model's own conditioning — which :func:`representative_call` builds from random inputs (speed does
not depend on their values).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import Tensor

from .catalog import MIN_PATH_GAIN
from .denoiser import Denoiser
from .kernels.paths import PathReport, select_paths
from .models import DiffusionModel
from .sampling import probe_call


def representative_call(
    model: DiffusionModel, batch_size: int, guidance_scale: float | None = None
) -> Callable[[], Tensor]:
    """One denoiser call on random inputs shaped as sampling ``batch_size`` samples makes them, on the denoiser's
    device and in its dtype (:func:`dmquant.sampling.probe_call`)."""
    return probe_call(model.denoiser, model.make_conditioning(batch_size, guidance_scale=guidance_scale), batch_size)


@torch.no_grad()
def choose_kernel_paths(
    model: DiffusionModel,
    batch_size: int,
    guidance_scale: float | None = None,
    *,
    compiled: bool = False,
    min_gain: float = MIN_PATH_GAIN,
    progress: bool = True,
) -> PathReport:
    """:func:`~dmquant.kernels.paths.select_paths` on a converted model's denoiser (on CUDA), with the calls
    sampling ``batch_size`` samples makes; ``compiled``: for a denoiser that will run under ``torch.compile``;
    ``min_gain``: the fraction of bf16's time a low-bit path must save to be kept."""
    call = representative_call(model, batch_size, guidance_scale)
    return select_paths(model.denoiser, call, compiled=compiled, min_gain=min_gain, progress=progress)


@torch.no_grad()
def median_call_ms(call: Callable[[], Tensor], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``call`` on the GPU in ms (CUDA events around each call, after ``warmup`` calls that
    also compile and capture a ``torch.compile``\\ d model)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def speedup_line(fp: DiffusionModel, converted: DiffusionModel, batch_size: int, guidance_scale: float | None) -> str:
    """One line: the median denoiser call of ``fp`` and of ``converted`` on this GPU, same inputs, one process."""
    fp_ms = median_call_ms(representative_call(fp, batch_size, guidance_scale))
    converted_ms = median_call_ms(representative_call(converted, batch_size, guidance_scale))
    device = torch.cuda.get_device_name(Denoiser(converted.denoiser).device)
    return (
        f"denoiser call at batch {batch_size} on {device}: FP {fp_ms:.2f} ms, converted {converted_ms:.2f} ms, "
        f"{fp_ms / converted_ms:.2f}x (median of 20 calls each, same process)"
    )
