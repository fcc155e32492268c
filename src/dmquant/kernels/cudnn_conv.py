"""W8A8-FP8 convolutions on cuDNN (Hopper), each shape's engine configuration autotuned.

A converted Conv2d with fp8 e4m3 weights (per output channel) and a static per-tensor fp8 activation scale computes

    y[b, n, oh, ow] = s_x · s_w[n] · Σ_{c, kh, kw} x_q[b, c, ·, ·] · W_q[n, c, kh, kw] + bias[n]

(:mod:`~dmquant.kernels.triton_conv` writes the same sum as an implicit GEMM). This module runs it as one cuDNN
graph: ``conv_fprop`` on the fp8 codes with float accumulation, then the two dequantization scales and the bias
as pointwise epilogue nodes, the output written in the model's dtype. Input and output are NHWC (the A operand of
:func:`~dmquant.kernels.operands.quantize_activations` and the channels_last output the Triton kernels write); the
weight is read in place, since its (Cout, KH·KW·Cin) codes with K ordered ``(kh, kw, cin)`` are cuDNN's KRSC filter
layout.

Why by hand: torch has no fp8 convolution, and cuDNN's is reached only through the graph API of
``nvidia-cudnn-frontend``. Its heuristic's first engine configuration is often not the fastest (the first picks
ran at 0.19–1.09× of bf16 cuDNN on SDXL's shapes on an H200), so the first plans of its ranking are timed once per
shape and device and the fastest kept, in the decision cache (:func:`_plan`). :mod:`~dmquant.kernels.paths` then
times that against the Triton kernel and bf16 for each layer, as for any candidate.

The call is the torch custom op ``dmquant::cudnn_fp8_conv2d`` (compiled graphs keep it opaque; CUDA graphs capture
it once the shape's plan exists: the first call of a shape builds and autotunes, outside any capture).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable

import torch
from torch import Tensor

from .decision_cache import cache_dir, merge_entries, read_entries

#: Whether nvidia-cudnn-frontend is installed (read once: torch.compile cannot trace the lookup).
CUDNN_FRONTEND_AVAILABLE = importlib.util.find_spec("cudnn") is not None
#: Plans autotuned per shape: the first of cuDNN's ranking (its heuristics, then the fallback list). Building a
#: runtime-fusion plan compiles a kernel, so all of them would cost seconds per shape.
AUTOTUNE_PLANS = 8
#: The decision cache's file (:mod:`~dmquant.kernels.decision_cache`) of the plan chosen for each shape, so that a
#: later process builds that plan alone.
PLAN_FILE = "cudnn-conv-plans.json"
#: Timed executions of each plan when autotuning a shape (after one untimed).
AUTOTUNE_CALLS = 10


def takes(x: Tensor, groups: int) -> bool:
    """Whether cuDNN's FP8 convolution may run this call: CUDA input on Hopper, ``groups == 1``, the frontend
    installed (whether cuDNN builds the shape is found when it is first planned)."""
    return CUDNN_FRONTEND_AVAILABLE and x.is_cuda and groups == 1 and torch.cuda.get_device_capability(x.device)[0] == 9


def _data_type(dtype: torch.dtype):
    import cudnn

    return {
        torch.bfloat16: cudnn.data_type.BFLOAT16,
        torch.float16: cudnn.data_type.HALF,
        torch.float32: cudnn.data_type.FLOAT,
        torch.float8_e4m3fn: cudnn.data_type.FP8_E4M3,
    }[dtype]


def _nhwc_strides(channels: int, height: int, width: int) -> list[int]:
    """Strides of an NCHW-indexed tensor stored NHWC (channels_last), as cuDNN takes its dims and strides."""
    return [height * width * channels, 1, width * channels, channels]


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@functools.cache
def _handle(device_index: int):
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


def _graph(batch, height, width, channels, out_channels, window, bias_dtype, out_dtype, handle):
    """The cuDNN graph of one shape (validated, its plans ranked) and its tensors by role; RuntimeError where cuDNN
    supports no such graph."""
    import cudnn

    kh, kw, sh, sw, ph, pw, dh, dw = window
    out_h, out_w = output_size(height, kh, sh, ph, dh), output_size(width, kw, sw, pw, dw)
    graph = cudnn.pygraph(
        io_data_type=_data_type(out_dtype),
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    fp8, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    x = graph.tensor(name="x", dim=[batch, channels, height, width],
                     stride=_nhwc_strides(channels, height, width), data_type=fp8)  # fmt: skip
    w = graph.tensor(name="w", dim=[out_channels, channels, kh, kw],
                     stride=_nhwc_strides(channels, kh, kw), data_type=fp8)  # fmt: skip
    per_channel = {"dim": [1, out_channels, 1, 1], "stride": [out_channels, 1, 1, 1]}
    x_scale = graph.tensor(name="x_scale", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    w_scale = graph.tensor(name="w_scale", **per_channel, data_type=fp32)
    y = graph.conv_fprop(image=x, weight=w, padding=[ph, pw], stride=[sh, sw], dilation=[dh, dw],
                         compute_data_type=fp32, name="conv")  # fmt: skip
    y = graph.mul(a=graph.mul(a=y, b=x_scale, name="descale_x"), b=w_scale, name="descale_w")
    bias = None
    if bias_dtype is not None:
        bias = graph.tensor(name="bias", **per_channel, data_type=_data_type(bias_dtype))
        y = graph.add(a=y, b=bias, name="bias")
    y.set_output(True).set_data_type(_data_type(out_dtype))
    y.set_dim([batch, out_channels, out_h, out_w]).set_stride(_nhwc_strides(out_channels, out_h, out_w))
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
    except Exception as error:  # cudnn raises its own error types for graphs it does not support
        raise RuntimeError(f"cuDNN builds no FP8 convolution of this shape: {error}") from error
    return graph, {"x": x, "w": w, "x_scale": x_scale, "w_scale": w_scale, "bias": bias, "y": y}


def _fastest_plan(graph, pack: dict, handle, device: torch.device) -> tuple[int, Tensor]:
    """The index of the fastest of the first :data:`AUTOTUNE_PLANS` ranked plans of ``graph``, each built, executed
    once and timed over :data:`AUTOTUNE_CALLS` calls on ``pack``'s buffers, and its workspace; a plan that fails to
    build or execute is skipped, RuntimeError where none runs."""
    import cudnn

    best, best_ms, errors = -1, float("inf"), []
    with torch.cuda.device(device):
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        for index in range(min(graph.get_execution_plan_count(), AUTOTUNE_PLANS)):
            try:
                graph.build_plan_at_index(index)
                workspace = torch.empty(graph.get_workspace_size_plan_at_index(index), dtype=torch.uint8, device=device)
                graph.execute_plan_at_index(pack, workspace, index=index, handle=handle)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(AUTOTUNE_CALLS):
                    graph.execute_plan_at_index(pack, workspace, index=index, handle=handle)
                end.record()
                end.synchronize()
            except Exception as error:  # a plan may build and still refuse to run this shape
                errors.append(f"plan {index}: {error}")
                continue
            if start.elapsed_time(end) < best_ms:
                best, best_ms = index, start.elapsed_time(end)
    if best < 0:
        raise RuntimeError(f"no cuDNN plan runs this FP8 convolution: {'; '.join(errors) or 'none ranked'}")
    return best, torch.empty(graph.get_workspace_size_plan_at_index(best), dtype=torch.uint8, device=device)


def _is_index(value) -> bool:
    return isinstance(value, int) and value >= 0


def _chosen_plan(graph, probe: Callable[[], dict], handle, device: torch.device, key: str) -> tuple[int, Tensor]:
    """The plan of ``graph`` to run and its workspace: the one the decision cache holds for ``key`` where it still
    builds, else :func:`_fastest_plan`'s on the buffers ``probe()`` makes, which the cache then keeps."""
    path = cache_dir() / PLAN_FILE
    known = read_entries(path, _is_index).get(key)
    if known is not None and known < graph.get_execution_plan_count():
        try:
            graph.build_plan_at_index(known)
            return known, torch.empty(graph.get_workspace_size_plan_at_index(known), dtype=torch.uint8, device=device)
        except Exception:  # a plan that no longer builds (another cuDNN behind the same versions): autotune again
            pass
    best, workspace = _fastest_plan(graph, probe(), handle, device)
    merge_entries(path, {key: best}, _is_index)
    return best, workspace


