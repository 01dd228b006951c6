"""Range initialisation: max, EMA, MSE search and per-timestep accumulation."""

from __future__ import annotations

import pytest
import torch

from gaq.quant.fake import channel_view, fake_quantize, qrange
from gaq.quant.observers import (
    EMAMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    PerTimestepObserver,
    make_observer,
)


def _lp_error(x, scale, zp, bits, symmetric, axis=None, p=2.4):
    qmin, qmax = qrange(bits, symmetric)
    s, z = channel_view(scale, x.ndim, axis), channel_view(zp, x.ndim, axis)
    return (x - fake_quantize(x, s, z, qmin, qmax)).abs().pow(p).mean()


def _heavy_tailed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t-like: a few large outliers, where clipping pays off.
    return torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).clamp_min(0.05)


def test_minmax_is_global_range_over_batches() -> None:
    obs = MinMaxObserver()
    obs.observe(torch.tensor([-1.0, 2.0]))
    obs.observe(torch.tensor([-3.0, 1.0]))
    assert obs.min == -3 and obs.max == 2
    per_channel = MinMaxObserver(axis=1)
    per_channel.observe(torch.tensor([[1.0, -5.0], [2.0, 4.0]]))
    assert torch.equal(per_channel.min, torch.tensor([1.0, -5.0]))
    assert torch.equal(per_channel.max, torch.tensor([2.0, 4.0]))


def test_ema_momentum() -> None:
    obs = EMAMinMaxObserver(momentum=0.95)
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.observe(torch.tensor([-3.0, 5.0]))
    assert obs.min == pytest.approx(0.95 * -1 + 0.05 * -3)
    assert obs.max == pytest.approx(0.95 * 1 + 0.05 * 5)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 0])
def test_mse_error_not_above_max(symmetric: bool, axis: int | None) -> None:
    x = _heavy_tailed(4, 64)
    bits = 4
    errors = {}
    for name in ("max", "mse"):
        obs = make_observer(name, axis=axis)
        obs.observe(x)
        errors[name] = _lp_error(x, *obs.compute(bits, symmetric), bits, symmetric, axis)
    assert errors["mse"] < errors["max"]  # outliers make clipping pay off


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 1])
def test_mse_search_matches_a_plain_loop_over_candidates(symmetric: bool, axis) -> None:
    """The batched search against the textbook loop: for each channel, try every
    shrunken range lo·(1 - i/G), hi·(1 - i/G) and keep the lowest mean |e|^p (pow here)."""
    from gaq.quant.fake import qparams_from_range

    x = _heavy_tailed(3, 5, 40, seed=3)
    obs = MSEObserver(axis=axis, grid=50, max_samples=None)
    obs.observe(x)
    scale, zp = obs.compute(4, symmetric)
    rows = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(5, -1)
    qmin, qmax = qrange(4, symmetric)
    for c, row in enumerate(rows):
        errs = []
        for i in range(50):
            f = 1.0 - i / 50
            s, z = qparams_from_range(row.min() * f, row.max() * f, 4, symmetric)
            errs.append(((row - fake_quantize(row, s, z, qmin, qmax)).abs().pow(2.4).mean(),
                         s, z))
        best_err = min(e for e, _, _ in errs)
        got_s = scale if axis is None else scale[c]
        got_z = zp if axis is None else zp[c]
        got_err = (row - fake_quantize(row, got_s, got_z, qmin, qmax)).abs().pow(2.4).mean()
        # the same candidate, or one whose error ties it to float precision
        assert got_err <= best_err * (1 + 1e-5)
        assert any(torch.equal(got_s, s) and torch.equal(got_z, z) for _, s, z in errs)


def test_mse_respects_symmetric() -> None:
    # Mostly positive data: an asymmetric grid fits it better, but a symmetric
    # search must still return a symmetric grid (Q-Diffusion's search ignored this).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, generator=g) * 4
    x[0] = -1.0
    sym = MSEObserver()
    sym.observe(x)
    scale, zp = sym.compute(4, symmetric=True)
    assert zp == 0
    xq = fake_quantize(x, scale, zp, *qrange(4, True))
    assert torch.all(xq / scale >= -8) and torch.all(xq / scale <= 7)
    asym_scale, asym_zp = sym.compute(4, symmetric=False)
    assert asym_zp != 0 and asym_scale != scale
    assert _lp_error(x, asym_scale, asym_zp, 4, False) < _lp_error(x, scale, zp, 4, True)


def test_mse_subsample_is_bounded_and_deterministic() -> None:
    results = []
    for _ in range(2):
        obs = MSEObserver(max_samples=300, seed=1)
        for i in range(4):
            obs.observe(_heavy_tailed(200, seed=i))
        assert obs._sample.numel() == 300
        results.append(obs.compute(8, False))
    assert torch.equal(results[0][0], results[1][0])
    # The exact range is still tracked over every element.
    assert obs._range.max == max(_heavy_tailed(200, seed=i).max() for i in range(4))


def test_unknown_observer_name() -> None:
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("percentile")


def test_per_timestep_routes_samples() -> None:
    obs = PerTimestepObserver(MinMaxObserver)
    # Two samples with timesteps 5 and 9, heads folded into the batch (k = 2 rows each).
    x = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    obs.observe(x, torch.tensor([5, 9]))
    obs.observe(torch.tensor([[-1.0]]), 5)
    ts, scales, zps = obs.compute(8, symmetric=False)
    assert ts.tolist() == [5, 9]
    assert obs.observers[5].min == -1 and obs.observers[5].max == 2
    assert obs.observers[9].min == 10 and obs.observers[9].max == 20
    assert scales.shape == (2,) and zps.shape == (2,)
    with pytest.raises(ValueError, match="multiple of the batch size"):
        obs.observe(torch.zeros(3, 1), torch.tensor([5, 9]))
