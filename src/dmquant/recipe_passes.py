"""The passes of a recipe, in the order :func:`dmquant.api.quantize` runs them, each registered for the config
section that asks for it (as torchao's ``quantize_`` dispatches a config type to its handler).

Planners first — the switch step of a bit schedule (PTQD), the most sensitive layers to smooth and hybrid
precision's promotions (efficient-LDM study) — fill in what the recipe leaves open; then quantizers are
attached, SmoothQuant's scales set, ranges calibrated, blocks reconstructed (BRECQ / Q-Diffusion / QDrop) and
PTQD's noise statistics measured. The passes themselves are :mod:`dmquant.passes` and the planners of
:mod:`dmquant.precision`; this module says when each runs and what they share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import passes
from .calib.record import CalibrationSet
from .config import (
    CorrectionConfig,
    HybridConfig,
    QuantConfig,
    ReconstructionConfig,
    SmoothingConfig,
    StepPrecisionConfig,
)
from .core.quantizer import STEPS_DRIVEN, set_step
from .correct.statistics import NoiseStatistics, collect_noise_statistics
from .errors import CalibrationError
from .models import DiffusionModel
from .offload import Offload
from .passes import Attached
from .precision.hybrid import plan_hybrid, promotion_rules
from .precision.planning import plan_smoothed_layers, plan_switch_step
from .sampling import Conditioning, StepContext, StepHook


@dataclass
class QuantizationRun:
    """What the passes of one :func:`dmquant.api.quantize` call share: the model being quantized (and an FP copy where
    reconstruction needs one), the recipe (planners fill in what it left open), the calibration data, the
    sampling model planners and the noise measurement sample with, the offloading of the passes that run the
    model (:mod:`dmquant.offload`; none for those that sample, which it refuses), and what is kept in
    ``dmquant_info``."""

    fp_model: nn.Module
    model: nn.Module
    sampler: DiffusionModel | None
    config: QuantConfig
    calibration: CalibrationSet
    batch_size: int
    progress: bool
    state_dir: str | Path | None
    offload: Offload | None = None
    attached: Attached | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizationPass:
    """One step of :func:`dmquant.api.quantize`, registered for the config section whose settings ask for it.

    ``asks`` names those settings (for messages); ``samples``: it samples with the model, so it needs a
    DiffusionModel; ``deferrable``: for a denoiser given alone it is left to a public function instead.
    """

    name: str
    section: type
    asks: str
    wants: Callable[[Any], bool]
    run: Callable[[QuantizationRun], None]
    samples: bool = False
    deferrable: bool = False

    def wanted(self, config: QuantConfig) -> bool:
        return self.wants(_section(config, self.section))


def _section(config: QuantConfig, section: type) -> Any:
    """The part of ``config`` of type ``section`` (the recipe itself for :class:`QuantConfig`)."""
    if isinstance(config, section):
        return config
    return next(getattr(config, f.name) for f in fields(config) if isinstance(getattr(config, f.name), section))


#: The passes of a recipe, in the order :func:`dmquant.api.quantize` runs them (see :func:`quantization_pass`).
PASSES: list[QuantizationPass] = []


def quantization_pass(
    section: type,
    asks: str,
    *,
    when: Callable[[Any], bool] = lambda section: section.enabled,
    samples: bool = False,
    deferrable: bool = False,
) -> Callable[[Callable[[QuantizationRun], None]], Callable[[QuantizationRun], None]]:
    """Register the decorated function as the next pass of :func:`dmquant.api.quantize`, run when ``when`` holds for the
    recipe's ``section`` (its ``enabled`` by default); see :class:`QuantizationPass` for the rest."""

    def register(run: Callable[[QuantizationRun], None]) -> Callable[[QuantizationRun], None]:
        PASSES.append(QuantizationPass(run.__name__, section, asks, when, run, samples, deferrable))
        return run

    return register


def wanted_passes(config: QuantConfig) -> list[QuantizationPass]:
    """The passes ``config`` asks for, in order (planners may add to them as they fill the recipe in)."""
    return [p for p in PASSES if p.wanted(config)]


@quantization_pass(
    StepPrecisionConfig, "step_precision", when=lambda s: s.enabled and s.switch_step is None, samples=True
)
def plan_switch(run: QuantizationRun) -> None:
    """PTQD's switch step of a bit schedule left open (:func:`dmquant.precision.planning.plan_switch_step`)."""
    schedule = run.config.step_precision
    switch = plan_switch_step(run.sampler, run.config, run.calibration, batch_size=run.batch_size)
    run.config = replace(run.config, step_precision=replace(schedule, switch_step=switch))


@quantization_pass(
    SmoothingConfig, "smoothing.most_sensitive", when=lambda s: s.enabled and s.most_sensitive > 0, samples=True
)
def plan_smoothing(run: QuantizationRun) -> None:
    """The most sensitive layers join the smoothed ones (:func:`dmquant.precision.planning.plan_smoothed_layers`)."""
    smoothing = run.config.smoothing
    flagged = plan_smoothed_layers(
        run.sampler, run.config, run.calibration, batch_size=run.batch_size, progress=run.progress
    )
    patterns = [*smoothing.patterns, *flagged]
    run.config = replace(run.config, smoothing=replace(smoothing, patterns=patterns, most_sensitive=0))


