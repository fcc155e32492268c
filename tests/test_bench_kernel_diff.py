"""The speed bench's kernel list (every kernel, with its launches) and ``bench/kernel_diff.py``, which sets two rows'
lists side by side: checked on made-up kernel times whose differences are worked out by hand."""

from __future__ import annotations

import json

import pytest

from bench import kernel_diff
from bench.speed_measure import FlopCount, KernelTime, kernel_summary


def _record(row: str, times: dict[str, KernelTime]) -> dict:
    return {"model": "m", "row": row, "kernels": kernel_summary(times, FlopCount())}


BF16 = {
    "nvjet_sm90_tst_bf16_gemm": KernelTime(300.0, 4),
    "triton_poi_fused_gelu_mul_7": KernelTime(146.0, 2),
    "flash_fwd_kernel": KernelTime(100.0, 2),
    "triton_red_fused_native_layer_norm_0": KernelTime(50.0, 2),
}
FP8 = {
    "nvjet_sm90_qqtst_fp8_gemm": KernelTime(200.0, 4),
    "triton_poi_fused__to_copy_clamp_gelu_mul_7": KernelTime(120.0, 2),
    "flash_fwd_kernel": KernelTime(100.0, 2),
    "triton_red_fused_native_layer_norm_0": KernelTime(60.0, 2),
}


def test_the_kernel_summary_keeps_every_kernel_with_its_launches_slowest_first():
    summary = kernel_summary({f"triton_poi_fused_{i}": KernelTime(float(i), i) for i in range(1, 51)}, FlopCount())
    listed = summary["by_kernel"]
    assert len(listed) == 50 and [k["ms"] for k in listed] == [i / 1000 for i in range(50, 0, -1)]
    assert [k["calls"] for k in listed[:2]] == [50, 49] and summary["kernel_time_ms"] == pytest.approx(1.275)
    assert sum(k["share"] for k in listed) == pytest.approx(1.0)
    assert summary["time_share"] == {"other": pytest.approx(1.0)}


def test_the_difference_of_two_complete_lists():
    before, after = (kernel_diff.kernel_list(_record(row, times)) for row, times in (("bf16", BF16), ("fp8", FP8)))
    found = {d.name: d for d in kernel_diff.differences(before, after)}
    assert "flash_fwd_kernel" not in found  # same time, same launches
    gone, come = found["nvjet_sm90_tst_bf16_gemm"], found["nvjet_sm90_qqtst_fp8_gemm"]
    assert (gone.ms, gone.calls, gone.delta_ms) == ((0.3, 0.0), (4, 0), pytest.approx(-0.3))
    assert (come.ms, come.calls, come.delta_ms) == ((0.0, 0.2), (0, 4), pytest.approx(0.2))
    assert found["triton_red_fused_native_layer_norm"].delta_ms == pytest.approx(0.01)  # inductor's number dropped
    assert [d.name for d in kernel_diff.differences(before, after)][:2] == [gone.name, come.name]
    table = kernel_diff.render(before, after, rows=2)
    # gemm/conv 0.300 -> 0.200; other (gelu + norm) 0.196 -> 0.180; attention unchanged; all 0.596 -> 0.480
    assert "| gemm/conv | 0.300 | 0.200 | -0.100 |" in table
    assert "| other | 0.196 | 0.180 | -0.016 |" in table and "| attention | 0.100 | 0.100 | +0.000 |" in table
    assert "| all kernels | 0.596 | 0.480 | -0.116 |" in table
    assert "| 3 more kernels | | | | -0.016 |" in table  # -0.146 + 0.120 + 0.010
    assert "0.300 (4) | 0.000 (0) | -0.300 |" in table and kernel_diff.PARTIAL_NOTE not in table


def test_a_kernel_below_a_partial_lists_cut_is_unknown_not_absent():
    old = _record("bf16", BF16)
    old["kernels"]["top"] = [
        {key: value for key, value in k.items() if key != "calls"} for k in old["kernels"].pop("by_kernel")[:2]
    ]
    before, after = kernel_diff.kernel_list(old), kernel_diff.kernel_list(_record("fp8", FP8))
    found = {d.name: d for d in kernel_diff.differences(before, after)}
    norm = found["triton_red_fused_native_layer_norm"]  # below the cut of the old list
    assert norm.ms == (None, 0.06) and norm.delta_ms is None and norm.size == pytest.approx(0.06)
    assert found["nvjet_sm90_tst_bf16_gemm"].calls == (None, 0)
    table = kernel_diff.render(before, after)
    assert kernel_diff.PARTIAL_NOTE in table and "| not listed | 0.060 (2) | — |" in table
    assert "| other | 0.196 | 0.180 | -0.016 |" in table  # categories from the whole profile still


def test_the_command_prints_the_tables_and_refuses_a_result_without_kernels(tmp_path, capsys):
    paths = []
    for row, times in (("bf16", BF16), ("fp8", FP8)):
        paths.append(tmp_path / f"{row}.json")
        paths[-1].write_text(json.dumps(_record(row, times)))
    assert kernel_diff.main([str(p) for p in paths] + ["--rows", "1"]) == 0
    assert "| all kernels | 0.596 | 0.480 | -0.116 |" in capsys.readouterr().out
    unprofiled = tmp_path / "error.json"
    unprofiled.write_text(json.dumps({"model": "m", "row": "r", "kernels": {"error": "torch.profiler failed: CUPTI"}}))
    assert kernel_diff.main([str(paths[0]), str(unprofiled)]) == 2
    assert "torch.profiler failed: CUPTI" in capsys.readouterr().err


def test_inductor_kernels_fusing_the_same_ops_count_as_one_unless_their_numbers_are_kept():
    assert kernel_diff.ops_name("triton_red_fused_native_layer_norm_12") == "triton_red_fused_native_layer_norm"
    assert kernel_diff.ops_name("nvjet_sm90_tst_80x64_64x11_1x2_h_bz_TNN") == "nvjet_sm90_tst_80x64_64x11_1x2_h_bz_TNN"
    assert kernel_diff.ops_name("cudnn_generated_kernel0_0") == "cudnn_generated_kernel0_0"  # not inductor's
    record = _record("fp8", FP8 | {"triton_red_fused_native_layer_norm_3": KernelTime(40.0, 1)})
    merged = kernel_diff.kernel_list(record)
    assert merged.ms["triton_red_fused_native_layer_norm"] == pytest.approx(0.1)
    assert merged.calls["triton_red_fused_native_layer_norm"] == 3
    kept = kernel_diff.kernel_list(record, keep_numbers=True)
    assert kept.ms["triton_red_fused_native_layer_norm_3"] == pytest.approx(0.04)
    assert "triton_red_fused_native_layer_norm" not in kept.ms
