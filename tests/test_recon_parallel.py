"""Data-parallel reconstruction (:mod:`dmquant.recon.parallel`): each process's share of a unit's samples, and
two CPU processes (gloo, through accelerate's debug launcher) reconstructing the model one process does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dmquant import api, distributed
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, ReconstructionConfig, load_recipe
from dmquant.core.layers import activation_quantizers
from dmquant.errors import ConfigError
from dmquant.recon.parallel import SampleShare

CONFIG = dataclasses.replace(
    load_recipe("minmax").with_bits(4, 8),
    reconstruction=ReconstructionConfig(
        enabled=True, num_samples=15, iterations=12, activation_iterations=6, batch_size=8
    ),
)


@pytest.fixture(scope="module")
def calibration(unet):
    return record_for(unet, CalibrationConfig(num_inference_steps=4, num_trajectories=4, batch_size=4), progress=False)


def test_a_share_holds_every_nth_sample_and_its_part_of_a_batch():
    share = SampleShare(total=7, index=1, count=3)
    assert share.rows.tolist() == [1, 4] and len(share) == 2
    positions, fraction = share.local(torch.tensor([4, 0, 1, 6, 3]))
    assert positions.tolist() == [1, 0] and fraction == 2 / 5
    alone = SampleShare(total=7)
    positions, fraction = alone.local(torch.tensor([4, 0]))
    assert positions.tolist() == [4, 0] and fraction == 1.0 and len(alone) == 7
    with pytest.raises(ConfigError, match="over 3 processes needs as many calibration samples at least, got 2"):
        SampleShare(total=2, index=0, count=3)


def _reconstruct(unet, calibration, out) -> None:
    model = api.quantize(unet.denoiser, CONFIG, calibration, progress=False)
    records = api.info(model).extra["reconstruction"]
    torch.save({"state": model.state_dict(), "records": records}, out / f"{distributed.process_index()}.pt")


def test_two_processes_reconstruct_the_model_one_process_does(unet, calibration, tmp_path, monkeypatch):
    """The two processes end with the same model, bit for bit (the all-reduce hands both the same sums). Against
    one process only the order of float summation differs (a gradient summed over the batch at once, or over
    each process's part and then across): every weight and range is the same bit for bit (the rounding is
    hardened), and the learned step sizes differ by a few Adam steps at most: Adam normalises each gradient,
    so where a step size's gradient is near zero its last bits decide the direction of a step of about the
    learning rate, and the bound is 4 x learning rate x iterations."""
    from accelerate import debug_launcher

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else accelerate sets its own count
    single = api.quantize(unet.denoiser, CONFIG, calibration, progress=False)
    debug_launcher(_reconstruct, args=(unet, calibration, tmp_path), num_processes=2)
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert first["state"].keys() == second["state"].keys()
    assert all(torch.equal(first["state"][key], second["state"][key]) for key in first["state"])
    learned = {f"{q.name}.scale" for q in activation_quantizers(single)}
    recon = CONFIG.reconstruction
    bound = 4 * recon.activation_learning_rate * recon.activation_iterations
    expected = single.state_dict()
    assert expected.keys() == first["state"].keys()
    for key, tensor in expected.items():
        if key in learned:
            assert float((first["state"][key] - tensor).abs().max()) <= bound, key
        else:
            assert torch.equal(first["state"][key], tensor), key
    one = [(r["unit"], r["pass_name"]) for r in api.info(single).extra["reconstruction"]]
    assert [(r["unit"], r["pass_name"]) for r in first["records"]] == one
