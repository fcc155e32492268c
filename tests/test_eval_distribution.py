"""Distribution metrics from features, checked against torchmetrics, closed forms and brute force."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from dmquant.eval.distribution import (
    DistributionReport,
    distribution_report,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from dmquant.eval.features import Features

pytestmark = pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features:UserWarning")


class _Precomputed(nn.Module):
    """Lets torchmetrics' image metrics take precomputed features as their "images"."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _correlated(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Features with a non-diagonal covariance, like network activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(100)) / math.sqrt(dim)
    return (torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing.double()).relu() + shift


def _standardized(values: torch.Tensor) -> torch.Tensor:
    """Columns with sample mean exactly 0 and unbiased std exactly 1."""
    centred = values - values.mean(dim=0)
    return centred / centred.std(dim=0)


# ---- FID ---------------------------------------------------------------------------------


def test_fid_of_1d_gaussians_is_mean_and_std_gap():
    base = _standardized(torch.randn(50, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a, b = 2.0 + 3.0 * base, -1.0 + 0.5 * base.flip(0)
    assert frechet_distance(a, b) == pytest.approx((2.0 + 1.0) ** 2 + (3.0 - 0.5) ** 2, rel=1e-12)


def test_fid_of_diagonal_covariances_has_closed_form():
    # Columns of a Hadamard matrix: zero-mean, mutually orthogonal, sample covariance (4/3) I.
    design = torch.tensor([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)
    design = design / math.sqrt(4 / 3)
    mean_a, std_a = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 0.5])
    mean_b, std_b = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([3.0, 0.5, 0.5])
    a = mean_a + std_a * design
    b = mean_b + std_b * design[[2, 0, 3, 1]]
    expected = ((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-12)


def test_fid_matches_torchmetrics():
    a, b = _correlated(300, 16, seed=1), _correlated(200, 16, seed=2, shift=0.3)
    metric = FrechetInceptionDistance(feature=_Precomputed(16))
    metric.update(a, real=True)
    metric.update(b, real=False)
    expected = metric.compute().item()
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def _mp_frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance in 40-digit arithmetic, as a reference free of float64 round-off."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40

    def gaussian(x):
        rows = mpmath.matrix(x.tolist())
        mean = [sum(rows[i, j] for i in range(rows.rows)) / rows.rows for j in range(rows.cols)]
        centred = rows - mpmath.ones(rows.rows, 1) * mpmath.matrix([mean])
        return mean, centred.T * centred / (rows.rows - 1)

    (mean_a, cov_a), (mean_b, cov_b) = gaussian(a), gaussian(b)
    eigenvalues, eigenvectors = mpmath.eigsy(cov_a)
    root = eigenvectors * mpmath.diag([mpmath.sqrt(max(w, 0)) for w in eigenvalues]) * eigenvectors.T
    product = root * cov_b * root
    trace_sqrt = sum(mpmath.sqrt(max(w, 0)) for w in mpmath.eigsy((product + product.T) / 2)[0])
    traces = sum(cov_a[i, i] + cov_b[i, i] for i in range(cov_a.rows))
    return float(sum((x - y) ** 2 for x, y in zip(mean_a, mean_b, strict=True)) + traces - 2 * trace_sqrt)


def test_fid_of_rank_deficient_covariances_matches_high_precision():
    # Fewer samples than dimensions: most eigenvalues are 0 and must not leak round-off into
    # the trace (torchmetrics, which takes the square roots of all of them, is off by ~1e-7 here).
    a, b = _correlated(6, 12, seed=1), _correlated(5, 12, seed=2, shift=0.3)
    assert frechet_distance(a, b) == pytest.approx(_mp_frechet_distance(a, b), rel=1e-12)


def test_fid_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    a = _correlated(20, 64, seed=3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance(a.float(), a[torch.randperm(20)]) == pytest.approx(0.0, abs=1e-5)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(torch.zeros(4), torch.zeros(4))


# ---- KID ---------------------------------------------------------------------------------


def test_kid_on_hand_numbers():
    # Linear kernel x*y on x = (1, 2), y = (0, 0): sum_{i != j} x_i x_j / (m (m - 1)) = 4 / 2.
    x, y = torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)
    mean, std = kernel_inception_distance(x, y, subsets=3, degree=1, gamma=1.0, coef=0.0)
    assert (mean, std) == (pytest.approx(2.0), 0.0)


def _torchmetrics_kid(real: torch.Tensor, fake: torch.Tensor, seed: int, **kwargs) -> tuple[float, float]:
    metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), **kwargs)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
    mean, std = metric.compute()
    return mean.item(), std.item()


def test_kid_matches_torchmetrics_on_whole_sets():
    real, fake = _correlated(60, 32, seed=4), _correlated(60, 32, seed=5, shift=0.2)
    expected_mean, expected_std = _torchmetrics_kid(real, fake, seed=0, subsets=4, subset_size=60)
    assert expected_mean > 0.01 and expected_std == pytest.approx(0.0, abs=1e-12)
    mean, std = kernel_inception_distance(real, fake, subsets=4)  # subset_size clipped to 60
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_matches_torchmetrics_on_random_subsets():
    # Both draw, per subset, a permutation of the real then of the fake set from a CPU
    # generator seeded with `seed`, so they pick the same subsets.
    real, fake = _correlated(80, 16, seed=6), _correlated(70, 16, seed=7, shift=0.1)
    kwargs = {"subsets": 20, "subset_size": 30, "degree": 2, "gamma": 0.5, "coef": 2.0}
    expected_mean, expected_std = _torchmetrics_kid(real, fake, seed=11, **kwargs)
    mean, std = kernel_inception_distance(real, fake, seed=11, **kwargs)
    assert expected_std > 0
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8)


