"""Calibration data recorded from the full-precision model's own sampling trajectories.

Diffusion models see a different activation distribution at every step, so their calibration
inputs are taken along the trajectories the FP model itself samples, at selected steps
(Q-Diffusion, Li et al. 2023; PTQ4DM, Shang et al. 2023). Recording is a :class:`StepHook` on
:func:`dmquant.sampling.sample`: what is stored is exactly what the model is fed.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dmquant import distributed
from dmquant.calib.strategies import PerTrajectorySteps, get_strategy
from dmquant.calib.tdac import FeatureAllocatedSteps
from dmquant.denoiser import Denoiser, flatten_conditioning
from dmquant.errors import CalibrationError, ConfigError
from dmquant.sampling import Conditioning, StepContext, StepHook, advance_generator, prepare_scheduler, sample

if TYPE_CHECKING:
    from dmquant.config import CalibrationConfig
    from dmquant.models import DiffusionModel


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


_COND_PREFIX = "cond."
_FIELDS = ("samples", "timesteps", "step_indices")


@dataclass
class CalibrationSet:
    """Model inputs recorded along sampling trajectories, one row per (trajectory, step).

    Attributes:
        samples: (N, C, H, W) model inputs ``x_t`` after ``scheduler.scale_model_input``; (N, L, C) packed
            latent tokens for a denoiser that takes those (FLUX, see :data:`dmquant.denoiser.TOKEN_SAMPLE_CLASSES`).
        timesteps: (N,) timestep values fed to the model (the scheduler's timesteps).
        step_indices: (N,) long: index of each row's step in the trajectory (0: noisiest).
        cond: conditioning keywords as fed, each (N, ...). Under classifier-free guidance the
            unconditional and the conditional copy of each input are both recorded, as
            Q-Diffusion does.
        num_inference_steps: the ``num_inference_steps`` of the recorded trajectories.
    """

    samples: Tensor
    timesteps: Tensor
    step_indices: Tensor
    cond: dict[str, Tensor]
    num_inference_steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.cond, Mapping):
            raise CalibrationError(f"cond: expected a mapping of tensors, got {type(self.cond).__name__}")
        for name, tensor in self.named_tensors().items():
            if not isinstance(tensor, Tensor) or tensor.dim() < 1:
                raise CalibrationError(f"{name}: expected a tensor with a row per sample, got {_described(tensor)}")
        checks = {
            "samples": (
                self.samples.dim() in (3, 4) and self.samples.is_floating_point(),
                "a float (N, C, H, W) tensor, or (N, L, C) tokens",
            ),
            "timesteps": (self.timesteps.dim() == 1 and not self.timesteps.is_complex(), "a real (N,) tensor"),
            "step_indices": (
                self.step_indices.dim() == 1 and not self.step_indices.is_floating_point(),
                "an integer (N,) tensor",
            ),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise CalibrationError(f"{name}: expected {expected}, got {_described(getattr(self, name))}")
        lengths = {name: len(tensor) for name, tensor in self.named_tensors().items()}
        if len(set(lengths.values())) > 1:
            raise CalibrationError(f"calibration tensors disagree on the number of rows: {lengths}")
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
            raise CalibrationError(f"num_inference_steps: expected an integer, got {self.num_inference_steps!r}")
        if (
            len(self)
            and not 0 <= int(self.step_indices.min()) <= int(self.step_indices.max()) < self.num_inference_steps
        ):
            raise CalibrationError(f"step_indices: must lie in [0, {self.num_inference_steps}) (num_inference_steps)")

    def check_fits(self, denoiser: Denoiser) -> None:
        """The samples have the layout, channels (and square size, where the model states one) ``denoiser`` takes:
        ``(N, C, H, W)``, or ``(N, L, C)`` tokens for a denoiser that takes those (``denoiser.takes_tokens``); any
        layout for a module of its own that states neither channels nor size (it is called with what it was given)."""
        channels, size = denoiser.in_channels, denoiser.sample_size
        name = type(denoiser.model).__name__
        if denoiser.takes_tokens:
            if self.samples.dim() != 3:
                raise CalibrationError(
                    f"samples: expected a float (N, L, C) tensor of tokens for a {name}, got {_described(self.samples)}"
                )
            if channels is not None and self.samples.shape[2] != channels:
                raise CalibrationError(
                    f"samples: {self.samples.shape[2]} channels per token, the model takes {channels}"
                )
            return
        if channels is None and size is None and denoiser.kind == "generic":
            return
        if self.samples.dim() != 4:
            raise CalibrationError(
                f"samples: expected a float (N, C, H, W) tensor for a {name}, got {_described(self.samples)}"
            )
        if channels is not None and self.samples.shape[1] != channels:
            raise CalibrationError(f"samples: {self.samples.shape[1]} channels, the model takes {channels}")
        if isinstance(size, int) and tuple(self.samples.shape[2:]) != (size, size):
            raise CalibrationError(f"samples: {tuple(self.samples.shape[2:])} pixels, the model takes {size}x{size}")

    def named_tensors(self) -> dict[str, Tensor]:
        """Every tensor of the set by its key (conditioning keys prefixed with ``cond.``)."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        return fields | {_COND_PREFIX + name: tensor for name, tensor in self.cond.items()}

    @classmethod
    def from_named_tensors(cls, tensors: Mapping[str, Tensor], num_inference_steps: int) -> CalibrationSet:
        """The inverse of :meth:`named_tensors`."""
        return cls(
            **{name: tensors[name] for name in _FIELDS},
            cond={
                name.removeprefix(_COND_PREFIX): tensor
                for name, tensor in tensors.items()
                if name.startswith(_COND_PREFIX)
            },
            num_inference_steps=num_inference_steps,
        )

    def _map(self, fn: Callable[[Tensor], Tensor]) -> CalibrationSet:
        """A set of ``fn`` applied to every tensor."""
        tensors = {name: fn(tensor) for name, tensor in self.named_tensors().items()}
        return self.from_named_tensors(tensors, self.num_inference_steps)

    def __len__(self) -> int:
        return self.samples.shape[0]

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor], Tensor]]:
        """Yield ``(x, t, cond, step_indices)`` batches of at most ``batch_size`` rows."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for index in order.split(batch_size):
            batch = self._map(lambda tensor, index=index: tensor[index.to(tensor.device)])
            yield batch.samples, batch.timesteps, batch.cond, batch.step_indices

    def steps(self) -> list[int]:
        """The recorded step indices, sorted, each once."""
        return sorted(set(self.step_indices.tolist()))

    def select_steps(self, step_indices: Sequence[int]) -> CalibrationSet:
        """The rows recorded at ``step_indices``."""
        missing = sorted(set(step_indices) - set(self.steps()))
        if missing:
            raise CalibrationError(f"steps {missing} were not recorded; recorded: {self.steps()}")
        steps = torch.as_tensor(list(step_indices), dtype=torch.long, device=self.step_indices.device)
        wanted = torch.isin(self.step_indices, steps)
        return self._map(lambda tensor: tensor[wanted.to(tensor.device)])

    def rows(self, index: Tensor) -> CalibrationSet:
        """The rows ``index`` (a 1-d long tensor), in that order."""
        return self._map(lambda tensor: tensor[index.to(tensor.device)])

    def to(self, device: torch.device | str) -> CalibrationSet:
        """A copy with every tensor on ``device``."""
        return self._map(lambda tensor: tensor.to(device))

    @classmethod
    def concatenate(cls, sets: Sequence[CalibrationSet]) -> CalibrationSet:
        """One set holding the rows of ``sets`` in order (recorded with the same steps and keys)."""
        if not sets:
            raise CalibrationError("no calibration sets to concatenate")
        kinds = {(part.num_inference_steps, tuple(sorted(part.cond))) for part in sets}
        if len(kinds) > 1:
            raise CalibrationError(
                f"cannot concatenate sets of different (num_inference_steps, cond keys): {sorted(kinds)}"
            )
        parts = [part.named_tensors() for part in sets]
        tensors = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        return cls.from_named_tensors(tensors, sets[0].num_inference_steps)


class _Recorder(StepHook):
    """Keeps (on the CPU) what the model is fed at the selected steps.

    With ``assignment`` (one step index per trajectory), a trajectory's rows are kept only at its
    own step; :meth:`start_batch` says which trajectories the next sampled batch holds.
    """

    def __init__(self, steps: Sequence[int], num_inference_steps: int, assignment: Sequence[int] | None = None):
        self.steps = frozenset(steps)
        self.num_inference_steps = num_inference_steps
        self.assignment = None if assignment is None else torch.as_tensor(list(assignment), dtype=torch.long)
        self.batch = slice(0, 0)
        self.records: list[CalibrationSet] = []

    def start_batch(self, start: int, size: int) -> None:
        self.batch = slice(start, start + size)

    def _rows(self, step_index: int, total_rows: int) -> Tensor | None:
        """Rows of the model input to keep at this step (``None``: all of them)."""
        if self.assignment is None:
            return None
        mine = torch.nonzero(self.assignment[self.batch] == step_index).flatten()
        size = self.batch.stop - self.batch.start
        copies = total_rows // size  # 2 under classifier-free guidance: [uncond; cond]
        return torch.cat([mine + copy * size for copy in range(copies)])

    def begin_step(self, ctx: StepContext) -> None:
        if ctx.step_index not in self.steps:
            return
        rows = self._rows(ctx.step_index, ctx.model_input.shape[0])
        if rows is not None and rows.numel() == 0:
            return

        def keep(tensor: Tensor) -> Tensor:
            tensor = tensor.cpu()
            return tensor if rows is None else tensor[rows]

        self.records.append(
            CalibrationSet(
                samples=keep(ctx.model_input),
                timesteps=keep(ctx.model_timestep),
                step_indices=torch.full(
                    (ctx.model_input.shape[0] if rows is None else rows.numel(),), ctx.step_index, dtype=torch.long
                ),
                cond={name: keep(tensor) for name, tensor in ctx.model_cond.items()},
                num_inference_steps=self.num_inference_steps,
            )
        )


def _selected_steps(steps: Sequence[int] | Callable[[int], Sequence[int]], num_steps: int) -> list[int]:
    """The step indices to record, checked against a trajectory of ``num_steps`` steps."""
    chosen = steps(num_steps) if callable(steps) else steps
    try:
        indices = sorted({operator.index(step) for step in chosen})
    except TypeError:
        raise ConfigError(f"step indices must be integers, got {list(chosen)!r}") from None
    outside = [step for step in indices if not 0 <= step < num_steps]
    if outside:
        raise ConfigError(f"step indices {outside} are outside the trajectory's steps 0..{num_steps - 1}")
    if not indices:
        raise CalibrationError("no sampling step was selected for calibration: the set would be empty")
    return indices


def _batch_conditioning(
    conditioning: Conditioning | Callable[[int], Conditioning] | None, start: int, size: int
) -> Conditioning | None:
    """The conditioning of trajectories ``start:start + size``."""
    if conditioning is None or isinstance(conditioning, Conditioning):
        fixed = conditioning is None or conditioning.batch_size is None
        return conditioning if fixed else conditioning.slice(start, start + size)
    return conditioning(size)


def record_calibration(
    model_or_denoiser: nn.Module | Denoiser,
    scheduler: Any,
    *,
    num_inference_steps: int,
    steps: Sequence[int] | Callable[[int], Sequence[int]] | PerTrajectorySteps,
    num_trajectories: int,
    conditioning: Conditioning | Callable[[int], Conditioning] | None = None,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """Sample ``num_trajectories`` trajectories with the FP model and record its inputs at ``steps``.

    Args:
        model_or_denoiser: the full-precision denoiser.
        scheduler: the diffusers scheduler to sample with (not mutated).
        num_inference_steps: steps of each trajectory.
        steps: step indices to record (0: first, noisiest step), or a strategy from
            :mod:`dmquant.calib.strategies`: a function of the trajectory length giving them, a
            :class:`~dmquant.calib.strategies.PerTrajectorySteps` (e.g. ``ndtc()``) giving each
            trajectory a step of its own, or a :class:`~dmquant.calib.tdac.FeatureAllocatedSteps`
            (``tdac()``) that first probes the model on a batch of trajectories to decide them.
        num_trajectories: number of sampled trajectories; each contributes one row per recorded
            step, or one row in all with a per-trajectory strategy (two rows per row under
            classifier-free guidance).
        conditioning: a :class:`Conditioning` for all ``num_trajectories`` samples (or for any
            batch when unconditional), or a function of a batch size ``n`` returning the
            conditioning of the next ``n`` trajectories.
        batch_size: trajectories sampled at once.
        generator: random source of the trajectories, consumed batch after batch.
        eta: DDIM's ``eta``.
        device: where to sample; defaults to the model's device. Records are kept on the CPU.
        progress: show a progress bar over the batches (on the main process).

    Under a launcher of several processes (``accelerate launch``) each process records every N-th batch,
    taking ``generator`` past the others' batches without the model
    (:func:`dmquant.sampling.advance_generator`), and every process returns the whole set, identical to
    the one a single process records (:mod:`dmquant.distributed`). With fewer batches than processes, the
    processes past the last batch record nothing and wait.

    Raises:
        ConfigError: a step index outside the trajectory, or inconsistent sizes.
        CalibrationError: nothing would be recorded, or the trajectories hold non-finite values.
    """
    if num_trajectories < 0 or batch_size < 1:
        raise ConfigError(f"need num_trajectories >= 0 and batch_size >= 1, got {num_trajectories}, {batch_size}")
    if isinstance(conditioning, Conditioning) and conditioning.batch_size not in (None, num_trajectories):
        raise ConfigError(
            f"the conditioning is for {conditioning.batch_size} samples but num_trajectories={num_trajectories}"
        )
    if num_trajectories == 0:
        raise CalibrationError("num_trajectories=0: the calibration set would be empty")
    prepared = prepare_scheduler(scheduler, num_inference_steps)
    if isinstance(steps, FeatureAllocatedSteps):
        probe = _batch_conditioning(conditioning, 0, min(num_trajectories, steps.probe_trajectories))
        steps = steps.resolve(model_or_denoiser, scheduler, num_inference_steps, probe, generator, eta)
    if isinstance(steps, PerTrajectorySteps):
        assignment = distributed.broadcast(
            steps.assign(prepared.timesteps, prepared.config.num_train_timesteps, num_trajectories)
        )
        recorder = _Recorder(sorted(set(assignment)), num_inference_steps, assignment)
    else:
        recorder = _Recorder(_selected_steps(steps, len(prepared.timesteps)), num_inference_steps)
    starts = range(0, num_trajectories, batch_size)
    mine = distributed.shard(len(starts), "recording", idle=True)  # the processes past the last batch wait
    records: dict[int, list[CalibrationSet]] = {}
    show = progress and distributed.is_main_process()
    for index, start in enumerate(tqdm(starts, desc="recording calibration data", disable=not show)):
        size = min(batch_size, num_trajectories - start)
        options = dict(
            batch_size=size,
            num_inference_steps=num_inference_steps,
            conditioning=_batch_conditioning(conditioning, start, size),
            generator=generator,
            eta=eta,
            device=device,
        )
        if index not in mine:  # another process's batch: the generator taken past it
            advance_generator(model_or_denoiser, scheduler, **options)
            continue
        recorder.start_batch(start, size)
        recorder.records = records[index] = []
        sample(model_or_denoiser, scheduler, **options, hooks=[recorder], progress=False)
    gathered = distributed.gather(records, len(starts))
    calibration = CalibrationSet.concatenate([record for batch in gathered for record in batch])
    if not torch.isfinite(calibration.samples).all():
        raise CalibrationError("the FP model's trajectories hold non-finite values at the recorded steps")
    return calibration


def record_forward_loop(model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> CalibrationSet:
    """Record every call of ``model`` while ``forward_loop(model)`` runs, as a calibration set.

    This is the ``forward_loop`` of ModelOpt's ``mtq.quantize(model, config, forward_loop)``: any code that
    runs the model on representative inputs — typically a diffusers pipeline called on the user's prompts
    with ``pipe.unet`` (or ``pipe.transformer``) being ``model``. Each call's sample, timestep and tensor
    keywords are kept on the CPU (nested ones such as SDXL's ``added_cond_kwargs`` flattened, see
    :func:`dmquant.denoiser.flatten_conditioning`). A row's step index is the rank of its timestep among
    the distinct timesteps seen, the largest first: the step index of every trajectory when the loop
    samples each with the same scheduler and number of steps.
    """
    calls: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        sample = arguments.pop(next(iter(arguments)), None)  # the first argument, whatever its name
        timestep = arguments.pop("timestep", None)
        if not isinstance(sample, Tensor) or timestep is None:
            raise CalibrationError(f"{type(module).__name__} was called without a sample and a timestep")
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep).reshape(-1).expand(batch)
        cond = flatten_conditioning(arguments)
        unbatched = sorted(name for name, tensor in cond.items() if tensor.ndim == 0 or tensor.shape[0] != batch)
        if unbatched:
            raise CalibrationError(
                f"the keywords {unbatched} of {type(module).__name__} are not batched with the sample: "
                "dmquant's calibration sets hold per-sample inputs"
            )
        calls.append((sample.detach().cpu(), timestep.detach().cpu(), {k: v.detach().cpu() for k, v in cond.items()}))

    handle = model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        handle.remove()
    if not calls:
        raise CalibrationError("forward_loop never called the model: nothing to calibrate on")
    timesteps = torch.cat([t for _, t, _ in calls])
    distinct = torch.unique(timesteps.float(), sorted=True).flip(0)
    step_indices = torch.searchsorted(-distinct, -timesteps.float())
    keys = {tuple(sorted(cond)) for _, _, cond in calls}
    if len(keys) > 1:
        raise CalibrationError(f"the calls of forward_loop disagree on their conditioning keywords: {sorted(keys)}")
    return CalibrationSet(
        samples=torch.cat([x for x, _, _ in calls]),
        timesteps=timesteps,
        step_indices=step_indices,
        cond={name: torch.cat([cond[name] for _, _, cond in calls]) for name in calls[0][2]},
        num_inference_steps=len(distinct),
    )


def calibration_runner(
    model: nn.Module,
    calibration: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    after_batch: Callable[[], Any] | None = None,
) -> Callable[[], None]:
    """The model over a ``CalibrationSet``, in order: the one forward loop over calibration data, which
    captures, range and smoothing statistics run (e.g. :func:`~dmquant.recon.capture.capture_block_io`'s
    ``run_batches``).

    Each batch ``(x, t, cond)`` of ``calibration.batches(batch_size)`` is moved to ``device``
    (default: the model's) and fed as ``Denoiser(model)(x, t, cond)``; outputs are discarded.
    ``after_batch`` is called after each batch (a progress bar's update).
    """
    denoiser = Denoiser(model)

    def run() -> None:
        target = denoiser.device if device is None else torch.device(device)
        for x, t, cond, _ in calibration.batches(batch_size):
            denoiser(x.to(target), t.to(target), {name: value.to(target) for name, value in cond.items()})
            if after_batch is not None:
                after_batch()

    return run


def first_rows_runner(model: nn.Module, calibration: CalibrationSet, rows: int) -> Callable[[], None]:
    """One call of the model on the first ``rows`` rows of ``calibration`` (:func:`calibration_runner`): the
    forward pass that traces what a model does (its split shortcuts, reconstruction units, BOPs)."""
    first = calibration.rows(torch.arange(min(len(calibration), rows)))
    return calibration_runner(model, first, batch_size=rows)


def record_for(model: DiffusionModel, config: CalibrationConfig, *, progress: bool = True) -> CalibrationSet:
    """Record calibration data from ``model``'s own FP trajectories as ``config`` (a recipe's
    ``calibration`` section) says."""
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
