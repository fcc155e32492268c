"""Distribution metrics of generated images, computed from pre-extracted :class:`Features`.

FID, sFID, KID, Inception Score and improved precision/recall are all statistics of the
features of two image sets. They are computed here rather than with torchmetrics' image
metrics because those run their own network on images for every metric, while dmquant extracts
features once per set (:mod:`dmquant.eval.features`) and reuses them for all five metrics and
for the FID floor. The formulas match torchmetrics where it implements them; the tests check
the numbers against it.

Every function works in float64 on the device of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dmquant.eval.features import Features


def _as_matrix(features: Tensor, name: str, min_rows: int) -> Tensor:
    if features.dim() != 2:
        raise ValueError(f"{name} must be an (N, D) feature matrix, got shape {tuple(features.shape)}")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} has {features.shape[0]} samples; at least {min_rows} are needed")
    return features.double()


def _check_pair(a: Tensor, b: Tensor, min_rows: int) -> tuple[Tensor, Tensor]:
    a, b = _as_matrix(a, "a", min_rows), _as_matrix(b, "b", min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return a, b


def _psd_eigenvalues(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off zeroed: those below ``D * eps * max`` become 0.

    A rank-deficient covariance (fewer samples than dimensions) has eigenvalues that are 0 up
    to round-off, of either sign; their square roots (``~1e-8`` for ``1e-16``) would otherwise
    add up to a visible bias in the trace of the square root.
    """
    tolerance = eigenvalues.shape[-1] * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max()
    return torch.where(eigenvalues > tolerance, eigenvalues, 0.0)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    r"""Fréchet distance between Gaussians fitted to two feature sets (FID; Heusel et al. 2017).

    With means :math:`\mu_i` and unbiased covariances :math:`\Sigma_i` of the rows of ``a`` and ``b``:

    .. math::
        d^2 = \lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{Tr}\bigl(\Sigma_1 + \Sigma_2
              - 2 (\Sigma_1 \Sigma_2)^{1/2}\bigr)

    (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium"; the Fréchet distance of Gaussians is Dowson and Landau 1982).

    :math:`\operatorname{Tr}(\Sigma_1 \Sigma_2)^{1/2}` is the sum of the square roots of the
    eigenvalues of :math:`\Sigma_1 \Sigma_2`. With :math:`\Sigma_1 = F^\top F` for any factor
    :math:`F`, these are the eigenvalues of the symmetric PSD matrix :math:`F \Sigma_2 F^\top`
    (the same as those of :math:`\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}`), which a symmetric
    eigensolver computes stably. :math:`F = R / \sqrt{N - 1}` comes from the QR decomposition
    of the centred ``a``, so no eigenvectors are needed (at ``D = 2048`` that is several times
    faster than a matrix square root), and :math:`\Sigma_1` is never formed. Eigenvalues that
    are 0 up to round-off (tiny negatives included) are set to 0.

    Called on the spatial features this is sFID (Nash et al. 2021, "Generating Images with
    Sparse Representations"), as ADM's evaluator computes it.

    Args:
        a, b: ``(N, D)`` and ``(M, D)`` feature matrices, ``N, M >= 2``.

    Returns:
        The squared distance :math:`d^2` (what is reported as FID), computed in float64.
    """
    a, b = _check_pair(a, b, min_rows=2)
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    cov_b = torch.atleast_2d(torch.cov(b.T))
    factor = torch.linalg.qr(a - mean_a, mode="r").R / math.sqrt(a.shape[0] - 1)
    product = factor @ cov_b @ factor.T
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = _psd_eigenvalues(eigenvalues).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + a.var(dim=0).sum() + cov_b.trace() - 2 * trace_sqrt
    return distance.item()


