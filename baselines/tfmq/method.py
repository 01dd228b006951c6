"""TFMQ-DM (Huang et al., CVPR 2024): temporal-information reconstruction, then block
reconstruction of the rest, with activations quantized per tensor *and* per sampling
timestep (finite-set calibration). The pipeline's stages live in :mod:`gaq.methods.tfmq`
(GAQ adds its weighting stage to the same stages); this class registers it with the
authors' layer rules and presets.
"""

from __future__ import annotations

from types import MappingProxyType

from torch import Tensor, nn

from gaq.config import QuantConfig
from gaq.methods.base import Method, QuantResult, RowStyle
from gaq.methods.stages import start, wrap
from gaq.methods.tfmq import TFMQConfig, finish_tfmq, tfmq_quant, tfmq_skip, tfmq_stages
from gaq.models.adapters import Block, SkipRule
from gaq.reconstruction import BlockData, ReconConfig, WeightFn

__all__ = ["TFMQ", "TFMQConfig"]


class TFMQ(Method):
    name = "tfmq"
    label = "TFMQ-DM"
    rows = MappingProxyType({
        "tfmq-lsq": RowStyle("TFMQ-DM + LSQ acts", "TFMQ-DM+LSQ", "#843c39"),
        # the ablation rows of benchmarks/tfmq-w3a8.toml: TFMQ-DM with one choice changed
        "tfmq-no-temporal": RowStyle("TFMQ-DM (no temporal unit)", color="#393b79"),
        "tfmq-static-acts": RowStyle("TFMQ-DM (one static act. range)", color="#ad494a"),
        "tfmq-mse-init": RowStyle("TFMQ-DM (MSE act. ranges)", color="#9e9ac8"),
        "tfmq-softmax16": RowStyle("TFMQ-DM (16-bit softmax)", color="#bd9e39"),
        "tfmq-ends-w8a8": RowStyle("TFMQ-DM (first/last layer W8A8)", color="#74c476"),
        # a dark rose: the name's derived colour was a grey next to TFMQ-DM's
        "tfmq-quant-skips": RowStyle("TFMQ-DM (skip convs quantized)",
                                     color=(0.7, 0.3, 0.5)),
    })
    Config = TFMQConfig
    presets = {
        "paper": TFMQConfig(),
        # sized for the bundled 16x16 digits model on one CPU core (< 2 min)
        "cpu": TFMQConfig(recon=ReconConfig(weight_iters=200, act_iters=50,
                                            split_reg="channels")),
    }

    def __init__(self, config: TFMQConfig, sample_weights: WeightFn | None = None) -> None:
        """``sample_weights(block, data)``: per-sample loss weights over the calibration
        training rows for each block (indexed like ``data.index()``); None = uniform."""
        super().__init__(config)
        self._weight_fn = sample_weights

    def sample_weights(self, block: Block, data: BlockData) -> Tensor | None:
        return None if self._weight_fn is None else self._weight_fn(block, data)

    def skip(self, module: nn.Module, name: str, role: str | None) -> SkipRule | None:
        return tfmq_skip(self.config, role)

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        return tfmq_quant(self.config, quant)

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        run = start(self, model, adapter, calib, quant)
        wrap(run)
        tfmq_stages(run, self.config, self.sample_weights)
        return finish_tfmq(run)
