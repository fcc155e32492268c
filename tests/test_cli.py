"""The ``dmquant`` command line: help, quantize, inspect, sample, eval, demo and error reporting."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmquant.cli import main
from dmquant.cli_commands import _compiled
from dmquant.config import QuantizerConfig
from dmquant.core.quantizer import Quantizer
from dmquant.report import LABEL_SIZE

CALIB = ["--calib-trajectories", "2", "--calib-steps", "3"]
SAMPLING = ["--num-samples", "2", "--steps", "3", "--batch-size", "2"]
COMMANDS = ["quantize", "sample", "eval", "analyze", "inspect", "demo"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table in ``text`` whose first column is ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))

    def split(line):
        return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = split(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, split(line), strict=False)))
    return rows


def assert_one_line_error(code: int, err: str, command: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dmquant {command}: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A tiny-dit checkpoint quantized at 4-bit weights, and what ``quantize`` printed."""
    output = tmp_path_factory.mktemp("quantize") / "dit-w4"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["quantize", "tiny-dit", "-o", str(output), "--w-bits", "4", *CALIB, "-q"])
    assert code == 0
    return output, stdout.getvalue()


# ---------------------------------------------------------------- help


def test_console_script_help():
    script = Path(sys.executable).parent / "dmquant"
    if not script.exists():
        script = Path(shutil.which("dmquant") or "dmquant")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dmquant")
    for command in COMMANDS:
        assert command in result.stdout
    assert "--version" in result.stdout
    assert result.stderr == ""


def test_top_level_help(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: dmquant")
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), command
    assert "Post-training quantization for diffusion models" in out


def test_version(capsys):
    from dmquant import __version__

    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"dmquant {__version__}"


