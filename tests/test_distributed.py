"""Work spread over processes (:mod:`dmquant.distributed`): each process's batches, the generator taken past
other processes' batches, and sampling, evaluation and calibration recording on 2 CPU processes (gloo, through
accelerate's debug launcher) giving what one process gives, bit for bit."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import load_file

from dmquant import distributed
from dmquant.calib.record import record_calibration
from dmquant.calib.strategies import ndtc, uniform
from dmquant.checkpoint import TENSORS_FILE
from dmquant.cli import main
from dmquant.errors import ConfigError
from dmquant.jobs import generate
from dmquant.sampling import Conditioning, advance_generator, sample
from dmquant.zoo import WEIGHTS_DIR
from dmquant.zoo.reference import MODEL_CARD_FILE

SAMPLING = ["--num-samples", "5", "--steps", "3", "--batch-size", "2", "--eta", "0.5", "--seed", "4", "-q"]
ZOO_EVALUATE = ["zoo", "evaluate", "ddpm-glyphs32", "--num-samples", "5", "--batch-size", "2", "--steps", "2", "-q"]
CALIB = ["--recipe", "minmax", "--calib-trajectories", "5", "--calib-steps", "3", "--calib-batch-size", "2", "-q"]


def classes(n: int, guidance_scale: float = 2.0) -> Conditioning:
    return Conditioning.classes(torch.arange(n) % 3, null_label=10, guidance_scale=guidance_scale)


def _on(processes: dict[int, int], monkeypatch, index: int) -> None:
    monkeypatch.setattr(distributed, "num_processes", lambda: processes["count"])
    monkeypatch.setattr(distributed, "process_index", lambda: index)


def test_each_process_takes_every_nth_batch(monkeypatch):
    shares = []
    for index in range(3):
        _on({"count": 3}, monkeypatch, index)
        shares.append(list(distributed.shard(7, "a job")))
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_more_processes_than_batches_is_a_clear_error(unet, monkeypatch):
    _on({"count": 3}, monkeypatch, 1)
    with pytest.raises(ConfigError, match="3 processes but sampling 4 images in batches of 2 makes only 2 batch"):
        generate(unet, 4, num_inference_steps=2, batch_size=2, progress=False)
    # a recipe's calibration batches are not the user's choice: the processes past the last one wait
    assert list(distributed.shard(2, "a recipe's batches", idle=True)) == [1]
    _on({"count": 3}, monkeypatch, 2)
    assert list(distributed.shard(2, "a recipe's batches", idle=True)) == []


def test_one_process_without_a_launcher():
    assert (distributed.num_processes(), distributed.process_index(), distributed.is_main_process()) == (1, 0, True)
    assert distributed.gather({2: "c", 0: "a", 1: "b"}, 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match=r"batches \[2\] of 3"):
        distributed.gather({1: "b", 0: "a"}, 3)


@pytest.mark.parametrize(
    "scheduler, eta, conditioning",
    [
        (DDPMScheduler(num_train_timesteps=100), 0.0, classes(2, 1.0)),
        (DDIMScheduler(num_train_timesteps=100), 1.0, classes(2)),
    ],
    ids=["ddpm", "ddim-eta1-guided"],
)
def test_advance_generator_draws_what_sampling_draws(unet, scheduler, eta, conditioning):
    """Stochastic steps draw from the generator at every step: skipping only the initial noise would not do."""
    options = dict(batch_size=2, num_inference_steps=4, conditioning=conditioning, eta=eta)
    sampled, skipped = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sample(unet.denoiser, scheduler, generator=sampled, progress=False, **options)
    advance_generator(unet.denoiser, scheduler, generator=skipped, **options)
    assert torch.equal(sampled.get_state(), skipped.get_state())


def _recordings(unet) -> dict[str, object]:
    """Calibration sets of 5 trajectories in batches of 2 along stochastic DDPM trajectories: at uniform steps
    with guidance, and at a step per trajectory (NDTC); and of 2 trajectories, one batch."""
    scheduler = DDPMScheduler(num_train_timesteps=100)
    common = dict(num_inference_steps=4, num_trajectories=5, batch_size=2, progress=False)
    sets = {
        "uniform": record_calibration(
            unet.denoiser,
            scheduler,
            steps=uniform(count=2),
            conditioning=classes,
            generator=torch.Generator().manual_seed(1),
            **common,
        ),
        "ndtc": record_calibration(
            unet.denoiser,
            scheduler,
            steps=ndtc(seed=2),
            conditioning=lambda n: classes(n, 1.0),
            generator=torch.Generator().manual_seed(2),
            **common,
        ),
    }
    sets["one batch"] = record_calibration(  # fewer batches than processes: the second process waits
        unet.denoiser,
        scheduler,
        steps=[1, 3],
        conditioning=classes,
        generator=torch.Generator().manual_seed(3),
        **(common | {"num_trajectories": 2}),
    )
    return {name: calibration.named_tensors() for name, calibration in sets.items()}


def _two_processes(unet, checkpoint: Path, out: Path) -> None:
    """What each of the two processes runs; process ``r`` writes what it got to ``out/r.pt`` and asks the
    commands to write into ``out/r/``."""
    rank = distributed.process_index()
    assert distributed.num_processes() == 2
    images, _ = generate(unet, 5, num_inference_steps=3, batch_size=2, seed=4, eta=0.5, progress=False)
    mine = out / str(rank)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        codes = [
            main(["sample", "tiny-unet", "-o", str(mine / "grid.png"), *SAMPLING]),
            main(["eval", str(checkpoint), "--json", str(mine / "eval.json"), *SAMPLING]),
            main(["quantize", "tiny-unet", "-o", str(mine / "checkpoint"), *CALIB]),
            main([*ZOO_EVALUATE, "--model-dir", str(out / f"zoo{rank}")]),
        ]
    batches = distributed.gather({index: (index, rank) for index in distributed.shard(5, "five batches")}, 5)
    refused = io.StringIO()
    with contextlib.redirect_stderr(refused):  # the commands that run on one process say so
        codes.append(main(["demo", "-o", str(mine / "demo")]))
        codes.append(main(["quantize", str(WEIGHTS_DIR / "dit-glyphs"), "-o", str(mine / "pipeline"), "-q"]))
    said = refused.getvalue()
    codes.append("dmquant demo runs on one process" in said and "a pipeline directory is quantized by one" in said)
    result = {
        "batches": batches,
        "images": images,
        "recordings": _recordings(unet),
        "codes": codes,
        "printed": printed.getvalue(),
    }
    torch.save(result, out / f"{rank}.pt")


def test_two_processes_give_what_one_gives(unet, tmp_path, monkeypatch):
    from accelerate import debug_launcher

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else accelerate sets its own count

    checkpoint = tmp_path / "checkpoint"
    single = tmp_path / "single"
    for folder in ("zoo", "zoo0", "zoo1"):
        shutil.copytree(WEIGHTS_DIR / "ddpm-glyphs32", tmp_path / folder)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ZOO_EVALUATE, "--model-dir", str(tmp_path / "zoo")]) == 0
        assert main(["quantize", "tiny-unet", "-o", str(checkpoint), *CALIB]) == 0
        assert main(["sample", "tiny-unet", "-o", str(single / "grid.png"), *SAMPLING]) == 0
        assert main(["eval", str(checkpoint), "--json", str(single / "eval.json"), *SAMPLING]) == 0
    images, _ = generate(unet, 5, num_inference_steps=3, batch_size=2, seed=4, eta=0.5, progress=False)
    recordings = _recordings(unet)

    debug_launcher(_two_processes, args=(unet, checkpoint, tmp_path), num_processes=2)

    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for result in results:  # every process returns the whole result, the one a single process computes
        assert result["batches"] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]
        assert result["codes"] == [0, 0, 0, 0, 2, 2, True]
        assert torch.equal(result["images"], images)
        for name, tensors in recordings.items():
            assert result["recordings"][name].keys() == tensors.keys()
            for key, tensor in tensors.items():
                assert torch.equal(result["recordings"][name][key], tensor), (name, key)
    # only the main process prints and writes
    assert "wrote" in results[0]["printed"] and results[1]["printed"] == ""
    assert not (tmp_path / "1").exists()
    main_out = tmp_path / "0"
    with np.load(single / "grid.npz") as one, np.load(main_out / "grid.npz") as two:
        assert one.keys() == two.keys() and all(np.array_equal(one[key], two[key]) for key in one)
    assert (single / "grid.png").read_bytes() == (main_out / "grid.png").read_bytes()
    one, two = (json.loads((folder / "eval.json").read_text()) for folder in (single, main_out))
    for key in ("psnr_db", "ssim", "steps", "sqnr_db_mean", "size_bytes", "gbops_per_call", "verdict"):
        assert one[key] == two[key], key
    card = (WEIGHTS_DIR / "ddpm-glyphs32" / MODEL_CARD_FILE).read_bytes()
    assert (tmp_path / "zoo1" / MODEL_CARD_FILE).read_bytes() == card  # written by the main process only
    one, two = (json.loads((tmp_path / folder / MODEL_CARD_FILE).read_text()) for folder in ("zoo", "zoo0"))
    assert one["quality"]["results"] == two["quality"]["results"]
    # calibration recorded over both processes: the same quantized model
    one, two = (load_file(folder / TENSORS_FILE) for folder in (checkpoint, main_out / "checkpoint"))
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)


def test_num_processes_launches_the_command_on_that_many_processes(tmp_path, capfd):
    """``--num-processes 2`` on the CPU: torch's launcher, accelerate's state on gloo; one process writes what a
    single process writes. With one batch for the two processes, each says so and the launch fails."""
    single, launched = tmp_path / "single.png", tmp_path / "launched.png"
    assert main(["sample", "tiny-unet", "-o", str(single), *SAMPLING]) == 0
    assert main(["sample", "tiny-unet", "-o", str(launched), *SAMPLING, "--num-processes", "2"]) == 0
    out = capfd.readouterr().out
    assert out.count(f"wrote {launched}") == 1
    with np.load(single.with_suffix(".npz")) as one, np.load(launched.with_suffix(".npz")) as two:
        assert all(np.array_equal(one[key], two[key]) for key in one)
    one_batch = ["--num-samples", "2", "--batch-size", "2", "--num-processes", "2"]
    assert main(["sample", "tiny-unet", "-o", str(tmp_path / "x.png"), *SAMPLING, *one_batch]) != 0
    assert "2 processes but sampling 2 images in batches of 2 makes only 1 batch" in capfd.readouterr().err
    assert not (tmp_path / "x.png").exists()
