"""Checking a requested device before any work: one clear line instead of a torch traceback
after minutes of calibration."""

from __future__ import annotations

import torch

from gaq.errors import GaqError

__all__ = ["check_device"]


def check_device(device: str | torch.device, where: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine; ``where`` names
    the flag or key it came from."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GaqError(f"{where}: {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GaqError(f"{where}: {device!r} needs a CUDA GPU and none is available here; "
                           "use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GaqError(f"{where}: {device!r} does not exist; this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise GaqError(f"{where}: device type {dev.type!r} is not supported; use cpu or cuda")
    return dev
