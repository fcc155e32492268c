"""bench/quality.py: the cell matrix, resuming, time-limited chunks and one real cell per kind on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import quality, report
from bench.configs import CALIBRATION_ABLATION, CALIBRATION_SIZE
from bench.report import validate_cell


def test_matrix_lists_fp_rows_recipe_bits_and_peers_with_their_own_bits():
    methods = ["fp", "fp-seed1", "mse", "torchao-int4-weight-only"]
    cells = quality.plan_cells(["ddpm-glyphs32"], methods, ["W8A8", "W4A8"])
    assert [(c.method, c.bits, c.kind) for c in cells] == [
        ("fp", "FP32", "fp"),
        ("fp-seed1", "FP32", "fp"),
        ("mse", "W8A8", "recipe"),
        ("mse", "W4A8", "recipe"),
        ("torchao-int4-weight-only", "W4A16", "peer"),
    ]
    assert cells[2].path(Path("r")) == Path("r/ddpm-glyphs32/mse__W8A8.json")


def test_pending_skips_finished_cells_and_retries_failed_ones(tmp_path):
    cells = quality.plan_cells(["dit-glyphs"], ["minmax"], ["W8A8", "W4A8", "W4A4"])
    quality.write_cell(cells[0].path(tmp_path), {"status": "ok"})
    quality.write_cell(cells[1].path(tmp_path), {"status": "failed"})
    assert quality.pending(cells, tmp_path, force=False) == cells[1:]
    assert quality.pending(cells, tmp_path, force=True) == cells


def test_a_time_limit_stops_before_the_next_model_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(quality, "ModelBench", lambda name, args: built.append(name))
    args = quality.parse_args(["--models", "ddpm-glyphs32", "--methods", "fp", "--results", str(tmp_path)])
    args.max_minutes = 0.0
    assert quality.run_matrix(args, "cmd") == 1
    assert built == []
    assert "1 cells left (time limit); run the same command again to resume" in capsys.readouterr().out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The FP row, a recipe cell (simulated, and on converted layers) and a peer cell of ddpm-glyphs32 at toy
    sizes on CPU."""
    results = tmp_path_factory.mktemp("results")
    torch.manual_seed(0)
    sizes = ["--bits", "W8A8", "--num-samples", "16", "--steps", "2", "--batch-size", "8"]
    sizes += ["--device", "cpu", "--results", str(results), "-q"]
    quality.main(["--models", "ddpm-glyphs32", "--methods", "fp", "minmax", "torchao-int4-weight-only", *sizes])
    quality.main(["--models", "ddpm-glyphs32", "--methods", "minmax", "--real-kernels", *sizes])
    return {path.stem: json.loads(path.read_text()) for path in (results / "ddpm-glyphs32").glob("*.json")}


