"""Uniform affine fake quantization with straight-through rounding.

``q = clamp(round(x/Δ) + z, qmin, qmax)``, ``x̂ = (q − z)·Δ``.

The arithmetic mirrors ``torch.fake_quantize_per_{tensor,channel}_affine``
exactly (multiply by ``1/Δ``, round half to even, add the integer zero point,
clamp), so results are bit-identical to the reference ops; the only difference
is that gradients flow to ``Δ`` as well (LSQ), which the reference ops do not
offer for per-channel scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

# Smallest step size: a constant tensor (range 0) must not give Δ = 0.
MIN_SCALE = 1e-8

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)``: ``[0, 2^b−1]`` or, symmetric, ``[−2^(b−1), 2^(b−1)−1]``."""
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {bits!r}")
    lowest = 2 if symmetric else 1
    if not lowest <= bits <= 16:
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(f"{kind} quantization needs {lowest} <= bits <= 16, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return (torch.round(x) - x).detach() + x


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale`` and (integer-valued) ``zero_point``.

    Gradients: to ``x`` inside the clamping range, to ``scale`` everywhere (LSQ:
    ``round(x/Δ) − x/Δ`` inside, ``qmin−z`` / ``qmax−z`` outside). ``zero_point``
    is treated as a constant. Half-precision inputs are computed in float32,
    because ``x/Δ`` needs more mantissa bits than fp16/bf16 hold at 8+ bits.
    """
    out_dtype = x.dtype
    if out_dtype in _LOW_PRECISION:
        x = x.float()
    zero_point = zero_point.detach().to(x.dtype)
    # x * (1/Δ), not x / Δ: this is what the torch reference kernels compute,
    # and the two differ in the last bit often enough to flip a rounding.
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        # Inference path: same arithmetic, in place after the first product, about twice
        # as fast (sampling pays for every activation quantizer at every step).
        # clamp(round(x/Δ) + z, qmin, qmax) − z == clamp(round(x/Δ), qmin − z, qmax − z)
        # exactly (z is an integer), which saves two passes over x.
        q = (x * torch.reciprocal(scale)).round_()
        if zero_point.numel() == 1:
            z = float(zero_point)
            q.clamp_(qmin - z, qmax - z)
        else:
            q = torch.clamp(q, qmin - zero_point, qmax - zero_point)
        return q.mul_(scale).to(out_dtype)
    q = torch.clamp(round_ste(x * torch.reciprocal(scale)) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(out_dtype)


def qparams_from_range(
    xmin: Tensor,
    xmax: Tensor,
    bits: int,
    symmetric: bool,
    unsigned: bool = False,
) -> tuple[Tensor, Tensor]:
    """Step size and zero point covering ``[xmin, xmax]`` (elementwise over channel tensors).

    The range is widened to contain 0, so zero is exactly representable and the
    zero point lies on the grid. Symmetric: ``Δ = max|x| / qmax`` (the positive
    end is not clipped), ``z = 0``. ``unsigned``: the grid ``[0, 2^b−1]`` with
    ``z = 0`` fixed, for non-negative tensors such as softmax outputs; negative
    values are clipped to 0.
    """
    if unsigned and symmetric:
        raise ValueError("unsigned and symmetric are mutually exclusive")
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.clamp(xmin.detach().float(), max=0.0)
    xmax = torch.clamp(xmax.detach().float(), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-xmin, xmax) / qmax, min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    if unsigned:
        scale = torch.clamp(xmax / qmax, min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax)
    return scale, zero_point


def channel_view(param: Tensor, ndim: int, axis: int | None) -> Tensor:
    """Reshape a per-tensor ``()`` or per-channel ``(C,)`` parameter to broadcast over a
    tensor with ``ndim`` dimensions."""
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = param.shape[-1]
    return param.reshape(shape)


def tensor_range(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of ``x``: scalars, or ``(C,)`` over all dimensions except ``axis``."""
    x = x.detach()
    if axis is None:
        return x.min(), x.max()
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def apply_keeping_float32(
    module: nn.Module,
    apply: Callable[[Callable[[Tensor], Tensor], bool], nn.Module],
    fn: Callable[[Tensor], Tensor],
    recurse: bool,
    names: Iterable[str],
) -> nn.Module:
    """Run ``nn.Module._apply`` but keep the named float32 tensors float32 (moving them only).

    ``model.half()``/``.to(torch.bfloat16)`` would otherwise round every ``Δ``
    to 8–11 mantissa bits, moving grid points by up to a level at 8 bits.
    Values are restored from before the cast, so a round trip is exact;
    parameters keep their identity (``.data`` is swapped), so optimizers
    holding them stay valid.
    """
    before = {}
    for name in names:
        t = module._parameters.get(name, module._buffers.get(name))
        if t is not None and t.dtype == torch.float32:
            before[name] = t.detach()  # holds the old storage even after param.data is swapped
    apply(fn, recurse)
    for name, old in before.items():
        if name in module._parameters:
            param = module._parameters[name]
            if param.dtype != torch.float32:
                param.data = old.to(param.device)
        else:
            buf = module._buffers[name]
            if buf.dtype != torch.float32:
                module._buffers[name] = old.to(buf.device)
    return module
