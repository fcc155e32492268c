"""Turn a calibrated (simulated) quantized model into one that runs in real low precision.

:func:`convert_model` replaces every calibrated :class:`~dmquant.core.layers.QuantLinear` and
:class:`~dmquant.core.layers.QuantConv2d` with a :class:`~dmquant.kernels.layers.LowBitLinear` /
:class:`~dmquant.kernels.layers.LowBitConv2d` that keeps the weight only as codes, and records
what it did in a :class:`ConversionReport` (``model.dmquant_conversion``). A layer whose weight
format no layout stores keeps its simulated form, with the reason in the report: conversion
never fails a model for one layer. Attention matmuls (Q·Kᵀ, softmax·V) quantized for FP8 attention run on
cuDNN's FP8 attention where it takes them (:mod:`~dmquant.kernels.fp8_attention`); other attention matmul
quantizers stay simulated.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..core.layers import QuantConv2d, QuantLinear
from .fp8_attention import convert_attention
from .layers import KernelActivation, LowBitConv2d, LowBitLinear
from .weights import LowBitWeight, UnsupportedWeight

#: The attribute of a converted model that holds its :class:`ConversionReport`.
REPORT_ATTRIBUTE = "dmquant_conversion"


@dataclass
class ConversionReport:
    """What :func:`convert_model` converted, what it kept simulated and why, and the weight bytes."""

    converted: Counter = field(default_factory=Counter)  # weight layout -> weights
    layers: list[dict] = field(default_factory=list)  # per converted weight: name, kind, layout, group, activation
    kept: dict[str, str] = field(default_factory=dict)  # layer name -> reason
    fp8_attention: list[str] = field(default_factory=list)  # attention modules on FP8 attention kernels
    weight_bytes_before: int = 0  # the float weights of the converted layers
    weight_bytes_after: int = 0  # their codes, scales and zero points

    def summary(self) -> str:
        layouts = ", ".join(f"{count} {layout}" for layout, count in sorted(self.converted.items())) or "none"
        ratio = self.weight_bytes_after / self.weight_bytes_before if self.weight_bytes_before else float("nan")
        text = f"converted {len(self.layers)} weights ({layouts}) into {ratio:.2f}x the bytes of their float32 form"
        text += f"; {len(self.fp8_attention)} attention modules on FP8 attention" if self.fp8_attention else ""
        return text + (f"; {len(self.kept)} kept simulated" if self.kept else "")


def _low_bit(layer: nn.Module, dynamic_fp8: bool, fast_accumulation: bool) -> LowBitLinear | LowBitConv2d:
    if isinstance(layer, QuantLinear):
        return LowBitLinear(layer, dynamic_fp8=dynamic_fp8, fast_accumulation=fast_accumulation)
    return LowBitConv2d(layer, fast_accumulation=fast_accumulation)


def _activation_text(activation: KernelActivation) -> str:
    if activation.dynamic:
        return "fp8 (dynamic per token)"
    return activation.mode or f"{activation.quantizer.fmt.name} (reference path)"


def _weights(layer: LowBitLinear | LowBitConv2d) -> list[tuple[LowBitWeight, KernelActivation]]:
    """Each stored weight of a converted layer with the activation parameters of the input it multiplies."""
    if isinstance(layer, LowBitLinear):
        return [(layer.weight, layer.activation)]
    return [(part.weight, part.activation) for part in layer.parts]


def convert_model(
    model: nn.Module, *, inplace: bool = False, dynamic_fp8: bool = False, fp8_fast_accumulation: bool = True
) -> nn.Module:
    """``model`` with its quantized Linear and Conv2d layers in real low precision (a copy unless ``inplace``).

    The converted model computes what the simulated one does: on CPU bit for bit (the reference
    path), on CUDA within the kernels' accumulation error. ``dynamic_fp8`` gives Linear layers with
    fp8 e4m3 activations per-token scales computed from each input instead of their calibrated
    per-tensor scale (convolutions keep theirs); those layers then differ from the simulated ones.
    ``fp8_fast_accumulation`` (the default) lets the fp8 GEMMs on cuBLASLt (Linear and 1×1 convolutions)
    accumulate in the tensor cores' reduced precision, as torchao's fp8 rows and TensorRT do: cuBLASLt's faster
    kernels (FLUX's GEMMs took 44.6 ms in torchao's fast-accumulating fp8 row against 54.5 ms in dmquant's
    fp32-promoting one on an H100, ``bench/results/speed-deployment``), at a
    distance from the simulated model within the floor of two equally valid float computations on every zoo model
    (``bench/results/fidelity``); ``False`` promotes the partial sums to fp32 as the simulated model assumes.

    On a GPU, :func:`dmquant.kernels.paths.select_paths` then measures each converted layer's paths (cuBLASLt,
    Triton, bf16) on a call of the model and keeps the fastest; ``dmquant convert`` and ``--real-kernels`` do so.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no quantized Linear or Conv2d layer: quantize it first")
    for name, layer in targets:
        try:
            converted = _low_bit(layer, dynamic_fp8, fp8_fast_accumulation)
        except (UnsupportedWeight, ValueError) as why:
            report.kept[name] = str(why)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, converted)
        for index, (weight, activation) in enumerate(_weights(converted)):
            report.converted[weight.layout] += 1
            report.weight_bytes_after += weight.nbytes
            report.layers.append(
                {
                    "name": name + (f" (input part {index})" if index else ""),
                    "kind": "Linear" if isinstance(converted, LowBitLinear) else "Conv2d",
                    "weight": weight.layout,
                    "group_size": weight.group_size,
                    "activation": _activation_text(activation),
                }
            )
        report.weight_bytes_before += layer.weight.numel() * layer.weight.element_size()
    report.fp8_attention = convert_attention(model)
    setattr(model, REPORT_ATTRIBUTE, report)
    return model
