"""Each converted layer's execution path, chosen by timing the candidates on the GPU the model runs on.

A converted layer can run three ways, and which is fastest depends on the GPU and the shape of the call: an fp8
GEMM of 512 rows (DiT-XL/2 at batch 2) ran slower on an H100 than the bf16 one it replaces, one of 8,192 rows
faster (``bench/results/speed-h100``). :func:`select_paths` runs one call of the model, records the input of every
converted layer, times each candidate on an input of that shape and layout, and keeps the fastest:

- ``"cublas"``: the vendor GEMM (cuBLASLt's ``_scaled_mm`` / ``_int_mm``) for W8A8 Linear and 1×1 layers
  (:mod:`~dmquant.kernels.cublas_gemm`);
- ``"triton"``: dmquant's Triton GEMM / implicit-GEMM convolution (:mod:`~dmquant.kernels.triton_gemm`,
  :mod:`~dmquant.kernels.triton_conv`), which every layout takes;
- ``"cudnn"``: cuDNN's FP8 convolution, its engine configuration autotuned per shape, for W8A8-FP8 Conv2d layers
  on Hopper (:mod:`~dmquant.kernels.cudnn_conv`);
- ``"dequant"``: for W4A16 layers (int4 weights, float activations), the weight dequantized per call into the
  compute dtype and run on the 16-bit vendor GEMM / convolution (:class:`~dmquant.kernels.layers.LowBitLinear`),
  the weight kept 4-bit in memory. The Triton W4A16 kernel dequantizes inside its main loop and is the faster at a
  few rows; at thousands of rows the GEMM is compute-bound and that kernel ran at 0.53× of bf16 (SD3's
  architecture at batch 1 on an H100, ``bench/results/speed-deployment``), where this path adds one pointwise
  pass over the codes to bf16's GEMM (eagerly :mod:`~dmquant.kernels.triton_dequantize`, compiled one fused
  kernel: the measured call is that pass, not the chain of torch operations it replaces, which made the path
  5–40× slower than the Triton kernel in the first measurement);
- ``"bf16"``: the layer's weight dequantized once into the compute dtype and run as a plain ``nn.Linear`` /
  ``nn.Conv2d`` (cuBLAS, cuDNN), its input left unquantized. The layer then computes with the quantized weight but
  full-precision activations (weight-only quantization), no longer its simulated twin's function, and keeps
  16-bit weights; the report says which layers did so. Layers with int4 weights never take it: their point is
  memory (``dense_for_int4`` lifts that).

A quantized candidate is timed with the quantization of its input (one pass, :mod:`~dmquant.kernels.triton_quantize`),
as an eager model runs it. A model that will run under ``torch.compile`` (``compiled=True``) has that quantization
fused into the op producing the input (a norm, a modulation, an activation), so there its own time is measured
apart and subtracted. That matters where the GEMM is small next to a pass of its own: on SD3's architecture
(1024², batch 2, H100) the eager timing kept 172 of 341 layers in bf16 — the adaLN modulations at two rows, the text
stream's projections at 333 (cuBLASLt with its quantization pass 0.0159 ms, bf16 0.0091) — and with them 1.1 GB of
16-bit weights (how much of the 0.0159 ms the quantization takes was not measured then). Now the report keeps that
pass's own time either way (:attr:`PathChoice.quantization_ms`), so each decision reads as what the quantization
costs against what the GEMM gains.

It is subtracted only where the producer runs in the same compiled graph as the layer. An input that enters the
graph from outside keeps its quantization pass and is timed with it: an input of the compiled region the layer runs
in (``regions``: the modules compiled one by one, by default the whole model), such as the block input a ResNet
block's 1×1 shortcut takes, the concatenation a UNet up-block feeds its ResNet blocks, or the text states of a
cross-attention's K and V projections; and the input of a layer outside every compiled region, such as a diffusers
UNet's down- and upsampling convolutions under regional compilation. Subtracted everywhere, on SD-1.5 at batch 2
(H100, regional compilation) the measurement kept 14 shortcuts, 5 resampling convolutions and ``conv_in`` on fp8 for
gains of 0.001–0.04 ms each, their quantization passes not counted, and the model ran at 0.95× of bf16; subtracted
only where it fuses, two shortcuts, four resampling convolutions and ``conv_in`` stayed low-bit, and it ran at 0.98×
(``bench/results/speed-deployment``). Where it fuses, the quantization is not free either, which this measurement
does not see: the producer still writes its 16-bit output where another op takes it, and one fp8 copy per quantized
consumer (a norm before Q, K and V with their own scales writes three). The attention kernel's output, which a
diffusers ``Attention``'s ``to_out`` (and ``to_add_out``) takes, is no producer to fuse into either. Other producers'
kinds are not seen: an input straight out of another GEMM counts as fused, although inductor does not fuse into a
vendor GEMM.

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``'s procedure, :func:`_median_ms`),
the first call excluded (it autotunes the Triton tiles). Each candidate is timed on an input laid out as it will be
at that call: the recorded one, except that a compiled model's convolutions run their 16-bit paths channels-last
(:func:`dense_input_channels_last`).

An FP8-attention module (:mod:`~dmquant.kernels.fp8_attention`) has two paths, timed for every attention shape of
the call: ``"fp8"``, cuDNN's FP8 attention on fp8 codes, and ``"bf16"``, torch's SDPA on the unquantized Q, K and V
(then no longer the simulated twin's function either; the report says which). The fp8 candidate is timed with the
quantization of Q, K and V, all three eagerly; compiled, only those of the operands that come straight out of their
projection's GEMM (:func:`~dmquant.kernels.fp8_attention.standalone_operands`: SDXL's Q, K and V, the V of FLUX's
single-stream blocks), the others fusing into the norm, rotary embedding or concatenation that produces them.
Eagerly, FP8 attention is slower than bf16 at every measured shape (``bench/results/attention-speed``). A call
cuDNN does not take runs the simulated attention, which materialises the probabilities and is never faster than
torch's fused SDPA: it takes ``"bf16"`` unmeasured against.

A quantized path must beat ``"bf16"`` by :data:`~dmquant.catalog.MIN_PATH_GAIN` (5%) of bf16's time to be kept
(``min_gain``): the isolated timing does not see what a low-bit layer costs the model around it (the fp8 copies its
producer writes beside its 16-bit output, a layout copy of the codes, another layer's weights evicting its own from
L2), and a layer that saves 2% alone can cost more than that in the model. On SD-1.5 at batch 2 (H100, compiled),
46 of the 75 layers the measurement kept low-bit saved under 5% each (0.015 ms together, of 0.135 predicted) and the
model ran at 0.98× of bf16; on FLUX, SD3, PixArt-Σ and SDXL the layers under 5% carry 0–0.006 ms of their predicted
gain (``bench/results/speed-deployment``). The choice is made from the times, not cached: another ``min_gain``
measures nothing again.

An input's layout can depend on the path the layer producing it takes. A converted convolution writes its output
channels-last whatever its input's layout; the dense convolution that replaces it where bf16 is faster, given an
NCHW input (a diffusers ``Transformer2DModel`` makes its tokens NCHW-contiguous before ``proj_out``), writes NCHW.
On SD-1.5 at batch 8 (H100) the resampling convolutions after the transformers were timed on the channels-last
inputs of the all-converted call, ran on NCHW ones once their ``proj_out`` had gone to bf16, and their input
quantization took 0.67 ms the timing had not seen (``bench/results/speed-deployment``). So once the paths are set,
the call is recorded again, and every layer still converted whose input changed layout (or fusion) is measured and
decided again, up to :data:`RECORDING_ROUNDS` recordings. A layer outside every compiled region runs eagerly, so
its 16-bit path is timed on its input's layout as it comes (:func:`dense_input_channels_last`).

Decisions are cached in a JSON file (:func:`cache_path`) keyed by the GPU, the torch/Triton/dmquant versions, the
layer's signature (kind, shape, formats, input shape, dtype and layout) and ``compiled``, so a shape is measured
once per device: the blocks of a model that repeat one shape share one measurement, and a second conversion
measures nothing.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import itertools
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from ..catalog import MIN_PATH_GAIN
from ..streams import side_stream
from . import cudnn_conv
from .decision_cache import cache_dir, merge_entries, read_entries
from .fp8_attention import AttentionCall, _Fp8Attend, full_precision_attention, pad_heads, padded_head_dim
from .layers import DEQUANTIZED, LowBitConv2d, LowBitLinear, memory_layout

#: The paths a converted layer may take, then an FP8-attention module's kernel: the report's columns.
PATHS = ("cublas", "triton", "cudnn", DEQUANTIZED, "fp8", "bf16")
#: The file of the decision cache (:mod:`~dmquant.kernels.decision_cache`) that keeps the measured times.
CACHE_FILE = "kernel-paths.json"
#: The key of a layer's measured times under which :func:`measure` keeps its input's quantization pass alone (ms),
#: beside the paths' times; no path of its own.
QUANTIZATION = "input quantization"

#: How many times :func:`select_paths` records the model's call: after a round of decisions, once more to find the
#: layers whose input a dense replacement upstream laid out anew (module docstring), and once to confirm.
RECORDING_ROUNDS = 3

LowBitLayer = LowBitLinear | LowBitConv2d


@dataclass
class PathChoice:
    """What :func:`select_paths` decided for one layer: the path, each candidate's median time per call (ms, summed
    over the layer's calls in one model call), and whether the times came from the cache."""

    name: str
    path: str
    times_ms: dict[str, float]
    inputs: list[list[int]]
    cached: bool = False
    kind: str = "layer"  # or "attention"
    #: A layer's quantized candidates were timed with its input's quantization pass: eagerly, or compiled where the
    #: pass does not fuse into the input's producer (module docstring); None for an attention module.
    quantization_timed: bool | None = None
    #: That quantization pass alone (ms, summed over the calls), included in or subtracted from the quantized
    #: candidates' times as ``quantization_timed`` says; None where no pass was timed (16-bit or dynamically
    #: quantized activations, an attention module, times cached before it was recorded).
    quantization_ms: float | None = None


