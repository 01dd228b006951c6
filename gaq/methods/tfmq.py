"""TFMQ-DM's pipeline as stages (Huang et al., CVPR 2024), shared by the TFMQ-DM baseline
(:mod:`baselines.tfmq.method`) and by GAQ, which adds its sample-weighting stage to it.

Order (authors' code and paper): quantize; AdaRound the temporal layers jointly on the
temporal features (:mod:`gaq.temporal`) and freeze them; AdaRound the remaining blocks
(the "temporal" unit leaves its resnets, which then see the frozen quantized features);
calibrate one activation ``(Δ_t, z_t)`` per sampling timestep with EMA min/max. The suite's
variant ``learn_act_steps=True`` then learns the activation steps (every table row) block by
block, which the authors' released calibration does not do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from torch import Tensor

from gaq.config import ConfigError, MethodConfig, QuantConfig
from gaq.methods.base import QuantResult
from gaq.methods.stages import (
    Run,
    finish,
    init_activations,
    learn_activation_steps,
    reconstruct_weights,
    temporal,
    temporal_act_steps,
    timestep_tables,
)
from gaq.models.adapters import SkipRule
from gaq.reconstruction import ReconConfig, WeightFn

__all__ = ["TFMQConfig", "finish_tfmq", "tfmq_quant", "tfmq_skip", "tfmq_stages"]


@dataclass(frozen=True)
class TFMQConfig(MethodConfig):
    # 2: learn_act_steps defaults to False (the authors' released calibration never
    # learns activation steps); version-1 files spell every field, so they read unchanged.
    # 3: first and last layer FP, as the authors' code keeps them (versions 1-2: W8A8)
    # 4: the softmax output at 8 bits, every one of the authors' scripts' default
    #    (versions 1-3: the run's softmax_bits, 16 in every shipped benchmark)
    VERSION: ClassVar[int] = 4
    # the authors' code weights a split shortcut conv's two rounding regularisers by their
    # shares of the input channels
    recon: ReconConfig = field(default_factory=lambda: ReconConfig(split_reg="channels"))
    # AdaRound the temporal layers on the temporal features (off: they stay in their
    # blocks and are reconstructed by block replay, i.e. plain BRECQ with per-t acts)
    temporal_recon: bool = True
    # LSQ-style activation-step learning after calibration (temporal layers, then block by
    # block): the suite's variant ("tfmq-lsq" in benchmarks/gaq.toml); the authors'
    # calibration only initialises the per-timestep activation ranges
    learn_act_steps: bool = False
    # finite-set calibration: one activation (Δ_t, z_t) per sampling timestep
    per_timestep_acts: bool = True
    act_range_init: Literal["max", "mse", "ema"] = "ema"
    # authors' code: skip/shortcut and downsample convs stay FP ("refer to PTQD")
    fp_skip_convs: bool = True
    # authors' code: the first time-embedding linear stays FP
    fp_first_time_layer: bool = True
    # sampler timesteps between the calibrated ones (interval calibration keeps every
    # n-th step) use the nearest calibrated timestep's activation parameters
    fill_timesteps: bool = True
    # first and last layer: the authors' code keeps them FP (disable_out_quantization);
    # "w8a8" is the suite's convention, "quantized" the run's bits
    first_last: Literal["w8a8", "fp", "quantized"] = "fp"
    # bits of the attention softmax output when the run quantizes attention: the authors'
    # scripts (DDIM, LDM, ImageNet, Stable Diffusion alike) leave --softmax_a_bit at 8
    softmax_bits: int | None = 8

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        # explicit learn_act_steps in every version-1 dict: same meaning; versions 1-2 kept
        # the first and last layer at W8A8; versions 1-3 the run's softmax bits (16)
        if version in (1, 2):
            return {"first_last": "w8a8", "softmax_bits": 16, **data}
        if version == 3:
            return {"softmax_bits": 16, **data}
        return super().upgrade(data, version)

    def validate(self) -> None:
        super().validate()
        if self.softmax_bits is not None and not (
                isinstance(self.softmax_bits, int) and 2 <= self.softmax_bits <= 16):
            raise ConfigError("softmax_bits", "must be an integer in 2..16 or None (off), "
                              f"got {self.softmax_bits!r}")


def tfmq_skip(cfg: TFMQConfig, role: str | None) -> SkipRule | None:
    """TFMQ-DM's layer rules (authors' code), by architectural role."""
    if cfg.fp_skip_convs and role in ("shortcut", "downsample"):
        return SkipRule("fp", "TFMQ-DM: skip/downsample convs FP (authors' code)")
    # the first linear of the timestep MLP (UNet time_embedding.linear_1, DiT's per-block
    # timestep embedder): the authors' code keeps it FP (their module 0)
    if cfg.fp_first_time_layer and role == "time_embed_in":
        return SkipRule("fp", "TFMQ-DM: first time-embedding layer FP (authors' code)")
    return None


def tfmq_quant(cfg: TFMQConfig, quant: QuantConfig) -> QuantConfig:
    """``quant`` with TFMQ-DM's first/last-layer rule, softmax bits and activation
    calibration (per timestep, EMA min/max)."""
    quant = replace(quant, first_last=cfg.first_last)
    if quant.attention:
        quant = replace(quant, softmax_bits=cfg.softmax_bits)
    if quant.act.bits is None:
        return quant
    act = replace(quant.act, range_init=cfg.act_range_init, per_timestep=cfg.per_timestep_acts)
    return replace(quant, act=act)


def tfmq_stages(run: Run, cfg: TFMQConfig, weight_fn: WeightFn | None = None,
                temporal_weights: Tensor | None = None) -> None:
    """TFMQ-DM's stages after :func:`~gaq.methods.stages.wrap`: the temporal unit, the
    remaining blocks, per-timestep activation ranges, optionally the activation steps,
    and the timestep tables. ``weight_fn`` gives per-sample loss weights for each block
    (GAQ's stage), ``temporal_weights`` per-row weights for the temporal unit."""
    recon = cfg.recon
    if cfg.temporal_recon:
        temporal(run, recon, temporal_weights)
    blocks = run.adapter.blocks(split_temporal=cfg.temporal_recon)
    reconstruct_weights(run, recon, blocks=blocks, weight_fn=weight_fn)
    init_activations(run, recon.capture_batch)
    if cfg.learn_act_steps and cfg.temporal_recon:
        temporal_act_steps(run, recon, temporal_weights)
    if cfg.learn_act_steps:
        learn_activation_steps(run, recon, blocks=blocks, weight_fn=weight_fn)
    if cfg.fill_timesteps:
        timestep_tables(run)


def finish_tfmq(run: Run, **extra: Any) -> QuantResult:
    """:func:`~gaq.methods.stages.finish` with the temporal unit's numbers: as stats
    (``temporal_`` prefix) and in the state."""
    result = finish(run, **{f"temporal_{k}": v for k, v in run.temporal.items()}, **extra)
    result.state["temporal"] = run.temporal
    return result
