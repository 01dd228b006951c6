"""TFMQ-DM (Huang et al., CVPR 2024) on gaq's shared reconstruction engine: the pipeline
GAQ builds on."""

from baselines.tfmq.method import TFMQ, TFMQConfig

__all__ = ["TFMQ", "TFMQConfig"]
