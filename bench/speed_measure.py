"""What the speed benchmark measures and how: FLOPs (through :mod:`dmquant.eval.cost`), weight bytes, the
compiler's settings, torch.compile and CUDA graphs, latency quantiles, the profiled kernels' split by category
and the device's peak GEMM rates."""

from __future__ import annotations

import gc
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from bench.common import call_times_ms, synchronize
from dmquant.core.layers import QUANT_LAYERS
from dmquant.eval.cost import layer_kind, op_calls
from dmquant.kernels.layers import LowBitConv2d, LowBitLinear

if TYPE_CHECKING:
    from bench.speed_run import ModelBench

#: ``--memory-format`` choices.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
#: Where regional compilation (``--compile-scope blocks``) applies torch.compile: the outermost of these.
COMPILED_BLOCKS = (
    "BasicTransformerBlock",
    "ResnetBlock2D",
    "Attention",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "JointTransformerBlock",
)
#: torch._inductor settings of every compiled row (torchao's recommended_inductor_config_setter
#: less coordinate-descent tuning, which multiplies compile time).
INDUCTOR_SETTINGS = {"force_fuse_int_mm_with_mul": True, "fx_graph_cache": True, "triton.unique_kernel_names": True}
#: torch._dynamo limits raised so that every compiled block fits: one graph per distinct block shape, and for
#: W8A8-INT8 one per block (dynamo specialises on each layer's activation zero point, a Python int; SDXL has 70
#: transformer blocks).
DYNAMO_SETTINGS = {"recompile_limit": 128, "accumulated_recompile_limit": 1024}


def layer_precision(module: nn.Module) -> str:
    """``"low-bit"`` (a torchao tensor subclass weight, or a layer class of ``dmquant.kernels``),
    ``"simulated"`` (dmquant's fake-quantized QuantLinear/QuantConv2d) or ``"full"``."""
    if is_traceable_wrapper_subclass(getattr(module, "weight", None)):
        return "low-bit"
    if isinstance(module, (LowBitConv2d, LowBitLinear)):
        return "low-bit"
    return "simulated" if isinstance(module, QUANT_LAYERS) else "full"


def outermost(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """The modules ``wanted`` picks that are not inside another picked one, by qualified name."""
    chosen: dict[str, nn.Module] = {}
    inside: str | None = None
    for name, module in model.named_modules():  # pre-order: a module's descendants follow it
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        inside = None
        if wanted(module):
            chosen[name], inside = module, name
    return chosen


@dataclass
class LayerFlops:
    kind: str
    precision: str
    flops: int = 0


@dataclass
class FlopCount:
    """FLOPs of one call: per layer (kind, precision) and of the attention matmuls."""

    layers: dict[str, LayerFlops] = field(default_factory=dict)
    attention: int = 0

    def of_kind(self, kind: str) -> int:
        return sum(layer.flops for layer in self.layers.values() if layer.kind == kind)

    @property
    def layer_total(self) -> int:
        return sum(layer.flops for layer in self.layers.values())

    @property
    def total(self) -> int:
        return self.layer_total + self.attention

    def full_precision(self) -> int:
        """FLOPs of layers left in full precision (attention matmuls not included)."""
        return sum(layer.flops for layer in self.layers.values() if layer.precision == "full")

    def summary(self) -> dict[str, Any]:
        full = self.full_precision()
        counts = Counter(f"{layer.kind}/{layer.precision}" for layer in self.layers.values())
        return {
            "total": self.total,
            "linear": self.of_kind("linear"),
            "conv": self.of_kind("conv"),
            "attention": self.attention,
            "layers_by_kind_and_precision": dict(counts),
            "full_precision_layer_fraction": full / self.layer_total if self.layer_total else None,
            "full_precision_fraction": (full + self.attention) / self.total if self.total else None,
        }


def count_flops(model: nn.Module, call: Callable[[], Any]) -> FlopCount:
    """FLOPs of ``call()`` (one call of ``model``): 2 × the multiply-accumulates :func:`dmquant.eval.cost.op_calls`
    finds, per layer (every layer listed, a layer not called with none) and of the attention matmuls."""
    count = FlopCount()
    for name, module in outermost(model, lambda m: layer_kind(m) is not None).items():
        count.layers[name] = LayerFlops(layer_kind(module), layer_precision(module))
    for op in op_calls(model, call):
        if op.kind == "attention":
            count.attention += 2 * sum(op.macs)
        else:
            count.layers[op.name].flops += 2 * sum(op.macs)
    return count


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes a tensor really stores: a tensor subclass (torchao) is the sum of its inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return sum(tensor_bytes(part) for part in inner if isinstance(part, Tensor))
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Parameters and buffers of ``model`` (each once), at their real storage."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_bytes(tensor) for tensor in tensors.values())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def convs_in_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """The 4-D weights of ``model``'s float ``nn.Conv2d`` layers in ``memory_format``, in place (converted layers and
    tensor subclasses left as they are, unlike ``nn.Module.to``); returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and type(module.weight) is nn.Parameter:
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
    return model


