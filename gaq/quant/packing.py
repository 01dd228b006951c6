"""Integer codes packed at their bit-width, and the compact form of a frozen weight.

A quantized weight is ``Ŵ = (q − z)·Δ`` with integer codes ``q`` on a ``b``-bit grid:
storing ``q`` in ``b`` bits (two 4-bit codes per byte) and ``Δ``, ``z`` per channel takes
about ``b/32`` of the float32 weight. Packing is a plain bit stream, least significant bit
first, so any width from 1 to 16 bits uses the same two functions.

:func:`encode_weight` derives the codes from the frozen weight itself (whatever rounding a
method learned) and keeps them only if :func:`decode_weight` gives the frozen weight back
bit for bit; a weight that is not exactly on its quantizer's grid is reported as such, and
the caller stores it in full precision instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gaq.quant.adaround import AdaRoundQuantizer
from gaq.quant.fake import channel_view
from gaq.quant.quantizer import FakeQuantizer

# codes packed per chunk: bounds the (codes x bits) bit matrix of a large layer to a few MB
_CHUNK = 1 << 20

# how the zero codes of a part get their sign: fake_quantize rounds x·(1/Δ) and keeps the
# sign of a weight rounded to zero (−0.0), AdaRound's (q − z)·Δ gives +0.0
ZERO_SIGNS = ("positive", "weight")

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16, torch.float64: torch.int64}


def packed_bytes(count: int, bits: int) -> int:
    """Bytes :func:`pack_codes` writes for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes`` (integers in ``[0, 2^bits)``, any shape) as a flat uint8 CPU tensor of
    :func:`packed_bytes` bytes: code ``i``'s bit ``j`` is bit ``i·bits + j`` of the stream,
    counted from the least significant bit of byte 0."""
    if not 1 <= bits <= 16:
        raise ValueError(f"codes are packed at 1 to 16 bits, got {bits}")
    flat = codes.detach().reshape(-1).to("cpu", torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, got "
                         f"[{flat.min()}, {flat.max()}]")
    small = flat.astype(np.uint8 if bits <= 8 else np.uint16)
    shifts = np.arange(bits, dtype=small.dtype)
    out = np.empty(packed_bytes(flat.size, bits), dtype=np.uint8)
    # chunks of a multiple of 8 codes start on a byte boundary
    for start in range(0, flat.size, _CHUNK):
        part = small[start:start + _CHUNK]
        bitmat = ((part[:, None] >> shifts) & 1).astype(np.uint8)
        packed = np.packbits(bitmat.reshape(-1), bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` codes :func:`pack_codes` wrote, as a flat int32 CPU tensor."""
    if not 1 <= bits <= 16:
        raise ValueError(f"codes are packed at 1 to 16 bits, got {bits}")
    data = packed.detach().reshape(-1).to("cpu", torch.uint8).numpy()
    if data.size != packed_bytes(count, bits):
        raise ValueError(f"{count} codes of {bits} bits take {packed_bytes(count, bits)} "
                         f"bytes, got {data.size}")
    shifts = np.arange(bits, dtype=np.int32)
    out = np.empty(count, dtype=np.int32)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        bitmat = np.unpackbits(data[first:first + packed_bytes(n, bits)], count=n * bits,
                               bitorder="little").reshape(n, bits)
        out[start:start + n] = (bitmat.astype(np.int32) << shifts).sum(axis=1)
    return torch.from_numpy(out)


@dataclass(frozen=True)
class Grid:
    """One weight part's grid: ``Δ`` and ``z`` shaped to broadcast over the part."""

    scale: Tensor
    zero_point: Tensor
    bits: int
    qmin: int
    qmax: int


def weight_grid(quantizer: nn.Module, part: Tensor) -> Grid | str:
    """The grid ``quantizer`` put ``part`` (an FP weight piece) on, or why there is none a
    state can store."""
    if isinstance(quantizer, AdaRoundQuantizer):
        return Grid(quantizer.scale.detach().float(), quantizer.zero_point.detach().float(),
                    quantizer.bits, quantizer.qmin, quantizer.qmax)
    if isinstance(quantizer, FakeQuantizer):
        if quantizer.mode != "static":
            return f"its weight quantizer is in {quantizer.mode} mode, not static"
        scale, zero = (channel_view(t.detach().float(), part.ndim, quantizer.axis)
                       for t in (quantizer.scale, quantizer.zero_point))
        return Grid(scale, zero, quantizer.bits, quantizer.qmin, quantizer.qmax)
    return f"its weight quantizer is a {type(quantizer).__name__}, with no integer grid"


def same_bits(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` hold the same bits (unlike ``torch.equal``, −0.0 is not +0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEW.get(a.dtype)
    return torch.equal(a, b) if view is None else torch.equal(a.view(view), b.view(view))


def dequantize(codes: Tensor, grid: Grid, zero_sign: str, fp_part: Tensor,
               dtype: torch.dtype) -> Tensor:
    """``(q − z)·Δ`` in float32, as fake_quantize and AdaRound compute it, in ``dtype``;
    ``zero_sign="weight"``: a zero takes the sign of the FP weight it came from."""
    device = fp_part.device
    q = codes.to(device=device, dtype=torch.float32).reshape(fp_part.shape)
    k = q - grid.zero_point.to(device)
    if zero_sign == "weight":
        k = torch.where(k == 0, torch.copysign(k, fp_part.float()), k)
    elif zero_sign != "positive":
        raise ValueError(f"zero_sign must be one of {ZERO_SIGNS}, got {zero_sign!r}")
    return (k * grid.scale.to(device)).to(dtype)


def encode_weight(layer: nn.Module) -> tuple[list[tuple[Tensor, Grid, str]], str]:
    """``layer``'s frozen weight as ``(codes, grid, zero_sign)`` per weight part (codes
    offset to ``[0, 2^b)``), checked to rebuild bit-identically; or ``([], reason)``
    when it does not (the caller stores the weight in full precision)."""
    frozen = layer.frozen_weight
    parts = layer.weight_parts()
    grids = [weight_grid(q, p) for q, p in zip(layer.weight_quantizers, parts, strict=True)]
    reason = next((g for g in grids if isinstance(g, str)), None)
    if reason is not None:
        return [], reason
    widths = [p.shape[1] for p in parts] if len(parts) > 1 else [frozen.shape[1]]
    pieces = frozen.split(widths, dim=1) if len(parts) > 1 else [frozen]
    out = []
    for piece, grid, fp_part in zip(pieces, grids, parts, strict=True):
        q = torch.round(piece.float() / grid.scale) + grid.zero_point
        if not bool(torch.isfinite(q).all()) or bool((q < grid.qmin).any()) \
                or bool((q > grid.qmax).any()):
            return [], "its frozen weight lies outside its quantizer's integer grid"
        codes = (q - grid.qmin).to(torch.int64)
        for sign in ZERO_SIGNS:
            rebuilt = dequantize(codes + grid.qmin, grid, sign, fp_part, frozen.dtype)
            if same_bits(rebuilt, piece):
                out.append((codes, grid, sign))
                break
        else:
            return [], ("its frozen weight is not (q − z)·Δ on its quantizer's grid, bit "
                        "for bit")
    return out, ""
