"""bench/speed.py: the cell matrix, resuming, time limits, FLOPs, weight bytes, the table, one CPU run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import common, configs, peers, speed, speed_measure, speed_rows, speed_run, speed_table, speed_workloads
from dmquant.api import info, quantize
from dmquant.calib.record import CalibrationSet
from dmquant.config import load_recipe
from dmquant.kernels.convert import convert_model


def test_cells_are_named_by_model_and_row_and_run_in_row_order():
    cells = speed_run.plan_cells(["dit-glyphs", "sd15-unet"], ["dmquant-w4a8", "bf16-eager"])
    assert [(cell.model, cell.row) for cell in cells] == [
        ("dit-glyphs", "bf16-eager"),
        ("dit-glyphs", "dmquant-w4a8"),
        ("sd15-unet", "bf16-eager"),
        ("sd15-unet", "dmquant-w4a8"),
    ]
    assert cells[1].path(Path("r")) == Path("r/dit-glyphs/dmquant-w4a8.json")


def test_a_row_whose_settings_are_all_deselected_is_left_out():
    rows = ["bf16-eager", "bf16-compiled", "bf16-compiled-cudagraphs", "int8-dynamic"]
    cells = speed_run.plan_cells(["dit-glyphs"], rows, settings=["eager"])
    assert [cell.row for cell in cells] == ["bf16-eager", "int8-dynamic"]


def test_pending_skips_finished_cells_and_retries_failed_ones(tmp_path):
    cells = speed_run.plan_cells(["dit-glyphs"], ["bf16-eager", "int8-dynamic", "dmquant-w8a8-int8"])
    for cell, status in zip(cells, ["ok", "unsupported", "failed"], strict=True):
        common.write_cell(cell.path(tmp_path), {"status": status})
    assert common.pending(cells, tmp_path, force=False) == cells[2:]
    assert common.pending(cells, tmp_path, force=True) == cells


def _time_limited(tmp_path, monkeypatch, models: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Args for ``models`` with one minute, estimates of 1 s per model but 10,000 s for SDXL, cells that
    run at once; and the list of the rows run."""
    ran = []
    monkeypatch.setattr(
        speed_run, "ESTIMATED_SECONDS", dict.fromkeys(speed_workloads.MODELS, 1) | {"sdxl-unet": 10_000}
    )
    monkeypatch.setattr(speed_run, "write_peaks", lambda args, command: None)
    monkeypatch.setattr(speed_run, "ModelBench", lambda model, args, rows: None)
    record = {"status": "ok", "reason": None, "metrics": {"median_ms": 1.0}}
    monkeypatch.setattr(
        speed_run, "run_cell", lambda bench, cell, *rest: ran.append(f"{cell.model}/{cell.row}") or record
    )
    argv = ["--models", *models, "--rows", "bf16-eager", "int8-dynamic", "--max-minutes", "1"]
    return speed.parse_args([*argv, "--results", str(tmp_path)]), ran


def test_a_model_that_would_not_finish_in_time_is_left_whole_for_the_next_run(tmp_path, monkeypatch, capsys):
    args, ran = _time_limited(tmp_path, monkeypatch, ["dit-glyphs", "sdxl-unet", "ldm-glyphs64"])
    assert speed_run.run_matrix(args, "cmd") == 2
    assert ran == ["dit-glyphs/bf16-eager", "dit-glyphs/int8-dynamic", "ldm-glyphs64/bf16-eager",
                   "ldm-glyphs64/int8-dynamic"]  # fmt: skip
    out = capsys.readouterr().out
    assert "sdxl-unet: left for the next run" in out and "2 cells left (time limit); run the same command" in out


def test_a_first_model_too_long_for_any_run_is_split_by_rows(tmp_path, monkeypatch, capsys):
    args, ran = _time_limited(tmp_path, monkeypatch, ["sdxl-unet", "dit-glyphs"])
    assert speed_run.run_matrix(args, "cmd") == 1
    assert ran == ["sdxl-unet/bf16-eager", "dit-glyphs/bf16-eager", "dit-glyphs/int8-dynamic"]
    assert "sdxl-unet: 1 rows left for the next run" in capsys.readouterr().out
    assert common.pending(speed_run.plan_cells(["sdxl-unet"], ["bf16-eager", "int8-dynamic"]), tmp_path, False) == [
        speed_run.Cell("sdxl-unet", "int8-dynamic")
    ]


