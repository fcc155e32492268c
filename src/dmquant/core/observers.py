"""Range estimation: observers see tensors batch by batch and return a range per parameter.

An observer reduces every batch to blocks (:func:`~dmquant.core.primitives.to_blocks`), one
row per quantization parameter, and :meth:`RangeObserver.compute` returns ``(min_val,
max_val)`` of shape :func:`~dmquant.core.primitives.param_shape`. Reduced dims are 1 there,
so activation batches of different batch sizes give the same parameter shape. All work is
done without autograd, in float32, on the input's device. Non-finite input is not checked
here; the caller knows which layer it came from and reports it.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from dmquant.core.primitives import (
    Granularity,
    QFormat,
    choose_qparams,
    fake_quant,
    param_shape,
    parse_format,
    to_blocks,
)
from dmquant.errors import ConfigError

__all__ = [
    "RangeObserver",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "SampledRangeObserver",
    "PercentileObserver",
    "MSEObserver",
    "UnitRangeObserver",
    "OBSERVERS",
    "make_observer",
]


class RangeObserver:
    """Base class. Subclasses implement ``_observe(blocks)`` on a float32 ``(P, R)`` matrix
    and ``_range()`` returning two ``(P,)`` vectors, and extend ``reset()``."""

    def __init__(self, granularity: Granularity = Granularity()) -> None:
        self.granularity = granularity
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.num_updates = 0
        self._param_shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Observe one batch."""
        if x.numel() == 0:
            raise ValueError(f"cannot observe an empty tensor of shape {tuple(x.shape)}")
        shape = param_shape(x.shape, self.granularity)
        if self._param_shape is not None and shape != self._param_shape:
            raise ValueError(
                f"batch of shape {tuple(x.shape)} gives parameter shape {shape}, but earlier "
                f"batches gave {self._param_shape} (granularity {self.granularity})"
            )
        self._observe(to_blocks(x.detach().to(torch.float32), self.granularity))
        self._param_shape = shape
        self.num_updates += 1

    @torch.no_grad()
    def compute(self) -> tuple[Tensor, Tensor]:
        """The estimated ``(min_val, max_val)``, each of the parameter shape."""
        if self._param_shape is None:
            raise ValueError("observer has seen no data")
        lo, hi = self._range()
        return lo.reshape(self._param_shape), hi.reshape(self._param_shape)

    def _observe(self, blocks: Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MinMaxObserver(RangeObserver):
    """Running minimum and maximum over all batches."""

    def reset(self) -> None:
        super().reset()
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    def _observe(self, blocks: Tensor) -> None:
        lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
        if self._min is None:
            self._min, self._max = lo, hi
        else:
            self._min, self._max = self._accumulate(lo, hi)

    def _accumulate(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The running range after a batch with block minima ``lo`` and maxima ``hi``."""
        return torch.minimum(self._min, lo), torch.maximum(self._max, hi)

    def _range(self) -> tuple[Tensor, Tensor]:
        return self._min, self._max


class EMAMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the per-batch min and max (Jacob et al. 2018,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", activation ranges): ``m = momentum * m + (1 - momentum) * batch_m``; the
    first batch initialises ``m``."""

    def __init__(self, granularity: Granularity = Granularity(), *, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        super().__init__(granularity)

    def _accumulate(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        m = self.momentum
        return m * self._min + (1.0 - m) * lo, m * self._max + (1.0 - m) * hi


class SampledRangeObserver(RangeObserver):
    """Base for observers that need the values themselves: keeps a uniform random sample of
    the columns of the ``(P, R)`` blocks over all batches, at most ``max_elements`` values in
    total (but at least one column), so per-channel statistics keep whole columns.

    Sampling is bottom-k over uniform random keys (each column seen gets a key from a
    generator seeded with ``seed``, the columns with the smallest keys are kept), which is a
    uniform sample without replacement over every batch seen, later ones included. The keys
    are drawn on the data's device: drawn on the CPU for GPU activations, the keys and their
    top-k took about 0.2 s per quantizer and batch of 8M values, most of the activation
    calibration's time. A sample is therefore reproducible per device type, not across them.
    """

    def __init__(self, granularity: Granularity = Granularity(), *, max_elements: int = 2**18, seed: int = 0) -> None:
        if not isinstance(max_elements, int) or max_elements < 1:
            raise ConfigError(f"max_elements must be a positive int, got {max_elements!r}")
        self.max_elements = max_elements
        self.seed = seed
        super().__init__(granularity)

    def reset(self) -> None:
        super().reset()
        self._generator: torch.Generator | None = None
        self._keys: Tensor | None = None
        self._sample: Tensor | None = None

    @property
    def sample(self) -> Tensor | None:
        """The ``(P, k)`` sample kept so far (None before the first batch)."""
        return self._sample

    def _observe(self, blocks: Tensor) -> None:
        budget = max(1, self.max_elements // blocks.shape[0])
        if self._generator is None:
            self._generator = torch.Generator(device=blocks.device).manual_seed(self.seed)
        keys = torch.rand(blocks.shape[1], generator=self._generator, device=blocks.device)
        keys, blocks = _bottom_k(keys, blocks, budget)
        if self._sample is not None:
            keys = torch.cat([self._keys, keys])
            blocks = torch.cat([self._sample, blocks], dim=1)
            keys, blocks = _bottom_k(keys, blocks, budget)
        # clone: a first batch kept whole may still be a view of the caller's tensor
        self._keys, self._sample = keys, blocks.clone()


def _bottom_k(keys: Tensor, columns: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest ``keys`` and their columns (all of them if there are at most ``k``)."""
    if keys.numel() <= k:
        return keys, columns
    keys, keep = keys.topk(k, largest=False, sorted=False)
    return keys, columns[:, keep]


class PercentileObserver(SampledRangeObserver):
    """The ``percentile``-th and ``(100 - percentile)``-th percentiles of each block's values
    (linear interpolation, as ``torch.quantile``) over the random sample (percentile
    calibration: Wu et al. 2020, "Integer Quantization for Deep Learning Inference:
    Principles and Empirical Evaluation")."""

    def __init__(
        self,
        granularity: Granularity = Granularity(),
        *,
        percentile: float = 99.99,
        max_elements: int = 2**18,
        seed: int = 0,
    ) -> None:
        if not 50.0 <= percentile <= 100.0:
            raise ConfigError(f"percentile must be in [50, 100], got {percentile!r}")
        self.percentile = percentile
        super().__init__(granularity, max_elements=max_elements, seed=seed)

    def _range(self) -> tuple[Tensor, Tensor]:
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], device=self._sample.device)
        lo, hi = torch.quantile(self._sample, q, dim=1)
        return lo, hi


class MSEObserver(SampledRangeObserver):
    """Lp-error grid search over shrunken min-max ranges (the ``mse`` scale method of
    Q-Diffusion, Li et al. 2023, inherited from BRECQ, Li et al. 2021; the Lp norm follows
    LAPQ, Nahshan et al. 2021, Q-Diffusion uses p = 2.4).

    Candidate ``i`` (``i = 0 .. num_candidates - 1``) is ``(f * min, f * max)`` with
    ``f = 1 - 0.01 i`` of each block's sampled min-max range. Each is turned into parameters
    by ``choose_qparams(fmt, symmetric)``, the block is fake-quantized, and each block keeps
    the candidate with the least ``mean |x - x_q|^p`` (the first one on ties).
    """

    def __init__(
        self,
        granularity: Granularity,
        fmt: QFormat | str | int,
        symmetric: bool,
        *,
        p: float = 2.0,
        num_candidates: int = 80,
        max_elements: int = 2**18,
        seed: int = 0,
    ) -> None:
        if not p > 0:
            raise ConfigError(f"Lp exponent p must be > 0, got {p!r}")
        if not isinstance(num_candidates, int) or not 1 <= num_candidates <= 100:
            raise ConfigError(f"num_candidates must be an int in [1, 100], got {num_candidates!r}")
        self.fmt = parse_format(fmt)
        self.symmetric = symmetric
        self.p = p
        self.num_candidates = num_candidates
        # choose_qparams rejects an impossible format/symmetry pair here rather than at compute()
        choose_qparams(torch.zeros(()), torch.zeros(()), self.fmt, symmetric)
        super().__init__(granularity, max_elements=max_elements, seed=seed)

    def _range(self) -> tuple[Tensor, Tensor]:
        x = self._sample
        xmin, xmax = x.amin(dim=1), x.amax(dim=1)
        best_err = torch.full_like(xmin, float("inf"))
        best_min, best_max = xmin.clone(), xmax.clone()
        for i in range(self.num_candidates):
            f = 1.0 - 0.01 * i
            lo, hi = xmin * f, xmax * f
            scale, zero_point = choose_qparams(lo, hi, self.fmt, self.symmetric)
            x_q = fake_quant(x, scale[:, None], zero_point[:, None], self.fmt)
            err = (x - x_q).abs().pow(self.p).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_min = torch.where(better, lo, best_min)
            best_max = torch.where(better, hi, best_max)
        return best_min, best_max


class UnitRangeObserver(RangeObserver):
    """The fixed range [0, 1] of a probability, whatever the batches hold: a softmax output in a float
    format (FP8 attention). The kernels quantize the softmax of a flash attention before its final
    normalisation, where values reach 1 even when no normalised probability does; a range observed on
    the normalised probabilities would clip those. A float format loses no relative precision to the
    wider range."""

    def _observe(self, blocks: Tensor) -> None:
        self._zeros = blocks.new_zeros(blocks.shape[0])

    def _range(self) -> tuple[Tensor, Tensor]:
        return self._zeros, self._zeros + 1.0


OBSERVERS: dict[str, type[RangeObserver]] = {
    "minmax": MinMaxObserver,
    "ema": EMAMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "unit": UnitRangeObserver,
}


def make_observer(
    name: str,
    granularity: Granularity | str,
    fmt: QFormat | str | int,
    symmetric: bool,
    **options: object,
) -> RangeObserver:
    """Build the observer registered as ``name`` in :data:`OBSERVERS`.

    ``fmt`` and ``symmetric`` are passed to observers that search over quantized values
    (``mse``); ``options`` are the observer's keyword-only arguments.
    """
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; valid: {sorted(OBSERVERS)}")
    cls = OBSERVERS[name]
    if isinstance(granularity, str):
        granularity = Granularity.parse(granularity)
    fmt = parse_format(fmt)
    params = inspect.signature(cls).parameters
    valid = sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for observer {name!r}; valid options: {valid}")
    context = {k: v for k, v in (("fmt", fmt), ("symmetric", symmetric)) if k in params}
    return cls(granularity, **context, **options)
