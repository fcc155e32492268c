"""Reconstruction iterations replayed from a CUDA graph.

One iteration of block reconstruction (:func:`dmquant.recon.brecq.reconstruct`) on a small
diffusion model is a thousand or so small kernels — fake quantization, AdaRound's soft rounding,
their gradients and the Adam update — over a batch of 32. On a GPU the host then spends longer
launching them than the GPU spends running them, and BRECQ / Q-Diffusion run thousands of
iterations per block. :class:`ReplayedIteration` captures the whole iteration (forward, loss,
backward, optimizer step) once into a CUDA graph (``torch.cuda.graph``; Adam with
``capturable=True``) and replays it for every later batch: per iteration the host only copies the
batch into the graph's input tensors, sets β and the regulariser weight, and launches one graph.

The computation is the eager one, kernel for kernel, so the result is the same up to the order of
floating-point work inside cuBLAS / cuDNN (tested against the eager loop on a GPU). Random draws
inside the step (QDrop's dropping) come from generators registered with the graph, which advance
their offsets at each replay as eagerly. Anything that cannot be captured (an op that needs the
host to wait for the GPU, a generator not registered) makes the capture fail; the iteration then
runs eagerly from there on, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..streams import side_stream

#: ``step(batch, beta, weight) -> loss``: one optimisation step on ``batch`` at AdaRound's ``beta``
#: and regulariser ``weight`` (floats when eager, 0-d device tensors when captured).
Step = Callable[[Any, "Tensor | float", "Tensor | float"], Tensor]

#: Eager iterations on a side stream before the capture: they allocate the optimizer's state and
#: let cuBLAS / cuDNN set up, as ``torch.cuda.graph``'s documentation asks.
WARMUP_ITERATIONS = 3


def graphs_available(device: torch.device) -> bool:
    """Whether :class:`ReplayedIteration` can capture on ``device`` (a CUDA device)."""
    return device.type == "cuda" and torch.cuda.is_available()


class ReplayedIteration:
    """Calls ``step`` once per batch: eagerly, or (on CUDA) replayed from a captured graph.

    Args:
        step: the iteration; see :data:`Step`. It must read its inputs only from ``batch`` (a
            pytree of tensors and constants, the same shapes and constants at every call), keep no
            Python state across calls, and zero the gradients it accumulates
            (``zero_grad(set_to_none=True)`` first).
        device: where the step runs; graphs are used only on CUDA.
        enabled: ``False`` runs every iteration eagerly.
        generators: device generators the step draws from (registered with the graph).
        warmup: eager iterations before the capture.
    """

    def __init__(
        self,
        step: Step,
        device: torch.device,
        *,
        enabled: bool = True,
        generators: Sequence[torch.Generator] = (),
        warmup: int = WARMUP_ITERATIONS,
    ) -> None:
        self.step = step
        self.graphed = enabled and graphs_available(device)
        self.generators = list(generators)
        self.warmup = warmup
        self.calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[Tensor] = []
        self._layout: Any = None
        self._loss: Tensor | None = None
        if self.graphed:
            self._beta = torch.zeros((), device=device)
            self._weight = torch.zeros((), device=device)
            self._side = side_stream(device)  # one per device: a stream per unit kept a cuBLAS workspace each

    def __call__(self, batch: Any, beta: float, weight: float) -> Tensor:
        """The iteration's loss (detached; read it with ``.item()`` only when needed: that waits)."""
        self.calls += 1
        if not self.graphed:
            return self.step(batch, beta, weight)
        self._beta.fill_(beta)
        self._weight.fill_(weight)
        if self._graph is None and self.calls > self.warmup:
            self._capture(batch)
        if self._graph is None:
            return self._on_side_stream(batch)
        self._load(batch)
        self._graph.replay()
        return self._loss

    def _on_side_stream(self, batch: Any) -> Tensor:
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            loss = self.step(batch, self._beta, self._weight)
        current.wait_stream(self._side)
        return loss

    def _capture(self, batch: Any) -> None:
        leaves, spec = tree_flatten(batch)
        static = [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        graph = torch.cuda.CUDAGraph()
        positions = [generator.get_state() for generator in self.generators]
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.step(tree_unflatten(static, spec), self._beta, self._weight)
        except RuntimeError as error:
            self.graphed = False
            for generator, position in zip(self.generators, positions, strict=True):
                _release(generator, position)
            warnings.warn(
                f"the reconstruction iteration could not be captured as a CUDA graph ({error}); "
                "running it eagerly (slower on small models, same result)",
                stacklevel=3,
            )
            return
        self._graph, self._loss = graph, loss
        self._inputs = [leaf for leaf in static if isinstance(leaf, Tensor)]
        self._layout = (spec, [None if isinstance(leaf, Tensor) else leaf for leaf in static])

    def _load(self, batch: Any) -> None:
        leaves, spec = tree_flatten(batch)
        constants = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        if (spec, constants) != self._layout:
            raise ValueError("a replayed iteration needs batches of the captured one's structure and constants")
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        for static, tensor in zip(self._inputs, tensors, strict=True):
            if static.shape != tensor.shape or static.dtype != tensor.dtype:
                raise ValueError(
                    f"a replayed iteration needs the captured shapes: got {tuple(tensor.shape)} {tensor.dtype} "
                    f"for {tuple(static.shape)} {static.dtype}"
                )
            static.copy_(tensor, non_blocking=True)


def _release(generator: torch.Generator, position: Tensor) -> None:
    """Give ``generator`` a fresh state at ``position``: a capture that failed leaves the state it
    registered marked as capturing, and an eager draw from it would then fail."""
    fresh = torch.Generator(device=generator.device)
    fresh.set_state(position)
    generator.graphsafe_set_state(fresh)
