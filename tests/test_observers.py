from __future__ import annotations

import pytest
import torch

from dmquant.core.observers import (
    OBSERVERS,
    EMAMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from dmquant.core.primitives import FP8_E4M3, Granularity, IntFormat, choose_qparams, fake_quant
from dmquant.errors import ConfigError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_minmax_over_batches_equals_minmax_of_concatenation():
    g = Granularity.per_channel(1)
    a = torch.randn(2, 3, 4, 4, generator=_gen(0))
    b = torch.randn(5, 3, 4, 4, generator=_gen(1)) * 3
    obs = MinMaxObserver(g)
    obs.update(a)
    obs.update(b)
    lo, hi = obs.compute()
    both = torch.cat([a, b])
    assert lo.shape == hi.shape == (1, 3, 1, 1)
    assert torch.equal(lo, both.amin(dim=(0, 2, 3), keepdim=True))
    assert torch.equal(hi, both.amax(dim=(0, 2, 3), keepdim=True))
    assert obs.num_updates == 2


def test_minmax_per_tensor_and_per_group_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-5.0, 6.0, 7.0, 0.5]])
    obs = MinMaxObserver(Granularity.per_group(2))
    obs.update(w)
    lo, hi = obs.compute()
    assert lo.tolist() == [[-2.0, 3.0], [-5.0, 0.5]] and hi.tolist() == [[1.0, 4.0], [6.0, 7.0]]
    obs = MinMaxObserver()
    obs.update(w)
    assert [t.tolist() for t in obs.compute()] == [[[-5.0]], [[7.0]]]


def test_ema_follows_its_formula():
    obs = EMAMinMaxObserver(Granularity.per_channel(0), momentum=0.75)
    batches = [
        torch.tensor([[1.0, -1.0], [2.0, 0.0]]),
        torch.tensor([[5.0, 3.0], [2.0, -4.0]]),
        torch.tensor([[0.0, 0.5], [9.0, 1.0]]),
    ]
    m_lo, m_hi = [-1.0, 0.0], [1.0, 2.0]  # the first batch initialises
    for b in batches:
        obs.update(b)
    for b in batches[1:]:
        lo, hi = b.amin(1).tolist(), b.amax(1).tolist()
        m_lo = [0.75 * m + 0.25 * v for m, v in zip(m_lo, lo, strict=False)]
        m_hi = [0.75 * m + 0.25 * v for m, v in zip(m_hi, hi, strict=False)]
    lo, hi = obs.compute()
    assert lo.flatten().tolist() == pytest.approx(m_lo) and hi.flatten().tolist() == pytest.approx(m_hi)
    assert lo.shape == (2, 1)
    # differs from a plain running min/max, which would give -4 and 9 here
    assert lo.flatten().tolist() != [-1.0, -4.0]


def test_percentile_matches_torch_quantile_on_small_tensor():
    x = torch.randn(3, 200, generator=_gen(2))
    obs = PercentileObserver(Granularity.per_channel(0), percentile=95.0)
    obs.update(x[:, :120])
    obs.update(x[:, 120:])
    lo, hi = obs.compute()
    assert torch.allclose(hi.flatten(), torch.quantile(x, 0.95, dim=1))
    assert torch.allclose(lo.flatten(), torch.quantile(x, 0.05, dim=1))
    assert bool((hi.flatten() < x.amax(1)).all())


def test_percentile_on_a_subsample_stays_close():
    x = torch.randn(400_000, generator=_gen(3))
    obs = PercentileObserver(percentile=99.0, max_elements=2**15)
    for chunk in x.split(100_000):
        obs.update(chunk)
    lo, hi = obs.compute()
    assert obs.sample.numel() == 2**15
    assert hi.item() == pytest.approx(2.326, abs=0.08)  # N(0, 1) 99th percentile
    assert lo.item() == pytest.approx(-2.326, abs=0.08)


