"""FP8 attention: a converted model's Q·Kᵀ and softmax·V on cuDNN's FP8 flash attention (Hopper).

A diffusers ``Attention`` (SD3's joint one and FLUX's ``FluxAttention`` too) quantized for FP8 attention
(``attention: {bits: fp8_e4m3, softmax_bits: fp8_e4m3}``: Q, K and V in fp8 e4m3 with calibrated per-tensor
scales, Q-Diffusion's attention quantizers, Li et al. 2023, Sec. 4.3) computes, simulated
(:mod:`dmquant.core.attention`)::

    S = Q_q · K_qᵀ · scale        P = fp8(softmax(S))  on [0, 1]        O = fp8(P · V_q)  on V's scale

and that is the function of cuDNN's fused FP8 scaled-dot-product attention: the fp8 codes of Q, K, V
with their dequantization scales (``descale_q/k/v``), the probabilities quantized inside the kernel
(``scale_s = 1 / s_P``, ``descale_s = s_P``), and the output written in fp8 (``scale_o = 1 / s_V``:
Hopper's kernels write O in fp8 only), dequantized here by ``s_V``. One difference stays: the kernel
quantizes each block's ``exp(S − running max)`` before the final division by the row sum, the simulation
the normalised probabilities; in a float format the two differ by rounding alone (the fidelity
benchmark measures it), and the range [0, 1] holds both.

Why by hand: neither torch's ``scaled_dot_product_attention`` nor a wheel-installable attention library
takes fp8 operands on Hopper (FlashAttention-3's FP8 forward is built from source); cuDNN's kernel is
reached through ``nvidia-cudnn-frontend``'s graph API, which this module wraps: one graph per shape,
built once and kept, executed on the current stream as a torch custom op (``dmquant::fp8_sdpa``), so
that ``torch.compile`` fuses the quantization of Q, K, V into the operations producing them and CUDA
graphs capture the call.

The kernel runs where cuDNN takes the call (a Hopper GPU, head dimension up to 128, no attention mask, a
probability scale that keeps 1 representable); elsewhere, and on CPU, the processor computes the simulated
attention, bit for bit. cuDNN takes head dimensions that are multiples of 16: other widths (PixArt's and
DiT-XL/2's 72, SD-1.5's 40) run with each head zero-padded to the next multiple (:func:`pad_heads`), which leaves
Q·Kᵀ unchanged and gives V's padded columns a zero output, dropped after; the padding fuses into the
quantization of Q, K and V under ``torch.compile``.

The kernel is not faster than bf16 everywhere (1.38× torch's bf16 SDPA at FLUX's 4,608 tokens, 0.88× at SDXL's
1,024 on an H100, ``bench/results/attention-speed``), so a processor also has a ``"bf16"`` path: torch's SDPA on the
unquantized Q, K and V, as diffusers computes it (:func:`full_precision_attention`).
:func:`dmquant.kernels.paths.select_paths` times the two on the GPU for every call shape and keeps the faster.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.attention import (
    MATMUL_ATTRIBUTE,
    AttentionQuantizers,
    QuantAttnProcessor,
    QuantJointAttnProcessor,
    softmax_scale,
)
from ..core.primitives import FP8_E4M3
from .layers import KernelActivation

#: The attribute of a converted ``Attention`` that holds its :class:`Fp8AttentionScales`.
SCALES_ATTRIBUTE = "fp8_attention"
#: Head dimensions cuDNN's FP8 attention takes on Hopper: multiples of 16 up to 128 (others are padded up).
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 16, 128
#: Whether nvidia-cudnn-frontend is installed (read once: torch.compile cannot trace the lookup).
CUDNN_FRONTEND_AVAILABLE = importlib.util.find_spec("cudnn") is not None


class Fp8AttentionScales(nn.Module):
    """The per-tensor scales of an attention's fp8 operands, as the kernel reads them (device tensors, one per
    sampling-step slot, so that blocks differing only in their scales share one compiled graph)."""

    def __init__(self, quant: AttentionQuantizers) -> None:
        super().__init__()
        self.query = KernelActivation(quant.query)
        self.key = KernelActivation(quant.key)
        self.value = KernelActivation(quant.value)
        self.probs = KernelActivation(quant.probs)
        # per slot, read once here (a value read per call would sync the host and break compiled graphs)
        scales = self.probs.scale.tolist() if self.probs.scale is not None else []
        self.probs_hold_one = [scale * FP8_E4M3.max_value >= 1.0 for scale in scales]

    @property
    def operands(self) -> tuple[KernelActivation, ...]:
        return self.query, self.key, self.value, self.probs

    @property
    def runs_on_kernel(self) -> bool:
        """Q, K, V and P in fp8 e4m3 with per-tensor scales at the current step, P's range holding 1."""
        if any(operand.mode != "fp8" for operand in self.operands):
            return False
        return self.probs_hold_one[self.probs.quantizer.slot()]


