"""Per-step noise-estimate error of a second model along the FP model's trajectories."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler

from dmquant.eval.noise import mse, noise_estimate_error, sqnr_db
from dmquant.sampling import Conditioning, prepare_scheduler
from dmquant.zoo.tiny import TINY_NUM_CLASSES, tiny_unet2d

STEPS = 3
BATCH = 2


def test_mse_and_sqnr_on_hand_numbers():
    reference, test = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0])
    assert mse(reference, test) == pytest.approx(4 / 3)
    # signal 1 + 4 + 9 = 14, noise 4
    assert sqnr_db(reference, test) == pytest.approx(10 * math.log10(14 / 4))
    # signal 4 * 4 = 16, noise 4 * 0.04 = 0.16: a ratio of 100
    assert sqnr_db(torch.full((2, 2), 2.0), torch.full((2, 2), 2.2)) == pytest.approx(20.0)
    assert sqnr_db(reference, reference) == math.inf and mse(reference, reference) == 0.0
    assert sqnr_db(torch.zeros(3), reference) == -math.inf


@pytest.fixture(scope="module")
def model():
    return tiny_unet2d(0, class_conditional=True)


def measure(fp, q):
    conditioning = Conditioning.classes([2, 9], null_label=TINY_NUM_CLASSES, guidance_scale=2.0)
    return noise_estimate_error(
        fp,
        q,
        DDIMScheduler(),
        num_inference_steps=STEPS,
        batch_size=BATCH,
        conditioning=conditioning,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )


def test_the_same_model_has_no_error(model):
    rows = measure(model, model)
    timesteps = prepare_scheduler(DDIMScheduler(), STEPS).timesteps.tolist()
    assert [row["step_index"] for row in rows] == list(range(STEPS))
    assert [row["timestep"] for row in rows] == timesteps
    assert all(row["sqnr_db"] == math.inf and row["mse"] == 0.0 for row in rows)


def test_a_perturbed_copy_has_finite_error(model):
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(1e-2 * torch.randn(parameter.shape, generator=generator))
    rows = measure(model, perturbed)
    assert len(rows) == STEPS
    assert all(math.isfinite(row["sqnr_db"]) and row["mse"] > 0 for row in rows)
