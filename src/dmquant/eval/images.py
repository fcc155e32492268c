"""Image fidelity of quantized samples against full-precision samples from the same noise.

Both metrics come from torchmetrics; this module fixes the conventions dmquant reports them
in: batches of ``(N, C, H, W)`` images in ``[0, data_range]``, one score per sample, and the
reported figure is the mean of the per-sample scores.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

#: torchmetrics' default SSIM window: a gaussian of sigma 1.5 truncated to 11 px.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def to_unit_range(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Map images from ``value_range`` to ``[0, 1]``, clamping anything outside it.

    Integer images are converted to ``float32`` first; floating images keep their dtype.
    """
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    if not images.is_floating_point():
        images = images.float()
    return ((images - low) / (high - low)).clamp(0.0, 1.0)


def _check_pair(reference: Tensor, test: Tensor) -> None:
    if reference.shape != test.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and test {tuple(test.shape)} differ in shape")
    if reference.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(reference.shape)}")
    if not (reference.is_floating_point() and test.is_floating_point()):
        raise TypeError(f"images must be floating point, got {reference.dtype} and {test.dtype}")


def _reduce(scores: Tensor, per_sample: bool) -> Tensor:
    return scores if per_sample else scores.mean()


def psnr(reference: Tensor, test: Tensor, *, data_range: float = 1.0, per_sample: bool = False) -> Tensor:
    """Peak signal-to-noise ratio in dB, ``10 * log10(data_range**2 / mse)``.

    Args:
        reference: full-precision images ``(N, C, H, W)`` in ``[0, data_range]``.
        test: quantized images of the same shape and range.
        data_range: peak value of the images.
        per_sample: return the ``(N,)`` per-sample PSNR (MSE over ``C, H, W`` of each
            sample) instead of their mean.

    Returns:
        ``(N,)`` per-sample PSNR, or the mean over samples of the per-sample PSNR (not the
        PSNR of the batch-wide MSE). A pair of identical images scores ``inf``, and so does
        the mean of any batch that contains one.
    """
    _check_pair(reference, test)
    scores = peak_signal_noise_ratio(test, reference, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return _reduce(scores, per_sample)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Gaussian SSIM window ``(size, sigma)`` for images of ``height x width`` pixels.

    The default 11-px window with sigma 1.5 is used when it fits. Smaller images get the
    largest odd window ``k`` (3 to 9) that fits, with ``sigma = 1.5 * k / 11`` so the window
    keeps the default's width-to-sigma ratio; torchmetrics truncates a gaussian of that sigma
    to exactly ``k`` pixels (``2 * int(3.5 * sigma + 0.5) + 1``).

    Raises:
        ValueError: a side is shorter than 3 px, where no SSIM window fits.
    """
    size = min(SSIM_WINDOW, height, width)
    if size % 2 == 0:
        size -= 1
    if size < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 px, got {height}x{width}")
    return size, SSIM_SIGMA * size / SSIM_WINDOW


def ssim(reference: Tensor, test: Tensor, *, data_range: float = 1.0, per_sample: bool = False) -> Tensor:
    """Structural similarity (Wang et al. 2004) with a gaussian window.

    torchmetrics' default gaussian window (11 px, sigma 1.5) needs images of at least 11 px
    on each side; smaller images (down to 3 px) use the smaller odd window chosen by
    :func:`ssim_window`, so their scores are comparable with each other but not with scores
    of larger images.

    Args:
        reference: full-precision images ``(N, C, H, W)`` in ``[0, data_range]``.
        test: quantized images of the same shape and range.
        data_range: peak value of the images.
        per_sample: return the ``(N,)`` per-sample SSIM instead of their mean.

    Returns:
        ``(N,)`` per-sample SSIM (mean of the SSIM map over channels and pixels), or the
        mean over samples of the per-sample SSIM. Identical images score 1.
    """
    _check_pair(reference, test)
    _, sigma = ssim_window(reference.shape[-2], reference.shape[-1])
    scores = structural_similarity_index_measure(
        test, reference, gaussian_kernel=True, sigma=sigma, data_range=data_range, reduction="none"
    )
    return _reduce(scores, per_sample)
