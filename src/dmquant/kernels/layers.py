"""Linear and Conv2d layers that hold low-bit weights and run on low-bit kernels.

:class:`LowBitLinear` and :class:`LowBitConv2d` replace a calibrated
:class:`~dmquant.core.layers.QuantLinear` / :class:`~dmquant.core.layers.QuantConv2d`. They keep
the weight only as codes (:class:`~dmquant.kernels.weights.LowBitWeight`) and the input's
activation quantizer (its per-step parameters and bit schedule included), and compute one of two
ways:

- on CUDA, where a kernel exists for the pair (activation mode of the current step, weight
  layout), with that kernel (:mod:`dmquant.kernels.dispatch`);
- otherwise with the *reference path*: the activation fake-quantized by its own quantizer, the
  weight dequantized from its codes, then ``F.linear`` / ``F.conv2d`` — the simulated layer's
  computation, so its output equals the simulated layer's bit for bit. This is what runs on
  CPU, for shapes or formats no kernel takes, and in the tests;
- for W4A16 (int4 weights, float activations) with ``backend = "dequant"`` (chosen by
  :mod:`~dmquant.kernels.paths` where it measures faster): the weight dequantized per call into the
  input's dtype, then ``F.linear`` / ``F.conv2d`` on the vendor's 16-bit GEMM or convolution. The
  weight stays 4-bit in memory (its 16-bit form lives for the call only); the output is the simulated
  layer's up to the 16-bit rounding of the dequantized weight and the order of accumulation. Under
  ``torch.compile`` the dequantization is one pointwise kernel over the N·K codes, which at thousands
  of rows costs little next to the GEMM.

Per-step activation parameters (``per_step_activations``, or a bit schedule) are chosen in Python
from the quantizer's current step. A captured CUDA graph therefore holds the parameters of the
step it was captured at: capture one graph per distinct parameter set (two for an A4-early /
A8-late schedule) and replay the one of each step — switching precision replays another graph,
it never recaptures.

``fast_accumulation`` (a conversion option) lets the FP8 GEMMs that run on cuBLASLt accumulate in the fp8
tensor cores' reduced precision (:mod:`~dmquant.kernels.cublas_gemm`): other kernels, and a layer that no longer
matches its simulated twin to fp32 accumulation. The reference path is unaffected.

A convolution with a split input (Q-Diffusion's shortcut split) has one part per input slice,
each with its own activation and weight parameters: the kernel path sums one convolution per
part (the bias added once), the reference path concatenates them into one as the simulated layer
does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layers import QuantConv2d, QuantLinear
from ..core.primitives import FP8_E4M3, choose_qparams, fake_quant
from ..core.quantizer import Quantizer
from . import dispatch
from .weights import KeepsDtypes, LowBitWeight


def activation_mode(quantizer: Quantizer) -> str | None:
    """How a kernel takes the input at the quantizer's current step: ``"int8"`` (8-bit integer,
    quantized just before the kernel), ``"fp8"`` (e4m3), ``"none"`` (left in floating point: a disabled
    quantizer or 16 bits); None when no kernel takes it (other widths, per-channel parameters)."""
    fmt = quantizer.fmt
    if not quantizer.enabled or (not fmt.is_float and fmt.bits == 16):
        return "none"
    if quantizer.granularity.kind != "tensor":
        return None
    if fmt == FP8_E4M3:
        return "fp8"
    return "int8" if not fmt.is_float and fmt.bits == 8 else None


def _in_dtype(bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bias in the dtype of the computation: float32 for the reference path, as the quantizers compute (a model
    cast for inference may hold it in bf16), the input's for the ``"dequant"`` path."""
    return None if bias is None else bias.to(dtype)


def memory_layout(x: Tensor) -> str:
    """How ``x`` lies in memory: ``"contiguous"``, ``"channels_last"`` (a 4-d NHWC tensor) or ``"strided"``."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


#: The ``backend`` of a W4A16 layer that dequantizes its weight per call and runs the 16-bit vendor kernel.
DEQUANTIZED = "dequant"


class KernelActivation(KeepsDtypes):
    """An activation quantizer's per-tensor parameters as the kernels take them, fixed at conversion, one
    per parameter set (sampling-step slot): scales as a float32 tensor and 8-bit zero points as an int32
    tensor, shifted like the weight codes into ``[-128, 127]`` (an unsigned 8-bit zero point ``z`` becomes
    ``z − 128``). Both move with the layer and are read on the device: no host sync per call, and
    ``torch.compile`` does not specialize on their values, so blocks that differ only in their calibrated
    parameters share one compiled graph. ``has_zero`` (whether any zero point is nonzero) is the one
    value-dependent choice left to the compiler: layers without zero points skip eq. 7's correction.

    With ``dynamic`` (fp8 e4m3 quantizers only) the calibrated scale is replaced by one computed per
    row (token) of each input, ``max|x[m]| / 448``, as fp8 inference libraries do; the layer then
    no longer computes its simulated twin's function but that of per-token fp8 quantization.
    """

    def __init__(self, quantizer: Quantizer, *, dynamic: bool = False) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.dynamic = dynamic and quantizer.enabled and all(fmt == FP8_E4M3 for fmt in quantizer.slot_formats)
        per_tensor = quantizer.enabled and quantizer.calibrated and quantizer.granularity.kind == "tensor"
        scale = quantizer.scale.detach().float().reshape(quantizer.num_steps, -1)[:, 0] if per_tensor else None
        self.register_buffer("scale", scale)
        zeros = quantizer.zero_point.reshape(quantizer.num_steps, -1)[:, 0].tolist() if per_tensor else []
        # only 8-bit integer slots reach a kernel with their zero point ("int8" mode); the others keep 0
        shifted = [
            int(zero) - (128 if fmt.qmax > 127 else 0) if not fmt.is_float and fmt.bits == 8 else 0
            for zero, fmt in zip(zeros, quantizer.slot_formats, strict=True)
        ] if per_tensor else []  # fmt: skip
        self.has_zero = any(shifted)
        zero_point = (
            torch.tensor(shifted, dtype=torch.int32, device=quantizer.zero_point.device) if per_tensor else None
        )
        self.register_buffer("zero_point", zero_point)

    @property
    def mode(self) -> str | None:
        return "fp8" if self.dynamic else activation_mode(self.quantizer)

    def parameters_now(self) -> tuple[Tensor | None, Tensor | None]:
        """Scale (a one-element tensor; None: dynamic per row) and shifted zero point (a one-element tensor;
        None: 0) of the current step."""
        if self.dynamic:
            return None, None
        slot = self.quantizer.slot()
        zero = self.zero_point[slot : slot + 1] if self.has_zero else None
        return self.scale[slot : slot + 1], zero

    def fake_quant(self, x: Tensor) -> Tensor:
        """The reference path's quantized input (float32): the quantizer's, or per-row fp8 when dynamic."""
        if not self.dynamic:
            return self.quantizer(x)
        absmax = x.float().abs().amax(dim=-1, keepdim=True)
        scale, zero = choose_qparams(-absmax, absmax, FP8_E4M3, symmetric=True, eps=torch.finfo(torch.float32).tiny)
        return fake_quant(x, scale, zero, FP8_E4M3)


class _Smoothing(nn.Module):
    """SmoothQuant's per-input-channel division, carried over from the simulated layer."""

    def __init__(self, smoothing: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("smoothing", smoothing)

    def unsmoothed(self, x: Tensor, channel_dim: int) -> Tensor:
        if self.smoothing is None:
            return x
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return x / self.smoothing.reshape(shape)


class LowBitLinear(_Smoothing):
    """``y = x_q · W_qᵀ + b`` with ``W_q`` stored as codes."""

    def __init__(self, layer: QuantLinear, *, dynamic_fp8: bool = False, fast_accumulation: bool = False) -> None:
        super().__init__(layer.smoothing)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.fast_accumulation = fast_accumulation
        self.backend = "auto"  # set by dmquant.kernels.paths where Triton measured faster than cuBLASLt
        self.activation = KernelActivation(layer.input_quantizer, dynamic=dynamic_fp8)
        self.weight = LowBitWeight.from_quantizer(layer.weight_quantizer, layer.weight.detach())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    @property
    def input_quantizer(self) -> Quantizer:
        return self.activation.quantizer

    def reference(self, x: Tensor) -> Tensor:
        """The simulated layer's computation (in float32, as the quantizers compute), in ``x``'s dtype."""
        bias = _in_dtype(self.bias, torch.float32)
        return F.linear(self.activation.fake_quant(x), self.weight.dequantize(), bias).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.unsmoothed(x, -1)
        if self.backend == DEQUANTIZED and self.activation.mode == "none":
            return F.linear(x, self.weight.dequantize(x.dtype), _in_dtype(self.bias, x.dtype))
        kernel = dispatch.linear_kernel(self.activation.mode, self.weight, x)
        if kernel is None:
            return self.reference(x)
        return kernel(
            x, self.activation, self.weight, self.bias, fast_accumulation=self.fast_accumulation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _ConvPart(nn.Module):
    """One input part of a convolution: its channels, activation quantizer and weight slice."""

    def __init__(self, quantizer: Quantizer, weight_quantizer: Quantizer, weight: Tensor, channels: slice) -> None:
        super().__init__()
        self.channels = channels
        self.activation = KernelActivation(quantizer)
        self.weight = LowBitWeight.from_quantizer(weight_quantizer, weight.detach())

    @property
    def input_quantizer(self) -> Quantizer:
        return self.activation.quantizer

    def weight_4d(
        self, kernel_size: tuple[int, int], dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:  # fmt: skip
        """The dequantized weight back in ``(Cout, Cin, kh, kw)``, by default laid out as a simulated layer's (so
        that ``F.conv2d`` takes the same path and gives the same bits)."""
        out_channels, (kh, kw) = self.weight.shape[0], kernel_size
        weight = self.weight.dequantize(dtype).reshape(out_channels, kh, kw, -1).permute(0, 3, 1, 2)
        if memory_format == torch.channels_last:
            return weight.contiguous(memory_format=memory_format)  # the codes' order already: no copy
        return weight.clone(memory_format=memory_format)  # the standard strides (a 1×1 permuted view has others)


class LowBitConv2d(_Smoothing):
    """A Conv2d with its weight stored as codes; ``groups == 1`` and zero padding run on kernels."""

    def __init__(self, layer: QuantConv2d, *, fast_accumulation: bool = False) -> None:
        super().__init__(layer.smoothing)
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r}: only zero padding is converted")
        self.fast_accumulation = fast_accumulation
        self.backend = "auto"  # as LowBitLinear's
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation = layer.dilation
        self.groups = layer.groups
        quantizers = [layer.input_quantizer] + ([layer.input_quantizer_skip] if layer.split else [])
        bounds = [0, layer.split, layer.in_channels] if layer.split else [0, layer.in_channels]
        self.parts = nn.ModuleList(
            _ConvPart(quantizer, weight_quantizer, weight, slice(start, stop))
            for quantizer, (weight_quantizer, weight), start, stop in zip(
                quantizers, layer.weight_parts(), bounds[:-1], bounds[1:], strict=True
            )
        )
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def reference(self, x: Tensor) -> Tensor:
        """The simulated layer's computation: the parts' quantized inputs and weights concatenated, one conv
        (in float32, as the quantizers compute), in ``x``'s dtype."""
        inputs = torch.cat([part.input_quantizer(x[:, part.channels]) for part in self.parts], dim=1)
        bias = _in_dtype(self.bias, torch.float32)
        output = F.conv2d(inputs, self.weight_4d(), bias, self.stride, self.padding, self.dilation, self.groups)
        return output.to(x.dtype)

    def weight_4d(
        self, dtype: torch.dtype = torch.float32, memory_format: torch.memory_format = torch.contiguous_format
    ) -> Tensor:
        """The parts' dequantized weights as one ``(Cout, Cin, kh, kw)`` convolution weight (float32 by default)."""
        parts = [part.weight_4d(self.kernel_size, dtype, memory_format) for part in self.parts]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).contiguous(memory_format=memory_format)

    def dequantized(self, x: Tensor) -> Tensor:
        """The W4A16 ``"dequant"`` path (module docstring): the parts' weights dequantized into ``x``'s dtype and
        layout, one 16-bit convolution."""
        layout = torch.channels_last if memory_layout(x) == "channels_last" else torch.contiguous_format
        weight = self.weight_4d(x.dtype, layout)
        bias = _in_dtype(self.bias, x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.unsmoothed(x, 1)
        if self.backend == DEQUANTIZED and all(part.activation.mode == "none" for part in self.parts):
            return self.dequantized(x)
        kernels = [dispatch.conv2d_kernel(part.activation.mode, part.weight, x, self.groups) for part in self.parts]
        if None in kernels:
            return self.reference(x)
        options = {
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "fast_accumulation": self.fast_accumulation,
            "backend": self.backend,
        }
        first, *others = (
            kernel(x[:, part.channels], part.activation, part.weight, bias, **options)
            for kernel, part, bias in zip(kernels, self.parts, [self.bias, None], strict=False)
        )
        return sum(others, first)

    def extra_repr(self) -> str:
        split = f", split={self.parts[0].channels.stop}" if len(self.parts) > 1 else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride},"
            f" padding={self.padding}{split}"
        )
