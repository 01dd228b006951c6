"""Dynamic post-training quantization: activation ranges from the live tensor at inference
(after Q-DiT's released code), weights reconstructed as BRECQ does."""

from baselines.dynamic.method import Dynamic, DynamicConfig, install_dynamic
from baselines.dynamic.quantizer import DynamicQuantizer, dynamic_fake_quantize, dynamic_rows

__all__ = ["Dynamic", "DynamicConfig", "DynamicQuantizer", "dynamic_fake_quantize",
           "dynamic_rows", "install_dynamic"]
