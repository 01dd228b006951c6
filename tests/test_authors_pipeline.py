"""Pipeline settings that follow the authors' released code: minibatches drawn from every
cached row, the split-shortcut rounding regulariser, the first and last layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.qdiffusion import QDiffusion
from baselines.tfmq import TFMQ
from gaq.quant import quantize_layer
from gaq.reconstruction import BlockData, ReconConfig, adaround, split_reg_scales
from gaq.registry import get_method


def _records(sizes: list[int]) -> list[dict]:
    out, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        out.append({"args": (idx.float().view(n, 1).repeat(1, 3),), "kwargs": {"scale": 2.0},
                    "target": idx.float().view(n, 1), "t": idx * 10, "index": idx})
        start += n
    return out


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_all_rows_minibatch_is_a_permutation_of_the_whole_cache(where):
    """The authors draw each minibatch as the first rows of a fresh random permutation of
    every cached row: the same rows here, from the same generator state, with every
    per-row tensor (inputs, target, timesteps, index) kept aligned."""
    sizes = [5, 7, 4, 6]
    data = BlockData(where)
    try:
        for r in _records(sizes):
            data.add(r)
        gen, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        seen_records = set()
        for _ in range(20):
            batch = data.sample(6, gen, "all_rows")
            expected = torch.randperm(sum(sizes), generator=ref)[:6]
            assert sorted(batch["index"].tolist()) == sorted(expected.tolist())
            assert batch["n"] == 6 and batch["kwargs"] == {"scale": 2.0}
            assert torch.equal(batch["target"].view(-1), batch["index"].float())
            assert torch.equal(batch["args"][0][:, 2], batch["index"].float())
            assert torch.equal(batch["t"], batch["index"] * 10)
            bounds = torch.tensor(sizes).cumsum(0)
            seen_records.add(len(torch.bucketize(batch["index"], bounds, right=True).unique()))
        assert max(seen_records) > 1  # rows of several captured batches in one minibatch
        whole = data.sample(100, gen, "all_rows")  # more than cached: every row once
        assert sorted(whole["index"].tolist()) == list(range(sum(sizes)))
        one = data.sample(6, torch.Generator().manual_seed(0), "one_record")
        assert len(torch.bucketize(one["index"], torch.tensor(sizes).cumsum(0),
                                   right=True).unique()) == 1
    finally:
        data.close()


def _split_layer() -> nn.Module:
    torch.manual_seed(0)
    layer = quantize_layer(nn.Conv2d(12, 4, 1), 4, None, split=8, weight_observer="max")
    for q, w in zip(layer.weight_quantizers, layer.weight_parts(), strict=True):
        q.calibrate(w)
        q.finalize()
    return layer


def test_split_regulariser_weights_follow_each_authors_rule():
    layer = _split_layer()
    assert split_reg_scales([layer], "sum") == [1.0, 1.0]
    assert split_reg_scales([layer], "first") == [1.0, 0.0]  # Q-Diffusion
    assert split_reg_scales([layer], "channels") == [8 / 12, 4 / 12]  # TFMQ-DM
    plain = quantize_layer(nn.Conv2d(12, 4, 1), 4, None)
    assert split_reg_scales([plain, layer], "first") == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("rule, second_moves", [("first", False), ("sum", True)])
def test_an_unregularised_half_gets_no_rounding_gradient(rule, second_moves):
    """With a zero reconstruction loss only the regulariser moves the rounding variables:
    under Q-Diffusion's rule the second half of a split conv must not move at all."""
    layer = _split_layer()
    quantizers = layer.use_adaround()
    before = [q.alpha.detach().clone() for q in quantizers]
    cfg = ReconConfig(weight_iters=3, warmup=0.0)
    zero = lambda: sum(q.alpha.sum() for q in quantizers) * 0.0  # noqa: E731
    adaround(quantizers, zero, cfg, reg_scales=split_reg_scales([layer], rule))
    assert not torch.equal(before[0], quantizers[0].alpha)
    assert (not torch.equal(before[1], quantizers[1].alpha)) is second_moves


