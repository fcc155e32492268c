"""The one side stream per CUDA device that dmquant's warm-ups and timings run on.

torch hands out streams from a pool of 32 per device, and keeps a cuBLAS workspace for every stream cuBLAS has run
on, for the life of the process (cuBLAS's and cuBLASLt's). Code that takes a new stream per task holds one more
workspace per task until all 32 are used: an offloaded reconstruction that warmed each unit up on a stream of its
own grew by 65 MiB per unit on an H200 and left 1.9 GB allocated after 30 units on an H100 (``recon/graphed.py``),
and timing each layer's paths with ``triton.testing.do_bench_cudagraph``, which takes a new stream per timing,
likely left the workspaces of all 32 (``kernels/paths.py``). One stream per device holds one: with it the converted
SD-1.5 UNet at batch 2 peaked at 1.54 GiB after its path measurement, against 2.38 before and bf16's 1.68 (H100,
``bench/results/speed-deployment``).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def side_stream(device: torch.device | str | None = None) -> torch.cuda.Stream:
    """The side stream of ``device`` (a CUDA device; by default the current one), the same object at every call."""
    device = torch.device("cuda") if device is None else torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _side_stream(torch.device("cuda", index))
