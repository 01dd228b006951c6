"""BRECQ-style block reconstruction: AdaRound for weights block by block (activations
off), then activation ranges from calibration data and LSQ-style step learning per block.
The generic AdaRound method, and the base the Q-Diffusion baseline specialises.

BRECQ itself (a CNN method) quantizes neither the attention matmuls nor the two halves
of a skip-concatenation separately; those are Q-Diffusion's additions, so here they are
options that default to off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import ClassVar, Literal

from torch import nn

from gaq.config import ConfigError, MethodConfig, QuantConfig
from gaq.methods.base import Method, QuantResult, RowStyle
from gaq.methods.stages import (
    Run,
    finish,
    init_activations,
    learn_activation_steps,
    reconstruct_weights,
    start,
    wrap,
)
from gaq.reconstruction import ReconConfig


@dataclass(frozen=True)
class BRECQConfig(MethodConfig):
    VERSION: ClassVar[int] = 1
    recon: ReconConfig = field(default_factory=ReconConfig)
    learn_act_steps: bool = True
    quantize_attention: bool = False
    split_shortcut: bool = False
    softmax_bits: int | None = 16
    # first and last layer: "w8a8" (BRECQ's convention), "fp" or "quantized"
    first_last: Literal["w8a8", "fp", "quantized"] = "w8a8"
    # activation range init: None = every training row with full-precision activations
    # upstream (the suite's); N = one batch of N random training rows, each quantizer
    # initialised on inputs the earlier ones already quantize (BRECQ's and Q-Diffusion's
    # code: 64)
    act_init_rows: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.act_init_rows is not None and self.act_init_rows < 1:
            raise ConfigError("act_init_rows", f"must be a positive integer or None, got "
                              f"{self.act_init_rows}")


class BRECQ(Method):
    name = "brecq"
    label = "BRECQ"
    rows = MappingProxyType({
        "brecq-no-lsq": RowStyle("BRECQ (no learned act. steps)", "BRECQ w/o LSQ", "#e6550d"),
        # benchmarks/tfmq-w3a8.toml: BRECQ with one choice changed
        "brecq-attn8": RowStyle("BRECQ + 8-bit softmax attention", color="#8ca252"),
    })
    Config = BRECQConfig
    presets = {
        "paper": BRECQConfig(),
        # sized for the bundled model on a laptop CPU
        "cpu": BRECQConfig(recon=ReconConfig(weight_iters=200, act_iters=50)),
    }

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        """The run's quantization config with this method's own choices applied."""
        cfg = self.config
        return replace(quant, attention=cfg.quantize_attention and quant.act.bits is not None,
                       split_shortcut=cfg.split_shortcut, softmax_bits=cfg.softmax_bits,
                       first_last=cfg.first_last)

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        run = start(self, model, adapter, calib, quant)
        cfg = self.config
        brecq_stages(run, cfg.recon, cfg.learn_act_steps, cfg.act_init_rows)
        return finish(run)


def brecq_stages(run: Run, cfg: ReconConfig, learn_act_steps: bool = True,
                 act_init_rows: int | None = None) -> None:
    """The BRECQ recipe every reconstruction-based method shares: wrap with the method's
    skip rules, AdaRound the weights block by block, initialise activation ranges from
    calibration data, then learn the activation steps block by block."""
    wrap(run)
    reconstruct_weights(run, cfg)
    init_activations(run, cfg.capture_batch, rows=act_init_rows, seed=cfg.seed)
    if learn_act_steps:
        learn_activation_steps(run, cfg)
