"""Uniform affine fake quantization against torch's reference ops, and its STE gradients."""

from __future__ import annotations

import pytest
import torch

from gaq.quant.fake import (
    channel_view,
    fake_quantize,
    qparams_from_range,
    qrange,
    round_ste,
    tensor_range,
)


def _inputs(bits: int, symmetric: bool, axis: int | None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 * bits + symmetric)
    x = torch.randn(6, 5, 4, generator=g) * 2 + 0.3
    lo, hi = tensor_range(x, axis)
    scale, zp = qparams_from_range(lo, hi, bits, symmetric)
    # Exact ties x/Δ = n + 0.5 exercise the half-to-even rounding on both sides.
    step = scale if axis is None else channel_view(scale, x.ndim, axis)
    ties = (torch.randint(-4, 4, x.shape, generator=g) + 0.5) * step
    return torch.cat([x, ties]), scale, zp


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 1])
def test_matches_torch_reference(bits: int, symmetric: bool, axis: int | None) -> None:
    x, scale, zp = _inputs(bits, symmetric, axis)
    qmin, qmax = qrange(bits, symmetric)
    if axis is None:
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), qmin, qmax)
    else:
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), axis, qmin, qmax)
    ours = fake_quantize(
        x, channel_view(scale, x.ndim, axis), channel_view(zp, x.ndim, axis), qmin, qmax
    )
    assert torch.equal(ours, ref)


def test_qrange() -> None:
    assert qrange(4, False) == (0, 15)
    assert qrange(4, True) == (-8, 7)
    assert qrange(1, False) == (0, 1)
    with pytest.raises(ValueError):
        qrange(1, True)
    with pytest.raises(ValueError):
        qrange(17, False)


def test_qparams_cover_range_and_zero() -> None:
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    scale, zp = qparams_from_range(lo, hi, 8, False)
    assert scale == pytest.approx(4 / 255)
    assert zp == torch.round(zp) and 0 <= zp <= 255
    x = torch.tensor([-1.0, 0.0, 3.0])
    xq = fake_quantize(x, scale, zp, 0, 255)
    assert xq[1] == 0  # zero is exactly representable
    assert torch.allclose(xq, x, atol=float(scale) / 2 + 1e-7)

    scale, zp = qparams_from_range(lo, hi, 8, True)
    assert zp == 0 and scale == pytest.approx(3 / 127)

    scale, zp = qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), 8, False, unsigned=True)
    assert zp == 0 and scale == pytest.approx(1 / 255)

    # A constant tensor must not produce Δ = 0 (division by zero downstream).
    scale, _ = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 8, False)
    assert scale > 0


def test_round_ste_is_identity_backward() -> None:
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(round_ste(x.detach()), torch.round(x.detach()))


def test_ste_gradients_match_lsq_formula() -> None:
    qmin, qmax = qrange(4, False)
    zp = torch.tensor(3.0)
    scale = torch.tensor(0.25, requires_grad=True)
    x = torch.tensor([-2.0, -0.3, 0.1, 0.61, 1.4, 5.0], requires_grad=True)
    fake_quantize(x, scale, zp, qmin, qmax).sum().backward()

    v = x.detach() / scale.detach()
    q = torch.round(v) + zp
    inside = (q >= qmin) & (q <= qmax)
    # x: straight through inside the grid, zero where clamped.
    assert torch.equal(x.grad, inside.float())
    # Δ (LSQ): round(x/Δ) − x/Δ inside, (qmin − z) or (qmax − z) outside.
    expected = torch.where(inside, torch.round(v) - v, torch.clamp(q, qmin, qmax) - zp)
    assert scale.grad is not None and scale.grad != 0
    assert torch.allclose(scale.grad, expected.sum(), atol=1e-6)


def test_half_precision_input_keeps_dtype() -> None:
    x = torch.randn(4, 4).half()
    scale, zp = qparams_from_range(*tensor_range(x), 8, False)
    out = fake_quantize(x, scale, zp, 0, 255)
    assert out.dtype == torch.float16
    ref = fake_quantize(x.float(), scale, zp, 0, 255).half()
    assert torch.equal(out, ref)
