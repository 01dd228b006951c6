"""Dynamic activation quantization (after Q-DiT's released code): the quantizer against an
independent re-implementation of the authors' function, ranges that follow each sample,
and the method end to end on the bundled digits model with save/restore."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from torch import nn

from baselines.dynamic import Dynamic, DynamicConfig, DynamicQuantizer, dynamic_rows
from gaq.calibration import CalibrationSpec, record_calibration
from gaq.cell import restore
from gaq.config import ConfigError, QuantConfig
from gaq.models.adapters import adapter_for
from gaq.quantize import _state_tensors, act_quantizers, quant_layers, save_state
from gaq.reconstruction import ReconConfig
from gaq.sampling import SamplerConfig, sample_batch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DynamicConfig(recon=ReconConfig(weight_iters=3, batch_size=8, capture_batch=8,
                                       eval_samples=16, cache="memory"))


def authors_quantize(w: torch.Tensor, n_bits: int, group_size: int, sym: bool,
                     clip_ratio: float = 1.0) -> torch.Tensor:
    """Q-DiT's activation path written out from their description (``qdit/quant.py`` at
    519d24a: ``quantize_activation_wrapper`` then ``quantize_tensor`` with its default
    ``quant_method="max"``): flatten to ``(-1, C)``, optionally regroup to
    ``(-1, group_size)``, one min/max per row, and the quantize-dequantize formula."""
    shape = w.shape
    w = w.reshape(-1, shape[-1])
    if group_size > 0:
        w = w.reshape(-1, group_size)
    if sym:
        w_max = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        q_max, q_min = 2 ** (n_bits - 1) - 1, -(2 ** (n_bits - 1))
        if clip_ratio < 1.0:
            w_max = w_max * clip_ratio
        scales = w_max / q_max
        base = torch.zeros_like(scales)
    else:
        w_max = w.amax(dim=-1, keepdim=True)
        w_min = w.amin(dim=-1, keepdim=True)
        q_max, q_min = 2**n_bits - 1, 0
        if clip_ratio < 1.0:
            w_max = w_max * clip_ratio
            w_min = w_min * clip_ratio
        scales = (w_max - w_min).clamp(min=1e-5) / q_max
        base = torch.round(-w_min / scales).clamp_(min=q_min, max=q_max)
    w = (torch.clamp(torch.round(w / scales) + base, q_min, q_max) - base) * scales
    return w.reshape(shape)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [0, 4])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_matches_the_authors_function_on_identical_tensors(sym, group, bits, clip):
    gen = torch.Generator().manual_seed(bits * 10 + group)
    # tokens of very different scales, an all-positive token and a constant one
    x = torch.randn(3, 5, 16, generator=gen) * torch.logspace(-3, 2, 5).reshape(1, 5, 1)
    x[0, 0] = x[0, 0].abs() + 0.5
    x[1, 1] = 0.25
    q = DynamicQuantizer(bits, sym, layout="token", group_size=group, clip_ratio=clip,
                         device="cpu")
    assert torch.equal(q(x), authors_quantize(x.clone(), bits, group, sym, clip))


def test_a_group_size_that_does_not_divide_the_width_takes_whole_tokens():
    x = torch.randn(2, 3, 12)
    q = DynamicQuantizer(8, layout="token", group_size=5, device="cpu")
    assert torch.equal(q(x), authors_quantize(x.clone(), 8, 0, False))


def test_each_sample_gets_its_own_grid_within_one_batch():
    """Two samples, the same pattern at scales 100x apart, in one batch: each is quantized
    on its own range (the error scales with the sample), and quantizing a sample alone or
    beside the other gives the same result. A static range fitted to the batch would
    flatten the small sample to a few levels."""
    base = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.cat([base, 100 * base])
    for layout, q in (("sample", DynamicQuantizer(4, layout="sample", device="cpu")),
                      ("token", DynamicQuantizer(4, layout="token", device="cpu"))):
        out = q(x)
        assert torch.allclose(out[1], 100 * out[0], rtol=1e-4, atol=1e-4), layout
        assert torch.equal(out[:1], q(x[:1])) and torch.equal(out[1:], q(x[1:])), layout
        levels = [out[i].unique().numel() for i in range(2)]
        assert levels[0] == levels[1] > 8, layout
    # a per-tensor range over the same batch leaves the small sample on about one level
    from gaq.quant.quantizer import FakeQuantizer

    static = FakeQuantizer(4, device="cpu")
    static.calibrate(x)
    static.finalize()
    assert static(x)[0].unique().numel() <= 3


def test_rows_follow_the_layout():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    assert dynamic_rows(x, "token").shape == (6, 8)
    assert dynamic_rows(x, "token", 4).shape == (12, 4)
    assert dynamic_rows(x.reshape(2, 3, 2, 4), "sample").shape == (2, 24)
    with pytest.raises(ValueError, match="layout"):
        dynamic_rows(x, "channel")


def test_half_precision_inputs_are_quantized_in_float32():
    x = torch.randn(4, 16)
    q = DynamicQuantizer(8, device="cpu")
    out = q(x.half())
    assert out.dtype == torch.float16
    assert torch.equal(out, q(x.half().float()).half())


def test_config_presets_and_validation():
    for cfg in Dynamic.presets.values():
        assert DynamicConfig.from_dict(cfg.to_dict()) == cfg
    assert Dynamic.presets["cpu"].recon == ReconConfig(weight_iters=200, act_iters=50)
    for bad in ({"act_group_size": -1}, {"clip_ratio": 0.0}, {"clip_ratio": 1.5}):
        with pytest.raises(ConfigError):
            DynamicConfig(**bad)


@pytest.fixture(scope="module")
def digits():
    from gaq.models.loading import load_model

    return load_model("digits")


def _sample(pipe, denoiser: nn.Module) -> torch.Tensor:
    return sample_batch(pipe.with_denoiser(denoiser), [0, 1], seed=0,
                        sampler=SamplerConfig(steps=6), decode=False)


@pytest.mark.slow
def test_end_to_end_on_bundled_digits_with_save_and_restore(digits, tmp_path):
    spec = CalibrationSpec(steps=6, interval=2, samples_per_step=3, batch_size=8)
    calib = record_calibration(digits, spec, model_id="digits", cache=False)
    den = digits.denoiser
    result = Dynamic(TINY).quantize(den, adapter_for(den), calib, QuantConfig.from_bits("W4A8"))
    acts = [q for _, q in act_quantizers(result.model)]
    assert acts and all(isinstance(q, DynamicQuantizer) for q in acts)
    assert result.stats["dynamic_quantizers"] == len(acts)
    layouts = {type(layer.fp): {q.layout for q in layer.act_quantizers}
               for _, layer in quant_layers(result.model) if layer.act_quantizers}
    assert layouts[nn.Conv2d] == {"sample"}
    images = _sample(digits, result.model)
    assert torch.isfinite(images).all()
    assert not torch.equal(images, _sample(digits, den))
    save_state(result.model, result.report, result.quant, tmp_path / "s", meta=result.state)
    back = restore(digits.denoiser, tmp_path / "s")
    restored = [q for _, q in act_quantizers(back.model)]
    assert [q.extra_repr() for q in restored] == [q.extra_repr() for q in acts]
    assert torch.equal(_sample(digits, back.model), images)
    saved = _state_tensors(result.model)  # what a state holds: frozen weights, quantizers
    again = _state_tensors(back.model)
    assert saved.keys() == again.keys()
    assert all(torch.equal(again[k], v) for k, v in saved.items())


def test_weight_only_bits_install_nothing(digits):
    spec = CalibrationSpec(steps=4, interval=2, samples_per_step=2, batch_size=8)
    calib = record_calibration(digits, spec, model_id="digits", cache=False)
    den = digits.denoiser
    cfg = dataclasses.replace(TINY, act_group_size=0)
    result = Dynamic(cfg).quantize(den, adapter_for(den), calib, QuantConfig.from_bits("W4A32"))
    assert result.stats["dynamic_quantizers"] == 0
    assert not list(act_quantizers(result.model))


def test_the_report_anchors_the_paired_tables_on_the_dynamic_row():
    from baselines.dynamic.report import DynamicReport

    rows = []
    for method, shift in (("dynamic", 0.0), ("tfmq", -0.5), ("fp", 0.0)):
        for image in range(8):
            rows.append({"model": "digits", "bits": "W4A8", "method": method, "seed": 0,
                         "image": image, "metric": "psnr", "value": 30.0 + shift + image % 3})
    per_image = pd.DataFrame(rows)
    metrics = per_image.drop(columns="image").drop_duplicates(["method"])
    out = DynamicReport().markdown({"per_image": per_image, "metrics": metrics}, "w4a8")
    assert "Δ vs Dynamic" in out["vs_dynamic"] and "−0.500" in out["vs_dynamic"]
    assert DynamicReport().markdown({"metrics": metrics[metrics.method != "dynamic"]},
                                    "w4a8") == {}


def test_perf_renders_the_three_side_by_side_ratios():
    from gaq import perf

    figure = {"ratio": 1.1, "min": 1.0, "max": 1.2}
    report = {"dynamic_overhead": {
        "model": "digits", "bits": "W4A8", "images": 256, "steps": 50, "batch_size": 128,
        "repeats": 5, "backend": "fake-quant, PyTorch CPU", "threads": 1,
        "fp_seconds": 10.0, "static_seconds": 11.0, "dynamic_seconds": 12.0,
        "static_over_fp": figure, "dynamic_over_fp": figure, "dynamic_over_static": figure}}
    md = perf.render(report)
    assert "dynamic activation ranges / FP" in md
    assert "static activation ranges / FP" in md
    assert "dynamic activation ranges / static ranges" in md
