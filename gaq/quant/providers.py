"""Step-size providers for timestep-conditioned quantizers (TDQ: ``Δ_t = f_φ(enc(t))``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[cos(t·ω_i), sin(t·ω_i)]`` with ``ω_i = max_period^(−i/(dim/2))``: shape ``(B, dim)``."""
    if dim < 2 or dim % 2:
        raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t.reshape(-1, 1).float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def inverse_softplus(y: Tensor) -> Tensor:
    """``x`` with ``softplus(x) = y`` (for ``y > 0``), stable for small ``y``."""
    return y + torch.log(-torch.expm1(-y))


class TimestepScaleMLP(nn.Module):
    """TDQ's step-size generator: sinusoidal encoding → 4-layer ReLU MLP → softplus.

    Layer sizes follow the code attributed to the TDQ authors:
    ``Linear(d,64)–ReLU–Linear(64,64)–ReLU–Linear(64,64)–ReLU–Linear(64,C)–Softplus``.
    The last bias is ``softplus⁻¹(s₀)`` and, unlike the reference, the last
    weight starts at zero, so the initial output is exactly the calibrated
    ``s₀`` at every timestep (the conditioned quantizer starts where static
    calibration left off); the zero weight still receives gradient, so the
    network leaves that point after the first step.

    Args:
        init_scale: ``s₀``: a scalar (per-tensor quantizer, output ``(B,)``) or
            ``(C,)`` (per-channel, output ``(B, C)``). The network is built on its device.
        embed_dim: size of the sinusoidal encoding.
        hidden: hidden width.
        max_period: encoding period, as in diffusers' timestep embeddings.
    """

    def __init__(
        self,
        init_scale: float | Tensor,
        embed_dim: int = 64,
        hidden: int = 64,
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        # a Python number is a host value; a tensor keeps its device (the quantizer's)
        s0 = torch.as_tensor(init_scale, dtype=torch.float32,
                             device=init_scale.device if isinstance(init_scale, Tensor)
                             else "cpu").detach()
        dev = s0.device
        if bool((s0 <= 0).any()):
            raise ValueError("initial step sizes must be positive")
        self.per_channel = s0.ndim > 0
        out = s0.numel()
        self.embed_dim = embed_dim
        self.max_period = max_period
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden, device=dev),
            nn.ReLU(),
            nn.Linear(hidden, hidden, device=dev),
            nn.ReLU(),
            nn.Linear(hidden, hidden, device=dev),
            nn.ReLU(),
            nn.Linear(hidden, out, device=dev),
        )
        last = self.net[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(inverse_softplus(s0.reshape(-1)))

    def forward(self, t: Tensor) -> Tensor:
        """Step sizes ``(B,)`` or ``(B, C)`` for timesteps ``t`` of shape ``(B,)``."""
        # Every row must come out the same whatever the batch size, so that Δ(t) for one
        # timestep (conditioned mode) and for a thousand at once (freezing to a table) are
        # bit-identical. Two things break that: a matrix product (its kernel depends on
        # the row count), replaced by a broadcast product summed over the last dimension;
        # and the scalar code path elementwise CPU kernels take for the elements past the
        # last full SIMD vector (softplus, cos, sin), avoided by padding the batch to a
        # multiple of ROW_PAD rows. The layers are 64 wide: neither costs what matters.
        t = t.reshape(-1)
        n = t.shape[0]
        if n % ROW_PAD:
            t = torch.cat([t, t[-1:].expand(ROW_PAD - n % ROW_PAD)])
        h = sinusoidal_embedding(t, self.embed_dim, self.max_period)
        h = h.to(self.net[0].weight.dtype)
        for layer in self.net:
            h = _rowwise_linear(h, layer) if isinstance(layer, nn.Linear) else layer(h)
        scale = F.softplus(h)[:n]
        return scale if self.per_channel else scale[:, 0]


#: Rows per padded provider batch. PyTorch's vectorized CPU loops take two SIMD vectors
#: per iteration and leave the rest to a scalar tail: 32 float32 rows on AVX-512 (16 was
#: measured to give different rows for 1 and 1,000 timesteps there), so 64 with margin.
ROW_PAD = 64


def _rowwise_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)``, each row reduced in the same order whatever the batch size."""
    return (x.unsqueeze(-2) * layer.weight).sum(-1) + layer.bias
