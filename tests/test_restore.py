"""Saving and restoring a quantization: the state holds the config the method actually
quantized with, and a restored PTQD model keeps its sampler correction."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_inputs import tiny_pipeline

from baselines.ptqd import PTQD, PTQDConfig
from baselines.tfmq import TFMQ, TFMQConfig
from gaq.calibration import CalibrationSpec, record_calibration
from gaq.cell import restore
from gaq.config import QuantConfig
from gaq.models.adapters import adapter_for
from gaq.quantize import save_state
from gaq.reconstruction import ReconConfig
from gaq.sampling import sample_batch

TINY = ReconConfig(weight_iters=3, act_iters=2, batch_size=8, capture_batch=8, cache="memory")
W4A8 = QuantConfig.from_bits("W4A8")


@pytest.fixture(scope="module")
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _calib(pipe, tmp_path, eta=0.0):
    spec = CalibrationSpec(steps=4, interval=2, samples_per_step=4, eta=eta)
    return spec, record_calibration(pipe, spec, cache_dir=tmp_path)


def test_tfmq_state_reloads_its_per_timestep_tables(make_tiny_model, sched, tmp_path):
    model = make_tiny_model("unet")
    pipe = tiny_pipeline("unet", model, sched)
    spec, calib = _calib(pipe, tmp_path)
    result = TFMQ(TFMQConfig(recon=TINY)).quantize(model, adapter_for(model), calib, W4A8)
    assert result.quant.act.per_timestep and not W4A8.act.per_timestep
    save_state(result.model, result.report, result.quant, tmp_path / "s", meta=result.state)
    back = restore(copy.deepcopy(model), tmp_path / "s")
    assert back.sampler_hook is None and back.quant == result.quant
    a = sample_batch(pipe, [0, 1], seed=0, sampler=spec.sampler, denoiser=result.model)
    b = sample_batch(pipe, [0, 1], seed=0, sampler=spec.sampler, denoiser=back.model)
    assert torch.equal(a, b)


def test_restored_ptqd_samples_like_before_saving(make_tiny_model, sched, tmp_path):
    model = make_tiny_model("unet")
    pipe = tiny_pipeline("unet", model, sched)
    spec, calib = _calib(pipe, tmp_path, eta=1.0)  # eta 1: the variance correction acts too
    result = PTQD(PTQDConfig(recon=TINY)).quantize(model, adapter_for(model), calib, W4A8)
    assert not result.quant.attention and W4A8.attention  # what the state must record
    save_state(result.model, result.report, result.quant, tmp_path / "s", meta=result.state)
    back = restore(copy.deepcopy(model), tmp_path / "s")
    assert back.sampler_hook is not None
    kw = {"seed": 0, "sampler": spec.sampler}
    before = sample_batch(pipe, [0, 1, 2], hook=result.sampler_hook, denoiser=result.model, **kw)
    after = sample_batch(pipe, [0, 1, 2], hook=back.sampler_hook, denoiser=back.model, **kw)
    assert torch.equal(before, after)
    # without the hook (what reloading gave before) the samples are not PTQD's
    bare = sample_batch(pipe, [0, 1, 2], denoiser=back.model, **kw)
    assert not torch.equal(bare, after)