def _plan_key(shape: tuple, device: int) -> str:
    """What a plan choice depends on: the shape, the GPU and the cuDNN libraries."""
    import cudnn

    try:
        frontend = importlib.metadata.version("nvidia-cudnn-frontend")
    except importlib.metadata.PackageNotFoundError:
        frontend = "unknown"
    versions = {"gpu": torch.cuda.get_device_name(device), "cudnn": cudnn.backend_version(), "frontend": frontend}
    return json.dumps(versions | {"shape": [str(part) for part in shape]}, sort_keys=True)


@functools.cache
def _plan(
    batch: int,
    height: int,
    width: int,
    channels: int,
    out_channels: int,
    window: tuple[int, ...],
    bias_dtype: torch.dtype | None,
    out_dtype: torch.dtype,
    device: int,
):
    """One shape's graph, its tensors, its plan (:func:`_chosen_plan`, timed on random operands) and that plan's
    workspace, made once per shape and device in a process."""
    handle = _handle(device)
    graph, tensors = _graph(batch, height, width, channels, out_channels, window, bias_dtype, out_dtype, handle)
    kh, kw, sh, sw, ph, pw, dh, dw = window
    on = {"device": torch.device("cuda", device)}
    out_h, out_w = output_size(height, kh, sh, ph, dh), output_size(width, kw, sw, pw, dw)

    def probe() -> dict:
        """Random operands of the shape, to time plans on."""
        pack = {
            tensors["x"]: torch.randn(batch, height, width, channels, **on).to(torch.float8_e4m3fn),
            tensors["w"]: torch.randn(out_channels, kh * kw * channels, **on).to(torch.float8_e4m3fn),
            tensors["x_scale"]: torch.ones(1, **on),
            tensors["w_scale"]: torch.ones(out_channels, **on),
            tensors["y"]: torch.empty(batch, out_h, out_w, out_channels, dtype=out_dtype, **on),
        }
        if bias_dtype is not None:
            pack[tensors["bias"]] = torch.zeros(out_channels, dtype=bias_dtype, **on)
        return pack

    key = _plan_key((batch, height, width, channels, out_channels, window, bias_dtype, out_dtype), device)
    best, workspace = _chosen_plan(graph, probe, handle, on["device"], key)
    return graph, tensors, best, workspace