def _brute_force_mse(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, p: float, n: int) -> tuple[float, float]:
    """Direct loop over the candidates of one block: shrink (min, max) by 1 - 0.01 i."""
    xmin, xmax = x.min().item(), x.max().item()
    best, best_range = float("inf"), None
    for i in range(n):
        lo, hi = min(xmin * (1 - 0.01 * i), 0.0), max(xmax * (1 - 0.01 * i), 0.0)
        if symmetric:
            scale, zp = max(-lo, hi) / qmax, 0.0
        else:
            scale = (hi - lo) / (qmax - qmin)
            zp = min(max(round(qmin - lo / scale), qmin), qmax)
        x_q = (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale
        err = (x - x_q).abs().pow(p).mean().item()
        if err < best:
            best, best_range = err, (xmin * (1 - 0.01 * i), xmax * (1 - 0.01 * i))
    return best_range


def _heavy_tailed(shape, seed: int) -> torch.Tensor:
    """Gaussian with 0.2% of the values scaled up 4x."""
    gen = _gen(seed)
    x = torch.randn(shape, generator=gen)
    outliers = torch.rand(shape, generator=gen) < 0.002
    return torch.where(outliers, x * 4, x)


@pytest.mark.parametrize(
    "fmt, symmetric, p, clips",
    [
        (IntFormat(4), True, 2.0, True),
        (IntFormat(3), False, 2.4, True),
        (IntFormat(8, signed=False), False, 2.4, False),
    ],
)
def test_mse_observer_matches_brute_force_and_clips_heavy_tails(fmt, symmetric, p, clips):
    x = _heavy_tailed((4, 2000), seed=4)
    obs = MSEObserver(Granularity.per_channel(0), fmt, symmetric, p=p)
    obs.update(x[:, :700])
    obs.update(x[:, 700:])
    lo, hi = obs.compute()
    assert lo.shape == (4, 1)
    for c in range(4):
        row = x[c]
        ref = _brute_force_mse(row, fmt.qmin, fmt.qmax, symmetric, p, 80)
        assert (lo[c].item(), hi[c].item()) == pytest.approx(ref, rel=1e-6)
        assert row.min().item() <= lo[c].item() and hi[c].item() <= row.max().item()
        if clips:  # at 3-4 bits the outliers are not worth their rounding cost: strictly inside
            assert row.min().item() < lo[c].item() and hi[c].item() < row.max().item()


def test_mse_observer_beats_minmax_lp_error():
    x = _heavy_tailed((20000,), seed=5)
    fmt = IntFormat(4)
    obs = MSEObserver(Granularity.per_tensor(), fmt, True, p=2.4)
    obs.update(x)

    def lp(lo, hi):
        s, z = choose_qparams(lo, hi, fmt, True)
        return (x - fake_quant(x, s, z, fmt)).abs().pow(2.4).mean().item()

    mse_err = lp(*obs.compute())
    minmax_err = lp(x.min(), x.max())
    assert mse_err < 0.5 * minmax_err


def test_mse_observer_float_format_and_clean_data_keeps_full_range():
    # uniform data has no tails to clip at 8 bits: the full range (factor 1.0) should win
    x = torch.rand(4096, generator=_gen(6)) * 2 - 1
    obs = MSEObserver(Granularity.per_tensor(), IntFormat(8), True)
    obs.update(x)
    lo, hi = obs.compute()
    assert lo.item() <= x.min().item() * 0.97 and hi.item() >= x.max().item() * 0.97
    obs = MSEObserver(Granularity.per_tensor(), FP8_E4M3, True, num_candidates=5)
    obs.update(x)
    assert obs.compute()[1].item() <= x.max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_subsample_bound_columns_and_later_batches(device):
    obs = PercentileObserver(Granularity.per_channel(1), max_elements=1024)
    for value in (1.0, 2.0, 3.0, 4.0):  # equal-sized batches, each a constant value
        obs.update(torch.full((50, 16, 8), value, device=device))
    sample = obs.sample
    assert sample.device.type == device  # sampled where the data is
    assert sample.shape == (16, 64)  # 1024 // 16 whole columns
    # whole columns: every channel sees the same positions, so each column is constant
    assert bool((sample == sample[:1]).all())
    shares = torch.stack([(sample[0] == v).float().mean() for v in (1.0, 2.0, 3.0, 4.0)])
    assert bool((shares > 0.1).all())  # later batches are represented, not only the first

    obs = MSEObserver(Granularity.per_tensor(), IntFormat(8), True, max_elements=500)
    for _ in range(3):
        obs.update(torch.randn(7, 300, generator=_gen(7)))
    assert obs.sample.numel() == 500

    tiny = PercentileObserver(Granularity.per_channel(0), max_elements=2)
    tiny.update(torch.randn(5, 10, generator=_gen(8)))
    assert tiny.sample.shape == (5, 1)  # at least one column per parameter


@pytest.mark.parametrize("device", DEVICES)
def test_subsample_is_seeded_and_does_not_alias_input(device):
    x = torch.randn(64, 100, generator=_gen(9)).to(device)

    def sample(seed):
        obs = PercentileObserver(max_elements=256, seed=seed)
        obs.update(x)
        return obs.sample.clone()

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))

    y = torch.randn(4, 8, generator=_gen(10)).to(device)
    obs = PercentileObserver(percentile=100.0)
    obs.update(y)
    expected_hi = y.max().item()
    y.fill_(1000.0)
    assert obs.compute()[1].item() == pytest.approx(expected_hi)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_common_behaviour(name):
    obs = make_observer(name, "channel:1", "int8", symmetric=False)
    with pytest.raises(ValueError, match="observer has seen no data"):
        obs.compute()
    obs.update(torch.randn(2, 3, 5, generator=_gen(11), dtype=torch.float64))
    obs.update(torch.randn(7, 3, 5, generator=_gen(12)).half())
    lo, hi = obs.compute()
    assert lo.shape == hi.shape == (1, 3, 1) and lo.dtype == hi.dtype == torch.float32
    assert bool((lo <= hi).all())
    with pytest.raises(ValueError, match=r"\(1, 4, 1\).*\(1, 3, 1\)"):
        obs.update(torch.randn(2, 4, 5))
    obs.reset()
    assert obs.num_updates == 0
    with pytest.raises(ValueError, match="observer has seen no data"):
        obs.compute()
    obs.update(torch.ones(1, 3, 1))
    assert obs.compute()[1].flatten().tolist() == [1.0, 1.0, 1.0]