def is_fp8_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` is a quantized attention whose matmuls are FP8 attention (fp8 softmax output)."""
    quant = getattr(attn, MATMUL_ATTRIBUTE, None)
    return isinstance(quant, AttentionQuantizers) and quant.fp8_attention


def padded_head_dim(head_dim: int) -> int | None:
    """The head dimension cuDNN's kernel runs a head of ``head_dim`` at: the next multiple of
    :data:`HEAD_DIM_MULTIPLE`; None above :data:`MAX_HEAD_DIM`."""
    if head_dim > MAX_HEAD_DIM:
        return None
    return -(-head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def pad_heads(x: Tensor, heads: int, padded: int) -> Tensor:
    """``(batch, tokens, heads·dim)`` rows as ``(batch, tokens, heads·padded)``, each head's channels followed by
    zeros (``x`` itself where ``dim == padded``)."""
    head_dim = x.shape[-1] // heads
    if head_dim == padded:
        return x
    return F.pad(x.unflatten(-1, (heads, head_dim)), (0, padded - head_dim)).flatten(-2)


def unpad_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """The inverse of :func:`pad_heads`: each head's first ``head_dim`` channels."""
    if x.shape[-1] == heads * head_dim:
        return x
    return x.unflatten(-1, (heads, -1))[..., :head_dim].flatten(-2)


def takes(query: Tensor, key: Tensor, heads: int, attention_mask: Tensor | None, attn_scale: float) -> bool:
    """Whether cuDNN's FP8 attention computes this call: ``(batch, tokens, heads·dim)`` CUDA operands on Hopper, of a
    shape whose graph cuDNN builds (tried once per shape)."""
    if not (CUDNN_FRONTEND_AVAILABLE and query.is_cuda and attention_mask is None):
        return False
    if query.dim() != 3 or key.shape[-1] != query.shape[-1] or query.shape[-1] % heads:
        return False
    padded = padded_head_dim(query.shape[-1] // heads)
    if torch.cuda.get_device_capability(query.device)[0] != 9 or padded is None:
        return False
    batch, q_tokens, _ = query.shape
    shape = concrete((batch, heads, q_tokens, key.shape[1], padded))
    return _builds(*shape, attn_scale, _device_index(query))


def concrete(sizes: tuple) -> tuple[int, ...]:
    """``sizes`` as plain ints. Under ``torch.compile`` with symbolic sizes (``dynamic=True``, or the automatic
    dynamic shapes of a recompile for a new shape) this specializes the graph to the sizes of the call (dynamo
    guards on them), since cuDNN's graph is planned per concrete shape at trace time; a new shape recompiles."""
    return tuple(operator.index(size) for size in sizes)


def _device_index(x: Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


@torch._dynamo.assume_constant_result  # compiled: answered at trace time, the shape is fixed in the graph
def _builds(*shape) -> bool:
    """Whether cuDNN builds the graph of this shape (some shapes have no engine); the refusal is warned once.

    A plain function around the cached one: dynamo looks through a ``functools.cache`` wrapper, and would then
    trace the graph build (a graph break at every attention) instead of taking the answer as a constant."""
    return _builds_once(*shape)


@functools.cache  # eager, answered once per shape: a refused graph is not rebuilt (nor warned) per call
def _builds_once(*shape) -> bool:
    try:
        _graph(*shape)
    except Exception as error:  # cudnn raises its own error types for unsupported graphs
        warnings.warn(f"cuDNN's FP8 attention refused {shape[:5]}: {error}; the simulated attention runs", stacklevel=3)
        return False
    return True


@functools.cache
def _handle(device_index: int):
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@functools.cache
def _graph(batch: int, heads: int, q_tokens: int, kv_tokens: int, head_dim: int, attn_scale: float, device: int):
    """cuDNN's FP8 SDPA forward for one shape: (graph, its input/output tensors), built once per shape."""
    import cudnn

    graph = cudnn.pygraph(
        io_data_type=cudnn.data_type.FP8_E4M3,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=_handle(device),
    )

    def operand(name: str, tokens: int):
        # (batch, heads, tokens, dim) over the (batch, tokens, heads·dim) rows the projections write
        dims = [batch, heads, tokens, head_dim]
        strides = [tokens * heads * head_dim, head_dim, heads * head_dim, 1]
        return graph.tensor(name=name, dim=dims, stride=strides, data_type=cudnn.data_type.FP8_E4M3)

    def scalar(name: str):
        return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)

    q, k, v = operand("q", q_tokens), operand("k", kv_tokens), operand("v", kv_tokens)
    scales = {name: scalar(name) for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
    out, _, amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v, **scales, is_inference=True, attn_scale=attn_scale, use_causal_mask=False, name="sdpa_fp8"
    )
    out_strides = [q_tokens * heads * head_dim, head_dim, heads * head_dim, 1]
    out.set_output(True).set_dim([batch, heads, q_tokens, head_dim]).set_stride(out_strides)
    out.set_data_type(cudnn.data_type.FP8_E4M3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, (q, k, v, out, amax_s, amax_o), scales


@torch.library.custom_op("dmquant::fp8_sdpa", mutates_args=())
def fp8_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    descale_q: Tensor,
    descale_k: Tensor,
    descale_v: Tensor,
    descale_s: Tensor,
    heads: int,
    attn_scale: float,
) -> Tensor:
    """``fp8(softmax(Q·Kᵀ·attn_scale)·V / s_V)`` from fp8 e4m3 ``(batch, tokens, heads·dim)`` operands and their
    one-element float32 dequantization scales; ``descale_s`` is the probabilities' scale. Returns O's fp8 codes on
    V's scale, ``(batch, q_tokens, heads·dim)``."""
    import cudnn

    batch, q_tokens, width = q.shape
    device = _device_index(q)
    graph, (tq, tk, tv, tout, tamax_s, tamax_o), scales = _graph(
        batch, heads, q_tokens, k.shape[1], width // heads, attn_scale, device
    )
    out = torch.empty_like(q)
    amax = torch.empty(2, dtype=torch.float32, device=q.device)
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=q.device)
    pack = {
        tq: q.contiguous(),
        tk: k.contiguous(),
        tv: v.contiguous(),
        tout: out,
        tamax_s: amax[0:1],
        tamax_o: amax[1:2],
        scales["descale_q"]: descale_q,
        scales["descale_k"]: descale_k,
        scales["descale_v"]: descale_v,
        scales["descale_s"]: descale_s,
        scales["scale_s"]: descale_s.reciprocal(),
        scales["scale_o"]: descale_v.reciprocal(),
    }
    handle = _handle(device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute(pack, workspace, handle=handle)
    return out


@fp8_sdpa.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, descale_s, heads, attn_scale):
    return torch.empty_like(q)


@dataclass(frozen=True)
class AttentionCall:
    """What the time of one attention call depends on: its shape, the softmax scale, the dtype, and whether cuDNN's
    FP8 kernel takes it."""

    batch: int
    heads: int
    q_tokens: int
    kv_tokens: int
    head_dim: int
    attn_scale: float
    dtype: str
    on_kernel: bool
    standalone: tuple[str, ...] = ()  # the operands whose quantization is a pass of its own: standalone_operands


def standalone_operands(attn: nn.Module) -> tuple[str, ...]:
    """Which of ``query``, ``key``, ``value`` reach the attention straight from their projection's GEMM, so that
    their fp8 quantization is a pass of its own even under ``torch.compile`` (a GEMM is not a kernel it fuses
    into). Joint attention (SD3, FLUX's double-stream blocks: added key/value projections) concatenates text and
    image tokens first, a kernel all three quantizations fuse into; otherwise a per-head norm (with FLUX's rotary
    embedding) takes Q's or K's, and V has none (SDXL's self-attention: all three)."""
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return ()
    norms = {"query": getattr(attn, "norm_q", None), "key": getattr(attn, "norm_k", None), "value": None}
    return tuple(name for name, norm in norms.items() if norm is None)


def full_precision_attention(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, heads: int, attn_scale: float
) -> Tensor:
    """``softmax(Q·Kᵀ·attn_scale + mask)·V`` by torch's SDPA on unquantized ``(batch, tokens, heads·dim)`` operands,
    as diffusers' processors compute it: the ``"bf16"`` path. A mask comes prepared for ``baddbmm``,
    ``(batch·heads, 1 or q_tokens, kv_tokens)``."""
    batch = query.shape[0]
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (query, key, value))
    if attention_mask is not None:
        attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn_scale)
    return out.transpose(1, 2).flatten(2).to(query.dtype)


class _Fp8Attend:
    """A quantized processor's attention on cuDNN's FP8 attention where it takes the call (:func:`takes`), reading
    the scales of ``attn.fp8_attention``; the simulated attention elsewhere.

    ``path`` is ``"fp8"`` (the above) or ``"bf16"`` (:func:`full_precision_attention`, set by
    :func:`dmquant.kernels.paths.select_paths` where it is the faster). While ``calls`` is a list, each call appends
    its :class:`AttentionCall`.
    """

    def __init__(self) -> None:
        self.path = "fp8"
        self.calls: list[AttentionCall] | None = None

    def attend(
        self,
        attn: nn.Module,
        quant: AttentionQuantizers,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
    ) -> Tensor:
        scales: Fp8AttentionScales = getattr(attn, SCALES_ATTRIBUTE)
        attn_scale = float(softmax_scale(attn))
        on_kernel = takes(query, key, attn.heads, attention_mask, attn_scale) and scales.runs_on_kernel
        if self.calls is not None:
            (batch, q_tokens, width), kv_tokens = query.shape, key.shape[1]
            dtype = str(query.dtype).removeprefix("torch.")
            shape = (batch, attn.heads, q_tokens, kv_tokens, width // attn.heads, attn_scale, dtype, on_kernel)
            self.calls.append(AttentionCall(*shape, standalone_operands(attn)))
        if self.path == "bf16":
            return full_precision_attention(query, key, value, attention_mask, attn.heads, attn_scale)
        if not on_kernel:
            return super().attend(attn, quant, query, key, value, attention_mask)
        from .operands import quantize_activations  # Triton: imported where a GPU call needs it

        (s_q, _), (s_k, _), (s_v, _), (s_p, _) = (operand.parameters_now() for operand in scales.operands)
        head_dim = query.shape[-1] // attn.heads
        padded = padded_head_dim(head_dim)
        operands = ((query, s_q), (key, s_k), (value, s_v))
        codes = [quantize_activations(pad_heads(x, attn.heads, padded), s, None, "fp8") for x, s in operands]
        out = torch.ops.dmquant.fp8_sdpa(*codes, s_q, s_k, s_v, s_p, attn.heads, attn_scale)
        return (unpad_heads(out, attn.heads, head_dim).float() * s_v).to(query.dtype)


class Fp8AttnProcessor(_Fp8Attend, QuantAttnProcessor):
    """:class:`~dmquant.core.attention.QuantAttnProcessor` on FP8 attention."""


class Fp8JointAttnProcessor(_Fp8Attend, QuantJointAttnProcessor):
    """:class:`~dmquant.core.attention.QuantJointAttnProcessor` on FP8 attention."""


#: The FP8 attention processor of each quantized processor.
FP8_PROCESSORS = {QuantAttnProcessor: Fp8AttnProcessor, QuantJointAttnProcessor: Fp8JointAttnProcessor}


def convert_attention(model: nn.Module) -> list[str]:
    """Give every FP8-attention module of ``model`` its kernel scales and FP8 attention processor; their names."""
    names = []
    for name, module in model.named_modules():
        if is_fp8_attention(module):
            setattr(module, SCALES_ATTRIBUTE, Fp8AttentionScales(getattr(module, MATMUL_ATTRIBUTE)))
            module.set_processor(FP8_PROCESSORS[type(module.processor)]())
            names.append(name)
    return names