@pytest.mark.parametrize(
    "command, options",
    [
        (
            "quantize",
            [
                "--output",
                "--overwrite",
                "--recipe",
                "--w-bits",
                "--a-bits",
                "--calib-trajectories",
                "--calib-steps",
                "--scheduler",
                "--device",
                "--quiet",
                "built-in model",
            ],
        ),
        (
            "sample",
            [
                "--output",
                "--num-samples",
                "--steps",
                "--seed",
                "--batch-size",
                "--labels",
                "--prompt",
                "--guidance",
                "--base",
                "--real-kernels",
                "--quiet",
            ],
        ),
        (
            "eval",
            ["--base", "--json", "--num-samples", "--steps", "--seed", "--batch-size", "--real-kernels", "--compile"],
        ),
        (
            "convert",
            [
                "--num-samples",
                "--base",
                "--device",
                "int8",
                "packed int4",
                "fp8",
                "--real-kernels",
                "--dynamic-fp8",
                "--fp8-exact-accumulation",
                "--compile",
            ],
        ),
        ("inspect", ["--recipe", "--w-bits", "--a-bits", "--quiet", "split shortcut"]),
        ("demo", ["--model", "--recipe", "--output", "--num-samples", "--steps", "--quiet", "W4A8", "FID-proxies"]),
    ],
)
def test_subcommand_help(capsys, command, options):
    code, out, err = run([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: dmquant {command}")
    text = " ".join(out.split())  # undo argparse's line wrapping
    for option in options:
        assert option in text, f"{command} --help does not mention {option}"
    assert err == ""


@pytest.mark.parametrize("value", ["1", "-0.1", "fast"])
def test_a_minimum_path_gain_outside_zero_to_one_is_a_usage_error(capsys, value):
    code, _, err = run(["convert", "ckpt", "out", "--min-path-gain", value], capsys)
    assert code == 2
    assert f"--min-path-gain: expected a fraction in [0, 1), got {value}" in err


def test_missing_subcommand_is_a_usage_error(capsys):
    code, _, err = run([], capsys)
    assert code == 2
    assert "required: COMMAND" in err


# ---------------------------------------------------------------- quantize


def test_quantize_writes_checkpoint(w4_checkpoint):
    output, stdout = w4_checkpoint
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "dmquant.json", "quantized_model.safetensors"]
    manifest = json.loads((output / "dmquant.json").read_text())
    assert manifest["source"] == "tiny-dit"
    config = json.loads((output / "config.json").read_text())  # what diffusers' tools read
    assert (
        config["_class_name"] == "DiTTransformer2DModel" and config["quantization_config"]["quant_method"] == "dmquant"
    )
    assert manifest["base"]["class"] == "DiTTransformer2DModel"
    assert manifest["recipe"]["name"] == "mse"
    # the calibration options reach the saved recipe
    assert manifest["recipe"]["calibration"]["num_trajectories"] == 2
    assert manifest["recipe"]["calibration"]["num_inference_steps"] == 3
    assert manifest["extra"]["calibration_samples"] > 0
    assert stdout.startswith("quantizing tiny-dit with recipe mse: weights int4 sym channel mse, activations uint8")
    quantized = sum(1 for row in manifest["report"] if row["weight"] != "fp" or row["activation"] != "fp")
    assert f"{quantized} layers quantized in" in stdout
    assert f"saved to {output}" in stdout
    # nothing left behind beside it (no staging directories)
    assert [p.name for p in output.parent.iterdir()] == [output.name]


def test_w_bits_4_shows_in_saved_report(w4_checkpoint):
    output, _ = w4_checkpoint
    manifest = json.loads((output / "dmquant.json").read_text())
    assert manifest["recipe"]["weight"]["bits"] == 4
    layers = [row for row in manifest["report"] if row["kind"] in ("Linear", "Conv2d")]
    default = [row for row in layers if row["rule"] is None]
    ruled = [row for row in layers if row["rule"] is not None]
    assert len(default) > 10
    assert {row["weight"] for row in default} == {"int4"}
    assert {row["activation"] for row in default} == {"uint8"}
    # the recipe's first/last-layer rules keep their 8 bits
    assert {row["name"] for row in ruled} == {"pos_embed.proj", "proj_out_2"}
    assert {row["weight"] for row in ruled} == {"int8"}


def test_quantize_refuses_existing_output_then_overwrites(tmp_path, capsys):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    argv = ["quantize", "tiny-dit", "-o", str(output), "--recipe", "minmax", *CALIB, "-q"]

    code, out, err = run(argv, capsys)
    line = assert_one_line_error(code, err, "quantize")
    assert str(output) in line
    assert "--overwrite" in line
    assert out == ""
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "precious"

    code, out, err = run([*argv, "--overwrite"], capsys)  # --overwrite replaces checkpoints only
    assert "not a dmquant checkpoint" in assert_one_line_error(code, err, "quantize")
    assert (output / "keep.txt").read_text() == "precious"

    (output / "keep.txt").unlink()
    code, out, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "dmquant.json", "quantized_model.safetensors"]
    assert json.loads((output / "dmquant.json").read_text())["recipe"]["name"] == "minmax"
    assert f"saved to {output}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_quantize_rejects_zero_calibration_trajectories(tmp_path, capsys):
    output = tmp_path / "zero"
    code, _, err = run(
        [
            "quantize",
            "tiny-dit",
            "-o",
            str(output),
            "--recipe",
            "minmax",
            "--calib-trajectories",
            "0",
            "--calib-steps",
            "3",
            "-q",
        ],
        capsys,
    )
    line = assert_one_line_error(code, err, "quantize")
    assert "num_trajectories" in line
    assert not output.exists()