def test_presets_follow_the_authors_and_version_1_keeps_its_meaning():
    assert QDiffusion.from_preset("cpu").config.recon.split_reg == "first"
    assert QDiffusion.Config().recon.split_reg == "first"
    for name in ("tfmq", "gaq", "gaq-uniform"):
        method = get_method(name)
        assert method.from_preset("cpu").config.recon.split_reg == "channels"
        assert method.from_preset("paper").config.recon.split_reg == "channels"
    assert TFMQ.Config().recon.minibatch == "all_rows"
    old = {k: v for k, v in ReconConfig().to_dict().items()
           if k not in ("minibatch", "split_reg")} | {"_version": 1}
    upgraded = ReconConfig.from_dict(old)
    assert (upgraded.minibatch, upgraded.split_reg) == ("one_record", "sum")
    with pytest.raises(ValueError, match="split_reg"):
        ReconConfig(split_reg="half")


def _first_last(method_name: str, tiny_unet) -> dict[str, tuple[str, int | None]]:
    from gaq.config import QuantConfig
    from gaq.models.adapters import adapter_for
    from gaq.quantize import plan

    method = get_method(method_name).from_preset("cpu")
    quant = QuantConfig.from_bits("W4A8")
    quant = method.effective_quant(quant)
    adapter = adapter_for(tiny_unet)
    report = plan(tiny_unet, adapter, quant, method.skip_filter(adapter))
    return {d.name: (d.status, d.weight_bits) for d in report
            if d.name in ("conv_in", "conv_out")}


@pytest.mark.parametrize("name, expected", [
    ("qdiffusion", ("quantized", 4)),  # the authors' QuantModel has no first/last exception
    ("tfmq", ("fp", None)),  # disable_out_quantization
    ("gaq", ("fp", None)),  # TFMQ-DM's pipeline
    ("brecq", ("w8a8", 8)),  # BRECQ's convention, the suite's default
    ("rtn", ("w8a8", 8)),
])
def test_first_and_last_layer_follow_each_authors_code(name, expected, tiny_unet):
    got = _first_last(name, tiny_unet)
    assert got == {"conv_in": expected, "conv_out": expected}


def test_old_configs_keep_the_8_bit_first_and_last_layer():
    from baselines.qdiffusion import QDiffusionConfig
    from baselines.tfmq import TFMQConfig

    for cls, version in ((QDiffusionConfig, 1), (TFMQConfig, 1), (TFMQConfig, 2)):
        old = {k: v for k, v in cls().to_dict().items() if k != "first_last"}
        old["_version"] = version
        assert cls.from_dict(old).first_last == "w8a8"
    with pytest.raises(Exception, match="first_last"):
        TFMQConfig(first_last="int8")


def _authors_max_quantizer(x: torch.Tensor, n_bits: int, sym: bool) -> torch.Tensor:
    """Q-Diffusion's UniformAffineQuantizer with scale_method 'max', per tensor, written
    from qdiff/quant_layer.py (Xiuyu-Li/q-diffusion, 715783d): init on ``x``, then
    quantize-dequantize ``x``."""
    n_levels = 2 ** n_bits if not sym else 2 ** (n_bits - 1) - 1
    x_min, x_max = min(x.min().item(), 0), max(x.max().item(), 0)
    if sym:
        delta = max(abs(x_min), x_max) / n_levels
    else:
        delta = float(x.max().item() - x.min().item()) / (n_levels - 1)
    delta = max(delta, 1e-8)
    zero_point = 0 if sym else round(-x_min / delta)
    x_int = torch.round(x / delta) + zero_point
    low, high = (-n_levels - 1, n_levels) if sym else (0, n_levels - 1)
    return (torch.clamp(x_int, low, high) - zero_point) * delta


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_the_suites_max_quantizer_is_the_authors(sym, signed):
    """The authors' --a_sym activation quantizer (and its asymmetric form) with a min/max
    init: the suite's FakeQuantizer with range_init "max" gives the same values, on signed
    tensors (post-SiLU-like) and non-negative ones (softmax-like)."""
    from gaq.quant import FakeQuantizer

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen) * 2.0
    x = torch.nn.functional.silu(x) if signed else torch.softmax(x.view(64, 64), -1).view(-1)
    q = FakeQuantizer(8, symmetric=sym, observer="max")
    q.observing = True
    q(x)
    q.finalize()
    with torch.no_grad():
        ours, theirs = q(x), _authors_max_quantizer(x, 8, sym)
    # their asymmetric step spans [min x, max x], the suite's [0, max x] (zero exactly on
    # the grid): the same up to 1 % of a step when min x is a hair above 0 (softmax)
    tol = 1e-6 if sym or signed else 0.01 * float(q.scale)
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)