@dataclass
class PathReport:
    """The choices of one :func:`select_paths` run, kept on the model as ``model.dmquant_paths``."""

    device: str
    choices: list[PathChoice] = field(default_factory=list)
    compiled: bool = False  # timed for a model that runs under torch.compile
    min_gain: float = 0.0  # the fraction of bf16's time a quantized path had to save to be kept

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for choice in self.choices:
            key = choice.path if choice.kind == "layer" else f"{choice.path} {choice.kind}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def summary(self) -> str:
        chosen = ", ".join(f"{count} {path}" for path, count in sorted(self.counts().items()))
        taken = sum(choice.times_ms[choice.path] for choice in self.choices)
        timed = " for compiled execution" if self.compiled else ""
        margin = f", each kept over bf16 only if it saved {self.min_gain:.0%} of its time" if self.min_gain else ""
        text = f"paths measured on {self.device}{timed}{margin}: {chosen}; the converted modules' time per call "
        text += f"{taken:.3f} ms"
        if all("bf16" in choice.times_ms for choice in self.choices):  # int4 layers are not timed in bf16
            text += f" against {sum(choice.times_ms['bf16'] for choice in self.choices):.3f} ms in bf16"
        return text

    def rows(self) -> list[dict[str, Any]]:
        """One table row per layer: its path, each candidate's time, whether the quantized candidates' times
        include the input's quantization ("own pass") or leave it to the producer it fuses into ("fused"), and that
        pass's own time."""
        passes = {True: "own pass", False: "fused", None: "—"}
        return [
            {"name": c.name, "path": c.path, "input": "; ".join("x".join(map(str, s)) for s in c.inputs)}
            | {f"{path} ms": f"{c.times_ms[path]:.4f}" if path in c.times_ms else "—" for path in PATHS}
            | {"input quantization": passes[c.quantization_timed]}
            | {"quantization ms": "—" if c.quantization_ms is None else f"{c.quantization_ms:.4f}"}
            for c in self.choices
        ]

    def to_dict(self) -> dict[str, Any]:
        layers = [asdict(c) for c in self.choices]
        return {
            "device": self.device,
            "compiled": self.compiled,
            "min_gain": self.min_gain,
            "counts": self.counts(),
            "layers": layers,
        }


