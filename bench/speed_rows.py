"""The speed benchmark's rows: the ways of running a model (bf16, torchao's peers, dmquant's conversions), in
which execution settings each is measured, and how each row's model is built from the float32 master."""

from __future__ import annotations

import copy
import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench import peers
from bench.configs import dmquant_config
from bench.speed_measure import MEMORY_FORMATS, compiled_regions, convs_in_memory_format, free_memory, outermost
from dmquant.api import info, quantize
from dmquant.catalog import MIN_PATH_GAIN
from dmquant.kernels.convert import REPORT_ATTRIBUTE, convert_model
from dmquant.kernels.paths import select_paths

if TYPE_CHECKING:
    from bench.speed_run import ModelBench

EAGER, COMPILED, GRAPHED = "eager", "compiled", "compiled+cudagraph"
#: The order settings are measured in (compiling changes the model in place).
SETTINGS = (EAGER, COMPILED, GRAPHED)
#: The bf16 row each setting is compared with.
REFERENCE_ROW = {EAGER: "bf16-eager", COMPILED: "bf16-compiled", GRAPHED: "bf16-compiled-cudagraphs"}
QUANTIZED_SETTINGS = (COMPILED, EAGER, GRAPHED)


@dataclass(frozen=True)
class Row:
    """One way of running a model.

    Attributes:
        name: the row's name (file name of its cells).
        kind: ``"bf16"``, ``"torchao"`` or ``"dmquant"``.
        settings: execution settings measured; the first is the headline one.
        description: what the row runs, exactly.
        peer: the ``peers.py`` name of a torchao row.
        formats: a dmquant row's (weight bits, activation bits, weight granularity).
        fast_accumulation: a dmquant row's fp8 GEMMs on cuBLASLt accumulate without fp32 promotion.
        linear_only: a dmquant row quantizes nn.Linear layers only, its convolutions left in the compute dtype.
        compute: a torchao row's number format of its quantized GEMMs' tensor-core math (``"fp8"`` or
            ``"int8"``); see :attr:`compute_format`.
        measured_paths: a dmquant row's converted layers take the path measured fastest on the device
            (cuBLASLt, Triton or bf16: :mod:`dmquant.kernels.paths`), as ``dmquant convert`` does by default;
            without it, every layer runs on its low-bit kernel.
        path_min_gain: a dmquant row with ``measured_paths`` keeps a quantized path over bf16 only if it saves
            this fraction of bf16's time (by default :data:`dmquant.catalog.MIN_PATH_GAIN`, as ``dmquant convert``).
        fp8_attention: a dmquant row quantizes the attention matmuls of diffusers ``Attention`` (SD3's joint
            attention included) and FLUX's ``FluxAttention`` for FP8 attention (:mod:`dmquant.kernels.fp8_attention`)
            instead of leaving them in the compute dtype.
    """

    name: str
    kind: str
    settings: tuple[str, ...]
    description: str
    peer: str | None = None
    formats: tuple[int | str, int | str, str] | None = None
    fast_accumulation: bool = False
    linear_only: bool = False
    compute: str | None = None
    measured_paths: bool = True
    fp8_attention: bool = False
    path_min_gain: float = MIN_PATH_GAIN

    @property
    def compute_format(self) -> str:
        """The tensor-core math of the row's low-bit GEMMs (``"bf16"``, ``"fp8"`` or ``"int8"``), whose measured
        peak its GEMM/conv throughput is compared with: a dmquant row's follows its activation format."""
        if self.formats is not None:
            return {"fp8_e4m3": "fp8", 8: "int8"}.get(self.formats[1], "bf16")
        return self.compute or "bf16"


_DMQUANT = (
    "dmquant.quantize with the minmax recipe (first/last layer at 8 bits), {attention}, {what}, "
    "calibrated on 2 random input rows; then dmquant.kernels.convert.convert_model; the model but its low-bit "
    "layers (codes, float32 scales) cast to the compute dtype"
)


def _dmquant(what: str, attention: str = "attention matmuls off") -> str:
    return _DMQUANT.format(what=what, attention=attention)


