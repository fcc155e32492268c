"""Shared test settings (one thread per process keeps timings steady on small shared CPUs) and fixtures."""

import pytest
import torch

from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig
from dmquant.models import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    """The built-in random-initialised ``tiny-unet`` (class-conditional UNet2DModel)."""
    return load_model("tiny-unet")


@pytest.fixture(scope="module")
def calibration(unet):
    """A small calibration set of ``unet``: 2 trajectories of 4 steps, with the unconditional copies."""
    return record_for(unet, CalibrationConfig(num_inference_steps=4, num_trajectories=2, batch_size=4), progress=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
