"""Round-to-nearest: the floor of every table. Weights per output channel with max or MSE
range initialisation (``QuantConfig.weight.range_init``), activation ranges from one pass
of calibration data; no reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from gaq.config import MethodConfig, QuantConfig, positive_int
from gaq.methods.base import Method, QuantResult
from gaq.methods.stages import finish, init_activations, start, wrap


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    VERSION: ClassVar[int] = 1
    batch_size: int = 64

    def validate(self) -> None:
        positive_int("batch_size", self.batch_size)


class RTN(Method):
    name = "rtn"
    label = "RTN"
    Config = RTNConfig
    presets = {"paper": RTNConfig(), "cpu": RTNConfig()}

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        run = start(self, model, adapter, calib, quant, needs_set=False)
        wrap(run)
        init_activations(run, self.config.batch_size)
        return finish(run)
