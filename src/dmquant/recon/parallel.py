"""Data-parallel reconstruction of a unit over the processes of a launch.

Under ``accelerate launch`` (or ``torchrun``) with N processes, each process captures and holds every N-th of
a unit's calibration samples (:class:`SampleShare`, the rows of :func:`dmquant.distributed.shard`). At every
iteration all processes draw the same batch of sample indices (one generator, seeded alike); each computes
the loss on the samples of the batch it holds, weighted by their fraction of the batch, plus ``1/N`` of the
rounding regulariser, and the gradients of the learned parameters (AdaRound's rounding logits, LSQ's step
sizes) are summed over the processes (an all-reduce, :meth:`SampleShare.sum_gradients`) before the optimiser
steps. The reconstruction loss is a mean over the batch's samples, so the sum is the gradient of the whole
batch's loss: N processes take the steps one process takes, up to the order in which floats are summed, and
every process ends with the same parameters (the all-reduce hands each the same sum).

What differs from one process: the random masks of QDrop (``drop_probability > 0``) are drawn per process for
its part of the batch, an equally distributed but different draw; the step is not replayed from a CUDA graph
(a process's part of the batch changes size from one iteration to the next).

Processes communicate through ``torch.distributed``, initialised by accelerate (:mod:`dmquant.distributed`):
gloo on the CPU, NCCL between GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import ConfigError


@dataclass(frozen=True)
class SampleShare:
    """The samples ``index``, ``index + count``, ``index + 2·count``, ... of ``total``: one process's share."""

    total: int
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count > self.total:
            raise ConfigError(
                f"reconstruction over {self.count} processes needs as many calibration samples at least, "
                f"got {self.total}: raise reconstruction.num_samples or launch fewer processes"
            )

    @classmethod
    def of_this_process(cls, total: int) -> SampleShare:
        """This process's share of ``total`` samples under the current launch (all of them on one process)."""
        return cls(total, distributed.process_index(), distributed.num_processes())

    @property
    def rows(self) -> Tensor:
        """The indices of the samples this process holds, in order."""
        return torch.arange(self.index, self.total, self.count)

    def __len__(self) -> int:
        return len(range(self.index, self.total, self.count))

    def local(self, batch: Tensor) -> tuple[Tensor, float]:
        """Of the sample indices ``batch``, the positions in this share of those it holds, and their fraction."""
        mine = batch[batch % self.count == self.index]
        return mine // self.count, mine.numel() / batch.numel()

    def sum_gradients(self, parameters: Sequence[nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the processes (one all-reduce). A parameter that
        got no gradient on any process keeps none, as on one process; on one process nothing happens."""
        if self.count == 1 or not parameters:
            return
        import torch.distributed as dist

        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([present.to(grads[0].device), *(g.reshape(-1).float() for g in grads)])
        dist.all_reduce(flat)
        present, offset = flat[: len(parameters)], len(parameters)
        for parameter, had, grad in zip(parameters, present.tolist(), grads, strict=True):
            summed = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
            offset += grad.numel()
            parameter.grad = summed.clone() if had else None

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (in float64); as they are on one process."""
        if self.count == 1:
            return list(values)
        import torch.distributed as dist

        device = distributed.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()
