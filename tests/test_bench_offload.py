"""bench/offload_calibration.py: one run of the shrunk FLUX architecture on the CPU, its result file, its errors."""

from __future__ import annotations

import json

import pytest

from bench import offload_calibration

RUN = ["--tiny", "--units", "3", "--iterations", "4", "--activation-iterations", "2", "--samples", "4", "-q"]


def test_a_tiny_run_writes_phases_units_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("DMQUANT_GIT_COMMIT", "abc123")
    assert offload_calibration.main([*RUN, "--device", "cpu", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "flux-dev-w4a8-tiny.json").read_text())
    assert result["status"] == "ok" and result["git_commit"] == "abc123" and not result["representative"]
    assert result["settings"]["recipe"]["name"] == "q-diffusion" and result["settings"]["recipe"]["weight"]["bits"] == 4
    assert set(result["phases"]) == {"build", "cast", "ranges", "reconstruction"}
    assert [row["pass_name"] for row in result["units"]] == ["weights"] * 3 + ["activations"] * 3
    assert all(row["seconds"] >= 0 and row["peak_gpu_memory_gib"] is None for row in result["units"])
    summed = {(b["pass_name"], b["block"]): b["units"] for b in result["blocks"]}
    assert sum(summed.values()) == 6 and result["weight_bytes"] > 0
    assert {"device", "torch", "diffusers", "date"} <= result["environment"].keys()


def test_blocks_sum_the_units_of_each_transformer_block():
    units = [
        {"pass_name": "weights", "unit": "x_embedder", "seconds": 1.0, "peak_gpu_memory_gib": 2.0},
        {"pass_name": "weights", "unit": "transformer_blocks.0.attn.to_q", "seconds": 1.5, "peak_gpu_memory_gib": 3.0},
        {"pass_name": "weights", "unit": "transformer_blocks.0.ff.net.2", "seconds": 2.0, "peak_gpu_memory_gib": 4.0},
    ]
    first, second = offload_calibration.blocks_of(units)
    assert first == dict(pass_name="weights", block="x_embedder", units=1, seconds=1.0, peak_gpu_memory_gib=2.0)
    block = "transformer_blocks.0"
    assert second == dict(pass_name="weights", block=block, units=2, seconds=3.5, peak_gpu_memory_gib=4.0)


def test_the_full_architecture_without_a_gpu_is_a_clear_error(capsys):
    if offload_calibration.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        offload_calibration.parse_args([])
    assert "CUDA is not available here; --tiny runs on the CPU" in capsys.readouterr().err
