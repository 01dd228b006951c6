"""Q-Diffusion: BRECQ + AdaRound weight reconstruction and LSQ-style activation steps on
timestep-aware (interval) calibration data, with shortcut splitting and quantized
attention (q, k, softmax output, v)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gaq.methods.brecq import BRECQ, BRECQConfig
from gaq.reconstruction import ReconConfig


@dataclass(frozen=True)
class QDiffusionConfig(BRECQConfig):
    VERSION: ClassVar[int] = 1
    recon: ReconConfig = field(default_factory=ReconConfig)
    quantize_attention: bool = True
    split_shortcut: bool = True
    # the authors keep the softmax output at 16 bits in their released configs
    softmax_bits: int | None = 16


class QDiffusion(BRECQ):
    name = "qdiffusion"
    Config = QDiffusionConfig
    presets = {
        # paper: 20k AdaRound iterations, batch 32, Adam 1e-3; 5k activation iterations, 4e-4
        "paper": QDiffusionConfig(),
        "cpu": QDiffusionConfig(recon=ReconConfig(weight_iters=200, act_iters=50)),
    }
