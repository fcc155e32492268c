"""Cached inputs and outputs of one block, for block-wise reconstruction.

BRECQ (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction", Sec. 3.2 and Sec. 4 / Alg. 1) reconstructs one block at a time: the block's
quantized copy is optimised so that its output matches the full-precision block's output, with
the block's *input* taken from the quantized model run up to that block (the earlier blocks
already quantized and reconstructed), so that each block learns to undo the error accumulated
before it. Q-Diffusion (Li et al. 2023) does the same for the residual and transformer blocks of
a diffusion UNet; QDrop (Wei et al. 2022) mixes the quantized and the FP input at random. The
loop over the calibration data is therefore run once per block and model, and what the block
sees is cached:

- :func:`~dmquant.recon.capture.capture_block_io` hooks one block, runs the model over the calibration data
  (``run_batches``) and records *every call* of the block: its positional and keyword
  arguments and its output. Diffusion blocks take more than one tensor — a ``ResnetBlock2D``
  is called as ``(hidden_states, temb)``, a ``BasicTransformerBlock`` as ``hidden_states`` plus
  ``encoder_hidden_states=`` / ``timestep=`` / ``class_labels=`` / ``attention_mask=None`` … —
  so the cache stores whatever the block was called with, and replays it.
- :class:`BlockIOCache` holds the recorded calls concatenated along the batch dimension, on
  the compute device while they fit a memory budget, else in (pinned) host memory moved there
  batch by batch.
- :func:`paired` joins the cache of the FP model (its output is the target) and that of the
  quantized model (its inputs are the block's inputs) into one batch source.

What is stored per argument (positional by index, keyword by name):

- a tensor whose first dimension is the call's batch size (that of the block's output) is
  *per-sample*: the calls' tensors are concatenated along dimension 0;
- any other tensor (a 0-d timestep, a mask shared by the batch) is *shared*: it must be equal
  in every call and is stored once;
- anything else (``None``, ``return_dict=False``, a dict of options) is a *constant*: it must be
  equal in every call and is stored once. Tensors nested in containers are not supported (an
  error says which argument).

The block's output is its return value if that is a tensor, the first element if it is a
tuple/list (diffusers' ``return_dict=False``), else its ``.sample`` (diffusers output objects);
see :func:`block_output`.

No library caches module calls with their arguments this way (``torch.utils.hooks`` only
delivers them), so this module is written by hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import CalibrationError, ConfigError, ModelError

__all__ = [
    "Slot",
    "CallLayout",
    "BlockIOCache",
    "PairedBlockIO",
    "block_output",
    "paired",
]

TARGET_KEY = "target"

SlotKind = Literal["batched", "shared", "const"]
Indices = Tensor | Sequence[int] | range | slice


# --------------------------------------------------------------------------------------
# Structure of a call
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One argument of the block's calls: a per-sample tensor, a shared tensor, or a constant.

    ``value`` is the constant (``kind == "const"``), else ``None``.
    """

    kind: SlotKind
    value: Any = None


@dataclass(frozen=True)
class CallLayout:
    """How the block was called: its arguments' slots, whether the output was kept, the calls' sizes.

    ``call_sizes`` holds the batch size of every recorded call in order; their sum is the
    number of cached samples.
    """

    args: tuple[Slot, ...]
    kwargs: tuple[tuple[str, Slot], ...]
    has_target: bool
    call_sizes: tuple[int, ...]

    def tensor_keys(self) -> dict[str, SlotKind]:
        """The stored tensors' keys (``args.<i>``, ``kwargs.<name>``, ``target``) and their kind."""
        keys: dict[str, SlotKind] = {}
        for index, slot in enumerate(self.args):
            if slot.kind != "const":
                keys[f"args.{index}"] = slot.kind
        for name, slot in self.kwargs:
            if slot.kind != "const":
                keys[f"kwargs.{name}"] = slot.kind
        if self.has_target:
            keys[TARGET_KEY] = "batched"
        return keys