def configure_compiler() -> dict[str, Any]:
    """Apply ``INDUCTOR_SETTINGS`` and ``DYNAMO_SETTINGS``; returns them as applied."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for dotted, value in INDUCTOR_SETTINGS.items():
        *parents, name = dotted.split(".")
        target = inductor_config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    for name, value in DYNAMO_SETTINGS.items():
        if hasattr(dynamo_config, name):  # named cache_size_limit before torch 2.7
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
    torch.backends.cudnn.benchmark = True
    return {"inductor": INDUCTOR_SETTINGS, "dynamo": DYNAMO_SETTINGS, "cudnn_benchmark": True}


def compiled_regions(model: nn.Module, scope: str) -> list[nn.Module]:
    """The modules ``--compile-scope`` compiles one by one: the whole model, or its outermost blocks."""
    if scope == "model":
        return [model]
    return list(outermost(model, lambda module: type(module).__name__ in COMPILED_BLOCKS).values())


def compile_in_place(model: nn.Module, scope: str) -> int:
    """torch.compile (default mode, ``dynamic=False``) the whole model or its outermost blocks; how many regions."""
    torch._dynamo.reset()
    regions = compiled_regions(model, scope)
    for module in regions:
        module.compile(dynamic=False)
    return len(regions)


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_in_place`: every module runs eagerly again."""
    for module in model.modules():
        module._compiled_call_impl = None


def capture_graph(call: Callable[[], Any]) -> Callable[[], None]:
    """``call`` (static inputs) captured into a torch.cuda.CUDAGraph after warm-up on a side stream; its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def _quantiles(times_ms: list[float]) -> dict[str, float]:
    if len(times_ms) == 1:
        low = median = high = times_ms[0]
    else:
        low, median, high = statistics.quantiles(times_ms, n=4, method="inclusive")
    return {"median_ms": median, "p25_ms": low, "p75_ms": high, "iqr_ms": high - low, "min_ms": min(times_ms)}


def timed(bench: ModelBench, call: Callable[[], Any]) -> dict[str, Any]:
    """Median and IQR of ``--repeats`` calls after ``--warmup`` (CUDA events on CUDA), and their peak memory."""
    device, args = bench.device, bench.args
    for _ in range(args.warmup):
        call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = call_times_ms(call, args.repeats, device)
    return _quantiles(times) | {"repeats": args.repeats, "peak_memory_gib": bench.peak_memory_gib()}


#: Kernel categories by name, checked in order (flash/fmha kernels carry "gemm" in their names too,
#: inductor's fused elementwise kernels the names of the ops they follow, such as addmm).
KERNEL_CATEGORIES = (
    ("other", re.compile(r"^triton_(poi|red|per)_")),  # inductor's fused pointwise/reduction kernels
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("gemm/conv", re.compile(r"gemm|gemv|matmul|cutlass|xmma|nvjet|tinygemm|conv|fprop|wgmma|_mm|mm_|addmm|triton_tem|"
                             r"sm\d\d_|cublas|cudnn|int4pack|scaled_mm|linear", re.I)),
)  # fmt: skip


def kernel_category(name: str) -> str:
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


class KernelTime(NamedTuple):
    """One kernel's self time over a profiled call, in µs, and how many times it ran."""

    us: float
    calls: int