#: How the description of a row with ``measured_paths`` ends (appended to its description).
MEASURED_PATHS = (
    "; on CUDA each converted W8A8 layer then takes the path measured fastest there (cuBLASLt, Triton, or bf16 with "
    "its dequantized weight; dmquant.kernels.paths), a quantized path kept over bf16 only where it saves "
    "dmquant.catalog.MIN_PATH_GAIN of bf16's time unless the row says otherwise, int4 layers keep their kernel"
)
ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("bf16-eager", "bf16", (EAGER,), "bfloat16 model, eager PyTorch"),
        Row("bf16-compiled", "bf16", (COMPILED,), "bfloat16 model under torch.compile (see settings.compile)"),
        Row(
            "bf16-compiled-cudagraphs",
            "bf16",
            (GRAPHED,),
            "bf16-compiled with its whole call captured into one explicit torch.cuda.CUDAGraph and replayed",
        ),
        Row("int8-dynamic", "torchao", QUANTIZED_SETTINGS, peers.PEERS["torchao-int8-dynamic"].description,
            peer="torchao-int8-dynamic", compute="int8"),
        Row("fp8-dynamic-row", "torchao", QUANTIZED_SETTINGS, peers.PEERS["torchao-fp8-dynamic"].description,
            peer="torchao-fp8-dynamic", compute="fp8"),
        Row("int4-weight-only", "torchao", QUANTIZED_SETTINGS, peers.PEERS["torchao-int4-weight-only"].description,
            peer="torchao-int4-weight-only"),
        Row("dmquant-w8a8-fp8", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("fp8 e4m3 weights per output channel and activations per tensor"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel")),
        Row("dmquant-w8a8-fp8-every-layer", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("fp8 as dmquant-w8a8-fp8-fast, every converted layer on its fp8 kernel (no "
                            "measured choice of paths)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True, measured_paths=False),
        Row("dmquant-w8a8-fp8-fast", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("fp8 as dmquant-w8a8-fp8, its fp8 GEMMs on cuBLASLt with fast accumulation "
                            "(use_fast_accum=True, as torchao's fp8 rows)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True),
        Row("dmquant-w8a8-fp8-any-gain", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("fp8 as dmquant-w8a8-fp8-fast, each measured path kept over bf16 however little it saves "
                     "(min_gain 0)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True, path_min_gain=0.0),
        Row("dmquant-w8a8-fp8-attention", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("fp8 as dmquant-w8a8-fp8-fast",
                     attention="Q, K, V and the softmax output of diffusers Attention (SD3's joint one too) and "
                     "FLUX's FluxAttention in fp8 e4m3 (FP8 attention: cuDNN's FP8 SDPA where it takes the head "
                     "dimension, the simulated attention elsewhere)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True, fp8_attention=True),
        Row("dmquant-w8a8-fp8-linear-fast", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("fp8 as dmquant-w8a8-fp8-fast on the nn.Linear layers only, the convolutions left "
                            "in bfloat16 on cuDNN (torchao's layer coverage, with static activation scales)"),
            formats=("fp8_e4m3", "fp8_e4m3", "channel"), fast_accumulation=True, linear_only=True),
        Row("dmquant-w8a8-int8", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("int8 symmetric per-channel weights, int8 asymmetric per-tensor activations"),
            formats=(8, 8, "channel")),
        Row("dmquant-w4a8", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("int4 weights per output channel, int8 per-tensor activations"),
            formats=(4, 8, "channel")),
        Row("dmquant-w4a16", "dmquant", QUANTIZED_SETTINGS,
            _dmquant("int4 weights per output channel, 16-bit activations"),
            formats=(4, 16, "channel")),
    )
}  # fmt: skip


class RowUnsupported(Exception):
    """The row cannot run here (a conversion that refuses the model, CUDA graphs without CUDA); the reason is kept."""


@dataclass
class Built:
    """A row's model, ready to call in the compute dtype, and what building it recorded."""

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False


def _bf16_copy(bench: ModelBench) -> nn.Module:
    workload = bench.workload
    master = copy.deepcopy(workload.model) if workload.model is not None else workload.master()
    return nn.Module.to(master, bench.dtype).eval()


def build_bf16(bench: ModelBench, row: Row) -> Built:
    if row.name == "bf16-compiled-cudagraphs" and bench.kept_compiled is not None:
        built, bench.kept_compiled = bench.kept_compiled, None
        return built
    return Built(_bf16_copy(bench))


def build_torchao(bench: ModelBench, row: Row) -> Built:
    """The torchao peer on a bf16 copy (``peers.apply_peer``: its own exclusions, in the cell).

    The rows of each Linear's product are recorded on one call with the workload's inputs first, so
    that the peer can leave out the layers its kernels refuse at this batch (``peers.linear_rows``).
    """
    peers.check_available(row.peer, bench.device)
    source = _bf16_copy(bench)
    args_, kwargs = bench.workload.inputs(bench.dtype)
    rows = peers.linear_rows(source, functools.partial(source, *args_, **kwargs))
    result = peers.apply_peer(row.peer, source, rows=rows)  # a copy, bfloat16 on CUDA like its source
    del source
    exclusions = [{"layers": n, "reason": why} for why, n in Counter(result.skipped_layers.values()).items()]
    details = {
        "coverage": {"quantized": result.quantized, "skipped": result.skipped},
        "exclusions": exclusions,
        "notes": result.notes,
        "peer_versions": peers.peer_versions(),
    }
    return Built(result.model, details)


def convert_for(row: Row, model: nn.Module, **options) -> nn.Module:
    """``convert_model`` of a quantized ``model`` with the row's conversion options (and ``options``)."""
    return convert_model(model, fp8_fast_accumulation=row.fast_accumulation, **options)


def build_dmquant(bench: ModelBench, row: Row) -> Built:
    """quantize the float32 master (a copy, or a fresh one for a rebuilt workload, quantized in place), convert it
    to real low-bit layers, cast the rest of the model to the compute dtype; then, for rows with
    ``measured_paths`` on CUDA, time each converted layer's paths on the workload's call and keep the fastest
    (:func:`dmquant.kernels.paths.select_paths`; timed for compiled execution when a compiled setting is measured,
    with ``--compile-scope``'s regions as the compiled graphs)."""
    workload = bench.workload
    fresh = workload.model is None
    master = workload.master()
    config = dmquant_config(row, master)
    quantized = quantize(master, config, workload.calibration(), batch_size=2, progress=bench.args.progress,
                         inplace=fresh)  # fmt: skip
    layers = info(quantized).report.layers
    try:
        converted = convert_for(row, quantized, inplace=fresh)
    except Exception as error:  # a conversion that refuses is a row this build cannot run
        raise RowUnsupported(f"convert_model raised {type(error).__name__}: {error}") from error
    del quantized, master
    free_memory()
    model = cast_outside_low_bit_layers(converted, bench.dtype).eval()
    details = {
        "recipe": config.to_dict(),
        "coverage": {
            "quantized": dict(Counter(layer.kind for layer in layers if layer.quantized)),
            "skipped": dict(Counter(layer.kind for layer in layers if not layer.quantized)),
        },
        "conversion": conversion_summary(model),
    }
    if row.measured_paths and bench.device.type == "cuda":
        memory_format = MEMORY_FORMATS[bench.args.memory_format]
        args_, kwargs = workload.inputs(bench.dtype, memory_format)
        convs_in_memory_format(model, memory_format)
        began = time.perf_counter()
        compiled = any(setting.startswith("compiled") for setting in bench.args.settings)
        paths = select_paths(
            model,
            lambda: model(*args_, **kwargs),
            compiled=compiled,
            regions=compiled_regions(model, bench.args.compile_scope),
            min_gain=row.path_min_gain,
            progress=bench.args.progress,
        )
        details["paths"] = paths.to_dict() | {"seconds": time.perf_counter() - began, "summary": paths.summary()}
    return Built(model, details)


def conversion_summary(model: nn.Module) -> dict[str, Any] | None:
    """What ``convert_model`` reported (``model.dmquant_conversion``): layouts, how each converted
    layer takes its input (a kernel mode, or the reference path), what stayed simulated and why."""
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if report is None:
        return None
    return {
        "summary": report.summary(),
        "converted": dict(report.converted),
        "activations": dict(Counter(layer["activation"] for layer in report.layers)),
        "kept_simulated": dict(Counter(report.kept.values())),
        "weight_bytes_before": report.weight_bytes_before,
        "weight_bytes_after": report.weight_bytes_after,
    }


def cast_outside_low_bit_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and buffers to ``dtype``, except the buffers of converted low-bit layers
    (their fp8 codes and float32 scales are as their kernels take them). Their biases are cast too: every
    floating parameter is then in ``dtype``, which is how diffusers reads a model's dtype (``ModelMixin.dtype``,
    the first one; UNet2DModel casts its time embedding to it). Returns ``model``."""
    low_bit = outermost(model, lambda module: type(module).__module__.startswith("dmquant.kernels"))
    kept = {id(inner) for layer in low_bit.values() for inner in layer.modules()}
    for module in model.modules():
        buffers = [] if id(module) in kept else module.named_buffers(recurse=False)
        for name, tensor in [*module.named_parameters(recurse=False), *buffers]:
            if tensor.is_floating_point():
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    setattr(module, name, tensor.to(dtype))
    return model


BUILDERS: dict[str, Callable[[ModelBench, Row], Built]] = {
    "bf16": build_bf16,
    "torchao": build_torchao,
    "dmquant": build_dmquant,
}