@torch.library.custom_op("dmquant::cudnn_fp8_conv2d", mutates_args=())
def cudnn_fp8_conv2d(
    a: Tensor, w: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
    window: list[int],
) -> Tensor:  # fmt: skip
    """The convolution of the (B, H, W, Cin) fp8 codes ``a`` (NHWC, contiguous) with the (Cout, KH·KW·Cin) fp8
    weight codes ``w``, dequantized by the (1,) ``x_scale`` and (Cout,) ``w_scale`` (float32), plus ``bias``.
    ``window`` is ``[kh, kw, sh, sw, ph, pw, dh, dw]``. Returns the (B, Ho, Wo, Cout) output, contiguous."""
    import cudnn

    batch, height, width, channels = a.shape
    kh, kw, sh, sw, ph, pw, dh, dw = window
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    bias_dtype = None if bias is None else bias.dtype
    shape = (batch, height, width, channels, w.shape[0], tuple(window), bias_dtype, out_dtype, device)
    graph, tensors, best, workspace = _plan(*shape)
    out = torch.empty(batch, output_size(height, kh, sh, ph, dh), output_size(width, kw, sw, pw, dw), w.shape[0],
                      dtype=out_dtype, device=a.device)  # fmt: skip
    pack = {
        tensors["x"]: a.contiguous(),
        tensors["w"]: w,
        tensors["x_scale"]: x_scale.reshape(1).float(),
        tensors["w_scale"]: w_scale.reshape(-1).float().contiguous(),
        tensors["y"]: out,
    }
    if bias is not None:
        pack[tensors["bias"]] = bias.contiguous()
    handle = _handle(device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(a.device).cuda_stream)
    graph.execute_plan_at_index(pack, workspace, index=best, handle=handle)
    return out


@cudnn_fp8_conv2d.register_fake
def _(a, w, x_scale, w_scale, bias, out_dtype, window):
    kh, kw, sh, sw, ph, pw, dh, dw = window
    batch, height, width, _ = a.shape
    out_h, out_w = output_size(height, kh, sh, ph, dh), output_size(width, kw, sw, pw, dw)
    return a.new_empty(batch, out_h, out_w, w.shape[0], dtype=out_dtype)
