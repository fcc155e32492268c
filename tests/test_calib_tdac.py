"""EDA-DM's TDAC: density and diversity of per-step features, the allocation, and the recorded set."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from dmquant.calib import get_strategy, record_calibration
from dmquant.calib.tdac import allocate, default_feature_layer, density_and_diversity, min_max, step_features
from dmquant.errors import ConfigError
from dmquant.sampling import Conditioning
from dmquant.zoo import tiny


def reference_scores(features, radius):
    """EDA-DM's loops (scripts/calibration.py) over steps i != j, written out again: the density
    counts the steps whose mean squared difference is at most r, the diversity sums
    1 - cos over the channel vector at every position of every trajectory."""
    steps = len(features)
    channel = 1 if features[0].ndim == 4 else features[0].ndim - 1
    density, diversity = [0] * steps, [0.0] * steps
    for i in range(steps):
        for j in range(steps):
            if i != j:
                a, b = features[i].double(), features[j].double()
                if torch.mean((a - b) ** 2) <= radius:
                    density[i] += 1
                cosine = torch.nn.functional.cosine_similarity(a, b, dim=channel, eps=1e-6)
                diversity[i] += float(torch.sum(1 - cosine))
    return density, diversity


def test_density_and_diversity_by_hand():
    # 4 steps, 1 trajectory, 2 positions (tokens) of 2 channels each
    features = torch.tensor(
        [
            [[[1.0, 0.0], [0.0, 1.0]]],
            [[[1.0, 0.0], [0.0, 2.0]]],
            [[[0.0, 1.0], [0.0, 1.0]]],
            [[[0.0, 3.0], [1.0, 0.0]]],
        ]
    )
    # mean squared differences: (0,1) 0.25, (0,2) 0.5, (0,3) 2.5, (1,2) 1.25, (1,3) 3, (2,3) 1.75
    density, diversity = density_and_diversity(features, radius=0.5)
    assert density.tolist() == [2, 1, 1, 0]
    assert density_and_diversity(features, radius=0.25)[0].tolist() == [1, 1, 0, 0]  # r itself counts
    # cosines per position: (0,1) 1, 1; (0,2) 0, 1; (0,3) 0, 0; (1,2) 0, 1; (1,3) 0, 0; (2,3) 1, 0
    assert diversity.tolist() == pytest.approx([0 + 1 + 2, 0 + 1 + 2, 1 + 1 + 1, 2 + 2 + 1])


@pytest.mark.parametrize("layout", ["feature maps (B, C, H, W)", "tokens (B, N, C)"])
def test_scores_match_the_reference_loops(layout):
    generator = torch.Generator().manual_seed(0)
    shape = (7, 3, 5, 4, 4) if layout.startswith("feature") else (7, 3, 6, 5)
    # each trajectory's features drift over the steps, so that some pairs of steps are within r
    drift = torch.linspace(0, 2, 7).reshape(-1, *[1] * (len(shape) - 1))
    trajectories = torch.randn(1, *shape[1:], generator=generator)
    features = trajectories + 0.3 * torch.randn(shape, generator=generator) + drift
    features[:, :, 0] += 1.5  # a channel (maps) / a token (tokens) offset: the cosine's axis matters
    for radius in (0.5, 1.5, 3.0):
        density, diversity = density_and_diversity(features, radius)
        expected_density, expected_diversity = reference_scores(features, radius)
        assert density.tolist() == expected_density
        assert diversity.tolist() == pytest.approx(expected_diversity, rel=1e-9)
        if radius == 1.5:
            assert len(set(expected_density)) > 1  # r separates the steps: the comparison means something


def test_each_trajectory_is_compared_with_itself_not_with_the_batch_mean():
    # two trajectories of opposite sign: their mean is 0 at every step, their own features are not
    step = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    features = torch.stack([step, 2 * step, -step])
    density, diversity = density_and_diversity(features, radius=3.0)
    assert density.tolist() == [1, 1, 0]  # mean squared differences: (0,1) 2.5, (0,2) 10, (1,2) 22.5
    # cosines: (0,1) 1, (0,2) -1, (1,2) -1 for both trajectories
    assert diversity.tolist() == pytest.approx([0 + 4, 0 + 4, 4 + 4])


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
    assert features.shape[:2] == (steps, 4)  # each probe trajectory kept
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
