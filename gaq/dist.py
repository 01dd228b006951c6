"""Data-parallel sampling within a cell, on ``torch.distributed`` as launched by ``torchrun``.

The sampler's global batch layout (:func:`gaq.sampling.batch_ranges`) has fixed
boundaries and image ``i`` depends on ``(seed, i)`` alone, so rank ``r`` of ``W`` samples
the global batches ``r, r+W, r+2W, …`` and rank 0 reassembles them in global order: the
union of images is bit-identical to a single-process run for any world size, and every
metric computed from it on rank 0 equals the single-process value.

Calibration and quantization run on rank 0 only (no method here shards them); rank 0
then hands the quantized denoiser and its sampler hook to the other ranks. Only rank 0
writes results. Any rank's failure is shared by a collective status check, so the cell
fails on every rank instead of leaving the others waiting.

Backends: NCCL where the device is CUDA, gloo on the CPU. Outside ``torchrun`` (no
``WORLD_SIZE``) everything runs in one process and nothing here communicates.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from gaq.errors import DivergedError, GaqError

__all__ = ["World", "init", "world"]

T = TypeVar("T")


class World:
    """This process's place in the job: ``rank`` of ``size`` (1 outside torchrun)."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.size = rank, size
        # collectives of objects travel as byte tensors on this device (NCCL needs CUDA)
        self.device = device or torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, num_batches: int) -> list[int]:
        """The global batch indices this rank samples: ``rank, rank + size, …``."""
        return list(range(self.rank, num_batches, self.size))

    def gather_batches(self, local: Sequence[torch.Tensor], num_batches: int) -> torch.Tensor:
        """Every rank's batches (from :meth:`shard`, in order) as one tensor in global batch
        order, on rank 0 (other ranks get an empty tensor)."""
        if not self.distributed:
            return torch.cat(list(local)) if local else torch.empty(0, device="cpu")
        parts: list[Any] = [None] * self.size
        tdist.all_gather_object(parts, [t.cpu() for t in local])
        if not self.main:
            return torch.empty(0, device="cpu")
        ordered = [parts[b % self.size][b // self.size] for b in range(num_batches)]
        return torch.cat(ordered) if ordered else torch.empty(0, device="cpu")

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0 and its result handed to every rank (e.g. a quantized
        model and its sampler hook); a failure on rank 0 fails every rank."""
        if not self.distributed:
            return make()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", make())
            except BaseException as e:  # shared so the other ranks stop too
                # a diverged cell stays a diverged cell on every rank: all skip to the next
                status = "diverged" if isinstance(e, DivergedError) else "error"
                box[0] = (status, f"{type(e).__name__}: {e}")
                tdist.broadcast_object_list(box, src=0, device=self.device)
                raise
        tdist.broadcast_object_list(box, src=0, device=self.device)
        status, value = box[0]
        if status == "diverged":
            raise DivergedError(f"rank 0: {value}")
        if status != "ok":
            raise GaqError(f"rank 0 failed: {value}")
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        tdist.all_reduce(t)
        return bool(int(t))

    def check(self, ok: bool, what: str) -> None:
        """All ranks agree that ``what`` succeeded everywhere, or all raise."""
        if self.any(not ok) and ok:
            raise GaqError(f"{what} failed on another rank")


_WORLD: World | None = None


def _shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def init(device: torch.device | str) -> World:
    """Join the ``torchrun`` job if there is one (NCCL for CUDA devices, gloo otherwise);
    once per process. Each CUDA rank uses GPU ``LOCAL_RANK``."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if size <= 1:
        _WORLD = World(0, 1, dev)
        return _WORLD
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=_dt.timedelta(minutes=30))
        # Tear the group down before the interpreter does: left to shutdown, the backend's
        # threads can be destroyed while still joinable, which aborts a rank that finished
        # cleanly ("terminate called without an active exception").
        atexit.register(_shutdown)
    _WORLD = World(tdist.get_rank(), tdist.get_world_size(), dev)
    return _WORLD


def world() -> World:
    """The current job (a single process unless :func:`init` joined a torchrun job)."""
    return _WORLD or World()