@pytest.mark.slow
def test_cells_follow_the_report_schema(small_run):
    assert set(small_run) == {"fp__FP32", "minmax__W8A8", "minmax__W8A8__kernels", "torchao-int4-weight-only__W4A16"}
    for name, cell in small_run.items():
        validate_cell(cell, name)
        assert cell["command"].startswith("python bench/quality.py --models ddpm-glyphs32")
        assert cell["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_recipe_cell_measures_against_fp_and_records_calibration(small_run):
    fp, cell = small_run["fp__FP32"], small_run["minmax__W8A8"]
    assert cell["status"] == "ok", cell["reason"]
    assert fp["metrics"].get("psnr") is None
    assert 5 < cell["metrics"]["psnr"] < 80 and 0 < cell["metrics"]["ssim"] <= 1
    assert len(cell["sqnr_per_step"]) == 2 and all(v > 0 for v in cell["sqnr_per_step"])
    assert cell["calibration_s"] > 0
    assert cell["recipe"]["weight"]["bits"] == 8 and cell["recipe"]["attention"]["enabled"] is False
    assert cell["metrics"]["fid_floor"] == fp["metrics"]["fid_floor"]


@pytest.mark.slow
def test_real_kernel_cells_are_filed_and_tabled_apart_and_equal_their_simulated_twins_on_cpu(small_run):
    simulated, converted = small_run["minmax__W8A8"], small_run["minmax__W8A8__kernels"]
    assert converted["status"] == "ok", converted["reason"]
    assert converted["metrics"] == simulated["metrics"]  # the reference path: bit for bit
    assert converted["sampling"]["real_kernels"] and "real_kernels" not in simulated["sampling"]
    assert converted["conversion"].startswith("converted ")
    assert report.table_name(converted) == "ddpm-glyphs32-kernels" and report.table_name(simulated) == "ddpm-glyphs32"


@pytest.mark.slow
def test_a_peer_that_cannot_run_here_is_a_row_with_its_reason(small_run):
    cell = small_run["torchao-int4-weight-only__W4A16"]
    with pytest.raises(quality.peers.PeerUnavailable) as why:  # no CUDA here, or no torchao
        quality.peers.check_available("torchao-int4-weight-only", "cpu")
    assert cell["status"] == "unsupported" and cell["reason"] == str(why.value)


def test_peer_denoiser_answers_in_float32_whatever_the_peer_computes_in():
    from dmquant.zoo.tiny import tiny_unet2d

    model = tiny_unet2d().to(torch.bfloat16)
    wrapped = quality.PeerDenoiser(model)
    out = wrapped(torch.randn(2, 3, 16, 16), torch.tensor([1, 500]), class_labels=torch.tensor([0, 1]))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    assert wrapped.config["in_channels"] == model.config.in_channels


def test_ptqd_ablation_steps_share_one_quantization_and_differ_only_in_the_corrections():
    bench = SimpleNamespace(model=SimpleNamespace(guidance_scale=4.0), args=SimpleNamespace(steps=7))
    methods = [m for m in quality.recipe_methods() if m.startswith("ptqd")]
    assert {"ptqd", "ptqd-cnc", "ptqd-cnc-bc", "ptqd-no-recon", "ptqd-mixed"} <= set(methods)
    switches = {}
    for method in ["ptqd-cnc", "ptqd-cnc-bc", "ptqd"]:
        config = quality._recipe_config(bench, quality.Cell("ldm-glyphs64", method, "W4A8"))
        correction = config.correction
        switches[method] = (correction.correlation, correction.bias, correction.variance)
        assert correction.enabled and correction.num_inference_steps == 7
        assert config.calibration.guidance_scale == 4.0 and config.weight.bits == 4
    assert switches == {
        "ptqd-cnc": (True, False, False),
        "ptqd-cnc-bc": (True, True, False),
        "ptqd": (True, True, True),
    }
    assert not quality._recipe_config(
        bench, quality.Cell("dit-glyphs", "q-diffusion-no-recon", "W4A8")
    ).reconstruction.enabled


def test_stochastic_sampler_cells_are_filed_apart():
    deterministic, stochastic = quality.plan_cells(["dit-glyphs"], ["fp"], [], etas=[0.0, 1.0])
    assert deterministic.path(Path("r")) == Path("r/dit-glyphs/fp__FP32.json")
    assert stochastic.path(Path("r")) == Path("r/dit-glyphs/fp__FP32__eta1.json")
    assert quality.parse_args(["--eta", "0", "0.5"]).eta == [0.0, 0.5]


def test_recipes_that_differ_only_in_their_correction_share_one_quantized_model():
    bench = SimpleNamespace(model=SimpleNamespace(guidance_scale=1.0), args=SimpleNamespace(steps=50))

    def key(method: str, bits: str = "W4A8") -> str:
        return quality.quantization_key(quality._recipe_config(bench, quality.Cell("ddpm-glyphs32", method, bits)))

    shared = {key(method) for method in ["q-diffusion", "ptqd-cnc", "ptqd-cnc-bc", "ptqd"]}
    assert len(shared) == 1
    assert key("ptqd", "W8A8") not in shared
    assert key("q-diffusion-no-recon") not in shared and key("eda-dm") not in shared


def test_calibration_ablation_compares_strategies_at_equal_size_on_one_quantizer():
    from dmquant.calib.strategies import get_strategy

    bench = SimpleNamespace(model=SimpleNamespace(guidance_scale=1.0), args=SimpleNamespace(steps=50))
    configs = {
        method: quality._recipe_config(bench, quality.Cell("ddpm-glyphs32", method, "W4A8"))
        for method in CALIBRATION_ABLATION
    }
    strategies = {method: config.calibration.strategy for method, config in configs.items()}
    assert strategies == {
        "calib-uniform": "uniform",
        "calib-ndtc": "ndtc",
        "calib-tdac": "tdac",
        "calib-single-step": "single_step",
    }
    uniform = configs["calib-uniform"].calibration
    steps = get_strategy(uniform.strategy, **uniform.strategy_options)(uniform.num_inference_steps)
    sizes = {method: config.calibration.num_trajectories for method, config in configs.items()}
    sizes["calib-uniform"] *= len(steps)
    assert all(abs(size - CALIBRATION_SIZE) <= 1 for size in sizes.values()), sizes
    for config in configs.values():  # everything but the calibration data is q-diffusion's, ranges only
        assert not config.reconstruction.enabled
        assert config.weight == configs["calib-tdac"].weight and config.activation.observer == "mse"


def test_each_quantization_keeps_its_progress_apart(tmp_path):
    bench = SimpleNamespace(name="dit-glyphs", args=SimpleNamespace(state_dir=str(tmp_path)))
    first, second = quality.quantization_state_dir(bench, "a"), quality.quantization_state_dir(bench, "b")
    assert first.parent == second.parent == tmp_path / "dit-glyphs" and first != second
    assert quality.quantization_state_dir(bench, "a") == first  # the same command finds it again
    bench.args.state_dir = None
    assert quality.quantization_state_dir(bench, "a") is None


@pytest.mark.slow
def test_a_run_killed_after_building_reloads_the_built_model_and_its_cost(tmp_path, monkeypatch):
    argv = ["--models", "ddpm-glyphs32", "--methods", "mse", "--bits", "W8A8", "--num-samples", "8"]
    argv += ["--steps", "2", "--batch-size", "8", "--device", "cpu", "-q", "--state-dir", str(tmp_path / "state")]
    quality.main([*argv, "--results", str(tmp_path / "first")])
    built = list((tmp_path / "state" / "ddpm-glyphs32").glob(f"*/{quality.BUILT}/{quality.BUILD_COST}"))
    assert len(built) == 1

    def never(*args, **kwargs):
        raise AssertionError("the built model was quantized again")

    monkeypatch.setattr(quality, "quantize_model", never)
    quality.main([*argv, "--results", str(tmp_path / "again")])
    cells = [tmp_path / run / "ddpm-glyphs32/mse__W8A8.json" for run in ("first", "again")]
    first, again = (json.loads(cell.read_text()) for cell in cells)
    assert again["status"] == "ok", again["reason"]
    assert again["calibration_s"] == first["calibration_s"]
    assert again["metrics"]["psnr"] == pytest.approx(first["metrics"]["psnr"])


def _cells_on_two_processes(argv: list[str], results: Path) -> None:
    """Each of two processes runs the matrix, writing (it would) into ``results/<rank>``."""
    rank = quality.distributed.process_index()
    assert quality.distributed.num_processes() == 2
    quality.main([*argv, "--results", str(results / str(rank))])


@pytest.mark.slow
def test_two_processes_measure_what_one_measures_and_one_writes(tmp_path, monkeypatch):
    """``accelerate launch bench/quality.py``: each process samples and records a share; the main process's
    cells hold one process's numbers, and the other process writes nothing."""
    from accelerate import debug_launcher

    argv = ["--models", "ddpm-glyphs32", "--methods", "fp", "minmax", "--bits", "W8A8", "--num-samples", "8"]
    argv += ["--steps", "2", "--batch-size", "4", "--device", "cpu", "-q"]
    quality.main([*argv, "--results", str(tmp_path / "single")])
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else accelerate sets its own count
    debug_launcher(_cells_on_two_processes, args=(argv, tmp_path), num_processes=2)
    assert not (tmp_path / "1").exists()
    for name in ("fp__FP32", "minmax__W8A8"):
        one, two = (
            json.loads((tmp_path / run / "ddpm-glyphs32" / f"{name}.json").read_text()) for run in ("single", "0")
        )
        assert one["status"] == two["status"] == "ok", (one["reason"], two["reason"])
        assert one["metrics"] == two["metrics"] and one.get("sqnr_per_step") == two.get("sqnr_per_step")
