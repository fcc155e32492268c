"""Models larger than the accelerator: weights kept in host memory, one block on the device at a time.

Calibration and block reconstruction touch the model one block after another, so a model need not fit
the GPU as a whole: with an :class:`Offload`, its parameters and buffers stay in host (CPU) memory, and

- while whole-model forwards run (calibration recording, activation-range estimation, the capture of a
  block's inputs in reconstruction) :meth:`Offload.running` puts hooks on the model's blocks: each block
  moves to the execution device when it is called and back to host memory when it returns; its inputs
  follow it to the device, and the model's output returns to where its input was (so a sampling loop on
  the host drives it unchanged). At most one call's blocks are on the device at a time: the one running
  and those enclosing it;
- the unit being reconstructed (its quantizers and AdaRound's rounding with it) and its FP twin stay on
  the execution device while they are optimised, :meth:`Offload.holding`, then go back.

Blocks (what moves whole): modules of a reconstruction block kind (:data:`~dmquant.recon.blocks.BLOCK_KINDS`),
the blocks a diffusers model declares as repeated (``_repeated_blocks``: FLUX's double- and single-stream
blocks, SD's ``BasicTransformerBlock``), and every Linear / Conv2d layer outside those. Any other module with
tensors of its own (norms, embeddings, a parameter of the model itself) moves just those. A forward stopped
inside a block (the capture stops after the block it records) leaves the enclosing block on the device until
the model's next call or the end of :meth:`~Offload.running`, which returns every tensor to host memory.
The layers and modules with tensors inside a block are hooked too, and move when called while their block is
not on the device: a model may call a part of a block outside the block's forward (diffusers' DiT computes its
conditioning with ``transformer_blocks[0].norm1.emb`` before running the blocks).

Only the place of the arithmetic changes, never its order or precision: results equal those of the model
held on the execution device bit for bit (and, with a CPU execution device, those of no offloading at all).

The hooks are accelerate's (``add_hook_to_module``, ``send_to_device``); the move is written here, because
accelerate's own offloading hook (``AlignDevicesHook(offload=True)``, what ``cpu_offload`` attaches) keeps a
module's parameters on the meta device between calls and loads a copy from a weights map for each call.
Weight-range calibration, AdaRound's rounding and hardening, and the saved progress of a reconstruction read
and write the parameters outside forwards, and quantizers update their state during them; here the module's
own tensors move (the parameter objects are kept), so between calls it is an ordinary module in host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import find_device, send_to_device
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import QuantConfig

HOST = torch.device("cpu")


def _move(module: nn.Module, device: torch.device, whole: bool) -> None:
    """The module's parameters and buffers (its submodules' too when ``whole``) to ``device``, in place."""
    for owner in module.modules() if whole else (module,):
        for parameter in owner.parameters(recurse=False):
            parameter.data = parameter.data.to(device)
        for name, buffer in owner.named_buffers(recurse=False):
            setattr(owner, name, buffer.to(device))


def _has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


class Moved(NamedTuple):
    """A module :meth:`Offload.running` hooks: whether it moves whole (a block or a layer) or only its own
    tensors, and the ids of the hooked whole modules it lies in (it moves only when none of them is on the
    device)."""

    module: nn.Module
    whole: bool
    within: tuple[int, ...]


def moved_modules(model: nn.Module) -> list[Moved]:
    """The modules :meth:`Offload.running` hooks; the model itself comes first (its output is returned where its
    input was)."""
    from .recon.blocks import BLOCK_KINDS  # here: diffusers loads only when a model is offloaded

    whole_types = (*(kind for kind, _ in BLOCK_KINDS), nn.Linear, nn.Conv2d)
    repeated = frozenset(getattr(model, "_repeated_blocks", None) or ())
    found: list[Moved] = []
    seen: set[int] = set()
    pending: list[tuple[nn.Module, tuple[int, ...]]] = [(model, ())]  # a stack, not a recursive closure: that
    while pending:  # would be a reference cycle holding every module (a model copy) until the garbage collector ran
        module, within = pending.pop()
        if id(module) in seen:  # a module shared by two parents is hooked once
            continue
        seen.add(id(module))
        whole = isinstance(module, whole_types) or type(module).__name__ in repeated
        if whole or module is model or _has_own_tensors(module):
            found.append(Moved(module, whole, within))
        inner = (*within, id(module)) if whole else within
        pending.extend((child, inner) for child in reversed(list(module.children())))
    return found


#: The modules on the execution device now, by id, with whether they moved whole.
Loaded = dict[int, tuple[nn.Module, bool]]


class _OnDeviceWhileCalled(ModelHook):
    """Moves its module to ``device`` for the call (inputs with it) and back to ``host`` after, unless one of the
    whole modules ``within`` which it lies is on the device already (it is then too).

    The hook of the model itself (``root``) returns the output to the input's device, and first sends back
    to ``host`` whatever an interrupted call left in ``loaded`` (a forward stopped inside a block skips the
    enclosing blocks' return), so one call's blocks at most are on the device at any time.
    """

    def __init__(
        self, device: torch.device, host: torch.device, moved: Moved, root: bool, loaded: Loaded
    ) -> None:  # fmt: skip
        self.device, self.host, self.whole, self.within = device, host, moved.whole, moved.within
        self.root, self.loaded = root, loaded
        self.input_device: torch.device | None = None

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.root:
            self.input_device = find_device([args, kwargs])
            for left, whole in self.loaded.values():
                _move(left, self.host, whole)
            self.loaded.clear()
        if not any(block in self.loaded for block in self.within):
            _move(module, self.device, self.whole)
            self.loaded[id(module)] = (module, self.whole)
        return send_to_device(args, self.device), send_to_device(kwargs, self.device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.loaded.pop(id(module), None) is not None:  # it moved for this call (its block was not there)
            _move(module, self.host, self.whole)
        if self.root and self.input_device is not None:
            output = send_to_device(output, self.input_device)
        return output


class Offload:
    """Calibration and reconstruction with the model's weights in host memory and each block run on ``device``.

    Args:
        device: the execution device (a GPU; ``"cuda"`` is the current one). A CPU device runs the same hooks
            without moving anything, which is how tests check that offloading changes no result.
    """

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.host = HOST

    def __repr__(self) -> str:
        return f"Offload(device={self.device})"

    def check_hosted(self, model: nn.Module) -> None:
        """Raise :class:`~dmquant.errors.ConfigError` unless every tensor of ``model`` is in host memory."""
        elsewhere = {str(t.device) for t in (*model.parameters(), *model.buffers()) if t.device != self.host}
        if elsewhere:
            raise ConfigError(
                f"offloading keeps the {type(model).__name__}'s weights in host memory, but some are on "
                f"{', '.join(sorted(elsewhere))}: pass the model on the CPU (model.to('cpu'))"
            )

    @contextmanager
    def running(self, *models: nn.Module) -> Iterator[None]:
        """While open, every forward of ``models`` runs block by block on :attr:`device` (see the module's
        docstring); on exit the hooks are removed and every tensor is back in host memory, also on error."""
        for model in models:
            self.check_hosted(model)
        hooked: list[tuple[nn.Module, bool, bool]] = []
        loaded: Loaded = {}
        try:
            for model in models:
                for moved in moved_modules(model):
                    module = moved.module
                    own_forward = "forward" in vars(module)
                    hook = _OnDeviceWhileCalled(self.device, self.host, moved, module is model, loaded)
                    add_hook_to_module(module, hook)
                    hooked.append((module, moved.whole, own_forward))
            yield
        finally:
            for module, whole, own_forward in reversed(hooked):
                remove_hook_from_module(module)
                if not own_forward:  # accelerate leaves the bound forward behind as an attribute
                    vars(module).pop("forward", None)
                _move(module, self.host, whole)

    @contextmanager
    def holding(self, *modules: nn.Module) -> Iterator[None]:
        """``modules`` on :attr:`device` while open (a unit being reconstructed), back in host memory after."""
        try:
            for module in modules:
                module.to(self.device)
            yield
        finally:
            for module in modules:
                module.to(self.host)


def offload_for(request: bool | str | torch.device | None, model: nn.Module) -> Offload | None:
    """The :class:`Offload` of ``model`` that ``quantize(..., offload=...)`` asks for: ``True`` this process's GPU,
    a device that device (``"cuda"``: this process's GPU under a launch of several), ``False`` / ``None`` none;
    checked against where the model's tensors are."""
    from .distributed import device

    if request is None or request is False:
        return None
    if request is True:
        if not torch.cuda.is_available():
            raise ConfigError(
                "offload=True runs each block on this process's GPU, but CUDA is not available; "
                "name an execution device instead (offload='cpu' runs the same steps on the CPU)"
            )
        request = "cuda"
    offload = Offload(device(request))
    offload.check_hosted(model)
    return offload


def refuse_unoffloaded_probes(config: QuantConfig) -> None:
    """Raise :class:`~dmquant.errors.ConfigError` for a recipe whose job also samples with the model besides
    calibrating and reconstructing it: an offloaded job covers those two only, and would run the rest with
    every weight in host memory, on the CPU."""
    probes = {
        "step_precision without a switch_step (measured by sampling)": (
            config.step_precision.enabled and config.step_precision.switch_step is None
        ),
        "smoothing.most_sensitive (measured by sampling)": config.smoothing.enabled and config.smoothing.most_sensitive,
        "hybrid (planned by sampling)": config.hybrid.enabled,
        "correction (PTQD's noise statistics, measured by sampling)": config.correction.enabled,
    }
    found = [name for name, used in probes.items() if used]
    if found:
        raise ConfigError(
            f"recipe {config.name!r} uses {', '.join(found)}, which offloading does not cover yet (only calibration "
            "and reconstruction run block by block): quantize without offloading, or drop those sections"
        )


def running(offload: Offload | None, *models: nn.Module) -> AbstractContextManager[None]:
    """``offload.running(*models)``, or nothing without offloading."""
    return offload.running(*models) if offload is not None else nullcontext()


def holding(offload: Offload | None, *modules: nn.Module) -> AbstractContextManager[None]:
    """``offload.holding(*modules)``, or nothing without offloading."""
    return offload.holding(*modules) if offload is not None else nullcontext()
