"""The passes that make a full-precision model a quantized one, and the probe that planners measure.

Each is one step of the data flow of a recipe (DESIGN.md): quantizers attached by the recipe's rules
(:func:`attach`), SmoothQuant's scales (:func:`smooth`), weight and activation ranges
(:func:`calibrate_ranges`), block reconstruction (:func:`reconstruct`). :func:`dmquant.api.quantize` runs
them in order, each when its config section asks for it; planners that choose what a recipe leaves open
(:mod:`dmquant.precision.planning`, :mod:`dmquant.precision.hybrid`) measure a :func:`range_calibrated`
copy of the model instead, the cheap model whose precision they analyse.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calib.record import CalibrationSet, calibration_runner, first_rows_runner
from .calibrate import calibrate_activations, calibrate_weights, name_quantizers
from .config import QuantConfig
from .core.attach import QuantReport, attach_quantizers, find_shortcut_splits
from .errors import ModelError
from .offload import Offload, running
from .precision.smoothquant import input_absmax, smoothed_layers
from .precision.smoothquant import smooth as smooth_layer
from .precision.step_schedule import apply_step_precision
from .recon.model import UnitRecord, reconstruct_model


@dataclass(frozen=True)
class Attached:
    """What :func:`attach` did: the per-layer report, the split shortcut convs, the per-step parameter sets."""

    report: QuantReport
    splits: dict[str, int]
    num_steps: int


def attach(
    model: nn.Module,
    config: QuantConfig,
    calibration: CalibrationSet,
    *,
    batch_size: int,
    offload: Offload | None = None,
) -> Attached:
    """Find split shortcuts (Q-Diffusion's split quantization of concatenated skips, on one forward pass of
    the first calibration rows, block by block with ``offload``) and attach quantizers to ``model`` in place
    as ``config`` says."""
    num_steps = calibration.num_inference_steps if config.per_step_activations else 1
    run_forward = first_rows_runner(model, calibration, min(batch_size, 2))
    attached = attach_traced(model, config, run_forward, num_steps, offload=offload)
    if attached.report.num_quantized == 0:
        raise ModelError(f"{type(model).__name__} has no Linear, Conv2d or attention layer left to quantize")
    return attached


def attach_traced(
    model: nn.Module,
    config: QuantConfig,
    run_forward: Callable[[], Any],
    num_steps: int = 1,
    *,
    offload: Offload | None = None,
    warn: bool = True,
) -> Attached:
    """:func:`attach` with the split shortcuts found on ``run_forward`` (one forward pass of ``model``, e.g.
    :func:`dmquant.sampling.probe_call`; block by block with ``offload``) and no check that anything was
    quantized: what ``dmquant inspect`` shows."""
    splits: dict[str, int] = {}
    if config.split_shortcut:
        with torch.no_grad(), running(offload, model):
            splits = find_shortcut_splits(model, run_forward)
    return Attached(attach_recorded(model, config, splits, num_steps, warn=warn), splits, num_steps)


def attach_recorded(
    model: nn.Module, config: QuantConfig, splits: dict[str, int], num_steps: int, *, warn: bool = True
) -> QuantReport:
    """Attach quantizers to ``model`` in place with known ``splits`` and ``num_steps`` (a checkpoint's):
    the layers of :func:`~dmquant.core.attach.attach_quantizers`, the step-aware bit schedule of
    ``config.step_precision`` and the smoothing scales of ``config.smoothing``'s layers (set to 1, so a
    checkpoint's state dict fits); every quantizer named after its module."""
    report = attach_quantizers(model, config, splits=splits, num_steps=num_steps, warn=warn)
    if config.step_precision.enabled:
        apply_step_precision(model, config)
    if config.smoothing.enabled:
        for layer in smoothed_layers(model, config.smoothing.patterns).values():
            layer.enable_smoothing()
    name_quantizers(model)
    return report


def smooth(
    model: nn.Module,
    config: QuantConfig,
    calibration: CalibrationSet,
    *,
    batch_size: int,
    offload: Offload | None = None,
) -> None:
    """SmoothQuant on the layers ``config.smoothing.patterns`` select, from their FP input ranges."""
    layers = smoothed_layers(model, config.smoothing.patterns)
    if not layers:
        raise ModelError(f"smoothing.patterns {config.smoothing.patterns} match no quantized layer")
    with running(offload, model):
        ranges = input_absmax(model, layers, calibration_runner(model, calibration, batch_size=batch_size))
    for name, layer in layers.items():
        smooth_layer(layer, ranges[name], config.smoothing.alpha)


def calibrate_ranges(
    model: nn.Module,
    config: QuantConfig,
    calibration: CalibrationSet,
    *,
    batch_size: int,
    progress: bool,
    offload: Offload | None = None,
) -> None:
    """Weight ranges from the weights; activation ranges over the calibration data, unless reconstruction
    estimates them once the weights are reconstructed (Q-Diffusion's order,
    :attr:`~dmquant.config.ReconstructionConfig.ranges_after_weights`)."""
    calibrate_weights(model, progress=progress)
    if not config.reconstruction.ranges_after_weights:
        calibrate_offloaded(model, calibration, batch_size=batch_size, progress=progress, offload=offload)


def calibrate_offloaded(
    model: nn.Module, calibration: CalibrationSet, *, batch_size: int, progress: bool, offload: Offload | None
) -> None:
    """Activation ranges over the calibration data, block by block with ``offload``."""
    with running(offload, model):
        calibrate_activations(model, calibration, batch_size=batch_size, progress=progress)


def reconstruct(
    fp_model: nn.Module,
    model: nn.Module,
    config: QuantConfig,
    calibration: CalibrationSet,
    *,
    batch_size: int,
    progress: bool,
    state_dir: str | Path | None,
    offload: Offload | None = None,
) -> list[UnitRecord]:
    """Block reconstruction of ``model`` against ``fp_model`` (:func:`dmquant.recon.model.reconstruct_model`),
    its activation ranges re-estimated when the reconstruction asks for it; with ``offload`` the weights stay in
    host memory and each unit is reconstructed on the execution device."""
    return reconstruct_model(
        fp_model,
        model,
        calibration,
        config.reconstruction,
        recalibrate=lambda: calibrate_offloaded(
            model, calibration, batch_size=batch_size, progress=progress, offload=offload
        ),
        state_dir=state_dir,
        capture_batch_size=batch_size,
        progress=progress,
        offload=offload,
    )


def range_calibrated(
    model: nn.Module, config: QuantConfig, calibration: CalibrationSet, *, batch_size: int
) -> nn.Module:
    """A copy of ``model`` at ``config``'s precision with its ranges set and nothing else
    (:meth:`~dmquant.config.QuantConfig.ranges_only`): the probe whose noise planners measure."""
    plain = config.ranges_only()
    probe = copy.deepcopy(model).eval()
    attach(probe, plain, calibration, batch_size=batch_size)
    calibrate_ranges(probe, plain, calibration, batch_size=batch_size, progress=False)
    return probe
