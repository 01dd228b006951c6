"""Dynamic post-training quantization: weights reconstructed as BRECQ does (AdaRound block
by block, activations off), activations quantized at inference with ranges taken from
each call's own tensor (per token, or per token and channel group, for a linear layer's
input; per sample for a convolution's), after Q-DiT's released activation quantizer
(Chen et al., arXiv 2406.17343). No activation range is calibrated, so the row is the
reference point every static scheme (one range per layer, or per layer and timestep) is
measured against. What is followed and what is not: NOTES.md."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from torch import nn

from baselines.dynamic.quantizer import DynamicQuantizer, layer_layout, make_dynamic
from gaq.config import ConfigError, MethodConfig, QuantConfig, non_negative_int
from gaq.methods.base import Method, QuantResult
from gaq.methods.stages import finish, reconstruct_weights, start, wrap
from gaq.quantize import quant_layers, set_mode
from gaq.reconstruction import ReconConfig

__all__ = ["Dynamic", "DynamicConfig", "install_dynamic"]


@dataclass(frozen=True)
class DynamicConfig(MethodConfig):
    """``recon`` drives the weight phase only (its ``act_*`` fields are unused: nothing
    about activations is learned or calibrated)."""

    VERSION: ClassVar[int] = 1
    recon: ReconConfig = field(default_factory=ReconConfig)
    # channels sharing one range within a token (Q-DiT's released command: 128); 0 or a
    # width it does not divide: the whole token. Convolution inputs: one range per sample
    act_group_size: int = 128
    # Q-DiT's a_clip_ratio: the range shrunk by this factor (1.0, their default: none)
    clip_ratio: float = 1.0
    # first and last layer: "w8a8" (the suite's convention, BRECQ's), "fp" or "quantized"
    first_last: Literal["w8a8", "fp", "quantized"] = "w8a8"

    def validate(self) -> None:
        super().validate()
        non_negative_int("act_group_size", self.act_group_size)
        if not (isinstance(self.clip_ratio, (int, float)) and 0.0 < self.clip_ratio <= 1.0):
            raise ConfigError("clip_ratio", f"must lie in (0, 1], got {self.clip_ratio!r}")


def install_dynamic(qmodel: nn.Module, cfg: DynamicConfig) -> int:
    """Replace every layer-input quantizer of ``qmodel`` by a dynamic one with its bits and
    grid (the layer's layout decides what a row is); returns how many."""
    n = 0
    for _, layer in quant_layers(qmodel):
        layout = layer_layout(layer.fp)
        for i, q in enumerate(layer.act_quantizers):
            if not isinstance(q, DynamicQuantizer):
                layer.act_quantizers[i] = make_dynamic(q, layout, cfg.act_group_size,
                                                       cfg.clip_ratio)
            n += 1
    set_mode(qmodel, "full")
    return n


class Dynamic(Method):
    name = "dynamic"
    label = "Dynamic"
    color = (0.75, 0.0, 0.25)  # crimson: the name's derived colour was a grey by TFMQ-DM's
    Config = DynamicConfig
    # the benchmark's paired tables anchored on this row: how close each static one comes
    report = "baselines.dynamic.report:DynamicReport"
    presets = {
        # AdaRound at BRECQ's paper budget; Q-DiT's activation groups of 128 channels
        "paper": DynamicConfig(),
        # BRECQ's cpu budget, so that at the same overrides the weights are BRECQ's
        "cpu": DynamicConfig(recon=ReconConfig(weight_iters=200, act_iters=50)),
    }

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        """BRECQ's layer choices (attention matmuls and the shortcut halves not quantized
        separately, Q-DiT's default too), so that the wrapped model and its weights are
        BRECQ's and only the activation ranges differ."""
        return replace(quant, attention=False, split_shortcut=False, softmax_bits=16,
                       first_last=self.config.first_last)

    @classmethod
    def finish_restore(cls, qmodel: nn.Module, state: Mapping[str, Any]) -> nn.Module:
        """The saved state holds no ranges: its layer-input quantizers become dynamic again,
        from the saved config."""
        if QuantConfig.from_dict(state["quant"]).act.bits is not None:
            install_dynamic(qmodel, DynamicConfig.from_dict(state["config"]))
        return qmodel

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        run = start(self, model, adapter, calib, quant)
        wrap(run)
        reconstruct_weights(run, self.config.recon)
        n = install_dynamic(run.qmodel, self.config) if run.quantizes_activations else 0
        return finish(run, dynamic_quantizers=n)
