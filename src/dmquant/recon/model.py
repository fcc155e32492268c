"""Reconstruction of a whole quantized model, unit after unit, resumable.

BRECQ (Li et al. 2021, Alg. 1) walks the network's blocks in order; for each it feeds the
quantized block the input of the model quantized so far and fits its output to the FP block's
output on the same calibration data. Q-Diffusion (Li et al. 2023, Sec. 4 and its reference
code) does this for diffusion UNets in two passes — first the weights' rounding with activations
in full precision, then, after calibrating activation ranges on the reconstructed model, the
activations' step sizes — and PTQ4DM runs QDrop's single pass that learns both with activations
quantized and randomly dropped. :func:`reconstruct_model` runs either as
:class:`~dmquant.config.ReconstructionConfig` says:

1. draw ``num_samples`` calibration rows (seeded);
2. for each pass, for each unit of :func:`~dmquant.recon.blocks.reconstruction_units` in
   execution order: capture the FP model's inputs and output of the unit and the quantized
   model's inputs (:mod:`dmquant.recon.capture`), reconstruct it (:func:`~dmquant.recon.brecq.reconstruct`),
   and save the unit's state (:mod:`dmquant.recon.state`);
3. a unit already finished in the state directory is restored instead, so a killed run resumes.

Each unit's optimisation is seeded from ``seed``, the pass and the unit's index, so a resumed run
gives the same model as an uninterrupted one. With an :class:`~dmquant.offload.Offload` the models'
weights stay in host memory: the captures run them block by block on the execution device, and the
unit being reconstructed is held there meanwhile. Under a launch of several processes each captures
and holds its share of the samples and the gradients are summed over them (:mod:`dmquant.recon.parallel`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.record import CalibrationSet, first_rows_runner
from ..config import ReconstructionConfig
from ..core.layers import QUANT_LAYERS, activation_quantizers
from ..offload import Offload, holding, running
from .blocks import ReconUnit, reconstruction_units
from .brecq import reconstruct
from .capture import capture_paired_io
from .objectives import InnerLayerLoss
from .parallel import SampleShare
from .qdrop import mix_inputs
from .state import ReconstructionState, fingerprint


@dataclass(frozen=True)
class ReconstructionPass:
    """One walk over the units: what it learns and whether activations are quantized meanwhile."""

    name: str
    learn_rounding: bool
    learn_activation_scales: bool
    activations_quantized: bool
    iterations: int
    recalibrate_first: bool = False


def plan_passes(config: ReconstructionConfig) -> list[ReconstructionPass]:
    """The passes of ``config.activation_scales`` (see :class:`~dmquant.config.ReconstructionConfig`)."""
    if config.activation_scales == "jointly":
        return [ReconstructionPass("joint", True, True, True, config.iterations)]
    if config.activation_scales == "fixed":
        return [ReconstructionPass("weights", True, False, True, config.iterations)]
    passes = [ReconstructionPass("weights", True, False, False, config.iterations)]
    if config.activation_iterations:
        passes.append(
            ReconstructionPass("activations", False, True, True, config.activation_iterations, recalibrate_first=True)
        )
    return passes


@dataclass(frozen=True)
class UnitRecord:
    """What reconstructing one unit did (kept in the quantized model's info and the state directory)."""

    pass_name: str
    index: int
    unit: str
    kind: str
    initial_mse: float
    final_mse: float
    changed_fraction: float | None
    learned_scales: int
    seconds: float
    #: read back from the state directory: ``seconds`` were spent by an earlier, interrupted run
    restored: bool = False


@contextmanager
def _activations_disabled(model: nn.Module, disabled: bool) -> Iterator[None]:
    found = activation_quantizers(model) if disabled else []
    for quantizer in found:
        quantizer.enabled = False
    try:
        yield
    finally:
        for quantizer in found:
            quantizer.enabled = True


def _has_work(unit: nn.Module, step: ReconstructionPass) -> bool:
    weights = any(q.enabled for m in unit.modules() if isinstance(m, QUANT_LAYERS) for q, _ in m.weight_parts())
    scales = any(q.calibrated for q in activation_quantizers(unit))
    return (step.learn_rounding and weights) or (step.learn_activation_scales and scales)


def _calibration_subset(calibration: CalibrationSet, config: ReconstructionConfig) -> CalibrationSet:
    if len(calibration) <= config.num_samples:
        return calibration
    generator = torch.Generator().manual_seed(config.seed)
    return calibration.rows(torch.randperm(len(calibration), generator=generator)[: config.num_samples].sort().values)


def _unit_generator(config: ReconstructionConfig, pass_index: int, unit_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1_000_003 + pass_index * 10_007 + unit_index)


def _reconstruct_unit(
    fp_model: nn.Module,
    model: nn.Module,
    unit: ReconUnit,
    step: ReconstructionPass,
    data: CalibrationSet,
    config: ReconstructionConfig,
    generator: torch.Generator,
    device: torch.device,
    capture_batch_size: int,
    progress: bool,
    desc: str,
    offload: Offload | None,
) -> dict[str, Any]:
    budget = config.memory_budget_mb * 2**20 // 2  # the FP and the quantized-input cache share it
    share = SampleShare.of_this_process(len(data))
    with running(offload, fp_model, model):
        pairs = capture_paired_io(
            fp_model,
            model,
            unit.name,
            data if share.count == 1 else data.rows(share.rows),
            batch_size=capture_batch_size,
            device=device,
            memory_budget_bytes=budget,
        )
    mixing = torch.Generator(device=device)
    mixing.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))

    def train_sample(index: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
        args, kwargs, fp_args, fp_kwargs, target = pairs.batch(index)
        probability = config.drop_probability
        return (
            mix_inputs(args, fp_args, probability, mixing),
            mix_inputs(kwargs, fp_kwargs, probability, mixing),
            target,
        )

    def fp_inputs(index: torch.Tensor) -> tuple[Any, Any]:
        args, kwargs, _ = pairs.fp.batch(index)
        return args, kwargs

    inner_loss = None
    if config.inner_loss_weight > 0:
        inner_loss = InnerLayerLoss(unit.module, fp_model.get_submodule(unit.name), fp_inputs, config.inner_loss_weight)
    with holding(offload, unit.module, *([inner_loss.fp_unit] if inner_loss else [])):
        result = reconstruct(
            unit.module,
            pairs.quantized_batch,
            share.total,
            train_sample=train_sample if config.drop_probability > 0 else None,
            inner_loss=inner_loss,
            iterations=step.iterations,
            batch_size=config.batch_size,
            learn_rounding=step.learn_rounding,
            learn_activation_scales=step.learn_activation_scales,
            learning_rate=config.learning_rate,
            activation_learning_rate=config.activation_learning_rate,
            regularizer_scale=config.regularizer_scale,
            warmup=config.warmup,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            drop_probability=config.drop_probability,
            generator=generator,
            cuda_graph=config.cuda_graphs,
            share=share,
            progress=progress,
            desc=desc,
        )
    return asdict(result)


def reconstruct_model(
    fp_model: nn.Module,
    model: nn.Module,
    calibration: CalibrationSet,
    config: ReconstructionConfig,
    *,
    recalibrate: Callable[[], None],
    state_dir: str | Path | None = None,
    capture_batch_size: int = 128,
    progress: bool = True,
    offload: Offload | None = None,
    max_units: int | None = None,
    on_unit: Callable[[UnitRecord], None] | None = None,
) -> list[UnitRecord]:
    """Reconstruct every unit of ``model`` (quantizers attached, ranges calibrated) against ``fp_model``.

    ``fp_model`` is the same architecture without quantizers (module names must match);
    ``recalibrate()`` re-estimates the activation ranges of ``model`` (run before a pass that
    learns step sizes after a weight pass, as Q-Diffusion does). With ``state_dir`` every
    finished unit is saved there and a rerun with the same model, recipe and calibration data
    restores the finished units instead of redoing them; the directory is kept (delete it once
    the quantized model is saved). Block inputs and outputs are captured running the models on
    ``capture_batch_size`` rows at a time. With ``offload`` the models' weights stay in host memory
    (:mod:`dmquant.offload`). ``max_units`` reconstructs only the first units of each pass (a partial
    reconstruction, to time a large model); ``on_unit(record)`` is called after each unit. Returns one
    record per unit and pass, restored ones included.
    """
    fp_model.eval()
    model.eval()
    data = _calibration_subset(calibration, config)
    device = offload.device if offload is not None else next(model.parameters()).device
    key = ""  # no state directory to match: a large model's weights are not hashed for nothing
    if state_dir is not None:
        key = fingerprint(
            {"reconstruction": asdict(config), "quantizers": [repr(q) for q in activation_quantizers(model)]},
            [*data.named_tensors().items(), *fp_model.state_dict().items()],
        )
    state = ReconstructionState(state_dir, key)
    passes = plan_passes(config)
    records: list[UnitRecord] = []
    for pass_index, step in enumerate(passes):
        if step.recalibrate_first:
            recalibrate()
        with _activations_disabled(model, not step.activations_quantized):
            runner = first_rows_runner(model, data, 2)
            with running(offload, model):
                units = [unit for unit in reconstruction_units(model, runner) if _has_work(unit.module, step)]
            units = units[:max_units]
            outer = tqdm(units, desc=f"reconstruction ({step.name})", unit="unit", disable=not progress)
            for index, unit in enumerate(outer):
                unit_id = state.unit_id(step.name, index)
                record = state.done(unit_id)
                restored = record is not None
                if restored:
                    state.restore(unit_id, unit.module)
                else:
                    started = time.perf_counter()
                    generator = _unit_generator(config, pass_index, index)
                    desc = f"{unit.name} ({unit.kind})"
                    result = _reconstruct_unit(
                        fp_model,
                        model,
                        unit,
                        step,
                        data,
                        config,
                        generator,
                        device,
                        capture_batch_size,
                        progress,
                        desc,
                        offload,
                    )
                    record = {
                        "pass_name": step.name,
                        "index": index,
                        "unit": unit.name,
                        "kind": unit.kind,
                        "seconds": round(time.perf_counter() - started, 2),
                        **{k: v for k, v in result.items() if k != "iterations"},
                    }
                    state.finish(unit_id, unit.module, record)
                records.append(UnitRecord(**record, restored=restored))
                if on_unit is not None:
                    on_unit(records[-1])
                if progress:
                    outer.set_postfix(unit=unit.name, mse=f"{record['initial_mse']:.3g}->{record['final_mse']:.3g}")
    if config.ranges_after_weights and not any(step.recalibrate_first for step in passes):
        recalibrate()  # no step-size pass re-estimated the ranges on the reconstructed weights
    return records
