"""End to end through ``get_method``: RTN and BRECQ on tiny random models of every supported
architecture (UNet2DModel, UNet2DConditionModel, DiT), the layer report, frozen weights,
save/load of a quantization state, and refusal of what gaq cannot quantize."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from torch import Tensor, nn

from gaq.calibration import CalibrationSet, CalibrationSpec, record_calibration
from gaq.config import QuantConfig
from gaq.errors import GaqError
from gaq.models.adapters import ADAPTERS, UNet2DAdapter, adapter_for
from gaq.models.pipeline import Pipeline
from gaq.quant import QuantLayer
from gaq.quantize import act_quantizers, load_state, quant_layers, save_state
from gaq.reconstruction import ReconConfig
from gaq.registry import get_method

KINDS = ("unet", "cond_unet", "dit")
METHODS = ("rtn", "brecq", "qdiffusion")
# Each BRECQ run streams its block captures from one of the two caches.
BRECQ_CACHE = {"unet": "disk", "cond_unet": "memory", "dit": "disk"}
RECONSTRUCTING = ("brecq", "qdiffusion")
TINY_RECON = ReconConfig(weight_iters=20, act_iters=5, batch_size=8, capture_batch=8)
# Measured at W8A8 (RTN / BRECQ): UNet 32.0 / 31.4 dB, conditional UNet 32.9 / 32.6 dB,
# DiT 38.2 / 38.0 dB. 20 dB leaves > 10 dB of margin; 60 dB would mean nothing was quantized.
W8A8_MIN_SQNR_DB = 20.0
NOT_QUANTIZED_SQNR_DB = 60.0
STATUSES = {"quantized", "w8a8", "fp"}


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise))


@torch.no_grad()
def denoise(kind: str, model: nn.Module, x: Tensor, t: Tensor, cond: dict) -> Tensor:
    """The noise prediction, called the way each architecture's pipeline calls it."""
    if kind == "dit":
        return model(x, timestep=t, class_labels=cond["class_labels"]).sample
    if kind == "cond_unet":
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    return model(x, t).sample


def run_on(kind: str, model: nn.Module, calib: CalibrationSet) -> Tensor:
    return denoise(kind, model, calib.x, calib.t, calib.cond)


