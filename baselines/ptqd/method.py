"""PTQD (He et al., NeurIPS 2023): BRECQ/AdaRound base PTQ with PTQD's layer choices,
then per-step quantization-noise statistics on the FP calibration trajectories, which the
sampler hook (:mod:`baselines.ptqd.hook`) uses to correct the noise prediction and the
DDIM variance schedule."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import ClassVar, Literal

import torch
from torch import nn

from baselines.ptqd.hook import (
    SIGMA_ESTIMATORS,
    PTQDSamplerHook,
    StepStats,
    fit_stats,
    sampler_key,
)
from gaq.config import MethodConfig, QuantConfig, positive_int
from gaq.errors import GaqError
from gaq.methods.base import Method, QuantResult, RowStyle
from gaq.methods.brecq import brecq_stages
from gaq.methods.stages import finish, start
from gaq.models.adapters import SkipRule, denoise
from gaq.reconstruction import ReconConfig
from gaq.sampling import _noise_prediction


@dataclass(frozen=True)
class PTQDConfig(MethodConfig):
    VERSION: ClassVar[int] = 2
    recon: ReconConfig = field(default_factory=ReconConfig)
    learn_act_steps: bool = True
    per_tensor_weights: bool = True  # PTQD's code quantizes weights per tensor
    correct: bool = True  # divide out k_t and remove the bias mu_t
    # variance schedule calibration; needs the correction (the authors' sampler sets
    # sigma_q to 0 when the correction is off, so VSC never acts without it)
    vsc: bool = True
    bias_of: Literal["raw", "residual"] = "raw"
    # the residual noise std sigma_q: the authors' mean of per-sample stds, or the RMS
    # around the per-channel mean (version 1 of this config; 0.2-3.6 % apart here)
    sigma_of: Literal["per_sample_std", "centred_rms"] = "per_sample_std"
    # PTQD only corrects a positive correlation (k > 0); True also divides out a negative
    # one (eps shrunk by the quantized model). Not in the paper or its code.
    negative_k: bool = False
    # True: refuse a calibration set that does not hold every step of its sampler (interval
    # 1), so that no step's statistics are interpolated or held from a neighbour. The method
    # cannot record trajectories itself: it is not given the scheduler.
    every_step: bool = False
    stats_batch: int = 64

    def validate(self) -> None:
        positive_int("stats_batch", self.stats_batch)
        if self.bias_of not in ("raw", "residual"):
            raise ValueError(f"bias_of must be 'raw' or 'residual', got {self.bias_of!r}")
        if self.sigma_of not in SIGMA_ESTIMATORS:
            raise ValueError(f"sigma_of must be one of {', '.join(SIGMA_ESTIMATORS)}, got "
                             f"{self.sigma_of!r}")
        if self.vsc and not self.correct:
            raise ValueError("vsc = true needs correct = true (PTQD's variance schedule "
                             "calibration uses the corrected residual noise); set vsc = false")

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version == 1:  # version 1 estimated sigma_q as the centred RMS
            return {"sigma_of": "centred_rms", **data}
        return super().upgrade(data, version)


class PTQD(Method):
    name = "ptqd"
    label = "PTQD"
    rows = MappingProxyType({
        "ptqd-base": RowStyle("PTQD base PTQ (no correction)", "PTQD base", "#8c6d31"),
        "ptqd-no-vsc": RowStyle("PTQD (no VSC)", "PTQD w/o VSC", "#7b4173"),
        "ptqd-negk": RowStyle("PTQD (k < 0 corrected too)", "PTQD k<0", "#637939"),
        "ptqd-per-channel": RowStyle("PTQD (per-channel weights)", "PTQD per-ch.", "#fd8d3c"),
    })
    Config = PTQDConfig
    presets = {
        "paper": PTQDConfig(),
        # sized for the bundled 16x16 digits model on a laptop CPU
        "cpu": PTQDConfig(recon=ReconConfig(weight_iters=200, act_iters=50)),
    }

    def skip(self, module: nn.Module, name: str, role: str | None) -> SkipRule | None:
        # PTQD's base-PTQ layer choices, on top of the model's policy
        if role in ("input", "output", "time_embed_in", "time_embed"):
            return SkipRule("w8a8", "ptqd: time embedding and first/last layer at 8 bits")
        if role == "shortcut":
            return SkipRule("fp", "ptqd: skip-connection conv kept FP")
        if role == "downsample":
            return SkipRule("fp", "ptqd: downsample conv kept FP")
        return None

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        """PTQD's variant of the run's config: attention matmuls unquantized and, by
        default, per-tensor weights."""
        quant = replace(quant, attention=False)
        if self.config.per_tensor_weights:
            quant = replace(quant, weight=replace(quant.weight, granularity="per_tensor"))
        return quant

    @classmethod
    def restore_hook(cls, state) -> PTQDSamplerHook:
        return PTQDSamplerHook.from_dict(state["ptqd"])

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        run = start(self, model, adapter, calib, quant)
        key = _calibration_sampler(calib)
        cfg = self.config
        if cfg.every_step:
            _require_every_step(calib)
        brecq_stages(run, cfg.recon, cfg.learn_act_steps)
        stats = noise_stats(run.qmodel, calib.train(), cfg.stats_batch, cfg.bias_of,
                            cfg.negative_k, cfg.sigma_of)
        hook = PTQDSamplerHook(stats, key, correct=cfg.correct, vsc=cfg.vsc)
        result = finish(run, sampler_hook=hook, mean_k=sum(s.k for s in stats) / len(stats))
        result.state["ptqd"] = hook.to_dict()
        return result


def _calibration_sampler(calib) -> dict:
    """The sampler key of the FP trajectories the calibration set was recorded on."""
    spec = calib.meta.get("spec")
    if not spec:
        raise GaqError("PTQD needs a calibration set recorded along FP sampler trajectories "
                       "(gaq.calibration.record_calibration): its statistics belong to one "
                       "sampler configuration, which this set does not record")
    if spec.get("protocol", "interval") != "interval":
        raise GaqError("PTQD needs per-step statistics: record the calibration set with the "
                       "'interval' protocol, not 'gaussian'")
    from gaq.sampling import sampler_kind

    return sampler_key(spec["steps"], spec["eta"], spec.get("guidance"),
                       sampler_kind(spec.get("sampler_name", "ddim")).scheduler)


def _require_every_step(calib) -> None:
    steps = int(calib.meta["spec"]["steps"])
    seen = len(calib.train().timesteps())
    if seen < steps:
        raise GaqError(f"PTQD with every_step=True needs statistics at all {steps} sampler "
                       f"steps but the calibration set holds {seen} timesteps: record it with "
                       "interval = 1")


@torch.no_grad()
def noise_stats(qmodel: nn.Module, calib, batch_size: int, bias_of: str = "raw",
                negative_k: bool = False, sigma_of: str = "per_sample_std") -> list[StepStats]:
    """PTQD's statistics for every timestep of ``calib``: the quantized model is run on the
    FP trajectory's inputs x_t and compared with the recorded eps_fp. With classifier-free
    guidance both are the guided prediction (the authors' code fits on the guided eps, the
    one its sampler corrects)."""
    from gaq.calibration import combine_guidance

    ref = next(qmodel.parameters())
    out = []
    batch_size += batch_size % 2  # a guided set's halves stay in one batch
    for t, rows in calib.by_timestep().items():
        eps_q = []
        for b in rows.batches(batch_size):
            cond = {k: v.to(ref.device) for k, v in b["cond"].items()}
            x = b["x"].to(ref.device, ref.dtype)
            pred = denoise(qmodel, x, b["t"].to(ref.device), cond)
            eps_q.append(_noise_prediction(pred, x.shape[1]).float().cpu())
        eps_fp = _noise_prediction(rows.eps_fp, rows.x.shape[1])
        out.append(fit_stats(t, combine_guidance(torch.cat(eps_q), calib.guidance),
                             combine_guidance(eps_fp, calib.guidance), bias_of, negative_k,
                             sigma_of))
    return out