#: The attribute of a model that holds its :class:`PathReport`.
REPORT_ATTRIBUTE = "dmquant_paths"


def cache_path() -> Path:
    """Where decisions are cached: :data:`CACHE_FILE` in the decision cache's directory (``$DMQUANT_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/dmquant``, else ``~/.cache/dmquant``)."""
    return cache_dir() / CACHE_FILE


def _are_times(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values())


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    """The cached times; an unreadable or malformed file counts as empty (it is only a cache) and is rewritten."""
    return read_entries(path, _are_times)


def _environment_key(device: torch.device) -> dict[str, Any]:
    versions = {}
    for distribution in ("dmquant", "triton"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = "none"
    # the candidate set too: a cache written before a path existed would never time it
    return {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, **versions, "paths": list(PATHS)}


def signature(layer: LowBitLayer, x: Tensor) -> dict[str, Any]:
    """What a layer's time on ``x`` depends on: kind, shape, weight layouts, activation modes, options and the
    input's shape, dtype and layout (never its name or values)."""
    parts = [(layer.weight, layer.activation)] if isinstance(layer, LowBitLinear) else [
        (part.weight, part.activation) for part in layer.parts
    ]  # fmt: skip
    key: dict[str, Any] = {
        "kind": type(layer).__name__,
        "weights": [[w.layout, list(w.shape), w.group_size] for w, _ in parts],
        "activations": [activation.mode for _, activation in parts],
        "has_zero": [activation.has_zero for _, activation in parts],
        "bias": layer.bias is not None,
        "smoothing": layer.smoothing is not None,
        "fast_accumulation": layer.fast_accumulation,
        "input": list(x.shape),
        "dtype": str(x.dtype),
        "layout": memory_layout(x),
    }
    if isinstance(layer, LowBitConv2d):
        key |= {"conv": [layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups]}
    return key


def dense_module(layer: LowBitLayer, dtype: torch.dtype, channels_last: bool = False) -> nn.Module:
    """The layer as a plain ``nn.Linear`` / ``nn.Conv2d`` in ``dtype`` with its dequantized weight (SmoothQuant's
    division folded in), on the layer's device: the ``"bf16"`` path. ``channels_last``: a convolution's weight in
    that layout, as cuDNN takes it best for channels-last inputs."""
    smoothing = layer.smoothing
    if isinstance(layer, LowBitLinear):
        weight = layer.weight.dequantize()
        if smoothing is not None:
            weight = weight / smoothing.reshape(1, -1)
        dense: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        weight = layer.weight_4d()
        if smoothing is not None:
            weight = weight / smoothing.reshape(1, -1, 1, 1)
        dense = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, bias=layer.bias is not None,
        )  # fmt: skip
    dense = dense.to(device=weight.device, dtype=dtype)
    dense.weight.data.copy_(weight.reshape(dense.weight.shape))
    if layer.bias is not None:
        dense.bias.data.copy_(layer.bias.detach())
    if channels_last and isinstance(dense, nn.Conv2d):
        dense.weight.data = dense.weight.data.contiguous(memory_format=torch.channels_last)
    return dense.eval().requires_grad_(False)


