"""Quantization primitives: fake quantization, observers, quantizers, quantized layers.

``gaq.quant.attention`` (the quantized attention processor) imports diffusers,
so its names are loaded on first access.
"""

from __future__ import annotations

from typing import Any

from gaq.quant.adaround import AdaRoundQuantizer, annealed_beta
from gaq.quant.context import (
    attach_timestep_context,
    current_timestep,
    normalize_timestep,
    timestep_context,
    timesteps_per_row,
)
from gaq.quant.fake import (
    channel_view,
    fake_quantize,
    qparams_from_range,
    qrange,
    round_ste,
    tensor_range,
)
from gaq.quant.modules import (
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    SplitQuantConv2d,
    make_weight_quantizer,
    quantize_layer,
    unet_shortcut_splits,
)
from gaq.quant.observers import (
    EMAMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PerTimestepObserver,
    make_observer,
)
from gaq.quant.providers import TimestepScaleMLP, sinusoidal_embedding
from gaq.quant.quantizer import FakeQuantizer, UnknownTimestepError

_LAZY = {"QuantAttnProcessor", "set_quant_attention"}

__all__ = [
    "AdaRoundQuantizer",
    "EMAMinMaxObserver",
    "FakeQuantizer",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PerTimestepObserver",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "SplitQuantConv2d",
    "TimestepScaleMLP",
    "UnknownTimestepError",
    "annealed_beta",
    "attach_timestep_context",
    "channel_view",
    "current_timestep",
    "fake_quantize",
    "make_observer",
    "make_weight_quantizer",
    "normalize_timestep",
    "qparams_from_range",
    "qrange",
    "quantize_layer",
    "round_ste",
    "set_quant_attention",
    "sinusoidal_embedding",
    "tensor_range",
    "timestep_context",
    "timesteps_per_row",
    "unet_shortcut_splits",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from gaq.quant import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'gaq.quant' has no attribute {name!r}")
