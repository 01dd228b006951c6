"""Q-Diffusion (Li et al., ICCV 2023) on gaq's shared block-reconstruction engine."""

from baselines.qdiffusion.method import QDiffusion, QDiffusionConfig

__all__ = ["QDiffusion", "QDiffusionConfig"]
