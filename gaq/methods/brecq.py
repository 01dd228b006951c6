"""BRECQ-style block reconstruction: AdaRound for weights block by block (activations
off), then activation ranges from calibration data and LSQ-style step learning per block.
The generic AdaRound method, and the base the Q-Diffusion baseline specialises.

BRECQ itself (a CNN method) quantizes neither the attention matmuls nor the two halves
of a skip-concatenation separately; those are Q-Diffusion's additions, so here they are
options that default to off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
from torch import nn

from gaq.config import ConfigError, MethodConfig, QuantConfig
from gaq.methods.base import Method, QuantResult
from gaq.methods.common import Timer, as_forward_loop, finish, require_calibration_set
from gaq.quantize import calibrate_activations, quantize_model
from gaq.reconstruction import ReconConfig, calib_batches, reconstruct


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
        require_calibration_set(self, calib)
        quant = self.effective_quant(quant)
        with Timer() as timer:
            qmodel, report, blocks = reconstruct_model(self, model, adapter, calib, quant,
                                                       self.config.recon,
                                                       self.config.learn_act_steps,
                                                       self.config.act_init_rows)
        result = finish(self, qmodel, report, quant, timer.seconds)
        result.state["blocks"] = blocks
        return result


def init_rows_loop(calib, rows: int, seed: int):
    """One batch of ``rows`` training rows drawn at random (without replacement, from
    ``seed``), as BRECQ's and Q-Diffusion's code initialise activation ranges."""
    from gaq.calibration import forward_loop

    train = calib.train()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=gen)[: min(rows, len(train))]
    return forward_loop(train.subset(idx), len(idx))


def reconstruct_model(method: Method, model: nn.Module, adapter, calib, quant: QuantConfig,
                      cfg: ReconConfig, learn_act_steps: bool = True,
                      act_init_rows: int | None = None):
    """The BRECQ pipeline every reconstruction-based method shares: quantize with the
    method's skip rules, AdaRound the weights block by block, initialise activation ranges
    from calibration data, then learn the activation steps block by block. Returns the
    quantized model, its layer report and the per-block metrics (JSON-able)."""
    qmodel, report = quantize_model(model, adapter, quant, method.skip_filter(adapter))
    batches = calib_batches(calib, cfg.capture_batch, next(model.parameters()).device)
    results = reconstruct(qmodel, model, adapter, batches, cfg, phase="weights")
    if quant.act.bits is not None:
        if act_init_rows is None:
            calibrate_activations(qmodel, as_forward_loop(calib, cfg.capture_batch))
        else:
            calibrate_activations(qmodel, init_rows_loop(calib, act_init_rows, cfg.seed),
                                  upstream="quantized")
        if learn_act_steps:
            results += reconstruct(qmodel, model, adapter, batches, cfg, phase="activations")
    return qmodel, report, [vars(r) for r in results]
