"""PTQD (He et al., NeurIPS 2023): quantization-noise correction inside the sampler."""

from baselines.ptqd.hook import PTQDSamplerHook, StepStats, fit_stats
from baselines.ptqd.method import PTQD, PTQDConfig

__all__ = ["PTQD", "PTQDConfig", "PTQDSamplerHook", "StepStats", "fit_stats"]
