from __future__ import annotations

import math

import pytest
import torch

from dmquant.eval.images import psnr, ssim, ssim_window, to_unit_range


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with structure at several scales, like decoded samples."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    detail = 0.1 * torch.rand(n, 3, size, size, generator=generator)
    return (0.9 * smooth + detail).clamp(0, 1)


def _noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def test_to_unit_range_maps_and_clamps():
    images = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert to_unit_range(images).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_unit_range(pixels, (0, 255)), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(ValueError, match="increasing"):
        to_unit_range(images, (1.0, 1.0))


def test_psnr_matches_hand_computation():
    reference = torch.zeros(2, 1, 2, 2)
    test = torch.zeros(2, 1, 2, 2)
    test[0, 0, 0, 0] = 0.2  # mse = 0.04 / 4 = 0.01 -> 20 dB
    test[1] = 0.5  # mse = 0.25 -> 10 * log10(4) dB
    expected = [20.0, 10 * math.log10(4.0)]
    per_sample = psnr(reference, test, per_sample=True)
    assert per_sample.shape == (2,)
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-5)
    assert psnr(reference, test).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_psnr_matches_formula_on_random_images():
    reference = _smooth_images(3, 16)
    test = _noisy(reference, 0.05)
    mse = ((reference.double() - test.double()) ** 2).mean(dim=(1, 2, 3))
    expected = 10 * torch.log10(1.0 / mse)
    assert torch.allclose(psnr(reference, test, per_sample=True).double(), expected, rtol=1e-5)
    scaled = psnr(255 * reference, 255 * test, data_range=255.0, per_sample=True)
    assert torch.allclose(scaled.double(), expected, rtol=1e-4)


def test_psnr_of_identical_images_is_inf():
    images = _smooth_images(2, 8)
    assert torch.isinf(psnr(images, images)).item()
    assert torch.isinf(psnr(images, images, per_sample=True)).all()


@pytest.mark.parametrize("size", [16, 8])
def test_ssim_of_identical_images_is_one(size):
    images = _smooth_images(3, size)
    assert ssim(images, images).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(ssim(images, images, per_sample=True), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("size", [16, 8])
def test_ssim_decreases_with_noise(size):
    reference = _smooth_images(4, size)
    scores = [ssim(reference, _noisy(reference, sigma)).item() for sigma in (0.02, 0.05, 0.1, 0.2)]
    assert all(math.isfinite(score) for score in scores)
    assert scores[0] < 1.0
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)


def test_per_sample_shapes():
    reference = _smooth_images(5, 12)
    test = _noisy(reference, 0.1)
    for metric in (psnr, ssim):
        assert metric(reference, test, per_sample=True).shape == (5,)
        assert metric(reference, test).shape == ()
        assert metric(reference, test).item() == pytest.approx(
            metric(reference, test, per_sample=True).mean().item(), rel=1e-6
        )


@pytest.mark.parametrize("shape", [(3, 3), (5, 7), (8, 8), (10, 12)])
def test_ssim_small_images(shape):
    reference = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    test = _noisy(reference, 0.1)
    scores = ssim(reference, test, per_sample=True)
    assert torch.isfinite(scores).all()
    assert (scores < 1).all() and (scores > -1).all()


def test_ssim_window():
    assert ssim_window(64, 32) == (11, 1.5)
    assert ssim_window(11, 11) == (11, 1.5)
    assert ssim_window(10, 12)[0] == 9
    assert ssim_window(8, 8)[0] == 7
    assert ssim_window(3, 5)[0] == 3
    with pytest.raises(ValueError, match="3x3"):
        ssim_window(2, 16)


@pytest.mark.parametrize("size", [3, 5, 7, 9, 11])
def test_ssim_window_sigma_gives_that_many_gaussian_taps(size):
    # torchmetrics truncates a gaussian of sigma s to 2 * int(3.5 * s + 0.5) + 1 taps.
    _, sigma = ssim_window(size, size)
    assert 2 * int(3.5 * sigma + 0.5) + 1 == size


def test_mismatched_inputs_rejected():
    images = _smooth_images(2, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(images, images[:1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ssim(images[0], images[0])
    with pytest.raises(TypeError, match="floating point"):
        psnr(images, (255 * images).to(torch.uint8))
