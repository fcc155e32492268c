"""A converted model's layers on the Triton kernels against their reference path, layer by layer.

Without CUDA the kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set before
they are imported) and the dispatch is told the CPU tensors may take them. This checks what the
kernel tests cannot: that conversion hands the kernels their operands right — the (kh, kw, cin)
weight order, shifted zero points, column sums, per-step activation parameters, split inputs.
fp8 and W4A16 need a GPU here (the interpreter mis-rounds e4m3 casts and has no bf16 dot).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dmquant import api  # noqa: E402
from dmquant.config import load_recipe  # noqa: E402
from dmquant.core.quantizer import set_step  # noqa: E402
from dmquant.denoiser import Denoiser  # noqa: E402
from dmquant.kernels import dispatch  # noqa: E402
from dmquant.kernels.convert import convert_model  # noqa: E402
from dmquant.kernels.layers import LowBitConv2d, LowBitLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer_inputs(model, calibration) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each converted layer's input and reference-path output in one forward pass on one sample."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            seen.setdefault(name, (args[0], output))

        return hook

    hooks = [
        module.register_forward_hook(keep(name))
        for name, module in model.named_modules()
        if isinstance(module, (LowBitLinear, LowBitConv2d))
    ]
    x, t, cond, _ = next(calibration.to(DEVICE).batches(1))
    with torch.no_grad():
        Denoiser(model)(x, t, cond)
    for hook in hooks:
        hook.remove()
    return seen


def _one_per_signature(model, recorded: dict) -> dict:
    """The first of the recorded layers of each kind, weight shape, input parts and input shape: the layers that
    repeat one of these hand the kernel the same operands (the interpreter runs each for seconds on the CPU)."""
    kept, seen = {}, set()
    for name, (x, expected) in recorded.items():
        module = model.get_submodule(name)
        weights = [part.weight for part in module.parts] if isinstance(module, LowBitConv2d) else [module.weight]
        key = (type(module), tuple(tuple(w.shape) for w in weights), tuple(x.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = (x, expected)
    return kept


@pytest.mark.slow
@pytest.mark.parametrize(
    ("weight_bits", "changes"),
    [(8, {}), (4, {"split_shortcut": True, "per_step_activations": True})],
    ids=["W8A8-INT8", "W4A8-split-per-step"],
)
def test_every_converted_layer_on_its_kernel_matches_its_reference_path(unet, calibration, weight_bits, changes):
    config = dataclasses.replace(load_recipe("minmax").with_bits(weight_bits, 8), **changes)
    converted = convert_model(api.quantize(unet.denoiser, config, calibration, progress=False)).to(DEVICE)
    set_step(converted, 2)  # per-step parameters: the kernels must read the current step's
    recorded = _layer_inputs(converted, calibration)
    assert len(recorded) > 20
    split = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "_runs_on_a_kernel", lambda mode, weight, x: mode == "int8")
        for name, (x, expected) in _one_per_signature(converted, recorded).items():
            module = converted.get_submodule(name)
            split += isinstance(module, LowBitConv2d) and len(module.parts) == 2
            with torch.no_grad():
                got = module(x)
            error = (got.float() - expected).norm() / expected.norm()
            assert error < 1e-3, f"{name}: relative error {error:.2e}"
    assert split or not changes.get("split_shortcut")


@pytest.mark.slow
def test_converted_layers_on_their_kernels_compile_into_one_graph(unet, calibration):
    """The kernels are custom ops (``dmquant::quantized_linear``, ``dmquant::quantized_conv2d``): torch.compile
    traces a converted block whole, the activation quantization in its graph, without a graph break. On a GPU the
    dispatch runs as it is (its choice of kernel traced too); on the CPU it is told the tensors may take them."""
    config = dataclasses.replace(load_recipe("minmax").with_bits(8, 8), split_shortcut=True)
    converted = convert_model(api.quantize(unet.denoiser, config, calibration, progress=False)).to(DEVICE)
    block = next(m for m in converted.modules() if type(m).__name__ == "ResnetBlock2D")
    x, t, cond, _ = next(calibration.to(DEVICE).batches(1))
    inputs = {}
    hook = block.register_forward_pre_hook(lambda module, args: inputs.setdefault("args", args))
    with torch.no_grad():
        Denoiser(converted)(x, t, cond)
    hook.remove()
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if DEVICE == "cpu":
            patch.setattr(dispatch, "_runs_on_a_kernel", lambda mode, weight, x: mode == "int8")
        eager = block(*inputs["args"])
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*inputs["args"])
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("weight_bits", [8, 4], ids=["W8A8-INT8", "W4A8"])
def test_a_model_converted_on_the_gpu_replays_in_a_cuda_graph(unet, calibration, weight_bits):
    """Quantized and converted where it runs (the parameters conversion creates are born on the GPU), the whole
    denoiser call captures into one CUDA graph: no host copy or sync in any converted layer."""
    config = load_recipe("minmax").with_bits(weight_bits, 8)
    on_gpu = calibration.to(DEVICE)
    converted = convert_model(api.quantize(copy.deepcopy(unet.denoiser).to(DEVICE), config, on_gpu, progress=False))
    assert all(buffer.is_cuda for buffer in converted.buffers())
    x, t, cond, _ = next(on_gpu.batches(1))
    denoiser = Denoiser(converted)
    with torch.no_grad():
        eager = denoiser(x, t, cond)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            denoiser(x, t, cond)  # the Triton kernels autotune outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = denoiser(x, t, cond)
        graph.replay()
    torch.testing.assert_close(captured, eager)