def dense_input_channels_last(layer: LowBitLayer, x: Tensor, compiled: bool) -> bool:
    """Whether the layer's 16-bit paths (``"bf16"``, ``"dequant"``) take ``x`` channels-last: as it comes eagerly
    (also for a layer outside the compiled regions of a compiled model); in a graph ``torch.compile`` compiles
    (``compiled``), always for a convolution while inductor's layout optimization is on (its default:
    ``torch._inductor.config.layout_optimization``), which runs the graph's convolutions channels-last whatever
    layout eager code gives their inputs. A diffusers ResNet block's 3×3 convolutions get contiguous inputs eagerly
    (GroupNorm's output); timed so, bf16 cuDNN took 0.198 ms for 2,560 → 1,280 channels at 8×8 on an H100, and the
    bf16 times of SD-1.5's converted layers added up to 7.2 ms where the compiled bf16 model's GEMM and convolution
    kernels take 3.9 ms in all (``bench/results/speed-deployment``, SD-1.5 at batch 2). The quantized paths keep the
    recorded layout: cuDNN's and Triton's convolutions are custom operators, whose inputs inductor gives eager
    strides (the 1×1 convolutions on cuBLASLt are not; in the SD-1.5 and SDXL UNets their inputs, the blocks'
    inputs, were recorded channels-last already)."""
    if memory_layout(x) == "channels_last":
        return True
    if not (compiled and isinstance(layer, LowBitConv2d) and x.dim() == 4):
        return False
    import torch._inductor.config as inductor_config

    return bool(inductor_config.layout_optimization)