def test_quantize_overwrite_onto_a_file_fails_cleanly(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a checkpoint")
    code, _, err = run(
        ["quantize", "tiny-dit", "-o", str(target), "--overwrite", "--recipe", "minmax", *CALIB, "-q"], capsys
    )
    if code == 2:
        assert_one_line_error(code, err, "quantize")
    else:
        assert code == 0 and (target / "dmquant.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ---------------------------------------------------------------- inspect


def test_inspect_fp_tiny_unet_lists_split_shortcut_convs(capsys):
    code, out, _ = run(["inspect", "tiny-unet", "-q"], capsys)
    assert code == 0
    assert out.startswith("tiny-unet: what recipe mse would do (not calibrated)")
    rows = table_rows(out, "name")
    assert list(rows[0]) == ["name", "kind", "weight", "activation", "granularity", "split", "rule"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["conv_in"]["rule"] == "conv_in|pos_embed.proj"
    assert by_name["conv_out"]["weight"] == "int8"
    assert by_name["time_embedding.linear_1"]["kind"] == "Linear"
    assert by_name["mid_block.attentions.0"]["kind"] == "Attention"
    split = {row["name"]: int(row["split"]) for row in rows if row["split"] != "0"}
    # the up blocks' resnets take cat([h, skip]): their conv1 and conv_shortcut are split
    assert split, "no split shortcut conv found"
    assert all(name.startswith("up_blocks.") for name in split)
    assert all(name.endswith((".conv1", ".conv_shortcut")) for name in split)
    assert split["up_blocks.0.resnets.0.conv_shortcut"] == split["up_blocks.0.resnets.0.conv1"] > 0
    assert "up_blocks.1.resnets.1.conv_shortcut" in split
    assert not any(name.startswith("down_blocks.") for name in split)
    quantized = sum(1 for row in rows if row["weight"] != "fp" or row["activation"] != "fp")
    assert f"{quantized} of {len(rows)} layers quantized, {len(split)} with a split shortcut input" in out


def test_inspect_fp_with_minmax_recipe_and_w_bits(capsys):
    code, out, _ = run(["inspect", "tiny-unet", "--recipe", "minmax", "--w-bits", "4", "-q"], capsys)
    assert code == 0
    assert "what recipe minmax would do" in out
    rows = table_rows(out, "name")
    assert all(row["split"] == "0" for row in rows)  # minmax does not split shortcuts
    assert "with a split shortcut input" in out and ", 0 with a split" in out
    weights = {row["name"]: row["weight"] for row in rows if row["kind"] != "Attention"}
    assert weights["down_blocks.0.resnets.0.conv1"] == "int4"
    assert weights["conv_in"] == weights["conv_out"] == "int8"


def test_inspect_checkpoint_prints_its_report(w4_checkpoint, capsys):
    output, _ = w4_checkpoint
    code, out, _ = run(["inspect", str(output), "-q"], capsys)
    assert code == 0
    assert out.startswith(f"{output}: recipe mse, quantized checkpoint")
    rows = table_rows(out, "name")
    report = json.loads((output / "dmquant.json").read_text())["report"]
    assert [row["name"] for row in rows] == [row["name"] for row in report]
    assert [row["weight"] for row in rows] == [row["weight"] for row in report]
    assert {row["weight"] for row in rows if row["rule"] == "—" and row["kind"] != "Attention"} == {"int4"}
    assert f"of {len(report)} layers quantized" in out


# ---------------------------------------------------------------- sample


def test_sample_writes_png_and_npz(tmp_path, capsys):
    png = tmp_path / "out" / "grid.png"
    code, out, err = run(
        [
            "sample",
            "tiny-dit",
            "-o",
            str(png),
            "--num-samples",
            "3",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--labels",
            "5,7",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    npz = png.with_suffix(".npz")
    assert out.strip() == f"wrote {png} and {npz}"
    with np.load(npz) as archive:
        images, labels = archive["images"], archive["class_labels"]
    # tiny-dit: 8x8 latents decoded to 16x16 RGB
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [5, 7, 5]
    assert images.std() > 0
    with Image.open(png) as picture:
        # 3 images -> a 2x2 grid of 16 px tiles with 2 px padding
        assert picture.size == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2)
        assert picture.mode == "RGB"
        pixels = np.asarray(picture)
    # the first tile sits at (2, 2), after the top and left padding
    np.testing.assert_array_equal(pixels[2:18, 2:18], images[0])


def test_sample_from_checkpoint_differs_from_fp(w4_checkpoint, tmp_path, capsys):
    output, _ = w4_checkpoint
    code, _, err = run(["sample", "tiny-dit", "-o", str(tmp_path / "fp.png"), *SAMPLING, "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["sample", str(output), "-o", str(tmp_path / "q.png"), *SAMPLING, "-q"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "fp.npz") as fp, np.load(tmp_path / "q.npz") as q:
        assert fp["images"].shape == q["images"].shape == (2, 16, 16, 3)
        assert not np.array_equal(fp["images"], q["images"])
        np.testing.assert_array_equal(fp["class_labels"], q["class_labels"])
    with Image.open(tmp_path / "q.png") as picture:
        assert picture.size == (2 * (16 + 2) + 2, 16 + 4)


def test_convert_lists_each_layer_and_matches_the_simulated_samples_on_cpu(w4_checkpoint, tmp_path, capsys):
    output, _ = w4_checkpoint
    code, out, err = run(["convert", str(output), *SAMPLING, "-q"], capsys)
    assert code == 0, err
    assert "int4" in out and "| name | kind | weight | group_size | activation |" in out
    assert "converted vs simulated, 2 samples from the same seeds on cpu: PSNR inf dB" in out
    code, _, err = run(["sample", str(output), "-o", str(tmp_path / "q.png"), *SAMPLING, "-q"], capsys)
    code, out, err = run(["sample", str(output), "-o", str(tmp_path / "r.png"), *SAMPLING, "--real-kernels"], capsys)
    assert code == 0, err
    assert out.startswith("converted ")
    with np.load(tmp_path / "q.npz") as simulated, np.load(tmp_path / "r.npz") as real:
        np.testing.assert_array_equal(simulated["images"], real["images"])


@pytest.mark.slow
def test_convert_compiles_the_converted_model_and_still_matches(w4_checkpoint, capsys):
    output, _ = w4_checkpoint
    code, out, err = run(["convert", str(output), *SAMPLING, "--compile", "-q"], capsys)
    assert code == 0, err
    assert "converted vs simulated, 2 samples from the same seeds on cpu: PSNR inf dB" in out


def test_sample_non_png_output_is_a_clean_error(tmp_path, capsys):
    code, _, err = run(["sample", "tiny-dit", "-o", str(tmp_path / "grid.jpg"), *SAMPLING, "-q"], capsys)
    assert ".png" in assert_one_line_error(code, err, "sample")


@pytest.mark.parametrize("option", ["--num-samples", "--batch-size"])
def test_sample_zero_count_is_a_usage_error(tmp_path, capsys, option):
    argv = ["sample", "tiny-dit", "-o", str(tmp_path / "s.png"), *SAMPLING, "-q"]
    argv[argv.index(option) + 1] = "0"
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------- eval


def test_eval_prints_metrics_and_writes_json(w4_checkpoint, tmp_path, capsys):
    output, _ = w4_checkpoint
    report = tmp_path / "results" / "eval.json"
    code, out, err = run(["eval", str(output), *SAMPLING, "--json", str(report), "-q"], capsys)
    assert code == 0, err
    assert out.startswith(f"{output} vs FP tiny-dit (2 samples, 3 steps, seed 0)")
    metrics = {row["metric"]: row["value"] for row in table_rows(out, "metric")}
    psnr = float(metrics["PSNR vs FP (dB)"])
    ssim = float(metrics["SSIM vs FP"])
    assert 0 < psnr < 100
    assert 0 < ssim <= 1
    assert "noise-estimate SQNR, mean over steps (dB)" in metrics
    assert "noise-estimate SQNR, worst step (dB)" in metrics
    assert float(metrics["compression"]) > 1  # 4-bit codes are smaller than FP32 weights
    steps_table = table_rows(out, "step_index")
    assert [row["step_index"] for row in steps_table] == ["0", "1", "2"]

    results = json.loads(report.read_text())
    assert f"wrote {report}" in out
    assert results["num_samples"] == 2 and results["num_inference_steps"] == 3
    assert "images" not in results
    assert len(results["steps"]) == 3
    assert [step["step_index"] for step in results["steps"]] == [0, 1, 2]
    assert all({"timestep", "sqnr_db", "mse"} <= set(step) for step in results["steps"])
    assert results["psnr_db"] == pytest.approx(psnr, rel=1e-3)
    assert results["sqnr_db_min"] == pytest.approx(min(step["sqnr_db"] for step in results["steps"]))
    run_record = results["run"]  # enough to rerun it and to know where it ran
    assert run_record["checkpoint"] == str(output.resolve()) and run_record["base"] == "tiny-dit"
    assert run_record["seed"] == 0 and run_record["torch_device"] == "cpu"
    assert results["verdict"]["within"] is None and out.rstrip().splitlines()[-1].startswith("verdict: ")
    assert {"device", "torch", "diffusers", "dmquant", "date"} <= set(run_record)
    assert results["size_bytes"] < results["fp_size_bytes"]


# ---------------------------------------------------------------- demo


def test_demo_writes_report_images_and_checkpoints(tmp_path, capsys):
    output = tmp_path / "demo"
    argv = ["demo", "-o", str(output), "--num-samples", "2", "--steps", "3", "--model", "tiny-dit", "-q"]
    code, out, err = run(argv + ["--batch-size", "2"], capsys)
    assert code == 0, err
    for name in ("fp.png", "w8a8.png", "w4a8.png"):
        with Image.open(output / name) as picture:  # a title strip above the grid
            assert picture.size == (2 * (16 + 2) + 2, 16 + 4 + LABEL_SIZE), name
    with Image.open(output / "comparison.png") as picture:  # one row per setting, labelled; one column per sample
        assert picture.size[0] > 2 * (16 + 2) + 2 and picture.size[1] == 3 * (16 + 2) + 2
    with Image.open(output / "sqnr.png") as picture:
        assert picture.size[0] > 300
    for label, weight in (("w8a8", "int8"), ("w4a8", "int4")):
        manifest = json.loads((output / label / "dmquant.json").read_text())
        assert (output / label / "quantized_model.safetensors").is_file()
        weights = {row["weight"] for row in manifest["report"] if row["rule"] is None and row["kind"] != "Attention"}
        assert weights == {weight}, label
    results = json.loads((output / "results.json").read_text())
    assert [row["setting"] for row in results["rows"]] == ["FP", "W8A8", "W4A8"]
    assert {len(steps) for steps in results["steps"].values()} == {3}
    assert results["floors"] == {}  # no glyph metrics for a model outside the zoo
    settings = [row["setting"] for row in table_rows(out, "setting")]
    assert settings == ["FP", "W8A8", "W4A8"]
    report = (output / "report.md").read_text()
    assert "| W4A8 |" in report and "![" in report
    page = (output / "report.html").read_text()
    assert "<table>" in page and "sqnr.png" in page and "comparison.png" in page
    assert "random-initialised" in out
    # every setting ends with a verdict and a next step; without glyph metrics there is no seed spread
    assert [verdict["setting"] for verdict in results["verdicts"]] == ["W8A8", "W4A8"]
    assert all(verdict["within"] is None and verdict["next_step"] for verdict in results["verdicts"])
    assert out.rstrip().splitlines()[-1].startswith("verdict: W4A8: no seed spread")
    assert report.rstrip().splitlines()[-1].startswith("- Verdict: W4A8:")
    assert set(results["files"]) == {p.name for p in output.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging directory or lock left

    # an earlier report is replaced only with --overwrite, and only while it holds nothing else
    code, _, err = run(argv, capsys)
    assert "--overwrite" in assert_one_line_error(code, err, "demo")
    (output / "notes.txt").write_text("mine")
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert "dmquant did not write" in assert_one_line_error(code, err, "demo")
    assert (output / "notes.txt").read_text() == "mine" and (output / "report.md").exists()


@pytest.mark.slow
def test_demo_on_the_shipped_glyph_model_reports_accuracy_and_fid_with_floor(tmp_path, capsys):
    output = tmp_path / "demo"
    argv = ["demo", "-o", str(output), "--num-samples", "8", "--steps", "4", "--batch-size", "8", "-q"]
    code, out, err = run(argv + ["--recipe", "minmax", "--calib-trajectories", "2", "--calib-steps", "4"], capsys)
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    rows = {row["setting"]: row for row in results["rows"]}
    assert set(rows) == {"FP", "FP (other seeds)", "W8A8", "W4A8"}
    for verdict in results["verdicts"]:  # judged on the glyph metrics against FP from other seeds
        assert verdict["within"] in (True, False) and "seed spread" in verdict["detail"]
    for row in rows.values():
        assert 0.0 <= row["class accuracy"] <= 1.0
        assert row["FID-proxy"] > 0
    floors = json.loads((output / "results.json").read_text())["floors"]
    assert floors["fid"] > 0 and floors["sfid"] > 0
    assert "FID-proxy floor" in out
    assert rows["W4A8"]["size (MiB)"] < rows["W8A8"]["size (MiB)"] < rows["FP"]["size (MiB)"]


def test_demo_refuses_a_foreign_non_empty_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code, out, err = run(["demo", "-o", str(tmp_path), "--model", "tiny-unet", "-q"], capsys)
    assert_one_line_error(code, err, "demo")
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "tiny-nope", "-o", "{tmp}/never"],
        ["inspect", "tiny-nope"],
        ["sample", "tiny-nope", "-o", "{tmp}/never.png"],
    ],
)
def test_unknown_builtin_model(tmp_path, capsys, argv):
    argv = [arg.format(tmp=tmp_path) for arg in argv] + ["-q"]
    code, out, err = run(argv, capsys)
    line = assert_one_line_error(code, err, argv[0])
    assert "tiny-nope" in line
    assert "tiny-unet, tiny-unet-text, tiny-dit" in line
    assert out == ""
    assert list(tmp_path.iterdir()) == []


def test_recipe_file_with_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("weight:\n  bitz: 4\n")
    output = tmp_path / "never"
    code, out, err = run(["quantize", "tiny-dit", "-o", str(output), "--recipe", str(recipe), *CALIB, "-q"], capsys)
    line = assert_one_line_error(code, err, "quantize")
    assert "weight.bitz: unknown key" in line
    assert "did you mean 'bits'?" in line
    assert "typo.yaml" in line
    assert not output.exists()


def test_unknown_recipe_name(capsys):
    code, _, err = run(["inspect", "tiny-dit", "--recipe", "msee", "-q"], capsys)
    line = assert_one_line_error(code, err, "inspect")
    assert "unknown recipe 'msee'" in line and "minmax, mse" in line


def test_eval_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    code, out, err = run(["eval", str(missing), *SAMPLING, "-q"], capsys)
    line = assert_one_line_error(code, err, "eval")
    assert str(missing) in line
    assert out == ""


def test_eval_of_an_fp_model_is_refused(capsys):
    code, _, err = run(["eval", "tiny-dit", *SAMPLING, "-q"], capsys)
    assert "not a dmquant checkpoint" in assert_one_line_error(code, err, "eval")


def test_unsupported_w_bits(tmp_path, capsys):
    code, _, err = run(["quantize", "tiny-dit", "-o", str(tmp_path / "never"), "--w-bits", "9", *CALIB, "-q"], capsys)
    assert "unsupported integer bit width 9" in assert_one_line_error(code, err, "quantize")
    assert not (tmp_path / "never").exists()


def test_float_activation_format_with_shipped_recipe(capsys):
    code, out, err = run(["inspect", "tiny-dit", "--a-bits", "fp8_e4m3", "-q"], capsys)
    assert code == 0, err
    rows = table_rows(out, "name")
    assert {row["activation"] for row in rows if row["kind"] == "Linear" and row["rule"] == "—"} == {"fp8_e4m3"}


def test_quantize_with_reconstruction_resumes_from_its_state_and_cleans_up(tmp_path, capsys, monkeypatch):
    import dmquant.recon.model as recon_model

    output = tmp_path / "qdiff"
    argv = ["quantize", "tiny-unet", "-o", str(output), "--recipe", "q-diffusion", *CALIB, "--recon-iterations", "2"]
    reconstruct, calls = recon_model.reconstruct, []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(kwargs["desc"])
        return reconstruct(*args, **kwargs)

    monkeypatch.setattr(recon_model, "reconstruct", dies_after_three)
    code, _, err = run([*argv, "-q"], capsys)
    state = tmp_path / "qdiff.reconstruction"
    assert code == 130 and f"the finished blocks are kept in {state}: rerun the same command to resume" in err
    assert len(list(state.glob("*.safetensors"))) == 3 and not output.exists()
    monkeypatch.setattr(recon_model, "reconstruct", reconstruct)

    code, out, err = run([*argv, "-q"], capsys)
    assert code == 0, err
    assert f"resuming the reconstruction saved in {state}" in out
    assert not state.exists()
    manifest = json.loads((output / "dmquant.json").read_text())
    assert manifest["recipe"]["reconstruction"]["iterations"] == 2
    assert {r["pass_name"] for r in manifest["extra"]["reconstruction"]} == {"weights", "activations"}


def test_a_state_directory_that_is_not_dmquant_progress_is_neither_resumed_nor_removed(tmp_path, capsys):
    output, state = tmp_path / "qdiff", tmp_path / "qdiff.reconstruction"
    state.mkdir()
    (state / "notes.txt").write_text("mine")
    code, out, err = run(["quantize", "tiny-unet", "-o", str(output), "--recipe", "q-diffusion", *CALIB, "-q"], capsys)
    assert "not the reconstruction progress" in assert_one_line_error(code, err, "quantize")
    assert "resuming" not in out
    assert [p.name for p in state.iterdir()] == ["notes.txt"] and not output.exists()


def test_no_reconstruction_skips_it(tmp_path, capsys):
    output = tmp_path / "plain"
    code, out, err = run(
        ["quantize", "tiny-dit", "-o", str(output), "--recipe", "ptq4dm", *CALIB, "--no-reconstruction", "-q"], capsys
    )
    assert code == 0, err
    manifest = json.loads((output / "dmquant.json").read_text())
    assert manifest["recipe"]["reconstruction"]["enabled"] is False and "reconstruction" not in manifest["extra"]


def test_analyze_ranks_blocks_and_modules_and_writes_plots(tmp_path, capsys):
    output = tmp_path / "sqnr"
    argv = ["analyze", "tiny-unet", "--recipe", "minmax", "--w-bits", "4", *CALIB, "-o", str(output)]
    code, out, err = run([*argv, "--steps", "3", "--num-samples", "2", "--top", "3", "-q"], capsys)
    assert code == 0, err
    assert "blocks, each quantized alone (global; most sensitive first)" in out
    blocks = table_rows(out, "name")
    assert len(blocks) == 3 and all(float(row["SQNR (dB)"]) > 0 for row in blocks)
    assert sorted(p.name for p in output.iterdir()) == ["blocks.png", "modules.png", "sensitivity.json"]
    data = json.loads((output / "sensitivity.json").read_text())
    assert len(data["timesteps"]) == 3 and "up_blocks.0.resnets.0" in data["blocks"]


def test_a_checkpoint_with_per_step_statistics_samples_with_its_own_steps(tmp_path, capsys):
    recipe = tmp_path / "corrected.yaml"
    recipe.write_text(
        "base: minmax\ncorrection: {enabled: true, num_samples: 2, num_inference_steps: 4, batch_size: 2}\n"
    )
    output = tmp_path / "ptqd"
    code, _, err = run(["quantize", "tiny-unet", "-o", str(output), "--recipe", str(recipe), *CALIB, "-q"], capsys)
    assert code == 0, err
    code, out, err = run(["eval", str(output), "--num-samples", "2", "--batch-size", "2", "-q"], capsys)
    assert code == 0, err
    assert "(2 samples, 4 steps" in out
    code, _, err = run(["eval", str(output), "--num-samples", "2", "--steps", "3", "-q"], capsys)
    assert "made for 4 steps; sample with --steps 4" in assert_one_line_error(code, err, "eval")


def test_compile_allows_one_graph_per_step_parameter_set():
    """A model with per-step ranges for 20 steps compiles up to 20 graphs (twice: full and last batches), past
    dynamo's default limit of 8, after which the remaining steps would run eagerly."""
    per_step = Quantizer(QuantizerConfig(bits=8, granularity="tensor"), num_steps=20)
    model = types.SimpleNamespace(denoiser=torch.nn.Sequential(per_step))
    with torch._dynamo.config.patch(recompile_limit=8):  # restored on exit
        _compiled(model, argparse.Namespace(compile=True, device="cpu"))
        assert torch._dynamo.config.recompile_limit == 40


# ---------------------------------------------------------------- values no command can use


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "tiny-unet", "--guidance", "nan"], "--guidance nan: must be a finite number"),
        (["sample", "tiny-unet", "--guidance", "inf"], "--guidance inf: must be a finite number"),
        (["sample", "tiny-unet", "--eta", "-1"], "--eta -1.0: must be a finite number >= 0"),
        (["sample", "tiny-unet", "--seed", "-1"], "--seed -1: must lie in"),
        (["sample", "tiny-unet", "--seed", str(2**64)], "--seed 18446744073709551616: must lie in"),
        (["sample", "tiny-unet", "--device", "nope"], "--device nope: not a torch device"),
        (["sample", "tiny-unet", "--device", "meta"], "--device meta: no such device"),
        (["inspect", "tiny-unet", "--device", "cuda:99"], "--device cuda:99: no such device"),
        (["zoo", "evaluate", "ddpm-glyphs32", "--guidance", "1", "nan"], "--guidance nan"),
        (["sample", "tiny-unet", "--prompt", "a red car"], "class-conditional: it takes class labels, not prompts"),
        (["sample", "tiny-unet-text", "--labels", "1"], "text-conditional: it takes prompts, not class labels"),
        (["inspect", "tiny-unet", "--w-bits", "²"], "unknown quantization format '²'"),
    ],
)
def test_a_value_no_command_can_use_is_a_one_line_error(tmp_path, capsys, argv, message):
    command = "zoo" if argv[0] == "zoo" else argv[0]
    if argv[0] == "sample":
        argv = [*argv, "-o", str(tmp_path / "x.png"), "--num-samples", "1", "--steps", "2"]
    code, _, err = run([*argv, "-q"], capsys)
    assert message in assert_one_line_error(code, err, command)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(capsys):
    code, _, err = run(["inspect", "tiny-unet", "--device", "cuda", "-q"], capsys)
    assert "--device cuda: no such device on this machine (0 cuda device(s))" in assert_one_line_error(
        code, err, "inspect"
    )


