"""PTQD: the explicit DDIM update equals diffusers' step, variance schedule calibration,
refusal of another sampler, tiny conditional UNet and DiT end to end, and the statistics
on the bundled digits model (k_t re-fitted on held-out trajectories after correction, with
PTQD's positive-only rule and with ``negative_k``)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_inputs import tiny_pipeline

from baselines.ptqd import PTQD, PTQDConfig, PTQDSamplerHook, StepStats, fit_stats
from gaq.calibration import CalibrationSpec, record_calibration
from gaq.config import QuantConfig
from gaq.errors import GaqError
from gaq.eval.eps import noise_curves
from gaq.models.adapters import adapter_for
from gaq.models.pipeline import Pipeline
from gaq.quantize import quant_layers
from gaq.reconstruction import ReconConfig
from gaq.sampling import (
    SamplerConfig,
    ddim_scheduler,
    ddim_sigma,
    ddim_update,
    sample_batch,
)

TINY_RECON = ReconConfig(weight_iters=5, act_iters=2, batch_size=8, capture_batch=8,
                         cache="memory")


@pytest.fixture(scope="module")
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def hook_with(sigma_q: float, key: dict | None = None, ts=(0, 250, 750)) -> PTQDSamplerHook:
    stats = [StepStats(t, 0.1, (0.0,), sigma_q) for t in ts]
    return PTQDSamplerHook(stats, key or {"scheduler": "DDIMScheduler", "steps": 4, "eta": 0.0,
                                          "guidance": None})


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_explicit_ddim_update_equals_diffusers_step(sched, eta):
    ddim = ddim_scheduler(sched, 10)
    gen = torch.Generator().manual_seed(0)
    for t in ddim.timesteps:
        x, eps, noise = (torch.randn(2, 1, 4, 4, generator=gen) for _ in range(3))
        ref = ddim.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        sigma, _ = ddim_sigma(ddim, int(t), eta)
        ours = ddim_update(ddim, eps, int(t), x, sigma, noise)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_vsc_is_a_no_op_at_eta_0_and_lowers_sigma_above(sched):
    ddim = ddim_scheduler(sched, 4)
    hook = hook_with(sigma_q=0.3)
    for t in ddim.timesteps:
        sigma0, c0 = ddim_sigma(ddim, int(t), 0.0)
        assert sigma0 == 0.0 and hook.sigma(0, int(t), sigma0, c0) == 0.0
        sigma1, c1 = ddim_sigma(ddim, int(t), 1.0)
        new = hook.sigma(0, int(t), sigma1, c1)
        # the last step (to alpha_prev = 1) has no noise to lower
        assert 0.0 <= new < sigma1 if sigma1 > 0 else new == 0.0
        expected = max(sigma1**2 - (c1 * 0.3 / 1.1) ** 2, 0.0) ** 0.5
        assert new == pytest.approx(expected)


def test_vsc_changes_eta_1_samples_only(tiny_unet, sched):
    """At eta = 0 the hook's sigma leaves the trajectory on diffusers' step (bit-identical to
    an eps-only hook); at eta = 1 it changes the samples."""

    class EpsOnly:
        def eps(self, step, t, x, eps):
            return None

    for eta, same in ((0.0, True), (1.0, False)):
        sampler = SamplerConfig(steps=4, eta=eta)
        hook = hook_with(0.5, {"scheduler": "DDIMScheduler", "steps": 4, "eta": eta,
                               "guidance": None}, ts=(0, 750))
        hook.correct = False  # isolate VSC
        pipe = Pipeline(tiny_unet, sched)
        a = sample_batch(pipe, [0, 1], seed=0, sampler=sampler, hook=hook)
        b = sample_batch(pipe, [0, 1], seed=0, sampler=sampler, hook=EpsOnly())
        assert torch.equal(a, b) is same


def test_another_sampler_configuration_is_refused(tiny_unet, sched):
    hook = hook_with(0.1)
    with pytest.raises(GaqError, match="steps"):
        sample_batch(Pipeline(tiny_unet, sched), [0], seed=0, sampler=SamplerConfig(steps=8),
                          hook=hook)
    with pytest.raises(GaqError, match="eta"):
        hook.bind(SamplerConfig(steps=4, eta=0.5), ddim_scheduler(sched, 4))
    hook.bind(SamplerConfig(steps=4), ddim_scheduler(sched, 4))  # its own: accepted


def test_statistics_recover_a_synthetic_noise_model():
    gen = torch.Generator().manual_seed(0)
    fp = torch.randn(64, 3, 8, 8, generator=gen)
    delta = 0.2 * torch.randn(64, 3, 8, 8, generator=gen) + torch.tensor([0.1, -0.2, 0.0]).view(
        1, 3, 1, 1)
    s = fit_stats(7, 1.15 * fp + delta, fp)
    assert s.k == pytest.approx(0.15, abs=0.01)
    assert s.mu == pytest.approx((0.1, -0.2, 0.0), abs=0.02)
    # The centred RMS removes the per-channel bias: the noise's own std. The authors'
    # per-sample std keeps the spread of the channel biases: sqrt(0.2² + var(0.1, −0.2, 0)).
    assert fit_stats(7, 1.15 * fp + delta, fp, sigma_of="centred_rms").sigma == pytest.approx(
        0.2, abs=0.01)
    assert s.sigma == pytest.approx((0.04 + torch.tensor([0.1, -0.2, 0.0]).var(
        unbiased=False).item()) ** 0.5, abs=0.01)
    assert fit_stats(7, 0.9 * fp, fp).k == 0.0  # negative slope: not used
    hook = PTQDSamplerHook([s, StepStats(9, 0.35, (0.3, 0.0, 0.0), 0.4)], hook_with(0).key)
    k, mu, sigma = hook.at(8)  # interpolated halfway
    assert k == pytest.approx((s.k + 0.35) / 2) and sigma == pytest.approx((s.sigma + 0.4) / 2)
    assert hook.at(0)[0] == s.k and hook.at(999)[0] == 0.35  # held beyond the ends


@pytest.mark.parametrize("a, sigma, helps", [(1.3, 0.9, True), (0.72, 0.9, False),
                                              (0.9, 0.05, True)])
def test_dividing_out_k_lowers_mse_unless_k_is_negative_and_noise_large(a, sigma, helps):
    """Why PTQD keeps only k > 0: with eps_q = a·eps_fp + δ, dividing by a = 1 + k always
    lowers the MSE for a > 1, but for a < 1 only when var δ < a²(1−a)/(1+a)·var eps_fp
    (0.084 at a = 0.72: the last step of the bundled model is far above it)."""
    gen = torch.Generator().manual_seed(1)
    fp = torch.randn(256, 1, 8, 8, generator=gen)
    eps_q = a * fp + sigma * torch.randn(fp.shape, generator=gen)
    s = fit_stats(0, eps_q, fp, negative_k=True)
    assert s.k == pytest.approx(a - 1, abs=0.02)
    hook = PTQDSamplerHook([s], hook_with(0).key)
    before = (eps_q - fp).pow(2).mean()
    after = (hook.eps(0, 0, None, eps_q) - fp).pow(2).mean()
    predicted = a > 1 or sigma**2 < a**2 * (1 - a) / (1 + a)
    assert bool(after < before) is helps is predicted


class InflatedNoise(torch.nn.Module):
    """A stand-in quantized denoiser that follows PTQD's noise model exactly:
    eps_q = (1 + k_t)·eps_fp + mu + δ, with k_t > 0 growing with t, a per-channel bias and
    fresh Gaussian δ at every call (uncorrelated with eps_fp)."""

    def __init__(self, fp: torch.nn.Module, sigma: float = 0.02) -> None:
        super().__init__()
        self.fp, self.sigma = fp, sigma
        self.gen = torch.Generator().manual_seed(123)

    @staticmethod
    def k(t: torch.Tensor) -> torch.Tensor:
        return 0.05 + 0.15 * t.float() / 1000

    def forward(self, x, t, **cond):
        eps = self.fp(x, t, **cond).sample
        k = self.k(t.expand(x.shape[0])).view(-1, 1, 1, 1)
        delta = self.sigma * torch.randn(eps.shape, generator=self.gen)
        return (1 + k) * eps + 0.03 + delta


@pytest.mark.parametrize("interval", [1, 2])
def test_correction_removes_k_on_held_out_trajectories_where_the_model_holds(
        tiny_unet, sched, tmp_path, interval):
    """Where the quantization noise is correlated with eps (k_t > 0, PTQD's premise), the
    statistics fitted on calibration trajectories remove it on held-out ones: the re-fitted
    k_t is within ±0.02 at every sampler step, and the corrected MSE is lower at every step.
    With an interval calibration the skipped steps use interpolated statistics."""
    from baselines.ptqd.method import noise_stats

    spec = CalibrationSpec(steps=10, interval=interval, samples_per_step=16)
    held_spec = CalibrationSpec(steps=10, interval=1, samples_per_step=16, seed=5)
    pipe = Pipeline(tiny_unet, sched, name="tiny")
    calib = record_calibration(pipe, spec, cache_dir=tmp_path)
    held = record_calibration(pipe, held_spec, cache_dir=tmp_path)
    qmodel = InflatedNoise(tiny_unet)
    stats = noise_stats(qmodel, calib.train(), 64)
    for s in stats:
        assert s.k == pytest.approx(float(InflatedNoise.k(torch.tensor(s.t))), abs=0.01)
    hook = PTQDSamplerHook(stats, hook_with(0).key)
    curves = noise_curves(qmodel, held, hook=hook)
    assert len(curves["noise_k"]) == 10  # every sampler step, calibrated or not
    for t, k in curves["noise_k_uncorrected"].items():  # the measurement sees the model
        assert k == pytest.approx(float(InflatedNoise.k(torch.tensor(t))), abs=0.01)
    assert max(abs(k) for k in curves["noise_k"].values()) <= 0.02, curves["noise_k"]
    for t, mse in curves["eps_mse"].items():
        assert mse < curves["eps_mse_uncorrected"][t]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cond_unet", "dit"])
def test_runs_on_conditional_unet_and_dit(make_tiny_model, sched, tmp_path, kind):
    model = make_tiny_model(kind)
    pipe = tiny_pipeline(kind, model, sched)
    spec = CalibrationSpec(steps=4, interval=2, samples_per_step=4)
    calib = record_calibration(pipe, spec, cache_dir=tmp_path)
    method = PTQD(PTQDConfig(recon=TINY_RECON))
    result = method.quantize(model, adapter_for(model), calib, QuantConfig.from_bits("W4A8"))
    assert {d.kind for d in result.report if d.status != "fp"} <= {"Conv2d", "Linear"}
    assert all(layer.weight_quantizer.axis is None for _, layer in quant_layers(result.model))
    assert len(result.state["ptqd"]["stats"]) == 2
    json.dumps(result.state)  # the state, statistics included, is plain JSON
    restored = PTQDSamplerHook.from_dict(json.loads(json.dumps(result.state["ptqd"])))
    images = sample_batch(pipe, [0, 1], seed=0, sampler=spec.sampler, hook=restored,
                          denoiser=result.model, decode=False)
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()


def test_skip_rules(make_tiny_model):
    model = make_tiny_model("unet")
    m = PTQD(PTQDConfig())
    rule = m.skip_filter(adapter_for(model))
    rules = {n: rule(mod, n) for n, mod in model.named_modules()}
    assert rules["time_embedding.linear_1"].precision == "w8a8"
    assert rules["conv_in"].precision == "w8a8"
    assert rules["down_blocks.0.downsamplers.0.conv"].precision == "fp"
    assert rules["up_blocks.0.resnets.0.conv_shortcut"].precision == "fp"
    assert rules["down_blocks.0.resnets.0.conv1"] is None
    assert m.effective_quant(QuantConfig.from_bits("W4A8")).attention is False


# -- the bundled digits model at W4A8 ----------------------------------------------------

# Base PTQ without reconstruction iterations (per-tensor MSE ranges, nearest rounding):
# what is tested here is PTQD's statistics and correction; AdaRound on the bundled model
# takes about a minute on one CPU thread (NOTES.md has those numbers). The calibration set
# holds every sampler step (interval 1), so no step's statistics are interpolated; the
# held-out trajectories use another seed.
DIGITS_SPEC = CalibrationSpec(steps=10, interval=1, samples_per_step=8)
HELD_SPEC = CalibrationSpec(steps=10, interval=1, samples_per_step=8, seed=7)
NO_RECON = ReconConfig(weight_iters=0, act_iters=0, capture_batch=40, cache="memory")


def refit_k(qmodel, hook: PTQDSamplerHook, held) -> dict[int, float]:
    """The slope k_t (unclamped) of the error left after the hook's correction, re-fitted
    on held-out rows, per timestep: the benchmark's ``noise_k`` curve."""
    return noise_curves(qmodel, held, hook=hook)["noise_k"]


@pytest.fixture(scope="module")
def digits_ptqd(tmp_path_factory):
    from gaq.models.loading import load_model

    loaded = load_model("digits")
    den, folder = loaded.denoiser, tmp_path_factory.mktemp("calib")
    calib = record_calibration(loaded, DIGITS_SPEC, model_id="digits",
                               cache_dir=folder)
    held = record_calibration(loaded, HELD_SPEC, model_id="digits",
                              cache_dir=folder)
    result = PTQD(PTQDConfig(recon=NO_RECON, every_step=True)).quantize(
        den, adapter_for(den), calib, QuantConfig.from_bits("W4A8"))
    return calib, held, result


@pytest.mark.slow
def test_every_step_option_refuses_an_interval_calibration(digits_ptqd):
    calib, _, _ = digits_ptqd
    missing_one = calib.subset(calib.t != calib.timesteps()[0])  # one step missing
    with pytest.raises(GaqError, match="every_step"):
        PTQD(PTQDConfig(recon=NO_RECON, every_step=True)).quantize(
            None, None, missing_one, QuantConfig.from_bits("W4A8"))


@pytest.mark.slow
def test_k_refitted_on_held_out_trajectories_digits(digits_ptqd):
    """PTQD's rule (k > 0 only) leaves the correlation where the quantized model shrinks
    eps (k < 0: the last step, t = 0, on this model); ``negative_k`` removes it at every
    sampler step, the last one included, when the statistics are fitted at every step."""
    from baselines.ptqd.method import noise_stats

    calib, held, result = digits_ptqd
    faithful = result.sampler_hook
    assert [s.t for s in faithful.stats] == held.timesteps()  # fitted at every step
    assert all(s.k >= 0 for s in faithful.stats)
    k_faithful = refit_k(result.model, faithful, held)
    assert k_faithful[0] < -0.1, k_faithful  # measured -0.16: PTQD does not correct it
    # what PTQD does correct, a positive correlation, is gone at every step
    assert max(k_faithful.values()) <= 0.02, k_faithful

    stats = noise_stats(result.model, calib.train(), 64, negative_k=True)
    assert min(s.k for s in stats) < 0
    hook = PTQDSamplerHook(stats, faithful.key)
    k_neg = refit_k(result.model, hook, held)
    assert max(abs(k) for k in k_neg.values()) <= 0.02, k_neg


def test_sigma_q_is_the_authors_mean_of_per_sample_stds():
    """The authors' estimator, written out: per sample, the unbiased std of the residual
    eps_q − (1+k)·eps_fp over its elements; then the mean over samples. A per-sample offset
    separates it from the centred RMS (which removes per-channel means pooled over samples)."""
    gen = torch.Generator().manual_seed(3)
    fp = torch.randn(32, 3, 8, 8, generator=gen)
    offset = torch.linspace(-0.5, 0.5, 32).view(32, 1, 1, 1)  # differs per sample
    eps_q = 1.1 * fp + 0.3 * torch.randn(fp.shape, generator=gen) * (1 + offset) + offset
    s = fit_stats(4, eps_q, fp)
    k = s.k
    stds = [float(torch.std(eps_q[i].double() - (1 + k) * fp[i].double())) for i in range(32)]
    assert s.sigma == pytest.approx(sum(stds) / len(stds), rel=1e-9)
    rms = fit_stats(4, eps_q, fp, sigma_of="centred_rms").sigma
    resid = (eps_q - fp).double() - k * fp.double()
    centred = resid - resid.mean(dim=(0, 2, 3), keepdim=True)
    assert rms == pytest.approx(float(centred.pow(2).mean().sqrt()), rel=1e-9)
    assert abs(rms - s.sigma) > 0.01  # the offsets stay in the pooled estimate only
    with pytest.raises(ValueError, match="sigma_of"):
        fit_stats(4, eps_q, fp, sigma_of="mad")


def test_vsc_needs_the_correction_as_in_the_authors_sampler():
    """The authors' sampler sets sigma_q to 0 with the correction off, so VSC cannot act:
    the config refuses the combination instead of running a pipeline they never ran."""
    with pytest.raises(ValueError, match="vsc = true needs correct = true"):
        PTQDConfig(correct=False)
    assert PTQDConfig(correct=False, vsc=False).vsc is False


def test_a_version_1_config_keeps_its_sigma_estimator():
    old = {k: v for k, v in PTQDConfig().to_dict().items() if k != "sigma_of"}
    old["_version"] = 1
    assert PTQDConfig.from_dict(old).sigma_of == "centred_rms"
    assert PTQDConfig.from_dict(PTQDConfig().to_dict()).sigma_of == "per_sample_std"
