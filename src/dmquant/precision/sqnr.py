"""Where quantization hurts: SQNR of every block and module of a quantized model, per sampling step.

The efficient-LDM study (Yang et al. 2023, "Efficient Quantization Strategies for Latent
Diffusion Models") ranks the parts of a model by the signal-to-quantization-noise ratio
``SQNR = 10 log10(‖F_fp‖² / ‖F_fp − F_q‖²)`` and spends precision (hybrid precision) and
smoothing (SmoothQuant) where it is lowest. Both views are measured here along FP trajectories,
at every step, on the inputs FP sampling visits:

- **global** (blocks: residual, transformer and lone attention blocks): the block's output with
  *only that block* quantized against the FP model's block output — how much noise the block
  makes on its own;
- **local** (modules: every quantized Linear / Conv2d): the module's output in the fully
  quantized model against what its FP weights give *on the same input* — the noise the module
  adds to what it receives, whatever noise that input already carries. (A difference of input
  and output SQNRs would be undefined for modules whose input carries no noise, such as the
  first layer on the raw sample.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.layers import QUANT_LAYERS
from ..core.quantizer import quantizers
from ..denoiser import Denoiser
from ..eval.noise import SideBySide, sqnr_db
from ..recon.blocks import candidate_units
from ..recon.capture import recorded_outputs
from ..sampling import Conditioning, StepContext, StepHook, sample


@dataclass(frozen=True)
class Sensitivity:
    """Per-step SQNR (dB) of each block (global) and module (local); step 0 is the noisiest."""

    timesteps: list[int]
    blocks: dict[str, list[float]]
    modules: dict[str, list[float]]

    @staticmethod
    def _ranking(table: dict[str, list[float]]) -> list[tuple[str, float]]:
        means = {name: mean_sqnr_db(values) for name, values in table.items()}
        return sorted(means.items(), key=lambda item: (item[1], item[0]))

    def block_ranking(self) -> list[tuple[str, float]]:
        """Blocks by mean SQNR over the steps, most sensitive (lowest) first."""
        return self._ranking(self.blocks)

    def module_ranking(self) -> list[tuple[str, float]]:
        """Modules by mean SQNR over the steps, most sensitive (lowest) first."""
        return self._ranking(self.modules)

    def to_json(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps, "blocks": self.blocks, "modules": self.modules}


def mean_sqnr_db(values: Sequence[float]) -> float:
    """The SQNR of the pooled noise: the mean of the per-step noise ratios, back in dB."""
    ratios = [10 ** (-v / 10) for v in values if not math.isnan(v)]
    if not ratios:
        return math.nan
    mean = sum(ratios) / len(ratios)
    return math.inf if mean == 0 else -10 * math.log10(mean)


@contextmanager
def _only_quantized(model: nn.Module, part: nn.Module) -> Iterator[None]:
    """Quantizers outside ``part`` switched off while open."""
    inside = {id(q) for q in quantizers(part)}
    states = [(q, q.enabled) for q in quantizers(model)]
    for quantizer, enabled in states:
        quantizer.enabled = enabled and id(quantizer) in inside
    try:
        yield
    finally:
        for quantizer, enabled in states:
            quantizer.enabled = enabled


def analyze_sensitivity(
    fp_model: nn.Module,
    quantized: nn.Module,
    scheduler: Any,
    *,
    num_inference_steps: int,
    conditioning: Conditioning,
    generator: torch.Generator | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool = True,
) -> Sensitivity:
    """Measure :class:`Sensitivity` along the FP trajectories of ``conditioning``'s samples.

    ``quantized`` is ``fp_model`` with quantizers attached and calibrated (module names match);
    ``hooks`` are its sampling hooks (per-step ranges, bit schedules). Costs one quantized forward
    per block and step besides the fully quantized one.
    """
    blocks = {u.name: u.module for u in candidate_units(quantized) if u.kind != "layer"}
    fp_blocks = {name: fp_model.get_submodule(name) for name in blocks}
    modules = {n: m for n, m in quantized.named_modules() if isinstance(m, QUANT_LAYERS)}
    fp_modules = {name: fp_model.get_submodule(name) for name in modules}
    block_sqnr: dict[str, list[float]] = {name: [] for name in blocks}
    module_sqnr: dict[str, list[float]] = {name: [] for name in modules}
    timesteps: list[int] = []
    denoiser = Denoiser(quantized)

    with recorded_outputs(fp_blocks) as fp_outputs, recorded_outputs(modules, keep_inputs=True) as seen:

        def measure(ctx: StepContext, eps: Tensor, eps_q: Tensor) -> None:
            """Called after the FP and the fully quantized model ran on this step's inputs."""
            timesteps.append(int(ctx.timestep))
            for name, (inputs, output) in list(seen.items()):
                module_sqnr[name].append(sqnr_db(fp_modules[name](inputs), output))
            for name, block in blocks.items():
                with _only_quantized(quantized, block), recorded_outputs({name: block}) as out:
                    denoiser(ctx.model_input, ctx.model_timestep, ctx.model_cond)
                block_sqnr[name].append(sqnr_db(fp_outputs[name], out[name]))

        sample(
            fp_model,
            scheduler,
            batch_size=conditioning.batch_size or 1,
            num_inference_steps=num_inference_steps,
            conditioning=conditioning,
            generator=generator,
            hooks=[SideBySide(denoiser, measure, hooks)],
            progress=progress,
        )
        order = list(fp_outputs)  # the blocks in the order the model runs them
    block_sqnr = {name: block_sqnr[name] for name in order}
    return Sensitivity(timesteps, block_sqnr, module_sqnr)
