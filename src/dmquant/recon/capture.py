"""Capture of one block's calls while the model runs over calibration data (BRECQ's per-block inputs).

:func:`capture_block_io` records every call of a block into a :class:`~dmquant.recon.cache.BlockIOCache`
(what is stored is described in :mod:`dmquant.recon.cache`); :func:`capture_paired_io` does it on the FP and
the quantized model and pairs the two; :func:`recorded_outputs` keeps only the latest call of some modules,
for looking at one forward pass at a time. No library captures module calls with their arguments this way
(``torch.utils.hooks`` only delivers them), so this module is written by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..calib.record import calibration_runner
from ..errors import CalibrationError, ModelError
from .cache import (
    TARGET_KEY,
    BlockIOCache,
    CallLayout,
    PairedBlockIO,
    Slot,
    block_output,
    contains_tensor,
    paired,
    resolve_device,
    same_const,
    tensor_nbytes,
)


class SkippedForward:
    """What ``model(...)`` returns while :func:`capture_block_io` stops it after the block.

    Its ``.sample`` and ``[0]`` are ``None``, so ``Denoiser(model)(...)`` and diffusers-style
    callers run through; the model's real output was never computed.
    """

    sample = None

    def __getitem__(self, index: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "SkippedForward()"


class _StopForward(BaseException):
    """Raised by the block's hook to end the model's forward; a BaseException so ``except Exception`` passes it."""

    def __init__(self, owner: object):
        super().__init__("block captured; forward stopped")
        self.owner = owner


class _Recorder:
    """Collects the block's calls; keeps per-sample tensors on ``device`` until the budget is exceeded."""

    def __init__(self, device: torch.device | None, budget: int | None, record_output: bool):
        self.device = device
        self.budget = budget
        self.record_output = record_output
        self.pending: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.args: list[Slot] | None = None
        self.kwargs: dict[str, Slot] | None = None
        self.pieces: dict[str, list[Tensor]] = {}
        self.shared: dict[str, Tensor] = {}
        self.call_sizes: list[int] = []
        self.nbytes = 0
        self.spilled = False

    def _storage(self, tensor: Tensor) -> torch.device:
        if self.device is None:  # not known before the first output; the pre-hook copies in place
            return tensor.device
        return torch.device("cpu") if self.spilled else self.device

    def _copy(self, value: Any) -> Any:
        return value.detach().to(self._storage(value), copy=True) if isinstance(value, Tensor) else value

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        named = [(f"positional argument {i}", value) for i, value in enumerate(args)] + [
            (f"keyword argument {name!r}", value) for name, value in kwargs.items()
        ]
        for where, value in named:
            if not isinstance(value, Tensor) and contains_tensor(value):
                raise CalibrationError(
                    f"the block's {where} holds tensors inside a {type(value).__name__}; a block cache stores "
                    "tensors passed directly as arguments only"
                )
        # copied before the forward: the block may modify its inputs in place
        self.pending.append((tuple(self._copy(a) for a in args), {k: self._copy(v) for k, v in kwargs.items()}))

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        call_args, call_kwargs = self.pending.pop()
        target = block_output(output)
        if target.dim() == 0:
            raise CalibrationError("the block returned a 0-d tensor: there is no batch dimension to cache")
        if self.device is None:
            self.device = resolve_device(target.device)
        batch = target.shape[0]
        call = len(self.call_sizes)
        slots_args = [self._slot(value, batch) for i, value in enumerate(call_args)]
        slots_kwargs = {name: self._slot(value, batch) for name, value in call_kwargs.items()}
        if self.args is None:
            self.args, self.kwargs = slots_args, slots_kwargs
        self._check_same_call(call, slots_args, slots_kwargs)
        for i, (slot, value) in enumerate(zip(slots_args, call_args, strict=True)):
            self._store(f"args.{i}", slot, value, call)
        for name, slot in slots_kwargs.items():
            self._store(f"kwargs.{name}", slot, call_kwargs[name], call)
        if self.record_output:
            self._store(TARGET_KEY, Slot("batched"), self._copy(target), call)
        self.call_sizes.append(batch)
        if self.budget is not None and not self.spilled and self.nbytes > self.budget:
            self.spilled = True
            self.pieces = {key: [piece.cpu() for piece in pieces] for key, pieces in self.pieces.items()}

    @staticmethod
    def _slot(value: Any, batch: int) -> Slot:
        if isinstance(value, Tensor):
            return Slot("batched" if value.dim() > 0 and value.shape[0] == batch else "shared")
        return Slot("const", value)  # nested tensors were refused by the pre-hook

    def _check_same_call(self, call: int, args: list[Slot], kwargs: dict[str, Slot]) -> None:
        assert self.args is not None and self.kwargs is not None
        first = (len(self.args), sorted(self.kwargs))
        if (len(args), sorted(kwargs)) != first:
            raise CalibrationError(
                f"call {call} of the block passed {len(args)} positional arguments and keywords {sorted(kwargs)}, "
                f"call 0 passed {first[0]} and {first[1]}: a block cache needs one calling convention"
            )
        pairs = [(f"positional argument {i}", a, b) for i, (a, b) in enumerate(zip(self.args, args, strict=True))]
        pairs += [(f"keyword argument {name!r}", self.kwargs[name], slot) for name, slot in kwargs.items()]
        for where, before, now in pairs:
            if before.kind != now.kind:
                raise CalibrationError(
                    f"the block's {where} was {before.kind} in call 0 but {now.kind} in call {call} "
                    "(a tensor is per-sample when its first dimension is the call's batch size)"
                )
            if now.kind == "const" and not same_const(before.value, now.value):
                raise CalibrationError(
                    f"the block's non-tensor {where} changed between calls: {before.value!r} in call 0, "
                    f"{now.value!r} in call {call}; a block cache stores non-tensor arguments once"
                )

    def _store(self, key: str, slot: Slot, value: Any, call: int) -> None:
        if slot.kind == "const":
            return
        if slot.kind == "shared":
            first = self.shared.setdefault(key, value)
            if first is not value and not (
                first.dtype == value.dtype and first.shape == value.shape and torch.equal(first, value.to(first.device))
            ):
                raise CalibrationError(
                    f"the block's tensor {key!r} (shape {tuple(value.shape)}, not per-sample) changed between "
                    f"call 0 and call {call}; such tensors are stored once and must be equal in every call"
                )
            return
        pieces = self.pieces.setdefault(key, [])
        if pieces and (pieces[0].dtype != value.dtype or pieces[0].shape[1:] != value.shape[1:]):
            raise CalibrationError(
                f"the block's tensor {key!r} is {value.dtype} {tuple(value.shape[1:])} per sample in call {call} but "
                f"{pieces[0].dtype} {tuple(pieces[0].shape[1:])} in call 0: the calls cannot be concatenated"
            )
        value = value.to(self._storage(value))
        pieces.append(value)
        self.nbytes += tensor_nbytes(value)

    def finish(self) -> BlockIOCache:
        assert self.args is not None and self.kwargs is not None and self.device is not None
        layout = CallLayout(
            args=tuple(self.args),
            kwargs=tuple(self.kwargs.items()),
            has_target=self.record_output,
            call_sizes=tuple(self.call_sizes),
        )
        tensors = {key: pieces[0] if len(pieces) == 1 else torch.cat(pieces) for key, pieces in self.pieces.items()}
        self.pieces.clear()
        return BlockIOCache(tensors | self.shared, layout, device=self.device, memory_budget_bytes=self.budget)


