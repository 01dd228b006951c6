"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down.

``Ŵ = Δ·(clamp(⌊W/Δ⌋ + h(V) + z, qmin, qmax) − z)`` with the rectified sigmoid
``h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1)``. Only ``V`` is learned; ``Δ``, ``z`` and
``⌊W/Δ⌋`` are frozen at construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gaq.quant.fake import apply_keeping_float32, channel_view, qrange
from gaq.quant.quantizer import FakeQuantizer

ZETA = 1.1
GAMMA = -0.1


class AdaRoundQuantizer(nn.Module):
    """Weight quantizer with learnable rounding; ``soft`` while training, ``hard`` after.

    ``V`` starts where ``h(V)`` equals the fractional part of ``W/Δ``, so the
    initial soft weight is ``W`` itself (up to clamping) and the initial hard
    rounding is round-to-nearest (ties round up).

    Args:
        weight: the full-precision weight it quantizes (stored as its grid floor).
        scale, zero_point: ``()`` or ``(C,)`` along ``axis``, e.g. from a
            calibrated :class:`FakeQuantizer` (see :meth:`from_quantizer`).
        bits, symmetric: the integer grid.
        axis: channel axis of ``scale`` (weights: 0), ``None`` for per-tensor.
    """

    def __init__(
        self,
        weight: Tensor,
        scale: Tensor,
        zero_point: Tensor,
        bits: int,
        symmetric: bool,
        axis: int | None = 0,
    ) -> None:
        super().__init__()
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.bits = bits
        self.symmetric = symmetric
        self.axis = axis
        w = weight.detach().float()
        scale = channel_view(torch.as_tensor(scale).detach().float(), w.ndim, axis)
        zero_point = channel_view(torch.as_tensor(zero_point).detach().float(), w.ndim, axis)
        self.register_buffer("scale", scale.to(w.device).clone())
        self.register_buffer("zero_point", zero_point.to(w.device).clone())
        # Same x·(1/Δ) as fake_quantize, so "nearest" here is FakeQuantizer's nearest.
        grid = w * torch.reciprocal(self.scale)
        w_floor = torch.floor(grid)
        self.register_buffer("w_floor", w_floor)
        self.alpha = nn.Parameter(self._init_alpha(grid - w_floor))
        self.soft = True
        # set_soft(True, recompute=True), as the AdaRound loop does: the soft weight and the
        # regulariser keep only V for backward and recompute their steps there
        self.recompute = False

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # The grid stays float32 under model.half(); only the result takes the model's dtype.
        return apply_keeping_float32(
            self, super()._apply, fn, recurse, ("scale", "zero_point", "w_floor")
        )

    @staticmethod
    def _init_alpha(rest: Tensor) -> Tensor:
        """``V`` with ``h(V) = rest``, its sign forced to agree with ``rest ≥ 0.5``.

        The inverse sigmoid is evaluated in floating point; without the sign fix a
        ``rest`` a few ulps from 0.5 could start on the wrong side, so hard rounding
        of the initial ``V`` would not be round-to-nearest.
        """
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        tiny = torch.finfo(alpha.dtype).tiny
        up = rest >= 0.5
        return torch.where(up, alpha.clamp(min=0.0), alpha.clamp(max=-tiny))

    @classmethod
    def from_quantizer(cls, quantizer: FakeQuantizer, weight: Tensor) -> AdaRoundQuantizer:
        """Start from a calibrated static quantizer's grid and step sizes."""
        if quantizer.mode != "static":
            raise ValueError(f"AdaRound needs a static weight quantizer; it is {quantizer.mode}")
        return cls(
            weight,
            quantizer.scale,
            quantizer.zero_point,
            quantizer.bits,
            quantizer.symmetric,
            quantizer.axis,
        )

    @staticmethod
    def _rectified(alpha: Tensor) -> Tensor:
        return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def h(self) -> Tensor:
        """Rectified sigmoid ``h(V)`` in ``[0, 1]``."""
        return self._rectified(self.alpha)

    def _recomputing(self) -> bool:
        """Whether this soft forward should save only ``V`` for backward. Autograd would
        otherwise keep about four weight-sized intermediates of the soft weight and four
        of the regulariser per layer until backward (measured: 8 of the 13 weight-sized
        copies at the peak of a 24 M-parameter block, ``results/perf/block_memory_*``).
        Recomputing them in backward runs the same kernels on the same inputs, so the
        gradient is bit-identical; it is used by the AdaRound loop only, not by GAQ's
        second-order meta step."""
        return (self.recompute and self.soft and torch.is_grad_enabled()
                and self.alpha is not None and self.alpha.requires_grad)

    def rounding(self) -> Tensor:
        """The rounding offset added to ``⌊W/Δ⌋``: ``h(V)`` when soft, ``[V ≥ 0]`` when hard."""
        if self.soft:
            return self.h()
        # h(V) >= 0.5 exactly when V >= 0.
        return (self.alpha >= 0).to(self.w_floor.dtype)

    def set_soft(self, soft: bool = True, recompute: bool = False) -> AdaRoundQuantizer:
        """Soft (``h(V)``) or hard rounding; ``recompute``: a soft forward keeps only V for
        backward (see :meth:`_recomputing`). Leaving soft mode clears it."""
        self.soft = soft
        self.recompute = soft and recompute
        return self

    def forward(self, x: Tensor | None = None) -> Tensor:
        """The quantized weight (float32). ``x``, if given, must be the weight this was built
        from; it is accepted so the module can stand in for a :class:`FakeQuantizer`."""
        if x is not None and x.shape != self.w_floor.shape:
            raise ValueError(
                f"AdaRoundQuantizer was built for a weight of shape {tuple(self.w_floor.shape)}, "
                f"got {tuple(x.shape)}"
            )
        if self._recomputing():
            return checkpoint(lambda a: self._weight(self._rectified(a)), self.alpha,
                              use_reentrant=False, preserve_rng_state=False)
        return self._weight(self.rounding())

    def _weight(self, offset: Tensor) -> Tensor:
        q = torch.clamp(self.w_floor + offset + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def rounding_regularizer(self, beta: float) -> Tensor:
        """``Σ (1 − |2h(V) − 1|^β)``: zero once every ``h`` is 0 or 1; large ``β`` is lenient
        with values near 0.5, small ``β`` pushes everything to the ends."""
        def reg(alpha: Tensor) -> Tensor:
            return (1 - (2 * self._rectified(alpha) - 1).abs().pow(beta)).sum()

        if self._recomputing():
            return checkpoint(reg, self.alpha, use_reentrant=False, preserve_rng_state=False)
        return reg(self.alpha)

    @property
    def released(self) -> bool:
        """Whether the rounding variables were dropped (:meth:`release`)."""
        return self.w_floor is None

    def release(self) -> AdaRoundQuantizer:
        """Drop ``V`` and ``⌊W/Δ⌋`` once the layer holds the folded weight: two weight-sized
        float32 tensors per layer that nothing reads afterwards (at 860 M parameters,
        7 GB). The grid (``scale``, ``zero_point``) stays."""
        self.alpha = None
        self.w_floor = None
        return self

    @torch.no_grad()
    def fold(self) -> Tensor:
        """The final hard-rounded, dequantized weight (detached)."""
        if self.released:
            raise RuntimeError("AdaRoundQuantizer.fold after release(): the layer holds "
                               "the folded weight already")
        soft, self.soft = self.soft, False
        try:
            return self.forward().detach().clone()
        finally:
            self.soft = soft


def annealed_beta(
    count: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0
) -> float | None:
    """AdaRound's β schedule at iteration ``count`` of ``total``, counted from 1 as the
    BRECQ / Q-Diffusion / TFMQ-DM loss counts its calls: ``None`` (no rounding term) while
    ``count < warmup·total``, then linear decay from ``start`` to ``end``, reached at the
    last iteration."""
    if total < 1:
        raise ValueError(f"total must be positive, got {total}")
    begin = warmup * total
    if count < begin:
        return None
    progress = (count - begin) / max(total - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)