def same_const(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_const(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_const(a[key], b[key]) for key in a)
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: only itself is the same
        return False


def contains_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(contains_tensor(item) for item in value)
    if isinstance(value, dict):
        return any(contains_tensor(item) for item in value.values())
    return False


def block_output(output: Any) -> Tensor:
    """The tensor a block returned: the value itself, the first element of a tuple/list, or ``.sample``."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, Tensor) and hasattr(output, "sample"):
        output = output.sample
    if not isinstance(output, Tensor):
        raise ModelError(f"cannot take a tensor from the block's output of type {type(output).__name__}")
    return output


def tensor_nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _as_index(indices: Indices, count: int) -> Tensor:
    """``indices`` as a 1-d CPU long tensor, checked against ``count`` samples."""
    if isinstance(indices, slice):
        indices = range(count)[indices]
    index = indices.detach().cpu() if isinstance(indices, Tensor) else torch.as_tensor(list(indices))
    if index.numel() == 0:
        index = index.reshape(0).long()
    if index.dim() != 1 or index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise IndexError(f"indices must be a 1-d sequence of ints, got shape {tuple(index.shape)} of {index.dtype}")
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= count):
        raise IndexError(
            f"indices must lie in 0..{count - 1}, got {int(index.min())}..{int(index.max())} "
            "(negative indices are not supported)"
        )
    return index


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


class BlockIOCache:
    """The recorded calls of one block: arguments and output, concatenated along the batch dimension.

    Args:
        tensors: the stored tensors by key (:meth:`CallLayout.tensor_keys`): per-sample tensors
            with ``len(self)`` rows, shared tensors as they were passed.
        layout: the calls' structure (constants included).
        device: the compute device :meth:`batch` delivers to.
        memory_budget_bytes: if the tensors' total size (:attr:`nbytes`) exceeds it, the
            per-sample tensors are kept in host memory — pinned when ``device`` is a CUDA
            device — and moved to ``device`` batch by batch (:attr:`spilled`); ``None``: no
            limit, everything on ``device``. Shared tensors are always on ``device``.

    Raises:
        CalibrationError: the tensors do not match the layout.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        layout: CallLayout,
        *,
        device: torch.device | str = "cpu",
        memory_budget_bytes: int | None = None,
    ):
        if memory_budget_bytes is not None and memory_budget_bytes < 0:
            raise ConfigError(f"memory_budget_bytes must be >= 0 or None, got {memory_budget_bytes}")
        keys = layout.tensor_keys()
        count = sum(layout.call_sizes)
        missing = sorted(keys.keys() - tensors.keys())
        extra = sorted(tensors.keys() - keys.keys())
        if missing or extra:
            raise CalibrationError(
                f"block cache tensors do not match its layout: missing {missing}, unexpected {extra}"
            )
        for key, kind in keys.items():
            tensor = tensors[key]
            if kind == "batched" and (tensor.dim() == 0 or tensor.shape[0] != count):
                raise CalibrationError(
                    f"block cache tensor {key!r} has shape {tuple(tensor.shape)}, expected {count} rows"
                )
        self.layout = layout
        self.device = resolve_device(device)
        self.memory_budget_bytes = memory_budget_bytes
        self.nbytes = sum(tensor_nbytes(tensor) for tensor in tensors.values())
        self.spilled = memory_budget_bytes is not None and self.nbytes > memory_budget_bytes
        self._pinned = self.spilled and self.device.type == "cuda"
        self._tensors = {key: self._place(tensor.detach(), keys[key]) for key, tensor in tensors.items()}

    def _place(self, tensor: Tensor, kind: SlotKind) -> Tensor:
        if kind == "shared" or not self.spilled:
            return tensor.to(self.device)
        tensor = tensor.to("cpu")
        if self._pinned and not tensor.is_pinned():
            try:
                tensor = tensor.pin_memory()
            except RuntimeError as error:  # page-locked memory is limited; unpinned copies are only slower
                warnings.warn(f"could not pin the spilled block cache ({error}); using pageable memory", stacklevel=3)
                self._pinned = False
        return tensor

    @property
    def on_device(self) -> bool:
        """Whether every tensor is held on :attr:`device` (``False``: spilled to host memory)."""
        return not self.spilled

    @property
    def has_target(self) -> bool:
        """Whether the block's output was recorded."""
        return self.layout.has_target

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by key, where they are held (read them, do not modify them)."""
        return dict(self._tensors)

    def __len__(self) -> int:
        return sum(self.layout.call_sizes)

    def __repr__(self) -> str:
        where = "spilled to host memory" if self.spilled else f"on {self.device}"
        return f"BlockIOCache({len(self)} samples, {self.nbytes} bytes, {where})"

    def _gather(self, key: str, index: Tensor) -> Tensor:
        tensor = self._tensors[key]
        if tensor.device == self.device:
            return tensor.index_select(0, index.to(self.device))
        if self._pinned:
            out = torch.empty((index.numel(), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
            torch.index_select(tensor, 0, index, out=out)
            return out.to(self.device, non_blocking=True)
        return tensor.index_select(0, index).to(self.device)

    def _value(self, key: str, slot: Slot, index: Tensor) -> Any:
        if slot.kind == "batched":
            return self._gather(key, index)
        if slot.kind == "shared":
            return self._tensors[key]
        return slot.value

    def batch(self, indices: Indices) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
        """``(args, kwargs, target)`` of the samples ``indices``, on :attr:`device`.

        ``block(*args, **kwargs)`` replays the recorded calls on those samples (constants and
        shared tensors included); ``target`` is the recorded output's rows (``None`` if the
        output was not recorded). Per-sample tensors are fresh copies; shared tensors and
        constants are the stored objects.
        """
        index = _as_index(indices, len(self))
        args = tuple(self._value(f"args.{i}", slot, index) for i, slot in enumerate(self.layout.args))
        kwargs = {name: self._value(f"kwargs.{name}", slot, index) for name, slot in self.layout.kwargs}
        target = self._gather(TARGET_KEY, index) if self.has_target else None
        return args, kwargs, target

    def sample_batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        epochs: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[Tensor]:
        """Random batches of sample indices (1-d CPU long tensors), epoch after epoch.

        Each epoch is a permutation of all samples drawn from ``generator`` (``None``: a
        generator seeded with 0) split into batches of ``batch_size``, so within an epoch no
        index repeats and all are covered (the last batch is smaller unless ``drop_last``).
        ``epochs=None`` yields batches without end — take as many as the optimisation needs.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if epochs is not None and epochs < 0:
            raise ConfigError(f"epochs must be >= 0 or None, got {epochs}")
        if drop_last and batch_size > len(self):
            raise ConfigError(f"drop_last with batch_size {batch_size} > {len(self)} samples leaves no batch")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(self), generator=generator, device=generator.device).cpu()
            for index in order.split(batch_size):
                if drop_last and index.numel() < batch_size:
                    break
                yield index
            epoch += 1

    def _signature(self) -> tuple:
        """What must agree between an FP and a quantized-input cache of the same block."""

        def describe(key: str, slot: Slot) -> tuple:
            if slot.kind == "const":
                return (slot.kind, slot.value)
            tensor = self._tensors[key]
            shape = tuple(tensor.shape[1:]) if slot.kind == "batched" else tuple(tensor.shape)
            return (slot.kind, tensor.dtype, shape)

        return (
            tuple(describe(f"args.{i}", slot) for i, slot in enumerate(self.layout.args)),
            tuple((name, describe(f"kwargs.{name}", slot)) for name, slot in self.layout.kwargs),
        )


