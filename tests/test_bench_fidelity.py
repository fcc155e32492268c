"""bench/fidelity.py: the single-call error, and one CPU run, where conversion must be exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bench import fidelity
from dmquant.api import quantize
from dmquant.config import load_recipe
from dmquant.denoiser import Denoiser
from dmquant.kernels.convert import convert_model


def test_single_call_error_is_zero_on_the_reference_path_and_the_norm_ratio_otherwise(unet, calibration):
    simulated = quantize(unet.denoiser, load_recipe("minmax"), calibration, progress=False)
    assert fidelity.denoiser_relative_error(simulated, convert_model(simulated), calibration) == 0.0
    perturbed = copy.deepcopy(simulated)
    with torch.no_grad():
        perturbed.conv_out.bias += 0.01
    x, t, cond, steps = next(calibration.batches(fidelity.CALL_ROWS))
    rows = steps == steps[0]
    with torch.no_grad():
        expected, got = (
            Denoiser(m)(x[rows], t[rows], {k: c[rows] for k, c in cond.items()}) for m in (simulated, perturbed)
        )
    direct = ((got - expected).norm() / expected.norm()).item()
    assert fidelity.denoiser_relative_error(simulated, perturbed, calibration) == pytest.approx(direct)
    assert direct > 0


@pytest.mark.slow
def test_a_cpu_run_converts_exactly_and_writes_its_cell(tmp_path):
    argv = ["--models", "ddpm-glyphs32", "--formats", "w8a8-int8", "--num-samples", "2", "--steps", "2",
            "--device", "cpu", "--results", str(tmp_path)]  # fmt: skip
    assert fidelity.main(argv) == 0
    cell = json.loads((tmp_path / "ddpm-glyphs32" / "w8a8-int8.json").read_text())
    assert cell["psnr_converted_vs_simulated_db"] is None and cell["meets_bound"]  # identical samples
    assert cell["denoiser_relative_error"] == 0.0 and cell["floor_psnr_db"] is None
    assert cell["conversion"]["converted"] and cell["environment"]["device"].startswith("CPU")
