"""Under torch.compile a converted layer's activation quantization fuses into the kernel that produces its input:
a compiled DiT block converted to W8A8-FP8 generates at most one Triton kernel more than the same block in bf16
(a standalone quantize pass would be one more per quantized input). The one: the attention output's quantization
for ``to_out``, whose producer, the fused SDPA, is not a Triton kernel (in bf16 its transpose back is a view)."""

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


def _inductor_kernels(model, *args) -> list[str]:
    """The names of the Triton kernels inductor generates for ``model`` (one per ``@triton.jit`` named ``triton_*``;
    a Triton kernel of dmquant's that the graph calls, a GEMM on a path measured faster, keeps its own name)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    _, sources = run_and_get_code(compiled, *args)
    names = [name for source in sources for name in re.findall(r"@triton\.jit\s*\ndef (\w+)", source)]
    return [name for name in names if name.startswith("triton_")]


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
    dense = model.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        bf16_kernels = _inductor_kernels(dense, x, t, labels)
        fp8_kernels = _inductor_kernels(converted, x, t, labels)
    listing = "\n".join(["fp8:", *fp8_kernels, "bf16:", *bf16_kernels])  # in full: pytest shortens a tuple's repr
    assert len(fp8_kernels) <= len(bf16_kernels) + 1, listing