def test_per_setting_presets_follow_the_authors_commands(tiny_unet):
    """paper-cifar10: max inits, symmetric activations and softmax output; paper-lsun:
    symmetric EMA-initialised activations, no split; paper-sd: EMA, softmax at 16 bits; the
    built model carries those quantizers."""
    from gaq.config import QuantConfig
    from gaq.models.adapters import adapter_for
    from gaq.quant import FakeQuantizer
    from gaq.quantize import quantize_model

    def effective(preset: str) -> QuantConfig:
        method = QDiffusion(QDiffusion.presets[preset])
        return method.effective_quant(QuantConfig.from_bits("W4A8"))

    cifar = effective("paper-cifar10")
    assert (cifar.weight.range_init, cifar.act.range_init) == ("max", "max")
    assert cifar.act.symmetric and cifar.softmax_symmetric and cifar.softmax_bits == 8
    lsun = effective("paper-lsun")
    assert (lsun.weight.range_init, lsun.act.range_init) == ("mse", "ema")
    assert lsun.act.symmetric and not lsun.softmax_symmetric and not lsun.split_shortcut
    sd = effective("paper-sd")
    assert sd.act.range_init == "ema" and not sd.act.symmetric and sd.softmax_bits == 16
    assert effective("paper") == effective("cpu")  # the quantizers; iterations differ

    qmodel, _ = quantize_model(tiny_unet, adapter_for(tiny_unet), cifar)
    quantizers = [m for m in qmodel.modules()  # activations: per tensor (weights: channel)
                  if isinstance(m, FakeQuantizer) and m.axis is None]
    probs = [m for n, m in qmodel.named_modules() if n.endswith("probs_quantizer")]
    assert probs and all(p.symmetric and p.bits == 8 for p in probs)
    assert quantizers and all(q.symmetric for q in quantizers)


def test_version_2_qdiffusion_configs_read_unchanged():
    from baselines.qdiffusion.method import QDiffusionConfig

    data = QDiffusionConfig().to_dict()
    for key in ("weight_range_init", "act_range_init", "act_symmetric", "softmax_symmetric"):
        data.pop(key)
    data["_version"] = 2
    assert QDiffusionConfig.from_dict(data) == QDiffusionConfig()


@pytest.mark.parametrize("upstream", ["fp", "quantized"])
def test_activation_init_sees_the_upstream_the_protocol_says(upstream):
    """upstream="quantized" (BRECQ's and Q-Diffusion's code): the second layer's input
    quantizer is initialised on what the first layer computes from its *quantized* input;
    "fp" (the suite's): from its full-precision input. Checked against both computed here."""
    from gaq.quant.fake import qparams_from_range
    from gaq.quantize import act_quantizers, calibrate_activations

    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 4)
    model = nn.Sequential(quantize_layer(first, 8, 3, act_observer="max"),
                          quantize_layer(second, 8, 3, act_observer="max"))
    x = torch.randn(64, 8)
    calibrate_activations(model, lambda m: m(x), upstream=upstream)
    (_, q1), (_, q2) = act_quantizers(model)
    with torch.no_grad():
        w1 = model[0].weight_quantizer(first.weight) if hasattr(model[0], "weight_quantizer") \
            else first.weight
        fp_in = torch.nn.functional.linear(x, w1, first.bias)
        q_in = torch.nn.functional.linear(q1(x), w1, first.bias)
    expect = {"fp": fp_in, "quantized": q_in}
    for name, y in expect.items():
        scale, _ = qparams_from_range(y.min(), y.max(), 3, False)
        assert torch.isclose(q2.scale, scale).item() == (name == upstream), name
