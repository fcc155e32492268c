"""The integer-domain reference of a quantized layer: codes multiplied, scales applied once.

The tests' reference for the real kernels (``dmquant.kernels``): what a W8A8 / W4A8 integer kernel computes
from the codes and scales of a calibrated layer, on any device.

A quantizer maps ``x`` to codes ``q = clamp(round(x / s) + z, qmin, qmax)`` that stand for
``s · (q − z)`` (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", eq. 1). A simulated layer multiplies the dequantized tensors
in float; an integer kernel multiplies the codes and applies the scales in its epilogue. For a
Linear with per-tensor (or per-row) activation parameters ``s_x, z_x`` and per-output-channel
weight parameters ``s_w[n], z_w[n]`` over ``K`` inputs (Jacob et al., eq. 7)::

    y[m, n] = s_x · s_w[n] · Σ_k (q_x[m, k] − z_x) · (q_w[n, k] − z_w[n]) + b[n]
            = s_x · s_w[n] · ( Σ_k q_x·q_w − z_w[n] · Σ_k q_x[m, k] − z_x · Σ_k q_w[n, k] + K · z_x · z_w[n] ) + b[n]

The weight's row sums are constants folded when a layer is converted; the activation's row sums
cost one reduction per row and vanish with symmetric weights (``z_w = 0``). Group-wise weight
parameters apply this per group of ``K`` and sum the groups. A convolution is the same product
over each output pixel's receptive field, with one caveat a kernel must honour: zero padding of
the *real-valued* input is the code ``z_x``, not 0.

Here the integer sums are exact: int64 for Linear, float64 convolutions of integer codes for
Conv2d (exact below 2**53).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dmquant.core.layers import QuantConv2d, QuantLinear
from dmquant.core.quantizer import Quantizer


@dataclass(frozen=True)
class Codes:
    """Integer codes and the parameters that map them back: ``value = scale · (codes − zero_point)``."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor


def codes_of(quantizer: Quantizer, x: Tensor) -> Codes:
    """The codes a calibrated integer quantizer gives ``x`` with its current step's parameters."""
    if not quantizer.enabled or not quantizer.calibrated:
        raise ValueError(f"{quantizer.name or 'quantizer'}: needs to be enabled and calibrated")
    if quantizer.fmt.is_float:
        raise ValueError(f"{quantizer.name or 'quantizer'}: {quantizer.fmt.name} has no integer codes")
    return Codes(quantizer.codes(x), *quantizer.qparams(x.shape))


def _one_value_along(tensor: Tensor, dim: int) -> Tensor:
    """``tensor`` reduced over ``dim``, checking that it is constant there (a parameter shared along it)."""
    first = tensor.narrow(dim, 0, 1)
    if not torch.equal(tensor, first.expand_as(tensor)):
        raise ValueError("the quantization parameters vary along a dimension the integer product sums over")
    return first


def integer_linear(x: Codes, weight: Codes, bias: Tensor | None, group_size: int | None = None) -> Tensor:
    """``y = x · Wᵀ + b`` from codes, by the integer identity of the module docstring.

    ``x``: codes ``(M, K)`` with parameters constant along ``K`` (per tensor or per row);
    ``weight``: codes ``(N, K)`` with parameters constant within each group of ``group_size``
    inputs (``None``: the whole row, per-channel).
    """
    rows, depth = x.codes.shape
    group = group_size or depth
    if depth % group:
        raise ValueError(f"group size {group} does not divide K={depth}")
    s_x = _one_value_along(x.scale.expand(rows, depth), 1).double()
    z_x = _one_value_along(x.zero_point.expand(rows, depth), 1).long()
    q_x = x.codes.long()
    out = torch.zeros(rows, weight.codes.shape[0], dtype=torch.float64, device=q_x.device)
    for start in range(0, depth, group):
        part = slice(start, start + group)
        q_w = weight.codes[:, part].long()
        s_w = _one_value_along(weight.scale.expand_as(weight.codes)[:, part], 1).double().T
        z_w = _one_value_along(weight.zero_point.expand_as(weight.codes)[:, part], 1).long().T
        products = q_x[:, part] @ q_w.T
        row_sums = q_x[:, part].sum(dim=1, keepdim=True)
        column_sums = q_w.sum(dim=1)[None, :]
        integer = products - z_w * row_sums - z_x * column_sums + group * z_x * z_w
        out += s_x * s_w * integer.double()
    if bias is not None:
        out += bias.double()
    return out.float()


def integer_conv2d(x: Codes, weight: Codes, conv: nn.Conv2d) -> Tensor:
    """``conv(x, W)`` without bias from codes: per-tensor activation, per-output-channel weight.

    The padding is applied to the codes with ``z_x`` (the real value 0), then the products of
    codes are summed exactly and corrected as in :func:`integer_linear`.
    """
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("the integer reference covers ungrouped convolutions with numeric zero padding")
    s_x = _one_value_along(x.scale.expand_as(x.codes).flatten(), 0)[0].double()
    z_x = _one_value_along(x.zero_point.expand_as(x.codes).flatten(), 0)[0].double()
    s_w = _one_value_along(weight.scale.expand_as(weight.codes).flatten(1), 1).double().reshape(1, -1, 1, 1)
    z_w = _one_value_along(weight.zero_point.expand_as(weight.codes).flatten(1), 1).double().reshape(1, -1, 1, 1)
    pad_h, pad_w = conv.padding
    q_x = nn.functional.pad(x.codes.double(), (pad_w, pad_w, pad_h, pad_h), value=float(z_x))
    q_w = weight.codes.double()
    window = {"stride": conv.stride, "dilation": conv.dilation}
    products = nn.functional.conv2d(q_x, q_w, **window)
    window_sums = nn.functional.conv2d(q_x, torch.ones_like(q_w[:1]), **window)
    column_sums = q_w.flatten(1).sum(dim=1).reshape(1, -1, 1, 1)
    depth = q_w[0].numel()
    integer = products - z_w * window_sums - z_x * column_sums + depth * z_x * z_w
    return (s_x * s_w * integer).float()


def layer_reference(layer: QuantLinear | QuantConv2d, x: Tensor) -> Tensor:
    """What an integer kernel computes for a calibrated ``layer`` on input ``x`` (its current step).

    Split convolutions (Q-Diffusion's shortcut split) are two integer products, one per part,
    summed; SmoothQuant's division happens before the codes, where a kernel would fold it.
    """
    x = layer._unsmoothed(x)
    if isinstance(layer, QuantLinear):
        flat = x.reshape(-1, x.shape[-1])
        group = layer.weight_quantizer.granularity.group_size
        out = integer_linear(
            codes_of(layer.input_quantizer, flat),
            codes_of(layer.weight_quantizer, layer.weight.detach()),
            layer.bias,
            group_size=group,
        )
        return out.reshape(*x.shape[:-1], -1)
    inputs = [x] if not layer.split else [x[:, : layer.split], x[:, layer.split :]]
    activations = [layer.input_quantizer] if not layer.split else [layer.input_quantizer, layer.input_quantizer_skip]
    out = sum(
        integer_conv2d(codes_of(activation, part), codes_of(quantizer, weight.detach()), layer)
        for activation, part, (quantizer, weight) in zip(activations, inputs, layer.weight_parts(), strict=True)
    )
    if layer.bias is not None:
        out = out + layer.bias.reshape(1, -1, 1, 1)
    return out