# --------------------------------------------------------------------------------------
# FP target + quantized input
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedBlockIO:
    """The FP cache (inputs and target) and the quantized-input cache of one block, row by row."""

    fp: BlockIOCache
    quant: BlockIOCache

    def __len__(self) -> int:
        return len(self.fp)

    @property
    def device(self) -> torch.device:
        return self.fp.device

    def batch(
        self, indices: Indices
    ) -> tuple[tuple[Any, ...], dict[str, Any], tuple[Any, ...], dict[str, Any], Tensor]:
        """``(quant_args, quant_kwargs, fp_args, fp_kwargs, fp_target)`` of the samples ``indices``.

        BRECQ feeds the quantized block ``quant_args``/``quant_kwargs`` and compares its output
        with ``fp_target``; QDrop mixes the quantized and FP inputs.
        """
        index = _as_index(indices, len(self))
        quant_args, quant_kwargs, _ = self.quant.batch(index)
        fp_args, fp_kwargs, target = self.fp.batch(index)
        assert target is not None  # checked by paired()
        return quant_args, quant_kwargs, fp_args, fp_kwargs, target

    def quantized_batch(self, indices: Indices) -> tuple[tuple[Any, ...], dict[str, Any], Tensor]:
        """``(quant_args, quant_kwargs, fp_target)`` of the samples ``indices``: what BRECQ feeds the
        quantized block and what it compares the output with."""
        quant_args, quant_kwargs, _, _, target = self.batch(indices)
        return quant_args, quant_kwargs, target

    def sample_batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        epochs: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[Tensor]:
        """:meth:`BlockIOCache.sample_batches` over the shared rows."""
        return self.fp.sample_batches(batch_size, generator, epochs=epochs, drop_last=drop_last)


def paired(fp_cache: BlockIOCache, quant_cache: BlockIOCache) -> PairedBlockIO:
    """Join the FP model's cache of a block (with its output) and the quantized model's cache of it.

    Both must come from the same calibration batches in the same order: the same calls' sizes,
    the same arguments (kinds, dtypes, per-sample shapes, constants) and the same device.

    Raises:
        CalibrationError: the caches do not line up, or the FP cache has no recorded output.
    """
    if not fp_cache.has_target:
        raise CalibrationError("the FP block cache holds no output (captured with record_output=False)")
    if len(fp_cache) != len(quant_cache):
        raise CalibrationError(f"the FP cache has {len(fp_cache)} samples, the quantized one {len(quant_cache)}")
    if fp_cache.layout.call_sizes != quant_cache.layout.call_sizes:
        raise CalibrationError(
            "the FP and quantized caches were recorded in differently sized calls "
            f"({list(fp_cache.layout.call_sizes)} vs {list(quant_cache.layout.call_sizes)}): "
            "capture both over the same calibration batches in the same order"
        )
    fp_signature, quant_signature = fp_cache._signature(), quant_cache._signature()
    if fp_signature != quant_signature:
        raise CalibrationError(
            f"the FP and quantized caches hold different arguments: {fp_signature} vs {quant_signature}"
        )
    if fp_cache.device != quant_cache.device:
        raise CalibrationError(f"the FP cache serves {fp_cache.device}, the quantized one {quant_cache.device}")
    return PairedBlockIO(fp_cache, quant_cache)
