"""FakeQuantizer modes: static, per-timestep table, conditioned; LSQ; state round trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gaq.quant.context import timestep_context
from gaq.quant.providers import TimestepScaleMLP, inverse_softplus, sinusoidal_embedding
from gaq.quant.quantizer import FakeQuantizer, UnknownTimestepError


def _per_timestep_quantizer(**kwargs) -> FakeQuantizer:
    """Calibrated at t=10 on a small range and at t=20 on a large one."""
    fq = FakeQuantizer(8, **kwargs, per_timestep=True).observe()
    for t, spread in ((10, 1.0), (20, 8.0)):
        with timestep_context(t):
            fq(torch.linspace(-spread, spread, 64).reshape(4, 2, 8))
    return fq.finalize()


def test_static_calibration_disable_and_observe() -> None:
    x = torch.randn(4, 3, 5)
    fq = FakeQuantizer(4, observer="max")
    assert fq.mode == "uncalibrated"
    with pytest.raises(RuntimeError, match="not calibrated"):
        fq(x)
    fq.observe()
    assert torch.equal(fq(x), x)  # observing passes the input through
    fq.finalize()
    assert fq.mode == "static" and not fq.observing
    xq = fq(x)
    assert not torch.equal(xq, x)
    assert torch.unique(xq).numel() <= 16
    fq.disable()
    assert torch.equal(fq(x), x)
    fq.enable()
    assert torch.equal(fq(x), xq)


def test_per_channel_static() -> None:
    x = torch.randn(3, 8) * torch.tensor([[0.1], [1.0], [10.0]])
    fq = FakeQuantizer(8, symmetric=True, axis=0)
    fq.calibrate(x)
    fq.finalize()
    assert fq.scale.shape == (3,)
    assert torch.allclose(fq.scale, x.abs().amax(dim=1) / 127)
    assert torch.allclose(fq(x), x, atol=float(fq.scale.max()) / 2 + 1e-6)


def test_table_picks_params_per_timestep() -> None:
    fq = _per_timestep_quantizer()
    assert fq.mode == "table" and fq.timesteps.tolist() == [10, 20]
    s10, _ = fq.qparams(10)
    s20, _ = fq.qparams(20)
    assert s20 == pytest.approx(8 * s10)
    x = torch.linspace(-1, 1, 33)
    with timestep_context(10):
        y10 = fq(x)
    with timestep_context(20):
        y20 = fq(x)
    assert not torch.equal(y10, y20)
    assert (y10 - x).abs().max() < (y20 - x).abs().max()


def test_table_errors() -> None:
    fq = _per_timestep_quantizer()
    with pytest.raises(RuntimeError, match="timestep"):
        fq(torch.zeros(2))
    with (
        pytest.raises(UnknownTimestepError, match="no parameters for timestep 15"),
        timestep_context(15),
    ):
        fq(torch.zeros(2))
    with (
        pytest.raises(UnknownTimestepError, match=r"\[15\]"),
        timestep_context(torch.tensor([10, 15])),
    ):
        fq(torch.zeros(2, 3))


@pytest.mark.parametrize("rows_per_sample", [1, 3])
def test_per_sample_gather(rows_per_sample: int) -> None:
    fq = _per_timestep_quantizer()
    t = torch.tensor([20, 10])
    # k = rows_per_sample rows per sample, as after diffusers' head_to_batch_dim.
    x = torch.randn(2 * rows_per_sample, 5) * 3
    with timestep_context(t):
        batched = fq(x)
    for b, tb in enumerate(t.tolist()):
        rows = slice(b * rows_per_sample, (b + 1) * rows_per_sample)
        with timestep_context(tb):
            assert torch.equal(batched[rows], fq(x[rows]))


def test_per_channel_table_per_sample() -> None:
    fq = FakeQuantizer(6, axis=1, per_timestep=True).observe()
    for t, spread in ((1, 1.0), (2, 5.0)):
        with timestep_context(t):
            fq(torch.randn(4, 3, 2) * spread * torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1))
    fq.finalize()
    assert fq.scale.shape == (2, 3)
    x = torch.randn(2, 3, 2)
    with timestep_context(torch.tensor([2, 1])):
        batched = fq(x)
    for b, tb in enumerate([2, 1]):
        with timestep_context(tb):
            assert torch.equal(batched[b : b + 1], fq(x[b : b + 1]))


def _provider() -> TimestepScaleMLP:
    torch.manual_seed(0)
    mlp = TimestepScaleMLP(init_scale=0.05, embed_dim=16, hidden=16)
    with torch.no_grad():  # leave the constant initialisation so Δ really depends on t
        mlp.net[-1].weight.normal_(std=0.5)
    return mlp


def test_provider_initialises_to_s0() -> None:
    mlp = TimestepScaleMLP(init_scale=torch.tensor([0.01, 0.2]), embed_dim=8, hidden=8)
    out = mlp(torch.tensor([0, 500, 999]))
    assert out.shape == (3, 2)
    assert torch.allclose(out, torch.tensor([0.01, 0.2]).expand(3, 2), rtol=1e-5)
    y = torch.tensor([1e-4, 0.3, 5.0])
    assert torch.allclose(torch.nn.functional.softplus(inverse_softplus(y)), y, rtol=1e-5)


def test_conditioned_then_frozen_table_is_identical() -> None:
    fq = FakeQuantizer(6, symmetric=True).set_provider(_provider())
    assert fq.mode == "conditioned"
    timesteps = [999, 500, 20, 0]
    x = torch.randn(2, 4, 5)
    conditioned = {}
    for t in timesteps:
        with timestep_context(t):
            conditioned[t] = fq(x)
    assert not torch.equal(conditioned[999], conditioned[0])
    per_sample_t = torch.tensor([999, 20])
    with timestep_context(per_sample_t):
        conditioned_batch = fq(x)

    provider = fq.freeze_to_table(timesteps)
    assert isinstance(provider, TimestepScaleMLP)
    assert fq.mode == "table" and fq.provider is None
    assert fq.timesteps.tolist() == sorted(timesteps)
    for t in timesteps:
        with timestep_context(t):
            assert torch.equal(fq(x), conditioned[t])
    with timestep_context(per_sample_t):
        assert torch.equal(fq(x), conditioned_batch)


def test_conditioned_step_size_receives_gradient() -> None:
    fq = FakeQuantizer(4, symmetric=True).set_provider(_provider())
    x = torch.randn(8, 3) * 0.2
    with timestep_context(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])):
        (fq(x) - x).pow(2).sum().backward()
    grads = [p.grad for p in fq.provider.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_asymmetric_conditioned_needs_static_zero_point() -> None:
    with pytest.raises(ValueError, match="zero point"):
        FakeQuantizer(8).set_provider(_provider())
    fq = FakeQuantizer(8)
    fq.calibrate(torch.rand(10) * 3 - 1)
    fq.finalize()
    zp = fq.zero_point.clone()
    fq.set_provider(_provider())
    assert torch.equal(fq.zero_point, zp)


def test_learn_scale_lsq() -> None:
    fq = FakeQuantizer(4)
    fq.calibrate(torch.randn(100))
    fq.finalize()
    before = fq.state_dict()
    fq.learn_scale()
    assert isinstance(fq.scale, torch.nn.Parameter)
    assert set(fq.state_dict()) == set(before)
    x = torch.randn(50)
    (fq(x) - x).pow(2).mean().backward()
    assert fq.scale.grad is not None and fq.scale.grad != 0
    fq.learn_scale(False)
    assert "scale" in fq._buffers

    table = _per_timestep_quantizer().learn_scale()
    with timestep_context(20):
        table(torch.randn(10) * 8).sum().backward()
    assert table.scale.grad[0] == 0 and table.scale.grad[1] != 0  # only t=20's row


def _roundtrip(source: FakeQuantizer, fresh: FakeQuantizer, path) -> FakeQuantizer:
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    fresh.load_state_dict(load_file(str(path)))
    return fresh


@pytest.mark.parametrize("mode", ["static", "per_channel", "table", "learned", "conditioned"])
def test_state_dict_roundtrip_safetensors(mode: str, tmp_path) -> None:
    x = torch.randn(2, 3, 4)
    if mode == "static":
        source, fresh = FakeQuantizer(5, observer="mse"), FakeQuantizer(5)
        source.calibrate(x)
        source.finalize()
    elif mode == "per_channel":
        source, fresh = FakeQuantizer(5, axis=1), FakeQuantizer(5, axis=1)
        source.calibrate(x)
        source.finalize()
    elif mode == "table":
        source, fresh = _per_timestep_quantizer(), FakeQuantizer(8)
    elif mode == "learned":
        source, fresh = _per_timestep_quantizer().learn_scale(), FakeQuantizer(8)
        with torch.no_grad():
            source.scale.mul_(1.1)
    else:
        source = FakeQuantizer(8, symmetric=True).set_provider(_provider())
        fresh = FakeQuantizer(8, symmetric=True).set_provider(
            TimestepScaleMLP(init_scale=1.0, embed_dim=16, hidden=16)
        )
    loaded = _roundtrip(source, fresh, tmp_path / "q.safetensors")
    assert loaded.mode == source.mode
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for t in (10, 20, torch.tensor([20, 10])):
        with timestep_context(t):
            assert torch.equal(loaded(x), source(x))


def test_conditioned_state_needs_provider(tmp_path) -> None:
    source = FakeQuantizer(8, symmetric=True).set_provider(_provider())
    with pytest.raises(RuntimeError, match="set_provider"):
        _roundtrip(source, FakeQuantizer(8, symmetric=True), tmp_path / "q.safetensors")


def test_dtype_cast_keeps_float32_grid() -> None:
    fq = FakeQuantizer(8)
    fq.calibrate(torch.randn(64) * 3)
    fq.finalize()
    scale = fq.scale.clone()
    fq.to(torch.bfloat16)
    assert fq.scale.dtype == torch.float32 and torch.equal(fq.scale, scale)
    x = torch.randn(16).bfloat16()
    out = fq(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fq(x.float()).bfloat16())
    fq.learn_scale()
    param = fq.scale
    fq.half()
    assert fq.scale is param and param.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("channels", [None, 3, 64])
def test_provider_rows_do_not_depend_on_batch_size(channels) -> None:
    # freezing evaluates a thousand timesteps at once; conditioned mode one at a time
    torch.manual_seed(1)
    init = 0.05 if channels is None else torch.rand(channels) + 0.01
    mlp = TimestepScaleMLP(init_scale=init)
    with torch.no_grad():
        for layer in mlp.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(std=0.3)
        ts = torch.arange(1000)
        batched = mlp(ts)
        single = torch.cat([mlp(ts[i:i + 1]) for i in range(0, 1000, 7)])
        odd = mlp(ts[:37])
    assert torch.equal(batched[::7], single)
    assert torch.equal(batched[:37], odd)
    reference = torch.nn.functional.softplus(mlp.net(sinusoidal_embedding(ts, 64)))
    reference = reference if channels else reference[:, 0]
    assert torch.allclose(batched, reference, rtol=1e-4, atol=1e-6)