def _candidates(
    layer: LowBitLayer, x: Tensor, dense_for_int4: bool, compiled: bool = False
) -> dict[str, Callable[[], Tensor]]:
    """Each path's call on ``x``, the 16-bit paths' in the layout they will see (:func:`dense_input_channels_last`).
    A quantized path whose kernel the input does not reach (the reference path on this input) is left out; so is
    ``"bf16"`` for int4 weights unless ``dense_for_int4`` (or no other path takes them: W4A8 on a shape no kernel
    takes)."""
    from . import dispatch

    channels_last = dense_input_channels_last(layer, x, compiled)
    dense_x = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    weights = [layer.weight] if isinstance(layer, LowBitLinear) else [part.weight for part in layer.parts]
    modes = [layer.activation.mode] if isinstance(layer, LowBitLinear) else [p.activation.mode for p in layer.parts]
    on_kernel = all(
        (dispatch.linear_kernel(mode, weight, x) if isinstance(layer, LowBitLinear)
         else dispatch.conv2d_kernel(mode, weight, x, layer.groups)) is not None
        for mode, weight in zip(modes, weights, strict=True)
    )  # fmt: skip
    candidates: dict[str, Callable[[], Tensor]] = {}
    if on_kernel:
        vendor = all(weight.layout in dispatch.VENDOR_LAYOUTS for weight in weights)
        for path in ("cublas", "triton") if vendor else ("triton",):
            candidates[path] = _with_backend(layer, x, "auto" if path == "cublas" else "triton")
        fp8 = all(weight.layout == "fp8" for weight in weights) and set(modes) == {"fp8"}
        if isinstance(layer, LowBitConv2d) and fp8 and cudnn_conv.takes(x, layer.groups):
            candidates["cudnn"] = _with_backend(layer, x, "cudnn")
    if set(modes) == {"none"} and all(weight.layout == "int4" for weight in weights):
        candidates[DEQUANTIZED] = _with_backend(layer, dense_x, DEQUANTIZED)
    if candidates and not dense_for_int4 and any(weight.layout == "int4" for weight in weights):
        return candidates
    dense = dense_module(layer, x.dtype, channels_last=channels_last)
    candidates["bf16"] = lambda: dense(dense_x)
    return candidates


def _with_backend(layer: LowBitLayer, x: Tensor, backend: str) -> Callable[[], Tensor]:
    def call() -> Tensor:
        kept, layer.backend = layer.backend, backend
        try:
            return layer(x)
        finally:
            layer.backend = kept

    return call


#: A timing replays one CUDA graph this many times and takes the median; the graph repeats the call to run about
#: :data:`GRAPH_MS` milliseconds (``triton.testing.do_bench_cudagraph``'s procedure, with its 25 ms as used here).
REPLAYS = 10
GRAPH_MS = 25.0


def _median_ms(call: Callable[[], Tensor]) -> float:
    """Median time (ms) of one ``call``, the first call excluded (it autotunes the Triton tiles and picks cuBLAS's
    heuristics): ``triton.testing.do_bench_cudagraph``'s procedure, written here because that function takes a new
    stream from torch's pool for every timing, and cuBLAS keeps a workspace per stream it has run on
    (:mod:`dmquant.streams`); this one warms up on dmquant's one side stream and captures on torch's one capture
    stream. The collector is off while capturing: a Triton kernel it finalizes would unload its module mid-capture."""
    stream = side_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            call()
        end.record()
        end.synchronize()
        estimate = start.elapsed_time(end) / 5
        repeats = max(1, int(GRAPH_MS / estimate)) if estimate > 0 else 1000
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph):
                for _ in range(repeats):
                    call()
        finally:
            if collecting:
                gc.enable()
        times = []
        for _ in range(REPLAYS):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / repeats)
    torch.cuda.current_stream().wait_stream(stream)
    return statistics.median(times)


def _input_quantization(layer: LowBitLayer, x: Tensor) -> Callable[[], Any] | None:
    """The quantization of ``x`` that a quantized path of ``layer`` runs before its GEMM (each input part's slice of
    a split convolution), as a call; None where the activations are not statically quantized (W4A16, dynamic fp8:
    nothing, or a per-row reduction, to take apart)."""
    from .operands import quantize_activations  # Triton: imported where a GPU call needs it

    if isinstance(layer, LowBitLinear):
        parts = [(layer.activation, x)]
    else:
        parts = [(part.activation, x[:, part.channels]) for part in layer.parts]
    if any(activation.mode not in ("int8", "fp8") or activation.dynamic for activation, _ in parts):
        return None
    quantized = [(activation.mode, slice_, *activation.parameters_now()) for activation, slice_ in parts]
    return lambda: [quantize_activations(slice_, scale, zero, mode) for mode, slice_, scale, zero in quantized]


def measure(
    layer: LowBitLayer,
    x: Tensor,
    dense_for_int4: bool = False,
    compiled: bool = False,
    fuses_quantization: bool = True,
) -> dict[str, float]:
    """Median time (ms) of each candidate path of ``layer`` on a random input shaped and laid out like ``x``;
    ``compiled``: for a model run under ``torch.compile``, where, if ``fuses_quantization`` (the input's producer is
    one the quantization fuses into), a quantized path is timed without its input's quantization (module docstring).
    Where the input is quantized with static scales, that quantization's own time is kept under :data:`QUANTIZATION`.

    A candidate that fails (a shape cuBLASLt refuses, a capture a kernel breaks, cuDNN's own error types) is left
    out; bf16 always runs.
    """
    probe = torch.randn_like(x)
    times = {}
    for path, call in _candidates(layer, probe, dense_for_int4, compiled).items():
        try:
            times[path] = _median_ms(call)
        except Exception:
            if path == "bf16":
                raise
    quantization = _input_quantization(layer, probe) if any(path != "bf16" for path in times) else None
    if quantization is None:
        return times
    pass_ms = _median_ms(quantization)
    if compiled and fuses_quantization:
        times = {path: t if path == "bf16" else max(t - pass_ms, 0.0) for path, t in times.items()}
    return times | {QUANTIZATION: pass_ms}


