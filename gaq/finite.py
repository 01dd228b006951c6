"""Non-finite values named where they enter: a model's weights, a calibration set, a
quantized model after calibration. A NaN that reaches sampling gives black images with
exit code 0, and one that reaches the range observers gives a message about zero points;
these checks say instead which tensor holds it and what to do."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from gaq.errors import GaqError


def first_non_finite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or ±inf, or None."""
    for name, value in tensors:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def require_finite_module(module: nn.Module, what: str, fix: str,
                          error: type[GaqError] = GaqError) -> None:
    """Raise one ``error`` if any parameter or buffer of ``module`` is non-finite (a
    :class:`DivergedError` where the values were computed, not loaded)."""
    bad = first_non_finite(list(module.named_parameters()) + list(module.named_buffers()))
    if bad is not None:
        raise error(f"{what}: tensor {bad} holds NaN or infinite values; {fix}")


def require_finite_tensors(tensors: dict[str, Tensor], what: str, fix: str) -> None:
    """Raise one :class:`GaqError` if any of the named tensors is non-finite."""
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise GaqError(f"{what}: {bad} holds NaN or infinite values; {fix}")
