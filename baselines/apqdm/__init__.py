"""APQ-DM (Wang et al., CVPR 2024): group-wise activation quantizers across timesteps."""

from baselines.apqdm.method import APQDM, APQDMConfig

__all__ = ["APQDM", "APQDMConfig"]