def random_calibration(kind: str, model: nn.Module, rows: int = 16) -> CalibrationSet:
    """Random (x_t, t, cond) rows with their FP outputs: the method path is what is tested."""
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.randint(0, 1000, (rows,), generator=gen)
    if kind == "dit":
        cond = {"class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (rows,), generator=gen)}
    else:
        cond = {"encoder_hidden_states": torch.randn(rows, 3, cfg.cross_attention_dim,
                                                     generator=gen)}
    return CalibrationSet(x=x, t=t, eps_fp=denoise(kind, model, x, t, cond), cond=cond)


def method(name: str, cache: str = "memory"):
    cls = get_method(name)
    if name in RECONSTRUCTING:
        return cls(cls.Config(recon=dataclasses.replace(TINY_RECON, cache=cache)))
    return cls(cls.Config())


@pytest.fixture(scope="module")
def fp_case(make_tiny_model, tmp_path_factory):
    """``fp_case(kind) -> (fp model, calibration set, FP output on it)``, built once per module."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            model = make_tiny_model(kind)
            if kind == "unet":
                from diffusers import DDPMScheduler

                sched = DDPMScheduler(num_train_timesteps=1000,
                                      beta_schedule="squaredcos_cap_v2")
                spec = CalibrationSpec(steps=4, interval=2, samples_per_step=4)
                calib = record_calibration(Pipeline(model, sched), spec, model_id="tiny-unet",
                                           cache_dir=tmp_path_factory.mktemp("calib"))
            else:
                calib = random_calibration(kind, model)
            cache[kind] = (model, calib, run_on(kind, model, calib))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def quantized(fp_case):
    """``quantized(kind, method, quant) -> QuantResult``, each combination run once."""
    cache: dict = {}

    def get(kind: str, name: str, quant: QuantConfig | None = None):
        quant = quant or QuantConfig.from_bits("W8A8")
        key = (kind, name, quant.fingerprint())
        if key not in cache:
            model, calib, _ = fp_case(kind)
            m = method(name, BRECQ_CACHE[kind])
            cache[key] = m.quantize(model, adapter_for(model), calib, quant)
        return cache[key]

    return get


cases = pytest.mark.parametrize("kind,name", [(k, m) for k in KINDS for m in METHODS])


@pytest.mark.slow
@cases
def test_report_covers_every_layer_once(fp_case, quantized, kind, name):
    model, _, _ = fp_case(kind)
    result = quantized(kind, name)
    report = result.report
    layers = {n: type(m).__name__ for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    attention = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"]
    assert attention, "every tiny model has attention"
    # the method's effective config says whether the attention operands are quantized
    quantizes_attention = result.state["quant"]["attention"]
    assert quantizes_attention == (name != "brecq")  # BRECQ itself leaves attention alone

    names = [d.name for d in report]
    assert len(names) == len(set(names)), "a layer is reported twice"
    assert {d.name: d.kind for d in report if d.kind != "attention"} == layers
    assert sorted(d.name for d in report if d.kind == "attention") == (
        sorted(attention) if quantizes_attention else [])
    assert {d.status for d in report} <= STATUSES
    for d in report:
        if d.status != "quantized":
            assert d.reason, f"{d.name} is {d.status} without a reason"
    counts = report.counts()
    assert counts["quantized"] > counts.get("w8a8", 0) + counts.get("fp", 0)
    # First/last layer (DiT: patch embedding and output projection) per the method's
    # first_last: W8A8 by default, quantized like the rest for Q-Diffusion (its authors'
    # code has no exception), FP for TFMQ-DM and GAQ.
    first_last = result.state["quant"].get("first_last", "w8a8")
    assert counts.get("w8a8", 0) == (2 if first_last == "w8a8" else 0)
    # The report describes the model the method returned.
    for d in report:
        if d.status != "fp" and d.kind != "attention":
            assert isinstance(result.model.get_submodule(d.name), QuantLayer), d.name


@pytest.mark.slow
@cases
def test_w8a8_output_is_close_to_fp_but_quantized(fp_case, quantized, kind, name):
    model, calib, fp_out = fp_case(kind)
    result = quantized(kind, name)
    out = run_on(kind, result.model, calib)
    assert out.shape == fp_out.shape
    assert not torch.equal(out, fp_out)
    assert W8A8_MIN_SQNR_DB < sqnr_db(fp_out, out) < NOT_QUANTIZED_SQNR_DB
    # The method worked on a copy: the FP model is untouched.
    assert torch.equal(run_on(kind, model, calib), fp_out)
    assert not any(isinstance(m, QuantLayer) for m in model.modules())


@cases
def test_stats_and_state(quantized, kind, name):
    result = quantized(kind, name)
    assert result.stats["calibration_seconds"] > 0
    assert result.state["method"] == name
    used, asked = QuantConfig.from_dict(result.state["quant"]), QuantConfig.from_bits("W8A8")
    # methods may switch attention / shortcut handling, never the bit-widths or ranges
    assert (used.weight, used.act) == (asked.weight, asked.act)
    if name in RECONSTRUCTING:
        phases = {tuple(sorted(b["metrics"])) for b in result.state["blocks"]}
        assert phases == {("adaround_error", "rtn_error"), ("act_after", "act_before")}


def _refuse_calls(module, args):
    raise AssertionError("a weight quantizer ran after the weights were frozen")


@cases
def test_weights_are_frozen(fp_case, quantized, kind, name):
    """Methods freeze weights, so a forward pass only fake-quantizes activations."""
    _, calib, _ = fp_case(kind)
    result = quantized(kind, name)
    layers = list(quant_layers(result.model))
    assert layers
    for lname, layer in layers:
        assert layer.frozen_weight is not None, lname
        assert layer.frozen_weight.shape == layer.fp.weight.shape
    before = run_on(kind, result.model, calib)
    handles = [q.register_forward_pre_hook(_refuse_calls)
               for _, layer in layers for q in layer.weight_quantizers]
    try:
        after = run_on(kind, result.model, calib)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(before, after)
    assert all(q.mode != "uncalibrated" for _, q in act_quantizers(result.model))


def test_w4_weights_are_worse_than_w8(fp_case, quantized):
    _, calib, fp_out = fp_case("unet")
    w8 = sqnr_db(fp_out, run_on("unet", quantized("unet", "rtn").model, calib))
    w4_result = quantized("unet", "rtn", QuantConfig.from_bits("W4A8"))
    w4 = sqnr_db(fp_out, run_on("unet", w4_result.model, calib))
    # measured: W8A8 32.0 dB, W4A8 15.4 dB
    assert w4 < w8 - 6
    # 4-bit frozen weights lie on a 16-level grid per output channel.
    for d in w4_result.report:
        if d.weight_bits == 4 and d.split is None and d.kind != "attention":
            w = w4_result.model.get_submodule(d.name).frozen_weight.flatten(1)
            assert max(len(row.unique()) for row in w) <= 16, d.name


def test_weight_sqnr_is_reported_per_layer_and_falls_with_the_bits(fp_case, quantized):
    """The layer report's weight SQNR: one value per layer with a quantized weight, equal to
    an independent computation on the frozen weight, about 6 dB per bit apart at W8 and W4."""
    from gaq.quantize import weight_sqnr_db

    model, _, _ = fp_case("unet")
    w8, w4 = (quantized("unet", "rtn", QuantConfig.from_bits(b)) for b in ("W8A8", "W4A8"))
    s8, s4 = weight_sqnr_db(w8.model), weight_sqnr_db(w4.model)
    with_weights = {d.name for d in w4.report if d.status != "fp" and d.kind != "attention"}
    assert set(s4) == with_weights and set(s8) == with_weights
    for name in with_weights:
        frozen = w4.model.get_submodule(name).frozen_weight
        assert s4[name] == pytest.approx(sqnr_db(model.get_submodule(name).weight.detach(), frozen))
    med8, med4 = (sorted(s.values())[len(s) // 2] for s in (s8, s4))
    assert 15 < med8 - med4 < 35  # 4 bits fewer: ~24 dB for a uniform grid
    md = w4.report.to_markdown(s4)
    no_weight = [line for line in md.splitlines() if "| attention |" in line or "| fp |" in line]
    assert "W SQNR (dB)" in md and no_weight
    assert all(line.split("|")[6].strip() == "-" for line in no_weight)  # the SQNR column
    assert f"over {len(s4)} layers" in md


def _per_timestep(label: str) -> QuantConfig:
    base = QuantConfig.from_bits(label)
    return dataclasses.replace(base, act=dataclasses.replace(base.act, per_timestep=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_save_load_is_bit_identical(fp_case, make_tiny_model, tmp_path, name):
    model, calib, _ = fp_case("unet")
    quant = _per_timestep("W4A8")
    result = method(name, "memory").quantize(model, adapter_for(model), calib, quant)
    assert {q.mode for _, q in act_quantizers(result.model)} == {"table"}
    folder = save_state(result.model, result.report, quant, tmp_path / "state")

    fresh = make_tiny_model("unet", seed=123)
    fresh.load_state_dict(model.state_dict())
    loaded, report, meta = load_state(fresh, folder)
    assert report == result.report and meta == {}
    assert {q.mode for _, q in act_quantizers(loaded)} == {"table"}
    # Per-sample timesteps (every calibrated one) and one timestep shared by the batch.
    one_t = torch.full_like(calib.t[:3], calib.timesteps()[0])
    for x, t in ((calib.x, calib.t), (calib.x[:3], one_t)):
        with torch.no_grad():
            expected = result.model(x, t).sample
            got = loaded(x, t).sample
        assert torch.equal(expected, got)


def test_unsupported_architecture_is_refused():
    with pytest.raises(GaqError) as info:
        adapter_for(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))
    message = str(info.value)
    assert "Sequential" in message
    assert all(arch in message for arch in ADAPTERS.names())


def test_unsupported_layer_is_refused(make_tiny_model):
    model = make_tiny_model("unet")
    model.mid_block.extra = nn.Conv1d(4, 4, 1)  # a layer no quantizer handles
    with pytest.raises(GaqError, match=r"mid_block\.extra.*Conv1d.*partial"):
        adapter_for(model)
    # A method given an adapter built without the check refuses as well.
    calib = lambda m: None  # noqa: E731 - never reached
    with pytest.raises(GaqError, match="Conv1d"):
        method("rtn").quantize(model, UNet2DAdapter(model), calib,
                               QuantConfig.from_bits("W8A8"))


def test_range_settings_of_the_spec_reach_the_observers(make_tiny_model):
    """mse_p, mse_grid and ema_momentum change what calibration computes: a one-point MSE
    grid is min/max exactly, and the spec's values are what the quantizers hold."""
    import dataclasses

    from gaq.config import act_spec, weight_spec
    from gaq.quant import FakeQuantizer
    from gaq.quantize import freeze, quantize_model

    def weight_quantizers(qmodel):
        return [(n, m) for n, m in qmodel.named_modules()
                if isinstance(m, FakeQuantizer) and ".weight_quantizers." in f".{n}."]

    model = make_tiny_model("unet")
    adapter = adapter_for(model)
    base = QuantConfig.from_bits("W4A8")

    def weight_scales(spec):
        qmodel, _ = quantize_model(model, adapter, dataclasses.replace(base, weight=spec))
        freeze(qmodel)
        return {name: q.scale.clone() for name, q in weight_quantizers(qmodel)}

    one_point = weight_scales(weight_spec(4, mse_grid=1))
    minmax = weight_scales(weight_spec(4, range_init="max"))
    searched = weight_scales(weight_spec(4))
    assert one_point.keys() == minmax.keys()
    assert all(torch.equal(one_point[n], minmax[n]) for n in minmax)
    assert any(not torch.equal(searched[n], minmax[n]) for n in minmax)

    qmodel, _ = quantize_model(model, adapter, dataclasses.replace(
        base, weight=weight_spec(4, mse_p=3.0, mse_grid=7),
        act=act_spec(8, range_init="ema", ema_momentum=0.5)))
    kwargs = [q.observer_kwargs for _, q in weight_quantizers(qmodel)]
    assert kwargs and all(k["p"] == 3.0 and k["grid"] == 7 for k in kwargs)
    acts = [q for _, q in act_quantizers(qmodel) if not q.unsigned]  # softmax keeps min/max
    assert acts and all(q.observer_name == "ema" and q.observer_kwargs == {"momentum": 0.5}
                        for q in acts)


def _truncate(folder):
    p = folder / "state.safetensors"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _nan_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "state.safetensors"))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(folder / "state.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("damage, expected", [
    (lambda f: shutil.rmtree(f), "does not exist"),
    (lambda f: (shutil.rmtree(f), f.write_text("x")), "is not a folder"),
    (lambda f: (f / "state.json").unlink(), "has no state.json"),
    (lambda f: (f / "state.safetensors").unlink(), "has no state.safetensors"),
    (lambda f: (f / "state.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "state.json").write_text("[1, 2]"), "format list"),
    (_truncate, "cannot be read"),
    (_nan_tensor, "NaN or infinite"),
], ids=["missing", "file", "no-json", "no-tensors", "bad-json", "json-list", "truncated",
        "nan"])
def test_a_damaged_state_is_one_clear_line(fp_case, make_tiny_model, tmp_path, damage,
                                           expected):
    model, calib, _ = fp_case("unet")
    result = method("rtn").quantize(model, adapter_for(model), calib,
                                    QuantConfig.from_bits("W8A8"))
    folder = save_state(result.model, result.report, QuantConfig.from_bits("W8A8"),
                        tmp_path / "state")
    damage(folder)
    with pytest.raises(GaqError) as err:
        load_state(make_tiny_model("unet"), folder)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg and str(folder) in msg


def test_a_state_of_another_model_is_refused(fp_case, make_tiny_model, tmp_path):
    model, calib, _ = fp_case("unet")
    result = method("rtn").quantize(model, adapter_for(model), calib,
                                    QuantConfig.from_bits("W8A8"))
    folder = save_state(result.model, result.report, QuantConfig.from_bits("W8A8"),
                        tmp_path / "state")
    with pytest.raises(GaqError, match="another model|does not match|shape"):
        load_state(make_tiny_model("dit"), folder)


@pytest.mark.slow
def test_a_reconstruction_method_never_writes_the_fp_model():
    """A whole reconstruction method leaves the FP model bit-identical, and the quantized
    model's layers share its weights rather than holding a second copy of them."""
    import copy

    from gaq.calibration import CalibrationSpec, record_calibration
    from gaq.methods.brecq import BRECQ
    from gaq.models.loading import load_model
    from gaq.quantize import quant_layers
    from gaq.reconstruction import ReconConfig

    torch.set_num_threads(1)
    pipe = load_model("digits")
    before = copy.deepcopy(pipe.denoiser.state_dict())
    calib = record_calibration(pipe, CalibrationSpec(steps=2, interval=1, samples_per_step=2),
                               cache=False)
    cfg = BRECQ.Config(recon=ReconConfig(weight_iters=2, act_iters=1, cache="memory"))
    result = BRECQ(cfg).quantize(pipe.denoiser, adapter_for(pipe.denoiser), calib,
                                 QuantConfig.from_bits("W4A8"))
    fp_ids = {id(p) for p in pipe.denoiser.parameters()}
    layers = list(quant_layers(result.model))
    assert layers and all(id(lay.fp.weight) in fp_ids for _, lay in layers)
    after = pipe.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