def _polynomial_mmd2(a: Tensor, b: Tensor, degree: int, gamma: float, coef: float) -> Tensor:
    r"""Unbiased :math:`\mathrm{MMD}^2_u` of two sets of equal size, kernel :math:`(\gamma x^\top y + c)^d`."""
    m = a.shape[0]
    k_aa = (a @ a.T * gamma + coef) ** degree
    k_bb = (b @ b.T * gamma + coef) ** degree
    k_ab = (a @ b.T * gamma + coef) ** degree
    within = (k_aa.sum() - k_aa.diagonal().sum() + k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_ab.sum() / m**2


def kernel_inception_distance(
    a: Tensor,
    b: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    r"""Kernel Inception Distance: unbiased squared MMD with a polynomial kernel (Bińkowski et al. 2018).

    For ``subsets`` random draws (without replacement) of ``m = subset_size`` rows from each set,

    .. math::
        \mathrm{MMD}^2_u = \frac{1}{m(m-1)} \sum_{i \ne j} \bigl(k(x_i, x_j) + k(y_i, y_j)\bigr)
                           - \frac{2}{m^2} \sum_{i, j} k(x_i, y_j),
        \qquad k(x, y) = (\gamma\, x^\top y + c)^d

    with :math:`\gamma = 1/D` by default (Bińkowski et al. 2018, "Demystifying MMD GANs").
    The defaults are those of torchmetrics' ``KernelInceptionDistance`` and, like it, the std
    is the population std over subsets. Unlike torchmetrics, which raises when a set has fewer
    than ``subset_size`` rows, ``subset_size`` is clipped to ``min(len(a), len(b))``; every
    subset of the smaller set is then the whole set (permuted), so for sets of equal size all
    subsets agree and the std is 0. Each subset is the head of a permutation of ``a`` and then
    one of ``b``, drawn from a CPU generator seeded with ``seed``: the subsets torchmetrics
    draws after ``torch.manual_seed(seed)``.

    Args:
        a, b: ``(N, D)`` and ``(M, D)`` feature matrices, ``N, M >= 2``.
        seed: seeds the subset draws, so the result is deterministic.

    Returns:
        ``(mean, std)`` of :math:`\mathrm{MMD}^2_u` over the subsets.
    """
    a, b = _check_pair(a, b, min_rows=2)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, a.shape[0], b.shape[0])
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        pick_a = torch.randperm(a.shape[0], generator=generator)[:size].to(a.device)
        pick_b = torch.randperm(b.shape[0], generator=generator)[:size].to(b.device)
        scores.append(_polynomial_mmd2(a[pick_a], b[pick_b], degree, gamma, coef))
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


def inception_score(logits: Tensor, *, splits: int = 10) -> tuple[float, float]:
    r"""Inception Score (Salimans et al. 2016) from classifier logits.

    With :math:`p(y|x)` the softmax of each row's logits and :math:`p(y)` its mean over one
    split, each split scores

    .. math::
        \mathrm{IS} = \exp\Bigl(\mathbb{E}_x\, \mathrm{KL}\bigl(p(y|x) \,\Vert\, p(y)\bigr)\Bigr)

    (Salimans et al. 2016, "Improved Techniques for Training GANs", section 4). The rows are
    cut in order into ``splits`` parts at ``i * N // splits``, as the paper's reference code
    does; torchmetrics shuffles the rows first and cuts with ``torch.chunk``, which agrees with
    this when ``N`` is a multiple of ``splits`` (up to the shuffle).

    Returns:
        ``(mean, std)`` over the splits; the std is the population std as in the reference code
        (torchmetrics reports the sample std, larger by :math:`\sqrt{s / (s - 1)}`).
    """
    if splits < 1:
        raise ValueError(f"splits must be positive, got {splits}")
    logits = _as_matrix(logits, "logits", min_rows=splits)
    log_probs, n = logits.log_softmax(dim=1), logits.shape[0]
    scores = []
    for i in range(splits):
        part = log_probs[i * n // splits : (i + 1) * n // splits]
        log_marginal = part.logsumexp(dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    return (x.square().sum(dim=1, keepdim=True) - 2 * x @ y.T + y.square().sum(dim=1)).clamp(min=0)


def _knn_radii(points: Tensor, k: int, batch_size: int) -> Tensor:
    """Squared distance of each point to its ``k``-th nearest neighbour among the others."""
    return torch.cat(
        [_squared_distances(rows, points).kthvalue(k + 1, dim=1).values for rows in points.split(batch_size)]
    )


def _coverage(manifold: Tensor, radii: Tensor, queries: Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` inside at least one ball of ``radii`` (squared) around ``manifold``."""
    inside = [(_squared_distances(rows, manifold) <= radii).any(dim=1) for rows in queries.split(batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    r"""Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points, each ball reaching the point's
    ``k``-th nearest neighbour within the set (the point itself excluded). Then

    .. math::
        \text{precision} = \frac{1}{|\Phi_g|} \sum_{\phi \in \Phi_g} f(\phi, \Phi_r), \qquad
        \text{recall} = \frac{1}{|\Phi_r|} \sum_{\phi \in \Phi_r} f(\phi, \Phi_g)

    where :math:`f(\phi, \Phi) = 1` if :math:`\phi` lies in some ball of :math:`\Phi`'s manifold
    (boundary included) (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models", section 2; ``k = 3`` as in the paper and ADM's evaluator).

    Pairwise distances are computed ``batch_size`` rows at a time, so the memory is
    ``batch_size x max(N, M)`` float64 values rather than ``N x M``.

    Args:
        real, fake: ``(N, D)`` and ``(M, D)`` feature matrices, each with more than ``k`` rows.

    Returns:
        ``(precision, recall)``, each in ``[0, 1]``.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got {k} and {batch_size}")
    real, fake = _check_pair(real, fake, min_rows=k + 1)
    precision = _coverage(real, _knn_radii(real, k, batch_size), fake, batch_size)
    recall = _coverage(fake, _knn_radii(fake, k, batch_size), real, batch_size)
    return precision, recall


@dataclass
class DistributionReport:
    """Distribution metrics of one set of generated samples against real reference images.

    ``fid_floor`` and ``sfid_floor`` are the same metrics between two disjoint real sets of the
    same size as the generated set: the score of a perfect generator at this sample count.
    """

    fid: float
    fid_floor: float
    sfid: float
    sfid_floor: float
    kid_mean: float
    kid_std: float
    inception_score: float
    inception_score_std: float
    precision: float
    recall: float
    num_samples: int
    extractor: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


#: Splits of the Inception Score, as Salimans et al. (2016) and torchmetrics use.
IS_SPLITS = 10


def fid_floors(reference: Features, floor_reference: Features) -> tuple[float, float]:
    """FID and sFID between two disjoint real sets: the floors of scores measured at that N."""
    return (
        frechet_distance(floor_reference.pooled, reference.pooled),
        frechet_distance(floor_reference.spatial, reference.spatial),
    )


def distribution_report(
    generated: Features,
    reference: Features,
    floor_reference: Features,
    extractor_name: str,
    *,
    floors: tuple[float, float] | None = None,
) -> DistributionReport:
    """FID, sFID, KID, IS and precision/recall of ``generated`` against ``reference``, with FID floors.

    Args:
        generated: features of the generated samples.
        reference: features of the real reference images.
        floor_reference: features of other real images, disjoint from ``reference`` and as many
            as ``generated``; FID and sFID of this set against ``reference`` are the floors.
        extractor_name: the feature network's name, recorded in the report.
        floors: ``fid_floors(reference, floor_reference)`` when already computed (they depend
            only on the real sets, so a caller judging several sample sets computes them once).

    The Inception Score uses ``IS_SPLITS`` splits, or one per sample below that many samples.

    Raises:
        ValueError: ``floor_reference`` and ``generated`` differ in size. FID is biased
            upwards at small sample counts, so a floor only bounds scores measured at the same N.
    """
    if len(floor_reference) != len(generated):
        raise ValueError(
            f"floor_reference has {len(floor_reference)} images but generated has {len(generated)}; "
            "the FID floor is only comparable at the same sample count"
        )
    fid_floor, sfid_floor = floors if floors is not None else fid_floors(reference, floor_reference)
    kid_mean, kid_std = kernel_inception_distance(generated.pooled, reference.pooled)
    is_mean, is_std = inception_score(generated.logits, splits=min(IS_SPLITS, len(generated)))
    precision, recall = precision_recall(reference.pooled, generated.pooled)
    return DistributionReport(
        fid=frechet_distance(generated.pooled, reference.pooled),
        fid_floor=fid_floor,
        sfid=frechet_distance(generated.spatial, reference.spatial),
        sfid_floor=sfid_floor,
        kid_mean=kid_mean,
        kid_std=kid_std,
        inception_score=is_mean,
        inception_score_std=is_std,
        precision=precision,
        recall=recall,
        num_samples=len(generated),
        extractor=extractor_name,
    )
