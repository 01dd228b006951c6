"""What names a model's weights: a digest of its state, the part of a benchmark cell's id,
a calibration cache key and a saved state's metadata that tells one model from another with
the same layers."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["state_dict_digest"]


def _update_with_tensors(h: Any, tensors: Mapping[str, Any]) -> None:
    for name in sorted(tensors):
        value = tensors[name]
        h.update(name.encode() + b"\0")
        if isinstance(value, Tensor):
            v = value.detach().cpu().contiguous()
            h.update(f"{v.dtype}:{tuple(v.shape)}\0".encode())
            # Viewing as bytes works for every dtype, bfloat16 included (numpy lacks it).
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # e.g. a module's _extra_state
            h.update(repr(value).encode() + b"\0")


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over a module's state_dict: names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    _update_with_tensors(h, module.state_dict())
    return h.hexdigest()
