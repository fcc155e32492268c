"""EDA-DM's TDAC: density and diversity of per-step features, the allocation, and the recorded set."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from dmquant.calib import get_strategy, record_calibration
from dmquant.calib.tdac import allocate, default_feature_layer, density_and_diversity, min_max, step_features
from dmquant.errors import ConfigError
from dmquant.sampling import Conditioning
from dmquant.zoo import tiny


def test_density_and_diversity_by_hand():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    density, diversity = density_and_diversity(features, radius=0.1)
    assert density.tolist() == [1, 1, 1, 1]  # each step has exactly one neighbour within r
    assert density_and_diversity(features, radius=2.0)[0].tolist() == [3, 3, 3, 3]

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)

    rows = features.tolist()
    expected = [sum(1 - cosine(rows[t], rows[s]) for s in range(4) if s != t) for t in range(4)]
    assert diversity.tolist() == pytest.approx(expected, rel=1e-9)


def test_channel_vectors_are_spatial_means_of_feature_maps():
    maps = torch.randn(3, 4, 5, 5)
    _, from_maps = density_and_diversity(maps, radius=1.0)
    _, from_vectors = density_and_diversity(maps.mean(dim=(2, 3)), radius=1.0)
    assert from_maps.tolist() == pytest.approx(from_vectors.tolist(), rel=1e-6)


@pytest.mark.parametrize(
    ("weights", "total", "counts"),
    [([1, 3], 10, [3, 7]), ([0.2, 0.3, 0.5], 7, [1, 2, 4]), ([0, 0, 0], 5, [2, 2, 1]), ([1, 0], 3, [3, 0])],
)
def test_allocation_sums_exactly_by_largest_remainders(weights, total, counts):
    assert allocate(weights, total) == counts


def test_min_max_and_bad_weights():
    assert min_max(torch.tensor([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert min_max(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError):
        allocate([1.0, -1.0], 4)
    with pytest.raises(ConfigError):
        get_strategy("tdac", radius=0.0)


def test_default_feature_layers():
    assert default_feature_layer(tiny.tiny_unet2d(0, class_conditional=False)) == "mid_block.attentions.0"
    dit = tiny.tiny_dit(num_embeds_ada_norm=tiny.TINY_NUM_CLASSES)
    assert default_feature_layer(dit) == f"transformer_blocks.{len(dit.transformer_blocks) // 2}"


def test_recorded_set_follows_the_allocation_of_the_model_features():
    unet = tiny.tiny_unet2d(0, class_conditional=False)
    steps, trajectories = 6, 24
    calibration = record_calibration(
        unet,
        DDIMScheduler(),
        num_inference_steps=steps,
        steps=get_strategy("tdac", radius=0.05, diversity_weight=1.2, probe_trajectories=4),
        num_trajectories=trajectories,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert len(calibration) == trajectories
    # the same probe (the first 4 trajectories of the same generator) gives the same weights
    features = step_features(
        unet,
        DDIMScheduler(),
        num_inference_steps=steps,
        layer=None,
        conditioning=None,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    density, diversity = density_and_diversity(features, 0.05)
    expected = allocate((min_max(density) + 1.2 * min_max(diversity)).tolist(), trajectories)
    recorded = torch.bincount(calibration.step_indices, minlength=steps).tolist()
    assert recorded == expected and sum(recorded) == trajectories
    assert len(set(recorded)) > 1  # the features do tell the steps apart


def test_class_conditional_probe_takes_its_own_trajectories_not_a_recording_batch():
    unet = tiny.tiny_unet2d(0, class_conditional=True)
    trajectories = 12
    conditioning = Conditioning(cond={"class_labels": torch.arange(trajectories) % tiny.TINY_NUM_CLASSES})
    calibration = record_calibration(
        unet,
        DDIMScheduler(),
        num_inference_steps=4,
        steps=get_strategy("tdac", radius=0.05, probe_trajectories=3),
        num_trajectories=trajectories,
        batch_size=8,
        conditioning=conditioning,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert len(calibration) == trajectories
