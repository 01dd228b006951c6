"""Finding device-placement bugs on a machine without a GPU.

On CUDA, a tensor the library creates without ``device=`` lands on the CPU while the model
sits on the GPU, and the first operation that mixes the two fails. On a CPU-only machine
that bug is invisible: everything is on the CPU anyway. :class:`OwnTensorsOn` makes it
visible: every tensor that code under ``gaq/`` or ``baselines/`` creates without naming a
device is created on ``meta`` instead (PyTorch's data-less device), so the first
operation that mixes it with the model's real CPU tensors fails just as CUDA would, and
any value read from it (``.item()``, ``.tolist()``) fails too.

Only this project's own calls are redirected: diffusers, torch and the other libraries
keep their behaviour (a diffusers scheduler keeping its tables on the CPU is diffusers'
business, and its ``step`` moves them). A call that names its device, passes a
``generator`` (whose device decides), or converts an existing tensor is left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import baselines
import gaq

OWN = tuple(str(Path(p.__file__).parent) + "/" for p in (gaq, baselines))
SKIP = (str(Path(torch.__file__).parent) + "/", __file__)


def _caller_is_own() -> bool:
    """Whether the first frame outside torch (and this file) belongs to the project."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(SKIP):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(OWN)


class OwnTensorsOn(TorchFunctionMode):
    """Tensors the project creates without an explicit device go to ``device``."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.constructors = _device_constructors()
        self.redirected = 0  # how many creations were sent to ``device`` (for the self-test)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self.constructors and kwargs.get("device") is None
                and kwargs.get("generator") is None
                and not (args and isinstance(args[0], torch.Tensor))
                and _caller_is_own()):
            kwargs = {**kwargs, "device": self.device}
            self.redirected += 1
        return func(*args, **kwargs)


def misplaced(model: torch.nn.Module) -> list[str]:
    """Every parameter and buffer of ``model`` that is not on its weights' device
    (the device of its first parameter), as ``name (device)``."""
    device = next(model.parameters()).device
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [f"{name} ({t.device})" for name, t in tensors if t.device != device]
