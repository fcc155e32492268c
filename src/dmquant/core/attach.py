"""Walk a model, swap its Linear/Conv2d layers and attention matmuls for quantized ones, report.

Which layers are quantized and at what precision is decided by the config's defaults and its
name-pattern rules (first matching rule wins). Every decision is recorded in a
:class:`LayerReport`, printed by ``dmquant inspect`` and saved with the checkpoint.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..config import LayerRule, QuantConfig, QuantizerConfig
from .attention import is_quantizable_attention, quantize_attention
from .layers import QuantConv2d, QuantLinear


@dataclass
class LayerReport:
    """What was done to one layer."""

    name: str
    kind: str  # "Linear", "Conv2d", "Attention"
    weight: str  # format name, "fp", or "-" for attention matmuls (no weights)
    activation: str
    granularity: str
    split: int  # channel where the skip half of a split input starts; 0 when not split
    rule: str | None  # the pattern of the rule that decided it, if any

    @property
    def quantized(self) -> bool:
        return self.weight not in ("fp", "-") or self.activation != "fp"


@dataclass
class QuantReport:
    layers: list[LayerReport]
    unmatched_rules: list[str]

    @property
    def num_quantized(self) -> int:
        return sum(layer.quantized for layer in self.layers)

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(layer) for layer in self.layers]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], unmatched_rules: list[str]) -> QuantReport:
        return cls([LayerReport(**row) for row in rows], list(unmatched_rules))


def _first_rule(rules: list[LayerRule], name: str) -> LayerRule | None:
    return next((rule for rule in rules if rule.matches(name)), None)


def _resolve(config: QuantizerConfig, bits: int | str | None, keep_fp: bool) -> QuantizerConfig | None:
    if keep_fp or not config.enabled:
        return None
    return config.with_bits(bits)


def _disabled(config: QuantizerConfig) -> QuantizerConfig:
    return QuantizerConfig(**{**asdict(config), "enabled": False})


def attach_quantizers(
    model: nn.Module,
    config: QuantConfig,
    *,
    splits: dict[str, int] | None = None,
    num_steps: int = 1,
    warn: bool = True,
) -> QuantReport:
    """Replace quantizable modules of ``model`` in place and return what was done.

    ``splits`` maps conv names to the channel where their input's skip half starts (see
    :func:`find_shortcut_splits`). ``num_steps > 1`` gives activation quantizers one set of
    parameters per sampling step. ``warn`` reports rule patterns that match no layer. A recipe's
    bit schedule and smoothing scales are attached by :func:`dmquant.passes.attach_recorded`.
    """
    splits = splits or {}
    used_rules: set[str] = set()
    reports: list[LayerReport] = []
    for name, module in list(model.named_modules()):
        rule = _first_rule(config.rules, name)
        keep_fp = bool(rule and rule.keep_fp)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, (QuantLinear, QuantConv2d)):
            if rule:
                used_rules.add(rule.pattern)
            weight = _resolve(config.weight, rule and rule.weight_bits, keep_fp)
            activation = _resolve(config.activation, rule and rule.activation_bits, keep_fp)
            split = splits.get(name, 0) if isinstance(module, nn.Conv2d) else 0
            if weight is not None or activation is not None:
                _replace(model, name, _quantized_layer(module, weight, activation, num_steps, split))
            reports.append(
                LayerReport(
                    name=name,
                    kind=type(module).__name__,
                    weight=weight.format.name if weight else "fp",
                    activation=activation.format.name if activation else "fp",
                    granularity=weight.granularity if weight else "-",
                    split=split if (weight or activation) else 0,
                    rule=rule.pattern if rule else None,
                )
            )
        elif is_quantizable_attention(module) and config.attention.enabled:
            if rule:
                used_rules.add(rule.pattern)
            operand = _resolve(config.activation, (rule and rule.activation_bits) or config.attention.bits, keep_fp)
            if operand is not None:
                quantize_attention(module, operand, config.attention.softmax_bits, num_steps=num_steps)
            reports.append(
                LayerReport(
                    name=name,
                    kind="Attention",
                    weight="-",
                    activation=f"{operand.format.name}, softmax {module.quant_matmul.probs.fmt.name}"
                    if operand
                    else "fp",
                    granularity=operand.granularity if operand else "-",
                    split=0,
                    rule=rule.pattern if rule else None,
                )
            )
    unmatched = [rule.pattern for rule in config.rules if rule.pattern not in used_rules]
    for pattern in unmatched if warn else ():
        warnings.warn(f"rule pattern {pattern!r} matches no quantizable layer", stacklevel=2)
    return QuantReport(reports, unmatched)


def _quantized_layer(
    module: nn.Module,
    weight: QuantizerConfig | None,
    activation: QuantizerConfig | None,
    num_steps: int,
    split: int,
) -> nn.Module:
    weight = weight or _disabled(activation)
    activation = activation or _disabled(weight)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, weight, activation, num_steps=num_steps, split=split)
    return QuantLinear(module, weight, activation, num_steps=num_steps)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def find_shortcut_splits(model: nn.Module, run_forward: Callable[[], Any]) -> dict[str, int]:
    """Find convs whose input is a channel concatenation of decoder and skip features.

    Diffusers' up blocks (``UpBlock2D``, ``AttnUpBlock2D``, ``CrossAttnUpBlock2D``, ...) take
    ``res_hidden_states_tuple`` and feed resnet ``i`` with ``cat([h, res_hidden_states_tuple[-1-i]])``;
    that input reaches the resnet's ``conv1`` (after norm and activation) and its
    ``conv_shortcut``. One forward pass (``run_forward``) observes the skip widths, and the
    split channel of each of those convs is the resnet's input width minus its skip width.
    """
    found: dict[str, int] = {}
    handles = []
    names = {module: name for name, module in model.named_modules()}

    def record(block: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(block.forward).bind_partial(*args, **kwargs)
        skips = bound.arguments.get("res_hidden_states_tuple")
        if not skips:
            return
        for i, resnet in enumerate(block.resnets):
            if i >= len(skips) or not hasattr(resnet, "conv1"):
                break
            split = resnet.conv1.in_channels - skips[-1 - i].shape[1]
            if split <= 0:
                continue
            for conv_name in ("conv1", "conv_shortcut"):
                conv = getattr(resnet, conv_name, None)
                if isinstance(conv, nn.Conv2d) and conv.in_channels == resnet.conv1.in_channels:
                    found[f"{names[resnet]}.{conv_name}"] = split

    for module in model.modules():
        if isinstance(getattr(module, "resnets", None), nn.ModuleList) and _takes_skips(module):
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return found


def _takes_skips(module: nn.Module) -> bool:
    return "res_hidden_states_tuple" in inspect.signature(module.forward).parameters