def measure_attention(shape: AttentionCall, device: torch.device, compiled: bool = False) -> dict[str, float]:
    """Median time (ms) of an FP8-attention call of ``shape`` on each path: ``"bf16"`` always, ``"fp8"`` where the
    kernel takes the call, with the quantization of Q, K and V (``compiled``: of its standalone operands alone;
    random operands: module docstring)."""
    dtype = getattr(torch, shape.dtype)
    width = shape.heads * shape.head_dim
    q = torch.randn(shape.batch, shape.q_tokens, width, device=device, dtype=dtype)
    k, v = (torch.randn(shape.batch, shape.kv_tokens, width, device=device, dtype=dtype) for _ in range(2))
    times = {"bf16": _median_ms(lambda: full_precision_attention(q, k, v, None, shape.heads, shape.attn_scale))}
    if shape.on_kernel:
        from .operands import quantize_activations  # Triton: imported where a GPU call needs it

        padded = padded_head_dim(shape.head_dim)  # the padding fuses into the quantization: timed as one pass
        operands = {name: pad_heads(x, shape.heads, padded) for name, x in (("query", q), ("key", k), ("value", v))}
        codes = [x.to(torch.float8_e4m3fn) for x in operands.values()]
        one = torch.ones(1, device=device)
        probs_scale = one / torch.finfo(torch.float8_e4m3fn).max
        kernel = torch.ops.dmquant.fp8_sdpa
        with contextlib.suppress(RuntimeError):
            fp8 = _median_ms(lambda: kernel(*codes, one, one, one, probs_scale, shape.heads, shape.attn_scale))
            for name in shape.standalone if compiled else operands:
                fp8 += _median_ms(lambda x=operands[name]: quantize_activations(x, one, None, "fp8"))
            times["fp8"] = fp8
    return times


def _fp8_attention_processors(model: nn.Module) -> dict[str, Any]:
    """The FP8-attention processor of each attention module of ``model`` that has one, by module name."""
    return {
        name: module.processor
        for name, module in model.named_modules()
        if isinstance(getattr(module, "processor", None), _Fp8Attend)
    }


class RecordedInput(NamedTuple):
    """One call's input of a converted layer: its shape, dtype and strides (a meta tensor); whether its
    quantization fuses into its producer (the producer runs in the same compiled graph as the layer and is not the
    attention kernel); and whether the layer runs inside a compiled region at all (outside one it runs eagerly, its
    16-bit path on the input's layout as it comes, :func:`dense_input_channels_last`)."""

    meta: Tensor
    quantization_fuses: bool
    in_compiled_region: bool = False

    def layout_key(self) -> tuple:
        """What the timing of this call depends on beyond the layer: shape, strides, dtype and fusion."""
        return (tuple(self.meta.shape), self.meta.stride(), self.meta.dtype, *self[1:])


def _attention_output_layers(model: nn.Module) -> set[int]:
    """The converted layers (by ``id``) that take an attention kernel's output: each diffusers ``Attention``'s
    ``to_out[0]``, and ``to_add_out`` (the text stream's in joint attention). Inductor does not fuse into the fused
    SDPA (nor cuDNN's FP8 kernel), so their input's quantization is a pass of its own, as the fusion test's kernel
    list shows (``tests/test_kernels_fusion.py``)."""
    found = set()
    for module in model.modules():
        to_out = getattr(module, "to_out", None)
        candidates = [to_out[0] if isinstance(to_out, (nn.ModuleList, nn.Sequential)) else None]
        candidates.append(getattr(module, "to_add_out", None))
        found |= {id(layer) for layer in candidates if isinstance(layer, (LowBitLinear, LowBitConv2d))}
    return found


def _tensor_addresses(*trees: Any) -> set[int]:
    return {leaf.data_ptr() for leaf in tree_leaves(trees) if isinstance(leaf, Tensor)}