@quantization_pass(HybridConfig, "hybrid", samples=True)
def plan_promotions(run: QuantizationRun) -> None:
    """Hybrid precision's promoted blocks (:func:`dmquant.precision.hybrid.plan_hybrid`), added as rules."""
    hybrid, sampler = run.config.hybrid, run.sampler
    plan = plan_hybrid(
        sampler.denoiser,
        run.config,
        run.calibration,
        sampler.scheduler,
        sampler.make_conditioning(hybrid.num_samples, guidance_scale=sampler.guidance_scale),
        seed=run.config.calibration.seed,
        batch_size=run.batch_size,
        progress=run.progress,
    )
    rules = promotion_rules(plan["promoted"], hybrid.weight_bits, hybrid.activation_bits)
    run.config = replace(run.config, rules=[*run.config.rules, *rules])
    run.extra["hybrid"] = plan


@quantization_pass(QuantConfig, "rules", when=lambda config: True)
def attach(run: QuantizationRun) -> None:
    """Quantizers attached by the recipe's rules (:func:`dmquant.passes.attach`)."""
    run.attached = passes.attach(run.model, run.config, run.calibration, batch_size=run.batch_size, offload=run.offload)


@quantization_pass(SmoothingConfig, "smoothing")
def smooth(run: QuantizationRun) -> None:
    """SmoothQuant's scales on the chosen layers (:func:`dmquant.passes.smooth`)."""
    passes.smooth(run.model, run.config, run.calibration, batch_size=run.batch_size, offload=run.offload)


@quantization_pass(QuantConfig, "weight, activation", when=lambda config: True)
def ranges(run: QuantizationRun) -> None:
    """Weight and activation ranges (:func:`dmquant.passes.calibrate_ranges`)."""
    passes.calibrate_ranges(
        run.model, run.config, run.calibration, batch_size=run.batch_size, progress=run.progress, offload=run.offload
    )


@quantization_pass(ReconstructionConfig, "reconstruction")
def reconstruct(run: QuantizationRun) -> None:
    """Block reconstruction (:func:`dmquant.passes.reconstruct`), its records kept in the info."""
    records = passes.reconstruct(
        run.fp_model,
        run.model,
        run.config,
        run.calibration,
        batch_size=run.batch_size,
        progress=run.progress,
        state_dir=run.state_dir,
        offload=run.offload,
    )
    run.extra["reconstruction"] = [asdict(record) for record in records]


@quantization_pass(CorrectionConfig, "correction", samples=True, deferrable=True)
def measure_correction(run: QuantizationRun) -> None:
    """PTQD's noise statistics, on the noise estimate sampling uses: at the model's own guidance scale.
    A denoiser given alone has no sampler: its statistics are measured by :func:`dmquant.api.measure_noise`."""
    sampler = run.sampler
    if sampler is None:
        return
    guidance = sampler.guidance_scale
    per_step = run.config.step_precision.enabled or run.attached.num_steps > 1
    selectors = [step_selector(run.config, run.attached.num_steps, run.model)] if per_step else []
    statistics = noise_statistics(
        run.model,
        run.fp_model,
        sampler.scheduler,
        lambda n: sampler.make_conditioning(n, guidance_scale=guidance),
        run.config.correction,
        selectors,
        progress=run.progress,
    )
    run.extra[NOISE_STATISTICS] = statistics.to_json()


class StepSelector(StepHook):
    """Selects each sampling step's activation parameters (per-step ranges, or a step-aware bit schedule).

    ``num_steps`` (when given) is the trajectory length the parameters were made for; sampling
    with another is an error rather than a silent mismatch of steps and parameters. After the last
    step the model counts as undriven again (see :func:`dmquant.api.mark_quantized`).
    """

    def __init__(self, model: nn.Module, num_steps: int | None = None):
        self.model = model
        self.num_steps = num_steps

    def begin_step(self, ctx: StepContext) -> None:
        if self.num_steps is not None and ctx.num_steps != self.num_steps:
            raise CalibrationError(
                f"this model's activation parameters are made for {self.num_steps} steps; "
                f"sample with {self.num_steps} steps, not {ctx.num_steps}"
            )
        set_step(self.model, ctx.step_index)

    def end_step(self, ctx: StepContext, prev_sample: torch.Tensor) -> None:
        if ctx.step_index == ctx.num_steps - 1:
            self.model.__dict__[STEPS_DRIVEN] = False


#: ``info(model).extra`` key of the PTQD noise statistics.
NOISE_STATISTICS = "noise_statistics"


def step_selector(config: QuantConfig, num_steps: int, model: nn.Module) -> StepSelector:
    """A :class:`StepSelector` checking the trajectory length that a bit schedule or per-step ranges were made
    for (noise statistics check their own)."""
    schedule = config.step_precision
    if schedule.enabled:
        return StepSelector(model, schedule.num_inference_steps)
    return StepSelector(model, num_steps if num_steps > 1 else None)


def noise_statistics(
    model: nn.Module,
    fp_model: nn.Module,
    scheduler: Any,
    conditioning: Callable[[int], Conditioning],
    config: CorrectionConfig,
    hooks: list[StepHook],
    *,
    progress: bool,
) -> NoiseStatistics:
    """PTQD's statistics of ``model`` against ``fp_model`` along the trajectories ``config`` asks for."""
    return collect_noise_statistics(
        fp_model,
        model,
        scheduler,
        num_inference_steps=config.num_inference_steps,
        num_samples=config.num_samples,
        conditioning=conditioning,
        batch_size=config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        quantized_hooks=hooks,
        progress=progress,
    )