def test_update_does_not_record_autograd():
    w = torch.randn(4, 4, requires_grad=True)
    obs = MinMaxObserver()
    obs.update(w * 2)
    assert not obs.compute()[1].requires_grad


def test_make_observer_options_and_errors():
    obs = make_observer("mse", Granularity.per_channel(), IntFormat(4), True, p=2.4, num_candidates=10, seed=3)
    assert isinstance(obs, MSEObserver)
    assert (obs.p, obs.num_candidates, obs.seed, obs.fmt, obs.symmetric) == (2.4, 10, 3, IntFormat(4), True)
    assert make_observer("ema", "tensor", 8, False, momentum=0.5).momentum == 0.5
    assert make_observer("percentile", "group:4", "fp8_e4m3", True, percentile=99.9).percentile == 99.9

    with pytest.raises(ConfigError, match=r"'histogram'.*\['ema', 'minmax', 'mse', 'percentile', 'unit'\]"):
        make_observer("histogram", "tensor", 8, True)
    with pytest.raises(ConfigError, match=r"\['momentum'\].*'minmax'.*valid options: \[\]"):
        make_observer("minmax", "tensor", 8, True, momentum=0.9)
    with pytest.raises(ConfigError, match=r"\['q'\].*\['max_elements', 'num_candidates', 'p', 'seed'\]"):
        make_observer("mse", "tensor", 8, True, q=2)
    with pytest.raises(ConfigError, match="'rows'"):
        make_observer("minmax", "rows", 8, True)
    with pytest.raises(ConfigError, match="fp8_e4m3.*symmetric"):
        make_observer("mse", "tensor", FP8_E4M3, False)
    with pytest.raises(ConfigError, match="momentum"):
        make_observer("ema", "tensor", 8, True, momentum=1.0)
    with pytest.raises(ConfigError, match="percentile"):
        make_observer("percentile", "tensor", 8, True, percentile=30)
    with pytest.raises(ConfigError, match="num_candidates"):
        make_observer("mse", "tensor", 8, True, num_candidates=101)
    with pytest.raises(ConfigError, match="max_elements"):
        make_observer("percentile", "tensor", 8, True, max_elements=0)
    with pytest.raises(ConfigError, match="p must be > 0"):
        make_observer("mse", "tensor", 8, True, p=0)