def _record_calls(
    model: nn.Module, call: Callable[[], Any], processors: dict[str, _Fp8Attend], regions: Iterable[nn.Module] = ()
) -> tuple[dict[str, list[RecordedInput]], dict[str, list[AttentionCall]]]:
    """During ``call()``: the input of every call of every converted layer of ``model``, with whether its quantization
    fuses into its producer: an op inside the call of the compiled region (of ``regions``; none: eager) the layer runs
    in, not passed into it, and not the attention kernel (:func:`_attention_output_layers`); and the
    :class:`~dmquant.kernels.fp8_attention.AttentionCall` of every call of each of ``processors`` (by name)."""
    seen: dict[str, list[RecordedInput]] = {}
    after_attention = _attention_output_layers(model)
    entered: list[set[int]] = []  # the tensor inputs of each region call in progress, innermost last
    handles = []

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        entered.append(_tensor_addresses(args, kwargs))

    def leave(*_: Any) -> None:  # returns None: a forward hook's return value would replace the output
        entered.pop()

    for region in regions:
        handles.append(region.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(region.register_forward_hook(leave, always_call=True))
    for name, module in model.named_modules():
        if isinstance(module, (LowBitLinear, LowBitConv2d)):

            def hook(module: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0]
                meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
                fuses = bool(entered) and x.data_ptr() not in entered[-1] and id(module) not in after_attention
                seen.setdefault(name, []).append(RecordedInput(meta, fuses, bool(entered)))

            handles.append(module.register_forward_pre_hook(hook))
    for processor in processors.values():
        processor.calls = []
    try:
        with torch.no_grad():
            call()
        attention = {name: processor.calls for name, processor in processors.items() if processor.calls}
    finally:
        for handle in handles:
            handle.remove()
        for processor in processors.values():
            processor.calls = None
    return seen, attention


def _materialized(meta: Tensor, device: torch.device) -> Tensor:
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)


@torch.no_grad()
def select_paths(
    model: nn.Module,
    call: Callable[[], Any],
    *,
    use_cache: bool = True,
    dense_for_int4: bool = False,
    compiled: bool = False,
    regions: Iterable[nn.Module] | None = None,
    min_gain: float = MIN_PATH_GAIN,
    progress: bool = False,
) -> PathReport:
    """Choose and set each converted layer's and FP8-attention module's path (module docstring) from one ``call()``
    of ``model`` on CUDA.

    Layers whose fastest path is ``"bf16"`` are replaced in ``model`` by their :func:`dense_module`; the others get
    ``backend`` ``"triton"`` or ``"auto"`` (cuBLASLt where it takes the call, so a later call of another shape
    still runs). An attention module's processor gets the ``path`` ``"fp8"`` or ``"bf16"``. A module called several
    times per model call (several shapes) takes the path fastest over all of them. ``compiled``: the model will run
    under ``torch.compile``, where quantizations fuse into the ops producing their inputs when those run in the same
    compiled graph (module docstring): ``regions`` are the modules compiled one by one (regional compilation), by
    default the whole ``model`` as one graph. ``min_gain``: the fraction of bf16's time a quantized path must save
    to be kept (:data:`~dmquant.catalog.MIN_PATH_GAIN`; 0 keeps the fastest however close).
    Returns the :class:`PathReport`, also kept as ``model.dmquant_paths``.
    """
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain is a fraction of bf16's time in [0, 1), got {min_gain}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (LowBitLinear, LowBitConv2d))}
    device = next((tensor.device for tensor in itertools.chain(model.buffers(), model.parameters())), None)
    if device is None or device.type != "cuda":
        raise ValueError("select_paths measures kernels on a CUDA device: move the converted model there first")
    processors = _fp8_attention_processors(model)
    graphs = ((model,) if regions is None else tuple(regions)) if compiled else ()
    inputs, attention = _record_calls(model, call, processors, graphs)
    environment = _environment_key(device)
    cache_file = cache_path()
    cache = _read_cache(cache_file) if use_cache else {}

    def timed(key: dict[str, Any], measure_now: Callable[[], dict[str, float]]) -> tuple[dict[str, float], bool]:
        text = json.dumps(environment | key | {"compiled": compiled}, sort_keys=True)
        cached = text in cache
        if not cached:
            cache[text] = measure_now()
        return cache[text], cached

    def layer_times(name: str):
        """Each recorded call's (times, cached), the calls' shapes, how to put a path in place, and whether the
        quantized candidates' times include the input's quantization pass."""
        layer, recorded = layers[name], inputs[name]
        measured = [
            timed(
                signature(layer, meta)
                | {
                    "dense_for_int4": dense_for_int4,
                    "dense_channels_last": dense_input_channels_last(layer, meta, compiled and in_region),
                    "fuses_quantization": fused,
                },
                lambda meta=meta, fused=fused, in_region=in_region: measure(
                    layer, _materialized(meta, device), dense_for_int4, compiled and in_region, fused
                ),
            )
            for meta, fused, in_region in recorded
        ]
        first = recorded[0]
        return (
            measured,
            [list(call.meta.shape) for call in recorded],
            lambda path: _apply(model, name, layer, path, first.meta, compiled and first.in_compiled_region),
            not all(call.quantization_fuses for call in recorded),  # eagerly none fuses (recorded without regions)
        )

    def attention_times(name: str):
        """As :func:`layer_times`, for an FP8-attention module."""
        calls = attention[name]
        measured = [
            timed({"kind": "attention"} | asdict(c), lambda c=c: measure_attention(c, device, compiled)) for c in calls
        ]
        shapes = [[c.batch, c.heads, c.q_tokens, c.kv_tokens, c.head_dim] for c in calls]
        return measured, shapes, lambda path: setattr(processors[name], "path", path), None

    def decide(modules: list[tuple[str, str, Callable]], round_: int) -> None:
        """Measure (or read from the cache) and set each of ``modules``' paths, its choice replacing an earlier
        round's."""
        label = "measuring kernel paths" + (f" (round {round_ + 1}: inputs laid out anew)" if round_ else "")
        for name, kind, times_of in tqdm(modules, desc=label, disable=not progress, unit="module"):
            measured, shapes, put_in_place, quantization_timed = times_of(name)
            path, totals = fastest([times for times, _ in measured], min_gain)
            cached = all(cached for _, cached in measured)
            passes = [times.get(QUANTIZATION) for times, _ in measured]
            quantization_ms = None if None in passes else sum(passes)
            choices[name] = PathChoice(name, path, totals, shapes, cached, kind, quantization_timed, quantization_ms)
            put_in_place(path)

    choices: dict[str, PathChoice] = {}
    decide([(name, "layer", layer_times) for name in inputs], 0)
    decide([(name, "attention", attention_times) for name in attention], 0)
    for round_ in range(1, RECORDING_ROUNDS):
        previous, (inputs, _) = inputs, _record_calls(model, call, {}, graphs)
        relaid = relaid_out(previous, inputs)
        if not relaid:
            break
        decide([(name, "layer", layer_times) for name in relaid], round_)
    report = PathReport(device=environment["gpu"], compiled=compiled, min_gain=min_gain)
    report.choices = list(choices.values())
    if use_cache:
        _write_cache(cache_file, cache)
    setattr(model, REPORT_ATTRIBUTE, report)
    return report


