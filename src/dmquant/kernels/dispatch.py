"""Which kernel runs a converted layer's call, if any.

A kernel is chosen per call from the activation mode of the current sampling step (a bit
schedule can change it between steps), the weight's layout and the input: kernels run on CUDA
only; None sends the layer down its reference path.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .weights import LowBitWeight

LinearKernel = Callable[..., Tensor]


def linear_kernel(mode: str | None, weight: LowBitWeight, x: Tensor) -> LinearKernel | None:
    """The kernel for ``y = x · Wᵀ + b`` with activations in ``mode`` and ``weight``'s layout, or None."""
    if mode is None or not x.is_cuda:
        return None
    return None


def conv2d_kernel(mode: str | None, weight: LowBitWeight, x: Tensor, groups: int) -> LinearKernel | None:
    """The implicit-GEMM convolution kernel for this mode and layout, or None."""
    if mode is None or not x.is_cuda or groups != 1:
        return None
    return None
