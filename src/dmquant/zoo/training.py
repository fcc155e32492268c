"""The training loop of the reference zoo: resumable, logged, deterministic given a seed.

One loop serves every zoo network. A :class:`TrainingTask` supplies the model and its loss on
a batch of glyphs; :func:`train` runs AdamW with a linear warm-up to a constant learning rate
(as DDPM trains; with an EMA of the weights the run can stop after any step), keeps the EMA,
logs to ``log.jsonl`` and a progress bar, and saves its whole state every ``save_every`` steps
and when its time budget runs out. Calling it again on the same directory resumes from the
last saved step and continues the same random stream: the batch of step ``s`` is glyphs
``s·B .. (s+1)·B - 1`` of the training split, and the step's other draws (noise, timesteps,
dropped labels) come from a generator seeded by ``(seed, s)``.

State is stored as safetensors (weights, EMA, optimizer moments) plus a JSON manifest; no pickle.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..errors import CheckpointError
from ..tensor_files import write_tensors
from .datasets import GlyphBatch, GlyphDataset

STATE_FILE = "state.safetensors"
MANIFEST_FILE = "state.json"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class TrainingPlan:
    """Hyper-parameters of one training run; saved in the manifest so a resume can check them."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 500
    weight_decay: float = 0.0
    ema_decay: float | None = None
    grad_clip: float = 1.0
    seed: int = 0
    resolution: int = 32
    log_every: int = 50
    save_every: int = 1000


@dataclass
class TrainingTask:
    """What is trained and how: ``loss(model, batch, generator) -> scalar``."""

    name: str
    model: nn.Module
    loss: Callable[[nn.Module, GlyphBatch, torch.Generator], Tensor]


@dataclass
class TrainingResult:
    """Where a run stopped: ``finished`` is False when the time budget ran out first."""

    model: nn.Module
    ema: nn.Module | None
    step: int
    finished: bool
    elapsed_s: float


def learning_rate(plan: TrainingPlan, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant."""
    return plan.learning_rate * min(1.0, (step + 1) / max(1, plan.warmup_steps))


def ema_decay(plan: TrainingPlan, step: int) -> float:
    """EMA decay with the usual warm-up ``min(decay, (1 + s) / (10 + s))`` so early weights fade fast."""
    return min(plan.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·model`` for parameters; buffers are copied."""
    for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1.0 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
        averaged.copy_(current)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one step's random draws, seeded by ``(seed, step)``."""
    mixed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(mixed)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"optimizer.{index}.{key}": value for index, entry in state.items() for key, value in entry.items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _save_state(directory: Path, task: TrainingTask, ema, optimizer, plan: TrainingPlan, step: int, elapsed: float):
    tensors = {f"model.{k}": v for k, v in task.model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors |= _optimizer_tensors(optimizer)
    write_tensors(directory / STATE_FILE, tensors)
    manifest = {"task": task.name, "step": step, "elapsed_s": elapsed, "plan": asdict(plan)}
    write_atomically(directory / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _load_state(directory: Path, task: TrainingTask, ema, optimizer, plan: TrainingPlan) -> tuple[int, float]:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        return 0, 0.0
    manifest = json.loads(manifest_path.read_text())
    if manifest["task"] != task.name:
        raise CheckpointError(f"{directory}: holds a {manifest['task']} run, not {task.name}")
    saved = {k: v for k, v in manifest["plan"].items() if k not in ("steps", "log_every", "save_every")}
    wanted = {k: v for k, v in asdict(plan).items() if k in saved}
    if saved != wanted:
        changed = {k: (saved[k], wanted[k]) for k in saved if saved[k] != wanted[k]}
        raise CheckpointError(f"{directory}: cannot resume with a different plan (saved, asked): {changed}")
    tensors = load_file(directory / STATE_FILE)

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    task.model.load_state_dict(part("model."))
    if ema is not None:
        ema.load_state_dict(part("ema."))
    _load_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("optimizer.")})
    return int(manifest["step"]), float(manifest["elapsed_s"])


def train(
    task: TrainingTask,
    plan: TrainingPlan,
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
    max_minutes: float | None = None,
    autocast: bool | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train ``task.model`` by ``plan``, saving state under ``directory``; resume if state is there.

    Args:
        max_minutes: stop (after saving) once this much wall time has passed in this call.
        autocast: bf16 autocast; defaults to on for CUDA.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    autocast = device.type == "cuda" if autocast is None else autocast
    model = task.model.to(device).train()
    ema = _copy_frozen(model) if plan.ema_decay else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay)
    start, elapsed_before = _load_state(directory, task, ema, optimizer, plan)
    dataset = GlyphDataset("train", plan.resolution)
    began = time.monotonic()
    step = start
    bar = tqdm(total=plan.steps, initial=start, desc=f"train {task.name}", disable=not progress, dynamic_ncols=True)
    with (directory / LOG_FILE).open("a") as log:
        while step < plan.steps:
            batch = dataset.batch(step * plan.batch_size, plan.batch_size, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(plan, step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = task.loss(model, batch, step_generator(plan.seed, step, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{task.name}: loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, ema_decay(plan, step))
            step += 1
            bar.update()
            spent = time.monotonic() - began
            out_of_time = max_minutes is not None and spent > 60 * max_minutes
            if step % plan.log_every == 0 or step == plan.steps or out_of_time:
                entry = {"step": step, "loss": loss.item(), "lr": learning_rate(plan, step - 1)}
                entry["elapsed_s"] = round(elapsed_before + spent, 2)
                log.write(json.dumps(entry) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if step % plan.save_every == 0 or step == plan.steps or out_of_time:
                _save_state(directory, task, ema, optimizer, plan, step, elapsed_before + spent)
            if out_of_time:
                break
    bar.close()
    model.eval()
    return TrainingResult(model, ema, step, step >= plan.steps, elapsed_before + time.monotonic() - began)


def _copy_frozen(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema
