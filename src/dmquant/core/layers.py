"""Quantized Linear and Conv2d layers (simulated: fake-quantized weights and input activations).

They compute in their input's dtype (the quantizers answer in float32; the fake-quantized operands are
cast back), so a quantized model runs after ``.to(torch.bfloat16)`` or ``.half()`` as its FP original does.
They subclass ``nn.Linear`` / ``nn.Conv2d`` and keep the original ``weight`` and ``bias``
parameters under the same names, so a quantized model's state dict is the FP one plus the
quantizers' buffers, and code that checks ``isinstance(m, nn.Conv2d)`` keeps working.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantizerConfig
from .quantizer import Quantizer, quantizers


def _adopt_parameters(target: nn.Module, source: nn.Module) -> None:
    target.weight = source.weight
    target.bias = source.bias


class _Smoothable:
    """SmoothQuant's per-input-channel scale ``s`` (Xiao et al. 2023, eq. 3): ``y = (x / s) · (W s)ᵀ``.

    :meth:`enable_smoothing` adds the buffer ``smoothing`` (ones: the FP function unchanged);
    :func:`dmquant.precision.smoothquant.smooth` sets it and multiplies the weight's input
    channels by it. The division stays in the layer here; a real kernel folds it into whatever
    produces the input.
    """

    def enable_smoothing(self) -> None:
        if getattr(self, "groups", 1) != 1:
            raise ValueError("SmoothQuant scales input channels of ungrouped layers only")
        self.smoothing = torch.ones(self.weight.shape[1], device=self.weight.device)

    def _unsmoothed(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoothing is None:
            return x
        shape = (1, -1, *([1] * (x.ndim - 2))) if isinstance(self, nn.Conv2d) else (-1,)
        return x / self.smoothing.reshape(shape)


class QuantLinear(_Smoothable, nn.Linear):
    """``y = x_q · W_qᵀ + b`` with a weight quantizer and an input-activation quantizer."""

    def __init__(self, linear: nn.Linear, weight: QuantizerConfig, activation: QuantizerConfig, *, num_steps: int = 1):
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        _adopt_parameters(self, linear)
        self.weight_quantizer = Quantizer(weight)
        self.input_quantizer = Quantizer(activation, num_steps=num_steps)
        self.register_buffer("smoothing", None)

    def weight_parts(self) -> list[tuple[Quantizer, torch.Tensor]]:
        """The weight and its quantizer, in the same form as ``QuantConv2d.weight_parts``."""
        return [(self.weight_quantizer, self.weight)]

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.input_quantizer(self._unsmoothed(x)).to(x.dtype)
        return nn.functional.linear(x_q, self.quantized_weight().to(x.dtype), self.bias)


class QuantConv2d(_Smoothable, nn.Conv2d):
    """A Conv2d with fake-quantized weight and input; optionally a *split* input.

    With ``split > 0`` the input is taken as the channel concatenation ``cat([h, skip])`` that
    UNet up-blocks feed their first conv and shortcut: channels ``[:split]`` and ``[split:]``
    get separate activation quantizers, and the matching input-channel slices of the weight
    separate weight quantizers (Q-Diffusion, Li et al. 2023, Sec. 4.2 "shortcut-splitting
    quantization": the two halves have very different ranges, so one quantizer for both
    wastes most of its levels).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        weight: QuantizerConfig,
        activation: QuantizerConfig,
        *,
        num_steps: int = 1,
        split: int = 0,
    ):
        with torch.device("meta"):
            super().__init__(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
            )
        _adopt_parameters(self, conv)
        if split and (conv.groups != 1 or not 0 < split < conv.in_channels):
            raise ValueError(f"split={split} is not a channel boundary of a {conv.in_channels}-channel input")
        self.split = split
        self.weight_quantizer = Quantizer(weight)
        self.input_quantizer = Quantizer(activation, num_steps=num_steps)
        self.register_buffer("smoothing", None)
        if split:
            self.weight_quantizer_skip = Quantizer(weight)
            self.input_quantizer_skip = Quantizer(activation, num_steps=num_steps)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", split={self.split}" if self.split else "")

    def weight_parts(self) -> list[tuple[Quantizer, torch.Tensor]]:
        """The weight slices and the quantizer of each (one, or two when split)."""
        if not self.split:
            return [(self.weight_quantizer, self.weight)]
        return [
            (self.weight_quantizer, self.weight[:, : self.split]),
            (self.weight_quantizer_skip, self.weight[:, self.split :]),
        ]

    def quantized_weight(self) -> torch.Tensor:
        return torch.cat([quantizer(part) for quantizer, part in self.weight_parts()], dim=1)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.input_quantizer(x)
        return torch.cat(
            [self.input_quantizer(x[:, : self.split]), self.input_quantizer_skip(x[:, self.split :])], dim=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.quantized_input(self._unsmoothed(x)).to(x.dtype)
        return self._conv_forward(x_q, self.quantized_weight().to(x.dtype), self.bias)


QUANT_LAYERS = (QuantLinear, QuantConv2d)


def activation_quantizers(model: nn.Module) -> list[Quantizer]:
    """The enabled quantizers of ``model`` that quantize activations (every one but the weights')."""
    weight_quantizers = {id(q) for m in model.modules() if isinstance(m, QUANT_LAYERS) for q, _ in m.weight_parts()}
    return [q for q in quantizers(model) if q.enabled and id(q) not in weight_quantizers]