def relaid_out(before: dict[str, list[RecordedInput]], after: dict[str, list[RecordedInput]]) -> list[str]:
    """The layers recorded in both rounds whose calls' inputs changed layout (strides, dtype) or fusion between
    them: those to measure again. Layers gone from ``after`` took the bf16 path and are no longer converted."""
    return [
        name
        for name, calls in after.items()
        if name in before and [c.layout_key() for c in calls] != [c.layout_key() for c in before[name]]
    ]


def fastest(entries: list[dict[str, float]], min_gain: float = 0.0) -> tuple[str, dict[str, float]]:
    """The path of least total time over a module's calls (one entry of times per call), among the paths every call
    took, and those totals; ``"bf16"`` unless the fastest other path saves at least ``min_gain`` of its total."""
    totals = {path: sum(entry[path] for entry in entries) for path in PATHS if all(path in e for e in entries)}
    best = min(totals, key=totals.__getitem__)
    if "bf16" in totals and totals[best] > (1.0 - min_gain) * totals["bf16"]:
        return "bf16", totals
    return best, totals


def _apply(model: nn.Module, name: str, layer: LowBitLayer, path: str, example: Tensor, compiled: bool = False) -> None:
    """Put ``path`` in place for ``layer`` (``example``: its first recorded input, for the dense layer's dtype and
    layout, :func:`dense_input_channels_last`)."""
    if path == "bf16":
        parent, _, child = name.rpartition(".")
        dense = dense_module(layer, example.dtype, channels_last=dense_input_channels_last(layer, example, compiled))
        setattr(model.get_submodule(parent), child, dense)
    else:
        layer.backend = "auto" if path == "cublas" else path


def _write_cache(path: Path, entries: dict[str, dict[str, float]]) -> None:
    """Merge ``entries`` into the cache file (another process may have added its own meanwhile)."""
    merge_entries(path, entries, _are_times)
