"""HTG: post-training quantization for Diffusion Transformers via hierarchical timestep
grouping (Ding et al., 2025)."""

from baselines.htg.method import HTG, HTGConfig

__all__ = ["HTG", "HTGConfig"]
