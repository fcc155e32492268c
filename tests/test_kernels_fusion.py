"""Under torch.compile a converted layer's activation quantization fuses into the kernel that produces its input.

Read from the Triton kernels inductor generates for a DiT block converted to W8A8-FP8: a kernel that stores float8
and fuses no operation but the quantization's own (scale, clamp, cast, views) is a standalone quantize pass that
rereads a bf16 activation. There is at most one: the attention output's for ``to_out``, whose producer, the fused
SDPA, is not a Triton kernel. Every other quantization sits in its producer: the adaLN LayerNorm and modulation,
GELU, SiLU. (A kernel that only broadcasts the static scale to the GEMM's row-wise scale vector stores no float8.)
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from dmquant import api
from dmquant.calib.record import CalibrationSet
from dmquant.config import load_recipe
from dmquant.kernels.convert import convert_model
from dmquant.kernels.dispatch import load_kernels

DEVICE = "cuda"


class Block(torch.nn.Module):
    """A DiT block (adaLN-Zero) called as ``f(x, t, class_labels=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = BasicTransformerBlock(256, 4, 64, norm_type="ada_norm_zero", num_embeds_ada_norm=1000)

    def forward(self, x, t, class_labels):
        return self.block(x, timestep=t, class_labels=class_labels)


#: ATen operations of a quantize pass itself: the scale's reciprocal, the multiply, the clamp, the cast, and the views
#: and scale preparation inductor lists with the ``_scaled_mm`` it feeds.
QUANTIZE_OPS = {"_to_copy", "reciprocal", "mul", "clamp", "t", "expand", "clone", "select", "_scaled_mm", "view",
                "transpose", "permute", "reshape", "unsqueeze", "squeeze"}  # fmt: skip

_KERNEL = re.compile(
    r"Original ATen: \[([^\]]*)\]\n(?:#[^\n]*\n|[ \t]*\n)*(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)'''",
    re.S,
)


def _inductor_kernels(model, *args) -> dict[str, tuple[set[str], bool]]:
    """Each Triton kernel inductor generates for ``model``: its ATen operations, and whether it stores float8."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    _, sources = run_and_get_code(compiled, *args)
    kernels = {}
    for source in sources:
        for ops, name, body in _KERNEL.findall(source):
            kernels[name] = ({op.strip().removeprefix("aten.") for op in ops.split(",")}, "float8" in body)
    return kernels


@pytest.mark.gpu
def test_a_compiled_fp8_block_has_no_standalone_quantize_kernel():
    load_kernels()
    torch.manual_seed(0)
    model = Block().to(DEVICE).eval()
    x = torch.randn(4, 256, 256, device=DEVICE)
    t = torch.randint(0, 1000, (4,), device=DEVICE)
    labels = torch.randint(0, 1000, (4,), device=DEVICE)
    calibration = CalibrationSet(samples=x, timesteps=t, step_indices=torch.zeros(4, dtype=torch.long, device=DEVICE),
                                 cond={"class_labels": labels}, num_inference_steps=1)  # fmt: skip
    config = load_recipe("minmax").with_bits("fp8_e4m3", "fp8_e4m3")
    config = dataclasses.replace(
        config, attention=dataclasses.replace(config.attention, enabled=False)
    )  # the projections only
    converted = convert_model(api.quantize(copy.deepcopy(model), config, calibration, progress=False))
    converted = converted.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        kernels = _inductor_kernels(converted, x, t, labels)
    listing = "\n".join(f"{name}: {sorted(ops)}{' -> fp8' if fp8 else ''}" for name, (ops, fp8) in kernels.items())
    quantizing = {name: ops for name, (ops, fp8) in kernels.items() if fp8}
    standalone = [name for name, ops in quantizing.items() if ops <= QUANTIZE_OPS]
    assert len(standalone) <= 1, listing
    for producer in ("native_layer_norm", "gelu", "silu"):
        assert any(producer in ops for ops in quantizing.values()), f"no quantization fused into {producer}:\n{listing}"