def kernel_times_us(call: Callable[[], Any], device: torch.device) -> dict[str, KernelTime]:
    """Self time and launch count of each kernel of one call (CUDA kernels on CUDA; aten ops on the CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    with profile(activities=[activity]) as profiler:
        call()
        synchronize(device)
    times: dict[str, KernelTime] = {}
    for event in profiler.key_averages():
        if event.device_type == kind:
            us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
            before = times.get(event.key, KernelTime(0.0, 0))
            times[event.key] = KernelTime(before.us + us, before.calls + event.count)
    return {name: time for name, time in times.items() if time.us > 0}


def kernel_summary(times: dict[str, KernelTime], flops: FlopCount) -> dict[str, Any]:
    """Time per kernel category, achieved TFLOP/s of the GEMM/conv and attention kernels, and every kernel, slowest
    first, with its launch count (``by_kernel``: all of them, so that two rows' lists set side by side account for
    the whole difference, ``bench/kernel_diff.py``; older results kept the 40 slowest, as ``top``)."""
    total = sum(time.us for time in times.values())
    by_category: dict[str, float] = {}
    for name, time in times.items():
        by_category[kernel_category(name)] = by_category.get(kernel_category(name), 0.0) + time.us

    def tflops(flop: int, us: float) -> float | None:
        return flop / (us * 1e-6) / 1e12 if us else None

    ranked = sorted(times.items(), key=lambda item: -item[1].us)
    return {
        "kernel_time_ms": total / 1000,
        "time_share": {category: us / total for category, us in by_category.items()} if total else {},
        "gemm_conv_tflops": tflops(flops.layer_total, by_category.get("gemm/conv", 0.0)),
        "attention_tflops": tflops(flops.attention, by_category.get("attention", 0.0)),
        "by_kernel": [
            {
                "name": name[:160],
                "ms": time.us / 1000,
                "calls": time.calls,
                "share": time.us / total,
                "category": kernel_category(name),
            }
            for name, time in ranked
        ],
    }


def profiled_kernels(call: Callable[[], Any], device: torch.device, flops: FlopCount) -> dict[str, Any]:
    """:func:`kernel_summary` of one profiled call, or why the profiler could not run (CUPTI refused)."""
    try:
        return kernel_summary(kernel_times_us(call, device), flops)
    except Exception as error:  # the latency stands without a kernel breakdown
        return {"error": f"torch.profiler failed: {type(error).__name__}: {error}"}


def _peak_tflops(run: Callable[[], Any], flops: int, device: torch.device, repeats: int = 10) -> float:
    for _ in range(3):
        run()
    synchronize(device)
    return flops / (statistics.median(call_times_ms(run, repeats, device)) / 1000) / 1e12


#: The ``peaks.json`` entry of each compute format (:attr:`Row.compute_format`), and how the table names it.
PEAK_KEYS = {"bf16": "bf16_tflops", "fp8": "fp8_rowwise_tflops", "int8": "int8_tops"}
PEAK_LABELS = {"bf16": "bf16", "fp8": "fp8 row-wise", "int8": "int8"}


def peak_kernels(size: int, device: torch.device) -> dict[str, Callable[[], Any]]:
    """The peak probes on ``size``³ under their ``PEAK_KEYS``: bf16 ``torch.mm``, fp8 e4m3
    ``torch._scaled_mm`` with row-wise scales, int8 ``torch._int_mm``."""
    generator = torch.Generator(device=device).manual_seed(0)

    def random(dtype: torch.dtype) -> Tensor:
        return torch.randn(size, size, device=device, generator=generator).to(dtype)

    a_bf16, b_bf16 = random(torch.bfloat16), random(torch.bfloat16)
    a_fp8, b_fp8 = random(torch.float8_e4m3fn), random(torch.float8_e4m3fn).t()  # column-major right operand
    row_scale = torch.ones(size, 1, device=device)
    column_scale = torch.ones(1, size, device=device)
    a_int8 = torch.randint(-128, 128, (size, size), device=device, dtype=torch.int8)
    b_int8 = torch.randint(-128, 128, (size, size), device=device, dtype=torch.int8).t()
    return {
        PEAK_KEYS["bf16"]: lambda: torch.mm(a_bf16, b_bf16),
        PEAK_KEYS["fp8"]: lambda: torch._scaled_mm(
            a_fp8, b_fp8, scale_a=row_scale, scale_b=column_scale, out_dtype=torch.bfloat16
        ),
        PEAK_KEYS["int8"]: lambda: torch._int_mm(a_int8, b_int8),
    }


def measure_peaks(device: torch.device, size: int) -> dict[str, Any]:
    """Achieved TFLOP/s (TOPS for int8) of each peak probe on a ``size``³ product; errors say why not."""
    peaks: dict[str, Any] = {"size": size, "errors": {}}
    try:
        probes = peak_kernels(size, device)
    except Exception as error:  # fp8 dtypes missing from an old torch
        return peaks | {"errors": {"setup": f"{type(error).__name__}: {error}"}}
    for name, run in probes.items():
        try:
            peaks[name] = _peak_tflops(run, 2 * size**3, device)
        except Exception as error:  # e.g. fp8 _scaled_mm below sm 8.9
            peaks[name] = None
            peaks["errors"][name] = f"{type(error).__name__}: {error}"
    return peaks