def test_kid_is_deterministic_in_its_seed():
    real, fake = _correlated(50, 8, seed=8), _correlated(40, 8, seed=9)
    first = kernel_inception_distance(real, fake, subsets=5, subset_size=20, seed=1)
    assert kernel_inception_distance(real, fake, subsets=5, subset_size=20, seed=1) == first
    assert kernel_inception_distance(real, fake, subsets=5, subset_size=20, seed=2) != first


# ---- Inception Score ---------------------------------------------------------------------


def test_inception_score_on_hand_numbers():
    confident = 100.0 * torch.eye(4, dtype=torch.float64)
    assert inception_score(confident.repeat(3, 1), splits=1) == (pytest.approx(4.0), 0.0)
    assert inception_score(torch.zeros(6, 5), splits=2) == (pytest.approx(1.0), pytest.approx(0.0))
    # Splits cut at i * N // splits: classes (0, 1 | 2, 2, 2) score 2 and 1. torch.chunk would
    # cut (0, 1, 2 | 2, 2) and score 3 and 1.
    rows = confident[[0, 1, 2, 2, 2]]
    mean, std = inception_score(rows, splits=2)
    assert (mean, std) == (pytest.approx(1.5), pytest.approx(0.5))


def test_inception_score_matches_torchmetrics_up_to_std_convention():
    logits = 3.0 * torch.randn(200, 12, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    metric = InceptionScore(feature=_Precomputed(12), splits=10)
    metric.update(logits)
    torch.manual_seed(5)
    expected_mean, expected_std = metric.compute()
    torch.manual_seed(5)
    shuffled = logits[torch.randperm(200)]  # the shuffle torchmetrics applies before splitting
    mean, std = inception_score(shuffled, splits=10)
    assert mean == pytest.approx(expected_mean.item(), rel=1e-10)
    # torchmetrics reports the sample std over splits, we the population std (as Salimans et al.)
    assert std * math.sqrt(10 / 9) == pytest.approx(expected_std.item(), rel=1e-8)


def test_inception_score_needs_a_sample_per_split():
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(torch.zeros(9, 3))


# ---- precision and recall ----------------------------------------------------------------


def _brute_force_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    def radii(points):
        return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def coverage(manifold, queries):
        balls = list(zip(manifold, radii(manifold), strict=True))
        return sum(any(math.dist(q, p) <= r for p, r in balls) for q in queries) / len(queries)

    real, fake = real.tolist(), fake.tolist()
    return coverage(real, fake), coverage(fake, real)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    real = torch.randn(40, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    fake = torch.randn(33, 5, generator=torch.Generator().manual_seed(13), dtype=torch.float64) + 1.0
    expected = _brute_force_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, k=k, batch_size=7) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_on_hand_examples():
    cluster = torch.randn(10, 4, generator=torch.Generator().manual_seed(14))
    far = cluster + 100.0
    assert precision_recall(cluster, cluster) == (1.0, 1.0)
    assert precision_recall(cluster, far) == (0.0, 0.0)
    # A generator that drops one of two modes: everything it makes is realistic, half the real is missed.
    assert precision_recall(torch.cat([cluster, far]), cluster) == (1.0, 0.5)


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3)


# ---- the report --------------------------------------------------------------------------


def _features(n: int, seed: int, shift: float = 0.0) -> Features:
    generator = torch.Generator().manual_seed(seed)
    return Features(
        pooled=_correlated(n, 8, seed) + shift,
        spatial=torch.randn(n, 6, generator=generator, dtype=torch.float64) + shift,
        logits=torch.randn(n, 5, generator=generator, dtype=torch.float64),
    )


def test_distribution_report_compares_generated_and_floor_with_reference():
    reference, floor = _features(60, seed=20), _features(40, seed=21)
    generated = _features(40, seed=22, shift=1.0)
    report = distribution_report(generated, reference, floor, "toy")
    assert report.fid == frechet_distance(generated.pooled, reference.pooled)
    assert report.fid_floor == frechet_distance(floor.pooled, reference.pooled)
    assert report.sfid == frechet_distance(generated.spatial, reference.spatial)
    assert report.sfid_floor == frechet_distance(floor.spatial, reference.spatial)
    assert report.fid > 3 * report.fid_floor > 0 and report.sfid > 3 * report.sfid_floor > 0
    assert (report.kid_mean, report.kid_std) == kernel_inception_distance(generated.pooled, reference.pooled)
    assert (report.inception_score, report.inception_score_std) == inception_score(generated.logits)
    assert (report.precision, report.recall) == precision_recall(reference.pooled, generated.pooled)
    assert report.num_samples == 40 and report.extractor == "toy"
    row = report.as_dict()
    assert row["fid_floor"] == report.fid_floor and set(row) == set(DistributionReport.__dataclass_fields__)


def test_distribution_report_needs_a_floor_of_the_generated_size():
    reference, generated = _features(60, seed=23), _features(40, seed=24)
    with pytest.raises(ValueError, match="floor_reference has 39 images but generated has 40"):
        distribution_report(generated, reference, _features(39, seed=25), "toy")
