"""Which kernel runs a converted layer's call, if any.

A kernel is chosen per call from the activation mode of the current sampling step (a bit
schedule can change it between steps), the weight's layout and the input. Kernels run on CUDA
with Triton installed; None sends the layer down its reference path, which is always correct.

==========  ===========  ==============================================================
activation  weight       kernel (:mod:`~dmquant.kernels.triton_gemm`, :mod:`~dmquant.kernels.triton_conv`)
==========  ===========  ==============================================================
int8        int8         W8A8-INT8: ``int8_linear`` / ``int8_conv2d``
int8        int4         W4A8: ``int4_linear`` / ``int4_conv2d`` with ``act="int8"``
none        int4         W4A16: the same with ``act="none"`` (bf16/fp16 inputs)
fp8         fp8          W8A8-FP8: ``fp8_linear`` / ``fp8_conv2d``, static per-tensor scale
==========  ===========  ==============================================================

Int8 and fp8 weights need per-channel parameters; group-wise int4 weights need groups of a
multiple of :data:`~dmquant.kernels.weights.GROUP_ALIGNMENT` elements (or one group per row). Other pairs (e.g. int8
weights with float activations) and other shapes take the reference path.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from .weights import GROUP_ALIGNMENT, LowBitWeight

Kernel = Callable[..., Tensor]
_PAIRS = {("int8", "int8"), ("int8", "int4"), ("none", "int4"), ("fp8", "fp8")}


#: Whether Triton is installed, read once at import: ``torch.compile`` cannot trace the module lookup, and a lookup
#: per call would break the compiled graph at every converted layer (its quantization then no longer fuses into
#: the kernel that produces its input).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def load_kernels() -> None:
    """Import the Triton kernel modules now, where Triton is installed: they register dmquant's custom ops, and
    ``torch.compile`` then finds them loaded instead of breaking its graph at the first converted layer."""
    if TRITON_AVAILABLE:
        from . import triton_conv, triton_gemm  # noqa: F401


def _runs_on_a_kernel(mode: str | None, weight: LowBitWeight, x: Tensor) -> bool:
    if (mode, weight.layout) not in _PAIRS or not x.is_cuda or not TRITON_AVAILABLE:
        return False
    if mode == "none" and x.dtype not in (torch.bfloat16, torch.float16):
        return False
    group = weight.group_size
    if weight.layout != "int4":
        return group == weight.shape[1]  # the int8 and fp8 kernels take per-channel scales only
    return group == weight.shape[1] or group % GROUP_ALIGNMENT == 0


def _weight_arguments(weight: LowBitWeight) -> dict:
    """The weight's tensors under the kernels' argument names."""
    if weight.layout == "fp8":
        return {"w_fp8": weight.stored, "w_scale": weight.scale[:, 0]}
    if weight.layout == "int8":
        return {
            "w_codes": weight.stored,
            "w_scale": weight.scale[:, 0],
            "w_zero": weight.kernel_zero,
            "w_colsum": weight.column_sums,
        }
    return {
        "w_packed": weight.stored,
        "w_scale": weight.scale,
        "w_zero": weight.kernel_zero,
        "group_size": weight.group_size,
        "w_colsum": weight.column_sums,
    }


def _arguments(mode: str, activation, weight: LowBitWeight, fast_accumulation: bool) -> dict:
    """A call's arguments: the weight's tensors and the current step's activation parameters (an fp8
    scale of None asks the kernel for dynamic per-row scales); fp8 calls also take ``fast_accumulation``."""
    arguments = _weight_arguments(weight) | ({"act": mode} if weight.layout == "int4" else {})
    if mode == "none":
        return arguments | {"x_scale": None, "x_zero": None}
    scale, zero = activation.parameters_now()
    if mode == "fp8":
        return arguments | {"x_scale": scale, "fast_accumulation": fast_accumulation}
    return arguments | {"x_scale": scale, "x_zero": zero}


#: The weight layouts whose kernels choose between cuBLASLt and Triton (a ``backend`` argument).
VENDOR_LAYOUTS = ("int8", "fp8")


def _kernel(functions: dict[str, Kernel], mode: str) -> Kernel:
    """``run(x, activation, weight, bias, fast_accumulation=False, backend="auto", **geometry)`` calling the function
    of the weight's layout; ``backend`` (``"auto"``, ``"triton"``) applies to the layouts of ``VENDOR_LAYOUTS``."""

    def run(
        x: Tensor, activation, weight: LowBitWeight, bias: Tensor | None, fast_accumulation: bool = False,
        backend: str = "auto", **geometry,
    ) -> Tensor:  # fmt: skip
        arguments = _arguments(mode, activation, weight, fast_accumulation)
        if weight.layout in VENDOR_LAYOUTS:
            arguments["backend"] = backend
        return functions[weight.layout](x, bias=bias, **arguments, **geometry)

    return run


def linear_kernel(mode: str | None, weight: LowBitWeight, x: Tensor) -> Kernel | None:
    """The kernel for ``y = x · Wᵀ + b`` with activations in ``mode`` and ``weight``'s layout, or None."""
    if not _runs_on_a_kernel(mode, weight, x):
        return None
    from . import triton_gemm

    layouts = {"int8": triton_gemm.int8_linear, "int4": triton_gemm.int4_linear, "fp8": triton_gemm.fp8_linear}
    return _kernel(layouts, mode)


def conv2d_kernel(mode: str | None, weight: LowBitWeight, x: Tensor, groups: int) -> Kernel | None:
    """The implicit-GEMM convolution kernel for this mode and layout (``groups == 1`` only), or None;
    it takes ``kernel_size``, ``stride``, ``padding``, ``dilation`` as keywords."""
    if groups != 1 or not _runs_on_a_kernel(mode, weight, x):
        return None
    from . import triton_conv

    layouts = {"int8": triton_conv.int8_conv2d, "int4": triton_conv.int4_conv2d, "fp8": triton_conv.fp8_conv2d}
    return _kernel(layouts, mode)
