"""Activation quantization with the range taken from the live tensor at every call.

Nothing is calibrated: each forward computes its own ``(Δ, z)`` from the tensor it is
given, one range per *row*. What a row is depends on the layer's input layout:

``token``
    a linear layer's input ``(..., C)``: one row per token (per sample for a 2-D
    ``(B, C)`` input), or, with ``group_size`` dividing ``C``, one row per token and group
    of ``group_size`` consecutive channels;
``sample``
    a convolution's input ``(B, C, H, W)``: one row per sample. Per-pixel ranges would not
    survive an integer convolution (a 3x3 window mixes pixels of different scales), a
    per-sample scale factors out of each output sample.

The range of a row is its min and max (asymmetric) or its largest magnitude (symmetric),
optionally shrunk by ``clip_ratio``, with the arithmetic of Q-DiT's released activation
quantizer (NOTES.md): the range floored at 1e-5, the zero point rounded from ``-min/Δ``
and clamped to the grid, ``x/Δ`` by division, and the range *not* widened to contain 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gaq.quant.quantizer import FakeQuantizer

__all__ = ["LAYOUTS", "DynamicQuantizer", "dynamic_fake_quantize", "dynamic_rows"]

LAYOUTS = ("token", "sample")
#: the smallest range of a row (Q-DiT's floor; a constant row would otherwise give Δ = 0)
MIN_RANGE = 1e-5
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dynamic_rows(x: Tensor, layout: str, group_size: int = 0) -> Tensor:
    """``x`` as a 2-D view whose rows each get their own range (see the module doc)."""
    if layout == "sample":
        return x.reshape(x.shape[0], -1)
    if layout != "token":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    width = x.shape[-1]
    if group_size and width % group_size == 0:
        return x.reshape(-1, group_size)
    return x.reshape(-1, width)


def dynamic_fake_quantize(rows: Tensor, bits: int, symmetric: bool,
                          clip_ratio: float = 1.0) -> Tensor:
    """Quantize-dequantize each row of the 2-D ``rows`` on a grid spanning that row's own
    range: ``[0, 2^b−1]`` with a per-row zero point, or ``[−2^(b−1), 2^(b−1)−1]`` with
    zero point 0 (``symmetric``)."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        top = rows.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_RANGE)
        if clip_ratio < 1.0:
            top = top * clip_ratio
        scale = top / qmax
        return rows.div(scale).round_().clamp_(qmin, qmax).mul_(scale)
    qmin, qmax = 0, 2**bits - 1
    hi = rows.amax(dim=-1, keepdim=True)
    lo = rows.amin(dim=-1, keepdim=True)
    if clip_ratio < 1.0:
        hi, lo = hi * clip_ratio, lo * clip_ratio
    scale = (hi - lo).clamp(min=MIN_RANGE) / qmax
    zero = torch.round(-lo / scale).clamp_(qmin, qmax)
    return rows.div(scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


class DynamicQuantizer(FakeQuantizer):
    """A layer-input quantizer whose ranges come from each call's own tensor.

    It keeps :class:`FakeQuantizer`'s buffers (unused, left uncalibrated), so the model's
    activation quantizers are walked, switched and saved as every other method's; a saved
    state records no range, and ``baselines.dynamic`` rebuilds these quantizers from its
    config on restore. Its ``mode`` reads ``dynamic``; nothing observes or learns here.
    """

    def __init__(self, bits: int, symmetric: bool = False, *, layout: str = "token",
                 group_size: int = 0, clip_ratio: float = 1.0,
                 device: torch.device | str | None = None) -> None:
        super().__init__(bits, symmetric, None, device=device)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: whole rows), got {group_size}")
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio}")
        self.layout = layout
        self.group_size = group_size
        self.clip_ratio = clip_ratio

    @property
    def mode(self) -> str:
        return "dynamic"

    @property
    def calibrated(self) -> bool:
        return True  # ranges need no calibration: every call brings its own

    def calibrate(self, x: Tensor) -> None:
        """Nothing to record: the range is taken at inference."""

    def finalize(self) -> DynamicQuantizer:
        self.observing = False
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.observing or not self.enabled:
            return x
        out_dtype = x.dtype
        # x/Δ needs more mantissa than fp16/bf16 hold at 8 bits (as the static quantizer)
        y = x.float() if out_dtype in _LOW_PRECISION else x
        rows = dynamic_rows(y, self.layout, self.group_size)
        q = dynamic_fake_quantize(rows, self.bits, self.symmetric, self.clip_ratio)
        return q.reshape(x.shape).to(out_dtype)

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        group = f", group={self.group_size}" if self.group_size and self.layout == "token" else ""
        flags = "" if self.enabled else ", disabled"
        return f"bits={self.bits}, {grid}, dynamic per {self.layout}{group}{flags}"


def make_dynamic(quantizer: FakeQuantizer, layout: str, group_size: int,
                 clip_ratio: float) -> DynamicQuantizer:
    """A dynamic quantizer with ``quantizer``'s bits, grid and device."""
    return DynamicQuantizer(quantizer.bits, quantizer.symmetric, layout=layout,
                            group_size=group_size, clip_ratio=clip_ratio,
                            device=quantizer.mode_code.device)


def layer_layout(module: nn.Module) -> str:
    """``sample`` for a convolution's input, ``token`` for a linear layer's."""
    return "sample" if isinstance(module, nn.Conv2d) else "token"
