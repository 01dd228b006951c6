"""AdaRound: initialisation at round-to-nearest, soft/hard modes, regulariser, fold."""

from __future__ import annotations

import pytest
import torch

from gaq.quant.adaround import AdaRoundQuantizer, annealed_beta
from gaq.quant.fake import channel_view
from gaq.quant.quantizer import FakeQuantizer


def _weight_and_rtn(symmetric: bool = False) -> tuple[torch.Tensor, FakeQuantizer]:
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * 0.1
    rtn = FakeQuantizer(4, symmetric=symmetric, axis=0)
    rtn.calibrate(w)
    rtn.finalize()
    return w, rtn


@pytest.mark.parametrize("symmetric", [False, True])
def test_hard_init_is_round_to_nearest(symmetric: bool) -> None:
    w, rtn = _weight_and_rtn(symmetric)
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    grid = w * torch.reciprocal(channel_view(rtn.scale, w.ndim, 0))
    not_tie = (grid - torch.floor(grid)) != 0.5
    assert not_tie.float().mean() > 0.99
    hard = ada.set_soft(False)(w)
    assert torch.equal(hard[not_tie], rtn(w)[not_tie])
    assert torch.equal(ada.fold(), hard)


def test_soft_init_reproduces_weight() -> None:
    w, rtn = _weight_and_rtn()
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    assert ada.soft
    # h(V) = frac(W/Δ), so the soft weight is W itself, up to clamping at the grid ends
    # (a rounded zero point can shift the grid by up to Δ/2 past the min/max range).
    scale = channel_view(rtn.scale, w.ndim, 0)
    zp = channel_view(rtn.zero_point, w.ndim, 0)
    clipped = torch.minimum(torch.maximum(w, (0 - zp) * scale), (15 - zp) * scale)
    assert torch.allclose(ada(w), clipped, atol=1e-6)
    assert torch.allclose(ada.h(), ada.h().clamp(0, 1))


def test_gradient_reaches_only_alpha() -> None:
    w, rtn = _weight_and_rtn()
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    assert [n for n, p in ada.named_parameters()] == ["alpha"]
    (ada() - w * 1.05).pow(2).sum().backward()
    assert ada.alpha.grad is not None and ada.alpha.grad.abs().sum() > 0


def test_regulariser_decreases_with_beta_annealing() -> None:
    w, rtn = _weight_and_rtn()
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    total = 100
    betas = [annealed_beta(count, total) for count in range(1, total + 1)]
    assert betas[:19] == [None] * 19  # warm-up: no rounding term before the 20th iteration
    decaying = [b for b in betas if b is not None]
    assert decaying[0] == 20 and decaying[-1] == 2
    assert all(a >= b for a, b in zip(decaying, decaying[1:], strict=False))
    with torch.no_grad():
        regs = [float(ada.rounding_regularizer(b)) for b in decaying]
    assert all(a >= b for a, b in zip(regs, regs[1:], strict=False))
    assert regs[-1] < regs[0]

    # Minimising the regulariser drives every h(V) to 0 or 1.
    opt = torch.optim.Adam([ada.alpha], lr=0.1)
    start = ada.rounding_regularizer(2.0).item()
    for _ in range(50):
        opt.zero_grad()
        ada.rounding_regularizer(2.0).backward()
        opt.step()
    assert ada.rounding_regularizer(2.0).item() < 0.1 * start


def test_fold_is_detached_and_restores_mode() -> None:
    w, rtn = _weight_and_rtn()
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    with torch.no_grad():
        ada.alpha.add_(torch.randn_like(ada.alpha))
    folded = ada.fold()
    assert ada.soft and not folded.requires_grad
    # The folded weight lies on the grid.
    scale = channel_view(rtn.scale, w.ndim, 0)
    levels = folded / scale + channel_view(rtn.zero_point, w.ndim, 0)
    assert torch.allclose(levels, torch.round(levels), atol=1e-4)
    assert levels.min() >= 0 and levels.max() <= 15


def test_needs_static_quantizer_and_matching_shape() -> None:
    w, rtn = _weight_and_rtn()
    with pytest.raises(ValueError, match="static"):
        AdaRoundQuantizer.from_quantizer(FakeQuantizer(4, axis=0), w)
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    with pytest.raises(ValueError, match="shape"):
        ada(torch.zeros(3))


def test_half_cast_keeps_grid_exact() -> None:
    w, rtn = _weight_and_rtn()
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    folded = ada.fold()
    ada.half()
    assert ada.scale.dtype == ada.w_floor.dtype == torch.float32
    assert ada.alpha.dtype == torch.float16
    assert torch.equal(ada.fold(), folded)


def _authors_beta(count: int, total: int, warmup: float, start: float, end: float):
    """The released BRECQ/Q-Diffusion schedule, restated: their loss increments a counter
    before each use (1-based), skips the rounding term while counter < warmup*total, and
    decays β linearly from start to end between warmup*total and total."""
    if count < total * warmup:
        return None
    rel = (count - total * warmup) / (total - total * warmup)
    return end + (start - end) * max(0.0, 1 - rel)


def test_reconstruction_anneals_beta_as_the_authors_count(monkeypatch) -> None:
    import gaq.reconstruction as recon

    seen = []

    def recording(count, total, warmup, start, end):
        seen.append(annealed_beta(count, total, warmup, start, end))
        return seen[-1]

    monkeypatch.setattr(recon, "annealed_beta", recording)
    w, rtn = _weight_and_rtn()
    ada = AdaRoundQuantizer.from_quantizer(rtn, w)
    cfg = recon.ReconConfig(weight_iters=200, warmup=0.2, beta_start=20.0, beta_end=2.0)
    recon.adaround([ada], lambda: (ada() - w).pow(2).sum(), cfg)
    assert seen == [_authors_beta(c, 200, 0.2, 20.0, 2.0) for c in range(1, 201)]
    assert seen[38] is None and seen[39] == 20.0 and seen[-1] == 2.0