@contextmanager
def recorded_outputs(modules: Mapping[str, nn.Module], *, keep_inputs: bool = False) -> Iterator[dict[str, Any]]:
    """While open, each module's latest output (:func:`block_output`), or ``(first input, output)``
    with ``keep_inputs``, by name; the dict's order is that of the modules' latest calls.

    Unlike :func:`capture_block_io` nothing is stored across calls: this is for looking at one
    forward pass at a time (a block's inner layers, every block at a sampling step).
    """
    seen: dict[str, Any] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen.pop(name, None)
            seen[name] = (args[0], block_output(output)) if keep_inputs else block_output(output)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def capture_block_io(
    model: nn.Module,
    block: nn.Module,
    run_batches: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    memory_budget_bytes: int | None = None,
    stop_after_block: bool = True,
    record_output: bool = True,
) -> BlockIOCache:
    """Record every call of ``block`` while ``run_batches()`` runs ``model`` over calibration data.

    Capture it on the FP model for the block's FP inputs and output (the reconstruction target)
    and on the quantized model (earlier blocks quantized and reconstructed) for the inputs BRECQ
    (Li et al. 2021, Sec. 4) feeds the quantized block; then join them with :func:`paired`. What
    is stored is described in this module's docstring.

    Args:
        model: the module ``run_batches`` calls (the denoiser), holding ``block``.
        block: the module whose calls are recorded.
        run_batches: runs the model over the calibration data batch by batch, e.g.
            :func:`calibration_runner`; it runs under ``torch.no_grad()``.
        device: where :meth:`BlockIOCache.batch` delivers; ``None``: the device of the
            block's output.
        memory_budget_bytes: see :class:`BlockIOCache`; also during the capture, per-sample
            tensors move to host memory as soon as their total exceeds it (checked after each
            call; joining the calls at the end briefly needs the cache's size twice).
        stop_after_block: end each model call right after the block's call (later layers are
            not needed): the block's forward hook raises an exception that a wrapper around
            ``model.forward`` catches, and ``model(...)`` returns a :class:`SkippedForward`
            instead of its output, so ``run_batches`` must not use the model's outputs. ``model``
            must be the module ``run_batches`` calls, not a module inside it. A block called more
            than once per model call (weight sharing) needs ``stop_after_block=False``: only its
            first call per model call is recorded otherwise. With ``False`` the model runs fully.
        record_output: keep the block's output (the target); the quantized-input cache does not
            need it.

    Hooks and the ``forward`` wrapper are removed on return, also when ``run_batches`` raises.

    Raises:
        ModelError: ``block`` is not inside ``model``, or the stop did not pass through
            ``model.forward`` (``run_batches`` called another module).
        CalibrationError: the block never ran, or its calls cannot be cached together (their
            arguments differ in structure, non-tensor values or per-sample shapes).
    """
    if not any(module is block for module in model.modules()):
        raise ModelError(f"the {type(block).__name__} to capture is not a submodule of the {type(model).__name__}")
    stop = stop_after_block and block is not model
    recorder = _Recorder(None if device is None else resolve_device(device), memory_budget_bytes, record_output)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        recorder.hook(module, args, kwargs, output)
        if stop:
            raise _StopForward(recorder)

    handles = [
        block.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True),
        block.register_forward_hook(hook, with_kwargs=True),
    ]
    had_own_forward = "forward" in vars(model)
    previous_forward = vars(model).get("forward")
    try:
        if stop:
            forward = model.forward

            def forward_until_block(*args: Any, **kwargs: Any) -> Any:
                try:
                    return forward(*args, **kwargs)
                except _StopForward as stopped:
                    if stopped.owner is not recorder:
                        raise
                    return SkippedForward()

            model.forward = forward_until_block
        with torch.no_grad():
            run_batches()
    except _StopForward as stopped:
        if stopped.owner is not recorder:
            raise
        raise ModelError(
            f"the capture stopped after the block, but not inside {type(model).__name__}.forward: pass as `model` "
            "the module run_batches calls, or stop_after_block=False"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        if stop:
            if had_own_forward:
                model.forward = previous_forward
            else:
                del model.forward
    if not recorder.call_sizes:
        raise CalibrationError(f"the {type(block).__name__} never ran while run_batches ran the model")
    return recorder.finish()


def capture_paired_io(
    fp_model: nn.Module,
    model: nn.Module,
    name: str,
    calibration: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    memory_budget_bytes: int | None = None,
) -> PairedBlockIO:
    """The block ``name``'s FP inputs and output (on ``fp_model``) paired with its inputs in the
    quantized ``model``, both captured over ``calibration`` in batches of ``batch_size``, each cache
    within ``memory_budget_bytes`` (see :func:`capture_block_io`)."""
    options = {"device": device, "memory_budget_bytes": memory_budget_bytes}
    fp_runner = calibration_runner(fp_model, calibration, batch_size=batch_size)
    fp_cache = capture_block_io(fp_model, fp_model.get_submodule(name), fp_runner, **options)
    quant_runner = calibration_runner(model, calibration, batch_size=batch_size)
    quant_cache = capture_block_io(model, model.get_submodule(name), quant_runner, record_output=False, **options)
    return paired(fp_cache, quant_cache)
