"""A job's batches spread over the processes of a launch (``accelerate launch``, ``torchrun``).

Sampling, evaluation and calibration recording number their batches, and a batch's randomness
depends only on its number (sampling: batch ``i`` uses seed ``seed + i``; recording: the generator
state the earlier batches leave, which every process reproduces without running the model). Each
process takes every ``N``-th batch (:func:`shard`), and the results are gathered back in batch
order on every process (:func:`gather`), so N processes give what one gives. Only the main process
shows progress and writes files (:func:`is_main_process`).

The processes are accelerate's (its ``PartialState``: gloo on CPU, NCCL on GPUs); a run that no
launcher started (``WORLD_SIZE`` unset or 1) is one process and never initialises it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _state() -> Any:
    """accelerate's process state under a launcher of several processes; ``None`` for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # set by `accelerate launch --cpu`


def num_processes() -> int:
    """How many processes the job is spread over (1 without a launcher)."""
    state = _state()
    return 1 if state is None else state.num_processes


def process_index() -> int:
    """This process's rank among :func:`num_processes` (0: the main process)."""
    state = _state()
    return 0 if state is None else state.process_index


def is_main_process() -> bool:
    """Whether this process shows progress and writes the outputs."""
    return process_index() == 0


def device(name: str | torch.device) -> torch.device:
    """The device this process runs on when asked for ``name``: with several processes, ``"cuda"`` (no
    index) is this process's own GPU (accelerate's ``PartialState.device``); anything else as named."""
    import torch

    requested = torch.device(name)
    state = _state()
    if state is None or requested.type != "cuda" or requested.index is not None:
        return requested
    return state.device


def shard(num_batches: int, what: str, *, idle: bool = False) -> range:
    """The batch indices of this process: every :func:`num_processes`-th of ``range(num_batches)``, starting at
    its index. ``what`` names the batches for the error raised when there are fewer than processes, unless
    ``idle``: then the processes past the last batch get none (a job whose batching is not the user's choice,
    such as a recipe's calibration batches)."""
    count = num_processes()
    if count > num_batches and not idle:
        raise ConfigError(
            f"{count} processes but {what} makes only {num_batches} batch(es): each process needs one at least; "
            f"launch at most {num_batches} process(es), or make the batches smaller"
        )
    return range(process_index(), num_batches, count)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    to = getattr(value, "to", None)
    return to("cpu") if callable(to) else value


def gather(local: Mapping[int, T], num_batches: int) -> list[T]:
    """Every process's results by batch index, merged into one list in batch order, on every process.

    ``local`` maps this process's batch indices (:func:`shard`) to their results: tensors, or objects
    made of tensors (lists, dicts, anything with ``.to``), sent between processes on the CPU and
    returned there. With one process, ``local``'s values as they are.
    """
    if num_processes() == 1:
        merged = dict(local)
    else:
        from accelerate.utils import gather_object

        merged = dict(gather_object([(index, _to_cpu(value)) for index, value in local.items()]))
    missing = sorted(set(range(num_batches)) - merged.keys())
    if missing:
        raise RuntimeError(f"batches {missing} of {num_batches} were computed by no process")
    return [merged[index] for index in range(num_batches)]


def broadcast(value: T) -> T:
    """The main process's ``value`` on every process (for a decision every process must share)."""
    if num_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([_to_cpu(value)])[0]
