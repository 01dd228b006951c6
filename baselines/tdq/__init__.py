"""TDQ, Temporal Dynamic Quantization (So et al., NeurIPS 2023), PTQ variant."""

from baselines.tdq.method import TDQ, TDQConfig

__all__ = ["TDQ", "TDQConfig"]