class ConvThenLinear(nn.Module):
    """A stride-2 conv, a grouped conv and a Linear, called like a denoiser (``t`` ignored)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.linear = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.grouped(self.conv(x)).flatten(1))


def test_flop_counter_matches_a_hand_count_of_convs_and_a_linear():
    model, x = ConvThenLinear(), torch.randn(2, 3, 8, 8)
    count = speed_measure.count_flops(model, lambda: model(x, None))
    conv = 2 * (2 * 8 * 4 * 4) * (3 * 3 * 3)  # 2 · output elements · (in / groups) · k²
    grouped = 2 * (2 * 8 * 4 * 4) * (2 * 3 * 3)
    linear = 2 * 2 * 128 * 10  # 2 · rows · in · out
    assert count.layers["conv"].flops == conv and count.layers["grouped"].flops == grouped
    assert count.of_kind("linear") == linear and count.total == conv + grouped + linear
    assert count.attention == 0 and count.summary()["full_precision_fraction"] == 1.0


def test_attention_flops_are_both_matmuls_of_every_head():
    from diffusers.models.attention_processor import Attention

    attention = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    hidden, context = torch.randn(3, 10, 16), torch.randn(3, 7, 12)
    count = speed_measure.count_flops(attention, lambda: attention(hidden, encoder_hidden_states=context))
    assert count.attention == 2 * (2 * 3 * 10 * 7 * 16)  # Q·Kᵀ and P·V, each 2·B·N·M·(heads·dim_head)


@pytest.mark.parametrize("build", ["tiny_dit", "tiny_unet2d", "tiny_unet2d_condition"])
def test_flop_counter_agrees_with_torch_on_whole_diffusers_models(build):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dmquant.zoo import tiny

    model = getattr(tiny, build)()
    config = model.config
    x, t = torch.randn(2, config.in_channels, config.sample_size, config.sample_size), torch.tensor([1, 900])
    labels = torch.tensor([0, 1])
    cond = {"encoder_hidden_states": torch.randn(2, 4, 32)} if "condition" in build else {"class_labels": labels}
    ours = speed_measure.count_flops(model, lambda: model(x, t, **cond))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as torch_count:
        model(x, t, **cond)  # the math backend runs attention as bmm, which torch counts
    assert ours.total == torch_count.get_total_flops() and ours.attention > 0


def _converted(bits: int | str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """ConvThenLinear, and a copy quantized by minmax at ``bits`` and converted to low-bit layers."""
    torch.manual_seed(0)
    model, x = ConvThenLinear(), torch.randn(2, 3, 8, 8)
    config = load_recipe("minmax").with_bits(bits, bits)
    calibration = CalibrationSet(x, torch.zeros(2), torch.zeros(2, dtype=torch.long), {}, 1)
    quantized = quantize(model, config, calibration, progress=False)
    return model, convert_model(quantized), x


def test_converted_low_bit_layers_are_counted_as_the_layers_they_replace():
    model, converted, x = _converted(8)
    fp = speed_measure.count_flops(model, lambda: model(x, None))
    low_bit = speed_measure.count_flops(converted, lambda: converted(x, None))
    assert {name: layer.flops for name, layer in low_bit.layers.items()} == {
        name: layer.flops for name, layer in fp.layers.items()
    }
    assert {layer.precision for layer in low_bit.layers.values()} == {"low-bit"}
    assert low_bit.summary()["full_precision_layer_fraction"] == 0.0
    assert speed_measure.weight_bytes(converted) < speed_measure.weight_bytes(model) / 2


def test_casting_a_converted_model_keeps_the_low_bit_layers_as_their_kernels_take_them():
    _, converted, _ = _converted("fp8_e4m3")
    converted.head = nn.LayerNorm(10)
    speed_rows.cast_outside_low_bit_layers(converted, torch.bfloat16)
    assert converted.head.weight.dtype == torch.bfloat16
    assert converted.linear.weight.stored.dtype == torch.float8_e4m3fn
    assert converted.linear.weight.scale.dtype == torch.float32
    assert converted.linear.bias.dtype == torch.bfloat16  # every floating parameter: the model's dtype is bf16
    assert speed_rows.conversion_summary(converted)["converted"] == {"fp8": 3}
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    assert converted(x, None).dtype == torch.bfloat16  # the reference path takes a bf16 bias


def test_weight_bytes_count_a_torchao_tensor_subclass_at_its_real_storage():
    torchao = pytest.importorskip("torchao.quantization")
    linear = nn.Sequential(nn.Linear(128, 64))
    torchao.quantize_(linear, torchao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    stored = speed_measure.weight_bytes(linear)
    assert 128 * 64 + 64 * 4 <= stored < 128 * 64 + 64 * 4 + 1024  # int8 codes, fp32 bias, row scales


def test_torchao_rows_leave_out_the_linears_whose_products_the_int8_kernel_refuses(monkeypatch):
    pytest.importorskip("torchao")
    from dmquant.zoo import tiny

    model = tiny.tiny_dit()
    size, labels = model.config.sample_size, torch.tensor([0, 1])
    inputs = torch.randn(2, 4, size, size), torch.tensor([1, 900]), {"class_labels": labels}
    workload = speed_workloads.Workload(model, *inputs, "tiny DiT")
    bench = argparse.Namespace(workload=workload, dtype=torch.float32, device=torch.device("cpu"))
    # the copy taken for a CUDA model, where torch._int_mm refuses 16 rows or fewer
    monkeypatch.setattr(peers, "_device", lambda module: torch.device("cuda"))
    details = speed_rows.build_torchao(bench, speed_rows.ROWS["int8-dynamic"]).details
    pooled = 3 * model.config.num_layers + 1  # per block: timestep embedder (2) and adaLN; proj_out_1
    reason = "torch._int_mm needs more than 16 rows on CUDA; this layer sees M=2"
    assert {"layers": pooled, "reason": reason} in details["exclusions"]
    assert details["coverage"]["skipped"]["Linear"] == pooled
    assert details["coverage"]["quantized"]["Linear"] == peers.count_layers(model)["Linear"] - pooled


def test_w4_rows_quantize_weights_per_output_channel_which_every_layer_takes():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    config = configs.dmquant_config(speed_rows.ROWS["dmquant-w4a8"], model)
    assert config.weight.granularity_spec.kind == "channel"
    assert config.weight.bits == 4 and config.activation.bits == 8 and not config.attention.enabled
    fp8 = configs.dmquant_config(speed_rows.ROWS["dmquant-w8a8-fp8"], model)
    assert {rule.weight_bits for rule in fp8.rules} == {"fp8_e4m3"}


def test_the_linear_only_row_keeps_the_convolutions_in_full_precision_and_accumulates_fast():
    row = speed_rows.ROWS["dmquant-w8a8-fp8-linear-fast"]
    torch.manual_seed(0)
    model, x = ConvThenLinear(), torch.randn(2, 3, 8, 8)
    calibration = CalibrationSet(x, torch.zeros(2), torch.zeros(2, dtype=torch.long), {}, 1)
    quantized = quantize(model, configs.dmquant_config(row, model), calibration, progress=False)
    assert {(layer.kind, layer.quantized) for layer in info(quantized).report.layers} == {
        ("Linear", True),
        ("Conv2d", False),
    }
    converted = speed_rows.convert_for(row, quantized)
    assert isinstance(converted.conv, nn.Conv2d) and converted.linear.fast_accumulation
    assert not speed_rows.convert_for(speed_rows.ROWS["dmquant-w8a8-fp8"], quantized).linear.fast_accumulation


def _fake_cell(results: Path, model: str, row: str, **fields) -> None:
    cell = {"model": model, "row": row, "kind": speed_rows.ROWS[row].kind, "status": "ok", "representative": True}
    common.write_cell(results / model / f"{row}.json", cell | fields)


def test_table_lists_cells_in_model_and_row_order_with_reasons_for_the_rest(tmp_path):
    metrics = {"median_ms": 12.345, "speedup_vs_bf16_same_compile": 1.5, "peak_memory_gib": 3.21}
    metrics |= {"weight_mib": 1234.5, "tflops": 250.0, "full_precision_layer_flop_fraction": 0.25}
    measurements = {"compiled": {"speedup_vs_bf16_same_setting": 1.5}, "eager": {"speedup_vs_bf16_same_setting": 0.8}}
    _fake_cell(tmp_path, "dit-glyphs", "int8-dynamic", metrics=metrics, measurements=measurements,
               settings={"headline": "compiled"})  # fmt: skip
    _fake_cell(tmp_path, "sd15-unet", "fp8-dynamic-row", status="unsupported", reason="needs sm >= 8.9 | CUDA")
    _fake_cell(tmp_path, "sd15-unet", "bf16-eager", metrics={"median_ms": 40.0}, settings={"headline": "eager"})
    lines = speed_table.speed_table(tmp_path).splitlines()
    assert lines[0].startswith("| model | row | median ms | speed-up vs bf16 (same compile) |")
    rows = [line.split(" | ")[:2] for line in lines[2:]]
    assert rows == [["| sd15-unet", "bf16-eager"], ["| sd15-unet", "fp8-dynamic-row"], ["| dit-glyphs", "int8-dynamic"]]
    assert "| 12.35 | 1.50x | 3.21 | 1234.5 | 250 | — | compiled; eager 0.80x; 25% of Linear/Conv FLOPs" in lines[4]
    assert "unsupported: needs sm >= 8.9 / CUDA" in lines[3] and lines[3].count("—") == 6
    assert all(line.count(" | ") == 8 for line in lines[2:])


def test_table_names_the_batch_where_a_model_is_measured_at_several(tmp_path):
    for folder, batch in [("sd3-medium", 2), ("sd3-medium-b1", 1)]:
        for row in ("bf16-compiled-cudagraphs", "dmquant-w4a16"):
            cell = {"model": "sd3-medium", "row": row, "kind": speed_rows.ROWS[row].kind, "status": "ok",
                    "inputs": {"batch": batch}, "metrics": {"median_ms": float(batch)}}  # fmt: skip
            common.write_cell(tmp_path / folder / f"{row}.json", cell)
    _fake_cell(tmp_path, "flux-dev", "bf16-compiled-cudagraphs", inputs={"batch": 1})
    rows = [line.split(" | ")[:3] for line in speed_table.speed_table(tmp_path).splitlines()[2:]]
    assert rows == [
        ["| flux-dev", "bf16-compiled-cudagraphs", "—"],
        ["| sd3-medium (batch 2)", "bf16-compiled-cudagraphs", "2.00"],
        ["| sd3-medium (batch 2)", "dmquant-w4a16", "2.00"],
        ["| sd3-medium (batch 1)", "bf16-compiled-cudagraphs", "1.00"],
        ["| sd3-medium (batch 1)", "dmquant-w4a16", "1.00"],
    ]


def test_table_compares_gemm_throughput_with_the_peak_of_the_rows_compute_format(tmp_path):
    common.write_cell(tmp_path / "peaks.json", {"size": 8192, "bf16_tflops": 800.0, "fp8_rowwise_tflops": 1250.0,
                                               "int8_tops": 1000.0})  # fmt: skip
    for row, tflops in [("bf16-compiled", 400.0), ("dmquant-w8a8-fp8", 250.0), ("dmquant-w4a8", 100.0),
                        ("dmquant-w4a16", 200.0), ("int8-dynamic", None)]:  # fmt: skip
        _fake_cell(tmp_path, "sd15-unet", row, metrics={"median_ms": 1.0, "gemm_conv_tflops": tflops})
    lines = speed_table.speed_table(tmp_path).splitlines()
    throughput = {line.split(" | ")[1]: line.split(" | ")[7] for line in lines[2:7]}
    assert throughput == {
        "bf16-compiled": "400 (50% of bf16)",
        "int8-dynamic": "—",
        "dmquant-w8a8-fp8": "250 (20% of fp8)",
        "dmquant-w4a8": "100 (10% of int8)",
        "dmquant-w4a16": "200 (25% of bf16)",
    }
    assert "fp8 row-wise 1.25e+03, int8 1e+03." in lines[-1]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """dit-glyphs at toy settings on the CPU: bf16-eager, fp8 (unsupported here), two dmquant rows, of
    which W4A8's conversion refuses."""
    results = tmp_path_factory.mktemp("speed")

    def convert_all_but_int4(model: nn.Module, **options) -> nn.Module:
        if info(model).config.weight.bits == 4:
            raise NotImplementedError("no int4 layout in this build")
        return convert_model(model, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(speed_rows, "convert_model", convert_all_but_int4)
        argv = ["--models", "dit-glyphs", "--rows", "bf16-eager", "fp8-dynamic-row", "dmquant-w8a8-int8"]
        argv += ["dmquant-w4a8", "--settings", "eager", "--tiny", "--repeats", "2", "--warmup", "1"]
        speed.main([*argv, "--device", "cpu", "--results", str(results), "-q"])
    cells = {path.stem: json.loads(path.read_text()) for path in (results / "dit-glyphs").glob("*.json")}
    return results, cells


def test_cpu_run_writes_one_cell_per_row_with_its_provenance(dit_run):
    results, cells = dit_run
    assert set(cells) == {"bf16-eager", "fp8-dynamic-row", "dmquant-w8a8-int8", "dmquant-w4a8"}
    for cell in cells.values():
        assert cell["schema"] == 1 and cell["model"] == "dit-glyphs" and not cell["representative"]
        assert cell["command"].startswith("python bench/speed.py --models dit-glyphs")
        assert cell["environment"]["torch"] == torch.__version__ and "torchao" in cell["environment"]
    peaks = json.loads((results / "peaks.json").read_text())
    assert peaks["size"] == 256 and peaks["bf16_tflops"] > 0


def test_cpu_run_measures_bf16_and_the_converted_model(dit_run):
    _, cells = dit_run
    bf16, int8 = cells["bf16-eager"], cells["dmquant-w8a8-int8"]
    assert bf16["status"] == "ok" and int8["status"] == "ok", int8["reason"]
    assert bf16["metrics"]["speedup_vs_bf16_same_compile"] == 1.0
    assert int8["inputs"]["batch"] == 2 and int8["settings"]["measured"] == ["eager"]
    assert int8["metrics"]["median_ms"] > 0 and int8["measurements"]["eager"]["reference"] == "bf16-eager (this run)"
    assert int8["flops"]["total"] == int8["flops"]["fp_model_total"] == bf16["flops"]["total"]
    assert int8["metrics"]["full_precision_layer_flop_fraction"] == 0.0
    assert int8["conversion"]["converted"]["int8"] == 57 and int8["weight_bytes"] < bf16["weight_bytes"] / 2
    assert int8["kernels"]["by_kernel"] and int8["recipe"]["attention"]["enabled"] is False


def test_rows_that_cannot_run_here_are_unsupported_with_their_reason(dit_run):
    _, cells = dit_run
    with pytest.raises(peers.PeerUnavailable) as why:  # no CUDA here, or no torchao
        peers.check_available("torchao-fp8-dynamic", "cpu")
    assert cells["fp8-dynamic-row"]["status"] == "unsupported" and cells["fp8-dynamic-row"]["reason"] == str(why.value)
    w4 = cells["dmquant-w4a8"]
    assert w4["status"] == "unsupported"
    assert w4["reason"] == "convert_model raised NotImplementedError: no int4 layout in this build"


def test_cpu_run_renders_as_a_table(dit_run, capsys):
    results, _ = dit_run
    speed.main(["--table", "--results", str(results)])
    table = capsys.readouterr().out
    assert table.count("| dit-glyphs |") == 4 and "not representative" in table


@pytest.mark.parametrize("model", ["flux-dev", "sd3-medium", "pixart-sigma"])
def test_the_deployment_transformers_run_as_denoisers_and_quantize(model):
    """The FLUX, SD3 and PixArt-Σ workloads (``--tiny``) are called as ``f(sample, timestep, **cond)``, quantize
    and convert like every other model; FLUX and SD3 are rebuilt per row from their seed, to the same weights."""
    args = speed.parse_args(["--tiny", "--device", "cpu", "--models", model])
    workload = speed_workloads.WORKLOADS[model](args, torch.device("cpu"))
    (sample, timestep), cond = workload.inputs(torch.float32)
    with torch.no_grad():
        expected = workload.model(sample, timestep, **cond).sample
    assert expected.shape[0] == workload.batch
    if workload.factory is not None:
        rebuilt = workload.factory()
        assert all(
            torch.equal(a, b)
            for a, b in zip(rebuilt.state_dict().values(), workload.model.state_dict().values(), strict=True)
        )
    row = speed_rows.ROWS["dmquant-w8a8-int8"]
    quantized = quantize(workload.master(), configs.dmquant_config(row, workload.model), workload.calibration(),
                         progress=False)  # fmt: skip
    converted = convert_model(quantized)
    with torch.no_grad():
        assert converted(sample, timestep, **cond).sample.shape == expected.shape


def test_the_fp8_rows_differ_only_in_accumulation_and_paths():
    default, every, exact = (speed_rows.ROWS[name] for name in
                             ("dmquant-w8a8-fp8-fast", "dmquant-w8a8-fp8-every-layer", "dmquant-w8a8-fp8"))  # fmt: skip
    assert default.fast_accumulation and default.measured_paths
    assert every.fast_accumulation and not every.measured_paths
    assert not exact.fast_accumulation and default.formats == every.formats == exact.formats


def test_the_fp8_attention_row_is_the_fast_row_with_its_attention_matmuls_in_fp8():
    model = nn.Sequential(nn.Linear(4, 4))
    row, fast = speed_rows.ROWS["dmquant-w8a8-fp8-attention"], speed_rows.ROWS["dmquant-w8a8-fp8-fast"]
    config = configs.dmquant_config(row, model)
    assert config.attention.enabled and config.attention.bits == config.attention.softmax_bits == "fp8_e4m3"
    assert not configs.dmquant_config(fast, model).attention.enabled
    assert (row.formats, row.fast_accumulation, row.measured_paths) == (fast.formats, True, True)
