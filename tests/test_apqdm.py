"""APQ-DM: group-wise activation quantizers found by a differentiable search, and the
structural-risk-minimisation ("srm") calibration protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler
from tiny_inputs import denoise, tiny_pipeline
from torch import nn

from baselines.apqdm import APQDM, APQDMConfig
from baselines.apqdm.srm import srm_select
from gaq.calibration import CalibrationSpec, record_calibration
from gaq.cell import restore
from gaq.config import QuantConfig
from gaq.models.adapters import adapter_for
from gaq.quantize import act_quantizers, save_state
from gaq.reconstruction import ReconConfig
from gaq.sampling import sample_batch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = APQDMConfig(recon=ReconConfig(weight_iters=5, act_iters=6, batch_size=8,
                                     capture_batch=8, eval_samples=16, cache="memory"),
                   groups=3)


@pytest.fixture(scope="module")
def digits():
    from gaq.models.loading import load_model

    return load_model("digits")


def spec(**kw) -> CalibrationSpec:
    return CalibrationSpec(**{"steps": 10, "interval": 2, "samples_per_step": 4,
                              "batch_size": 8, **kw})


def test_presets_round_trip_and_validation():
    for cfg in APQDM.presets.values():
        assert APQDMConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"groups": 0}, {"entropy_weight": -1.0}, {"logit_lr": 0.0}):
        with pytest.raises(Exception):  # noqa: B017 - ConfigError or ValueError
            APQDMConfig(**bad)


# ---------------------------------------------------------------------- srm protocol


def test_srm_is_deterministic_and_differs_from_interval(digits):
    s = spec(protocol="srm")
    a = record_calibration(digits, s, model_id="digits", cache=False)
    b = record_calibration(digits, s, model_id="digits", cache=False)
    kept = a.meta["srm_steps"]
    assert kept == b.meta["srm_steps"] and torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    assert len(kept) == len(s.kept_steps()) == 5 and kept != s.kept_steps()
    # the set holds exactly the selected steps' timesteps, samples_per_step rows each
    sampler_ts = a.meta["sampler_timesteps"]
    assert sorted(a.timesteps()) == sorted(sampler_ts[k] for k in kept)
    assert len(a) == 5 * 4
    assert s.data_fingerprint() != spec().data_fingerprint()
    assert s.data_fingerprint() != dataclasses.replace(s, srm_lambda=5.0).data_fingerprint()


def test_srm_select_balances_risk_and_coverage():
    gen = torch.Generator().manual_seed(0)
    # steps 0-3 narrow (low quantization risk), steps 4-7 wide and far away
    narrow = 0.1 * torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    wide = 3.0 + 2.0 * torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    feats = torch.cat([narrow, wide])
    risk_only, _ = srm_select(feats, 2, bits=4, lam=0.0)
    covered, terms = srm_select(feats, 2, bits=4, lam=100.0)
    assert all(k < 4 for k in risk_only)  # empirical risk alone keeps the easy steps
    assert any(k < 4 for k in covered) and any(k >= 4 for k in covered)  # MMD: both modes
    assert terms["mmd2"] >= 0 and srm_select(feats, 2, 4, 100.0)[0] == covered


# ---------------------------------------------------------------------- group search


@pytest.mark.slow
def test_group_search_beats_one_shared_quantizer_on_held_out_timesteps(digits):
    """Activations at 4 bits (weights 8-bit round-to-nearest): K groups against K = 1 (one
    quantizer shared by every timestep, learned the same way), on other trajectories at
    every sampler step."""
    calib = record_calibration(digits, spec(steps=20, interval=2, samples_per_step=4),
                               model_id="digits", cache=False)
    held = record_calibration(digits, spec(steps=20, interval=1, samples_per_step=3, seed=1),
                              model_id="digits", cache=False)
    den = digits.denoiser
    quant = QuantConfig.from_bits("W8A4")
    cfg = dataclasses.replace(TINY, recon=dataclasses.replace(TINY.recon, weight_iters=0,
                                                              act_iters=8, capture_batch=40),
                              first_last="quantized")

    def mse(groups: int) -> float:
        result = APQDM(dataclasses.replace(cfg, groups=groups)).quantize(
            den, adapter_for(den), calib, quant)
        tables = [q for _, q in act_quantizers(result.model) if q.calibrated]
        distinct = max(q.scale.unique().numel() for q in tables)
        assert distinct <= groups  # rows of one group share their parameters
        out = denoise("unet", result.model, held.x, held.t, {})
        return float((out - held.eps_fp).pow(2).mean())

    single, grouped = mse(1), mse(4)
    assert grouped < 0.85 * single, (grouped, single)  # measured: 0.218 vs 0.314


# ---------------------------------------------------------------------- end to end


def _sample(pipe, denoiser: nn.Module, steps: int, guidance: float | None = None
            ) -> torch.Tensor:
    from gaq.sampling import SamplerConfig

    sampler = SamplerConfig(steps=steps, guidance=guidance)
    return sample_batch(pipe.with_denoiser(denoiser), [0, 1], seed=0, sampler=sampler,
                        decode=False)


@pytest.mark.slow
def test_end_to_end_on_bundled_digits(digits, tmp_path):
    calib = record_calibration(digits, spec(protocol="srm"), model_id="digits", cache=False)
    quant = QuantConfig.from_bits("W4A8")
    den = digits.denoiser
    result = APQDM(TINY).quantize(den, adapter_for(den), calib, quant)
    tables = [q for _, q in act_quantizers(result.model) if q.calibrated]
    # every sampler step has a row (filled from the nearest calibrated one)
    assert tables and all(q.mode == "table" and q.timesteps.numel() == 10 for q in tables)
    images = _sample(digits, result.model, 10)
    assert torch.isfinite(images).all()
    assert not torch.equal(images, _sample(digits, den, 10))
    # save / restore: identical samples
    save_state(result.model, result.report, result.quant, tmp_path / "s", meta=result.state)
    restored = restore(digits.denoiser, tmp_path / "s")
    assert torch.equal(_sample(digits, restored.model, 10), images)


@pytest.mark.slow
def test_end_to_end_on_tiny_dit(make_tiny_model):
    model = make_tiny_model("dit")
    pipe = tiny_pipeline("dit", model, DDIMScheduler(num_train_timesteps=100))
    s = spec(steps=6, interval=2, samples_per_step=2, guidance=2.0)
    calib = record_calibration(pipe, s, model_id="tiny-dit", cache=False)
    result = APQDM(TINY).quantize(model, adapter_for(model), calib, QuantConfig.from_bits("W8A6"))
    grouped = [b for b in result.state["blocks"] if "groups_used" in b["metrics"]]
    assert grouped and all(b["metrics"]["groups_used"] <= TINY.groups for b in grouped)
    images = _sample(pipe, result.model, 6, guidance=2.0)
    assert torch.isfinite(images).all()


def test_srm_is_a_calibration_protocol_registered_by_the_baseline():
    """The step selection lives with APQ-DM and is found through the protocol registry;
    a misspelt protocol suggests it."""
    from baselines.apqdm.srm import SRM
    from gaq.calibration import PROTOCOLS
    from gaq.config import ConfigError

    assert PROTOCOLS.get("srm") is SRM
    with pytest.raises(ConfigError, match="did you mean 'srm'"):
        CalibrationSpec(protocol="smr")