def test_inspect_shows_a_recipe_whose_switch_step_is_chosen_while_quantizing(capsys):
    code, out, err = run(["inspect", "tiny-unet", "--recipe", "ptqd-mixed", "--a-bits", "4", "-q"], capsys)
    assert code == 0, err
    assert "switches the activations to 8 bits at a step chosen while quantizing" in out
    assert {row["activation"] for row in table_rows(out, "name") if row["rule"] == "—" and row["kind"] == "Conv2d"} == {
        "uint4"
    }


@pytest.mark.parametrize("steps", ["2", "5"], ids=["fewer", "more"])
def test_a_per_step_checkpoint_sampled_with_another_step_count_is_a_one_line_error(tmp_path, capsys, steps):
    recipe = tmp_path / "per-step.yaml"
    recipe.write_text("base: minmax\nper_step_activations: true\n")
    output = tmp_path / "per-step"
    code, _, err = run(["quantize", "tiny-unet", "-o", str(output), "--recipe", str(recipe), *CALIB, "-q"], capsys)
    assert code == 0, err
    argv = ["sample", str(output), "-o", str(tmp_path / "x.png"), "--num-samples", "1", "--steps", steps, "-q"]
    code, _, err = run(argv, capsys)
    assert "made for 3 steps; sample with --steps 3" in assert_one_line_error(code, err, "sample")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "tiny-unet", "-o", "{file}/grid.png", "--num-samples", "1", "--steps", "2"],
        ["analyze", "tiny-unet", "-o", "{file}/sqnr", "--num-samples", "1", "--steps", "2"],
        ["quantize", "tiny-unet", "-o", "{file}/q", *CALIB],
        ["demo", "--model", "tiny-unet", "-o", "{file}/demo", "--num-samples", "1", "--steps", "2"],
    ],
)
def test_an_output_below_a_file_is_refused_before_any_work(tmp_path, capsys, argv):
    (tmp_path / "file").write_text("mine")
    argv = [arg.format(file=tmp_path / "file") for arg in argv]
    code, out, err = run([*argv, "-q"], capsys)
    assert "is a file, so nothing can be created below it" in assert_one_line_error(code, err, argv[0])
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_a_write_the_machine_refuses_is_a_one_line_error(w4_checkpoint, tmp_path, capsys, monkeypatch):
    output, _ = w4_checkpoint

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "eval.json"))

    monkeypatch.setattr(Path, "write_text", no_space)
    argv = ["eval", str(output), "--json", str(tmp_path / "eval.json"), "--num-samples", "1", "--steps", "2", "-q"]
    code, _, err = run(argv, capsys)
    assert assert_one_line_error(code, err, "eval").endswith("eval.json: No space left on device")


def test_quantize_onto_an_output_another_process_is_writing_fails_before_calibrating(tmp_path, capsys, monkeypatch):
    import dmquant.api as api  # the command imports quantize from there when it runs

    output = tmp_path / "q"
    calibrated = []
    monkeypatch.setattr(api, "quantize", lambda *args, **kwargs: calibrated.append(args))
    descriptor = os.open(tmp_path / ".q.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as another dmquant process holds it
    try:
        code, _, err = run(["quantize", "tiny-unet", "-o", str(output), *CALIB, "-q"], capsys)
    finally:
        os.close(descriptor)
    assert "another process is writing it" in assert_one_line_error(code, err, "quantize")
    assert calibrated == [] and not output.exists()
