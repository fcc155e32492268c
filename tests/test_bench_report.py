"""bench/report.py: cell JSON -> BENCHMARKS.md tables, plots, commands; deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report as bench_report

MODEL = "ddpm-glyphs32"
ENVIRONMENT = {
    "device": "NVIDIA H100 80GB HBM3",
    "torch": "2.11.0",
    "diffusers": "0.42.1",
    "python": "3.12.3",
    "date": "2026-11-21",
}


def _cell(method, kind, bits, *, status="ok", reason=None, coverage=None, fid=1.0, sqnr=None, command=None, **metrics):
    values = {
        "class_accuracy": 0.9,
        "fid": fid,
        "fid_floor": 0.21,
        "sfid": 4.2,
        "sfid_floor": 2.0,
        "inception_score": 40.1,
        "kid": 0.001,
        "precision": 0.45,
        "recall": 0.95,
        "psnr": None if kind == "fp" else 21.8,
        "ssim": None if kind == "fp" else 0.81,
        **metrics,
    }
    return {
        "schema": 1,
        "model": MODEL,
        "method": method,
        "kind": kind,
        "bits": bits,
        "status": status,
        "reason": reason,
        "coverage": coverage,
        "metrics": values if status == "ok" else None,
        "sqnr_per_step": sqnr,
        "calibration_s": None if kind == "fp" else 41.2,
        "peak_memory_gib": 3.1,
        "sampling": {
            "sampler": "DDIM",
            "eta": 0.0,
            "num_inference_steps": 4,
            "num_samples": 1000,
            "seed": 1 if method == "fp-seed1" else 0,
            "guidance_scale": 1.0,
        },
        "features": "glyphnet",
        "command": command or f"python bench/quality.py --models {MODEL} --methods {method} --bits {bits}",
        "environment": ENVIRONMENT,
        "git_commit": "abc123",
    }


CELLS = [
    # Written in scrambled order: the report sorts.
    _cell("torchao-int4-weight-only", "peer", "W4A16", status="unsupported", reason="torchao int4 needs CUDA"),
    _cell("mse", "recipe", "W8A8", fid=0.7, sqnr=[30.0, 31.0, 32.0, 33.0]),
    _cell("minmax", "recipe", "W4A8", fid=3.5, sqnr=[10.0, 12.0, float("inf"), 14.0]),
    _cell("fp-seed1", "fp", "FP32", fid=0.66, class_accuracy=0.893),
    _cell(
        "quanto-w8a8",
        "peer",
        "W8A8",
        fid=0.9,
        coverage={"quantized": {"Linear": 20, "Conv2d": 0}, "skipped": {"Conv2d": 31}},
        command="python bench/quality.py --models ddpm-glyphs32 --methods quanto-w8a8 --bits W8A8",
    ),
    _cell("minmax", "recipe", "W8A8", fid=0.8, sqnr=[25.0, 26.0, 27.0, 28.0]),
    _cell("fp", "fp", "FP32", fid=0.63, class_accuracy=0.9),
]


def _write_cells(directory: Path, cells) -> Path:
    for cell in cells:
        path = directory / cell["model"] / f"{cell['method']}__{cell['bits']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=2))
    return directory


@pytest.fixture
def page(tmp_path):
    results = _write_cells(tmp_path / "results", CELLS)
    output, plots = tmp_path / "BENCHMARKS.md", tmp_path / "docs" / "bench"
    argv = ["--results", str(results), "--output", str(output), "--plots", str(plots)]
    assert bench_report.main(argv) == 0
    return output, plots, argv


def _report_arguments(tmp_path: Path) -> tuple[Path, list[str]]:
    """Where the report goes and the arguments that write it from ``tmp_path / "results"``."""
    output = tmp_path / "BENCHMARKS.md"
    return output, ["--results", str(tmp_path / "results"), "--output", str(output), "--plots", str(tmp_path / "plots")]


def _table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_rows_in_order_with_floor_spread_reason_and_coverage(page):
    output, _, _ = page
    text = output.read_text()
    rows = _table_rows(text)
    header, body = rows[0], rows[2:]
    assert header[:3] == ["method", "bits", "class acc."]
    assert "colour acc." not in header  # no cell of this model measures colour
    assert header[-1] == "notes"
    assert [(row[0], row[1]) for row in body] == [
        ("FP", "FP32"),
        ("FP (other seeds)", "FP32"),
        ("*FP seed-to-seed spread*", ""),
        ("minmax", "W8A8"),
        ("minmax", "W4A8"),
        ("mse", "W8A8"),
        ("quanto-w8a8", "W8A8"),
        ("torchao-int4-weight-only", "W4A16"),
    ]
    fid = header.index("FID-proxy")
    # The floor is the same for every row, so it is stated once above the table.
    assert "Floors (real vs real at the same N, the same for every row): FID-proxy 0.21, sFID-proxy 2." in text
    assert body[0][fid] == "0.63" and body[0][header.index("class acc.")] == "90.0%"
    # Spread = |FP − FP (other seeds)|.
    spread = body[2]
    assert spread[fid] == "±0.03" and spread[header.index("class acc.")] == "±0.7 pp"
    assert "FP seed-to-seed spread, |FP − FP (other seeds)|: class acc. ±0.7 pp, FID-proxy ±0.03" in text
    # Mean SQNR over finite steps; calibration time.
    assert body[3][header.index("mean SQNR (dB)")] == "26.5"
    assert body[4][header.index("mean SQNR (dB)")] == "12.0"
    assert body[3][header.index("calib. time")] == "41.2 s"
    assert body[0][header.index("calib. time")] == "—"
    # Peer coverage, unsupported row with its reason instead of numbers.
    assert body[6][-1] == "Linear only; 31 Conv2d left FP"
    assert body[7][-1] == "**unsupported**: torchao int4 needs CUDA"
    assert body[7][2:-1] == [""] * (len(header) - 3)


def test_commands_provenance_plots_and_determinism(page):
    output, plots, argv = page
    text = output.read_text()
    reproduce = text.split("```sh\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert reproduce[:2] == [
        f"python bench/quality.py --models {MODEL} --methods fp --bits FP32",
        f"python bench/quality.py --models {MODEL} --methods fp-seed1 --bits FP32",
    ]
    assert len(reproduce) == len(CELLS) == len(set(reproduce))
    assert "Measured on NVIDIA H100 80GB HBM3, torch 2.11.0, diffusers 0.42.1, Python 3.12.3, on 2026-11-21" in text
    assert "Sampling: DDIM, η = 0, 4 steps, guidance scale 1, N = 1000 samples, features: GlyphNet." in text
    for suffix in ("fid", "sqnr"):
        png = plots / f"{MODEL}-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](docs/bench/{MODEL}-{suffix}.png)" in text
    first = output.read_bytes()
    first_plot = (plots / f"{MODEL}-fid.png").read_bytes()
    assert bench_report.main(argv) == 0
    assert output.read_bytes() == first
    assert (plots / f"{MODEL}-fid.png").read_bytes() == first_plot


def test_floor_per_row_when_floors_differ_and_colour_column(tmp_path):
    cells = [
        _cell("fp", "fp", "FP32", fid=0.63, colour_accuracy=0.88),
        _cell("mse", "recipe", "W8A8", fid=0.7, fid_floor=0.3),
    ]
    results = _write_cells(tmp_path / "results", cells)
    output = tmp_path / "out.md"
    assert bench_report.main(["--results", str(results), "--output", str(output), "--plots", str(tmp_path)]) == 0
    text = output.read_text()
    header, _, fp, mse = _table_rows(text)
    assert "colour acc." in header and "notes" not in header
    fid = header.index("FID-proxy")
    assert fp[fid] == "0.63 (floor 0.21)" and mse[fid] == "0.7 (floor 0.3)"
    assert "sFID-proxy 2." in text  # the sFID floor is still shared
    assert "seed-to-seed spread is not known" in text
    assert not (tmp_path / f"{MODEL}-sqnr.png").exists()  # no SQNR curves, no plot and no link
    assert "-sqnr.png" not in text


def test_invalid_cell_is_refused_and_nothing_written(tmp_path, capsys):
    results = _write_cells(tmp_path / "results", [{**_cell("mse", "recipe", "W8A8"), "status": "done"}])
    output = tmp_path / "out.md"
    assert bench_report.main(["--results", str(results), "--output", str(output), "--plots", str(tmp_path)]) == 2
    assert "status must be one of ok, unsupported, failed" in capsys.readouterr().err
    assert not output.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench_report.main(["--results", str(empty), "--output", str(output)]) == 2
    assert "no result cells" in capsys.readouterr().err


def test_coverage_note_says_what_a_peer_left_in_floating_point():
    assert bench_report.coverage_note(None) is None
    assert bench_report.coverage_note({"quantized": {"Linear": 20}, "skipped": {"Conv2d": 31}}) == (
        "Linear only; 31 Conv2d left FP"
    )
    weight_only_convs = {"quantized": {"Conv2d": 36, "Linear": 41}, "skipped": {}, "unquantized_inputs": {"Conv2d": 36}}
    assert bench_report.coverage_note(weight_only_convs) == (
        "all layers quantized (36 Conv2d, 41 Linear); inputs of 36 Conv2d not quantized (weight-only)"
    )


def test_rows_other_models_have_are_named_as_not_measured():
    def cell(model, method, bits):
        return {"model": model, "method": method, "bits": bits}

    everywhere = [cell("a", "fp", "FP32"), cell("a", "quanto-w8a8", "W8A8"), cell("b", "fp", "FP32")]
    assert bench_report.missing_text(everywhere[:2], everywhere) is None
    assert bench_report.missing_text(everywhere[2:], everywhere) == (
        "Not measured on this model yet (other models have these rows): quanto-w8a8 W8A8."
    )


def test_a_stochastic_sampler_gets_tables_of_its_own(tmp_path):
    deterministic = [_cell("fp", "fp", "FP32"), _cell("mse", "recipe", "W8A8")]
    stochastic = [_cell("fp", "fp", "FP32", fid=0.5)]
    stochastic[0]["sampling"]["eta"] = 1.0
    for directory, cells in (("eta0", deterministic), ("eta1", stochastic)):
        _write_cells(tmp_path / "results" / directory, cells)
    groups = bench_report.by_model(bench_report.load_cells(tmp_path / "results"))
    assert list(groups) == [MODEL, f"{MODEL}-eta1"]
    assert [c["method"] for c in groups[f"{MODEL}-eta1"]] == ["fp"]
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main(argv) == 0
    text = output.read_text()
    assert f"## {MODEL}-eta1" in text and "η = 1" in text
    # rows of the deterministic sampler are not listed as missing from the stochastic table
    assert "Not measured" not in text


def test_ablations_list_their_measured_steps_in_order_next_to_fp(tmp_path):
    cells = [
        _cell("fp", "fp", "FP32", fid=0.6),
        _cell("fp-seed1", "fp", "FP32", fid=0.7),
        _cell("ptqd", "recipe", "W4A8", fid=0.8) | {"compute": {"gbops_per_call": 41.5, "fp_gbops_per_call": 430}},
        _cell("q-diffusion", "recipe", "W4A8", fid=0.9),
        _cell("ptqd-cnc", "recipe", "W4A8", fid=0.85),
        _cell("q-diffusion", "recipe", "W8A8", fid=0.65),  # alone at its bits: no comparison to show
        _cell("calib-tdac", "recipe", "W4A8", fid=0.7),  # one calibration step only: no view
    ]
    (view,) = bench_report.ablation_tables(cells)
    assert view.startswith("**PTQD ablation")
    rows = _table_rows(view)[2:]
    assert [row[-1] for row in rows] == ["430", "—", "—", "41.5"]  # GBOPs/call where recorded
    assert [row[:3] for row in rows] == [
        ["FP32", "FP (± seed-to-seed spread)", "0.6 (±0.1)"],
        ["W4A8", "quantized (q-diffusion)", "0.9"],
        ["W4A8", "+ correlated-noise correction", "0.85"],
        ["W4A8", "+ variance-schedule calibration (ptqd)", "0.8"],
    ]


def test_reading_notes_go_under_their_table_and_after_the_intro(tmp_path):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32"), _cell("mse", "recipe", "W8A8")])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / f"{MODEL}.md").write_text("What this table shows.\n")
    (notes / "all.md").write_text("How these runs were made.\n")
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main([*argv, "--notes", str(notes)]) == 0
    text = output.read_text()
    assert text.index("How these runs were made.") < text.index(f"## {MODEL}") < text.index("What this table shows.")


def test_calibration_cost_gets_a_section_that_names_the_models_not_measured(tmp_path):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32"), _cell("mse", "recipe", "W8A8")])
    measured = _cell("q-diffusion", "recipe", "W4A8") | {"calibration_s": 420.75}
    resumed = _cell("q-diffusion", "recipe", "W8A8") | {"calibration_s": 100.0, "resumed_reconstruction_s": 320.0}
    cost = _write_cells(tmp_path / "cost", [measured, resumed])
    (cost / "notes").mkdir()
    (cost / "notes" / "all.md").write_text("One process per GPU.\n")
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main([*argv, "--cost-results", str(cost)]) == 0
    section = output.read_text().split("## Calibration cost")[1]
    rows = {row[2]: row for row in _table_rows(section)[2:]}
    assert rows["W4A8"][:6] == [MODEL, "q-diffusion", "W4A8", "7.0 min", "—", "3.10"]
    assert rows["W8A8"][3:5] == ["7.0 min", "5.3 min"]  # a resumed run's cost counts the earlier run's blocks
    assert rows["W4A8"][6] == "—"  # the cell's recipe does not reconstruct
    others = [model for model in bench_report.ZOO_MODELS if model != MODEL]
    assert f"Not measured: {', '.join(others)}." in section and "One process per GPU." in section
    assert bench_report.main([*argv, "--cost-results", str(tmp_path / "absent")]) == 0
    assert "## Calibration cost" not in output.read_text()


def test_the_cost_table_says_how_the_reconstruction_steps_ran(tmp_path):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32")])

    def reconstructing(bits, **reconstruction):
        recipe = {"reconstruction": {"enabled": True, **reconstruction}}
        return _cell("q-diffusion", "recipe", bits) | {"calibration_s": 60.0, "recipe": recipe, "git_commit": "abc123"}

    cost = _write_cells(tmp_path / "cost", [reconstructing("W4A8", cuda_graphs=True), reconstructing("W8A8")])
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main([*argv, "--cost-results", str(cost)]) == 0
    rows = {row[2]: row for row in _table_rows(output.read_text().split("## Calibration cost")[1])[2:]}
    assert rows["W4A8"][6] == "CUDA graphs" and rows["W8A8"][6] == "eager"  # W8A8's recipe predates the switch
    assert rows["W4A8"][7].endswith(", at commit abc123")


def test_reconstruction_speed_gets_a_section(tmp_path):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32")])
    row = {"model": MODEL, "unit": "down_blocks.0.resnets.0", "kind": "resnet", "samples": 400, "iterations": 300}
    row |= {
        "eager": {"ms_per_iteration": 6.727, "final_mse": 2.4e-4},
        "graphed": {"ms_per_iteration": 1.063, "final_mse": 2.4e-4},
    }
    row["speedup"] = 6.33
    record = {
        "rows": [row],
        "environment": ENVIRONMENT,
        "git_commit": "abc123",
        "command": "python bench/recon_speed.py",
    }
    results = tmp_path / "recon-speed"
    results.mkdir()
    (results / "NVIDIA-H100.json").write_text(json.dumps(record))
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main(argv) == 0
    section = output.read_text().split("## Reconstruction speed")[1]
    assert _table_rows(section)[2] == [
        MODEL,
        "down_blocks.0.resnets.0",
        "resnet",
        "6.73",
        "1.06",
        "6.3×",
        "0.00024",
        "0.00024",
    ]
    assert "at commit abc123" in section and "python bench/recon_speed.py" in section
    assert bench_report.main([*argv, "--recon-speed-results", str(tmp_path / "absent")]) == 0
    assert "## Reconstruction speed" not in output.read_text()


def test_speed_cells_next_to_the_results_get_a_section(tmp_path):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32")])
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main(argv) == 0
    assert "## Speed" not in output.read_text()
    cell = {"model": MODEL, "row": "bf16-eager", "kind": "bf16", "status": "ok", "metrics": {"median_ms": 12.5}}
    (tmp_path / "speed" / MODEL).mkdir(parents=True)
    (tmp_path / "speed" / MODEL / "bf16-eager.json").write_text(json.dumps(cell))
    assert bench_report.main(argv) == 0
    section = output.read_text().split("## Speed")[1]
    assert f"| {MODEL} | bf16-eager | 12.50 |" in section
    assert "### Whole-model compile" not in section
    (tmp_path / "speed-model-scope" / MODEL).mkdir(parents=True)
    whole = cell | {"metrics": {"median_ms": 10.25}}
    (tmp_path / "speed-model-scope" / MODEL / "bf16-eager.json").write_text(json.dumps(whole))
    assert bench_report.main(argv) == 0
    blocks, whole_model = output.read_text().split("## Speed")[1].split("### Whole-model compile")
    assert f"| {MODEL} | bf16-eager | 12.50 |" in blocks
    assert f"| {MODEL} | bf16-eager | 10.25 |" in whole_model
    assert f"### {bench_report.SPEED_ONE_H100_TITLE}" not in whole_model
    (tmp_path / "speed-h100" / MODEL).mkdir(parents=True)
    one_run = cell | {"metrics": {"median_ms": 11.75}}
    (tmp_path / "speed-h100" / MODEL / "bf16-eager.json").write_text(json.dumps(one_run))
    (tmp_path / "speed-h100" / "notes").mkdir()
    (tmp_path / "speed-h100" / "notes" / "all.md").write_text("Why some rows are missing.\n")
    assert bench_report.main(argv) == 0
    whole_model, one_h100 = (
        output.read_text().split("### Whole-model compile")[1].split(f"### {bench_report.SPEED_ONE_H100_TITLE}")
    )
    assert f"| {MODEL} | bf16-eager | 10.25 |" in whole_model and "11.75" not in whole_model
    assert f"| {MODEL} | bf16-eager | 11.75 |" in one_h100 and "Why some rows are missing." in one_h100


def _fidelity_cell(model, fmt, psnr, *, meets, device="NVIDIA H200"):
    return {
        "format": fmt,
        "model": model,
        "psnr_converted_vs_simulated_db": psnr,
        "meets_bound": meets,
        "floor_psnr_db": 30.07,
        "denoiser_relative_error": 0.00123,
        "psnr_simulated_vs_fp_db": 22.81,
        "sampling_s": {"simulated": 0.58, "converted": 46.6},
        "num_samples": 64,
        "steps": 20,
        "bound_db": 35.0,
        "command": f"python bench/fidelity.py --models {model}",
        "environment": ENVIRONMENT | {"device": device},
        "git_commit": "abc123",
    }


def test_deployment_fidelity_gets_a_section_of_its_own(tmp_path, capsys):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32")])
    fidelity = tmp_path / "fidelity"
    cells = [
        _fidelity_cell("dit-glyphs", "w8a8-int8", 29.49, meets=False),
        _fidelity_cell(MODEL, "w8a8-int8", None, meets=True, device="cpu"),  # None: identical samples
        _fidelity_cell(MODEL, "w8a8-fp8", 35.38, meets=True),
    ]
    for cell in cells:
        (fidelity / cell["model"]).mkdir(parents=True, exist_ok=True)
        (fidelity / cell["model"] / f"{cell['format']}.json").write_text(json.dumps(cell))
    (fidelity / "notes").mkdir()
    (fidelity / "notes" / "all.md").write_text("Why DiT misses the bound.\n")
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main(argv) == 0
    section = output.read_text().split("## Deployment fidelity")[1]
    header, _, *rows = _table_rows(section)
    assert header[:4] == ["model", "format", "PSNR converted vs simulated (dB)", "meets the bound"]
    assert header[-1] == "device"
    assert [row[:4] for row in rows] == [  # zoo model order, then format
        [MODEL, "w8a8-fp8", "35.4", "yes"],
        [MODEL, "w8a8-int8", "identical", "yes"],
        ["dit-glyphs", "w8a8-int8", "29.5", "**no**"],
    ]
    assert rows[0][4:] == ["30.1", "1.2e-03", "22.8", "64 × 20", "0.6 s / 46.6 s", "NVIDIA H200"]
    assert rows[1][-1] == "cpu"
    assert "at or above the bound (35 dB)" in section and "Measured on 2026-11-21, at commit abc123." in section
    assert "Why DiT misses the bound." in section
    assert f"python bench/fidelity.py --models {MODEL}\npython bench/fidelity.py --models dit-glyphs" in section
    assert bench_report.main([*argv, "--fidelity-results", str(tmp_path / "absent")]) == 0
    assert "## Deployment fidelity" not in output.read_text()
    (fidelity / MODEL / "w4a8.json").write_text("[]")
    assert bench_report.main(argv) == 2
    assert "w4a8.json: expected a JSON object, got list" in capsys.readouterr().err


def test_layer_throughput_has_one_line_per_layer_and_a_column_per_path(tmp_path):
    _write_cells(tmp_path / "results", [_cell("fp", "fp", "FP32")])
    conv = {"op": "conv3x3", "shape": [2, 320, 64, 64], "layout": "channels_last"}
    linear = {"op": "linear", "shape": [2, 320, 1280]}
    timings = [
        conv | {"path": "bf16", "ms": 0.05816, "tflops": 259.6},
        conv | {"path": "int8", "ms": 0.1751, "tflops": 86.2},
        linear | {"path": "bf16", "ms": 0.02155, "tflops": 0.076},
        linear | {"path": "torch-int8", "error": "self.size(0) needs to be greater than 16, but got 2"},
        linear | {"path": "torch-fp8", "ms": 0.02301, "tflops": 0.071},
    ]
    record = {
        "rows": timings,
        "environment": ENVIRONMENT,
        "git_commit": "abc123",
        "command": "python bench/layer_speed.py",
    }
    layer_speed = tmp_path / "layer-speed"
    (layer_speed / "notes").mkdir(parents=True)
    (layer_speed / "NVIDIA-H100.json").write_text(json.dumps(record))
    (layer_speed / "notes" / "all.md").write_text("The int8 GEMM is the bottleneck.\n")
    output, argv = _report_arguments(tmp_path)
    assert bench_report.main(argv) == 0
    section = output.read_text().split("## Layer throughput")[1]
    header, _, *rows = _table_rows(section)
    assert header == ["op", "shape", "layout", *bench_report.LAYER_SPEED_PATHS]
    assert rows == [
        ["conv3x3", "2×320×64×64", "channels_last", "0.058", "0.175", *[""] * 9],
        ["linear", "2×320×1280", "", "0.022", *[""] * 8, "—", "0.023"],
    ]
    assert "Measured on NVIDIA H100 80GB HBM3, torch 2.11.0" in section and "on 2026-11-21, at commit abc123" in section
    assert "- torch-int8 on linear 2×320×1280: self.size(0) needs to be greater than 16, but got 2" in section
    assert "The int8 GEMM is the bottleneck." in section and "python bench/layer_speed.py" in section
    assert bench_report.main([*argv, "--layer-speed-results", str(tmp_path / "absent")]) == 0
    assert "## Layer throughput" not in output.read_text()
