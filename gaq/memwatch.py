"""Peak memory of this process, split into what it owns and what the page cache lends it.

``ru_maxrss`` counts every resident page, including pages of memory-mapped files: the
reconstruction's disk cache is read memory-mapped, so a calibration that touches a large
cache shows a large peak RSS that the kernel can drop at any time. What grows without
bound when a pipeline holds its calibration data in RAM (Q-Diffusion's users report
~300 GB for LSUN) is *anonymous* memory, so that is the figure a bound is judged on.
Linux reports both (``RssAnon``, ``RssFile`` in ``/proc/self/status``), as current values
only; :class:`PeakMemory` samples them on a thread and keeps the maxima.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def _status_mb() -> dict[str, float]:
    """Current ``RssAnon``/``RssFile``/``RssShmem`` in MB (empty off Linux)."""
    if not _STATUS.exists():
        return {}
    out = {}
    for line in _STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


def _anon(status: dict[str, float]) -> float:
    return status["RssAnon"] + status.get("RssShmem", 0.0)


def anon_mb() -> float | None:
    """This process's anonymous memory now, in MB (None off Linux)."""
    s = _status_mb()
    return _anon(s) if s else None


class PeakMemory:
    """``with PeakMemory(interval=0.02) as peak: ...`` then ``peak.result()``: the peak
    anonymous memory (sampled), the peak of anonymous + file-backed pages (sampled), and
    the kernel's exact peak RSS (``ru_maxrss``, since process start). Sampling can miss a
    spike shorter than ``interval``; the kernel's figure misses nothing but mixes the two."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_anon_mb = 0.0
        self.peak_rss_sampled_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        s = _status_mb()
        if s:
            anon = _anon(s)
            self.peak_anon_mb = max(self.peak_anon_mb, anon)
            self.peak_rss_sampled_mb = max(self.peak_rss_sampled_mb, anon + s["RssFile"])

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict[str, float | None]:
        linux = _STATUS.exists()
        return {"peak_anon_mb": self.peak_anon_mb if linux else None,
                "peak_rss_sampled_mb": self.peak_rss_sampled_mb if linux else None,
                # Linux reports ru_maxrss in kB
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: allocations of at least this many bytes get their own mapping, returned to the kernel
#: on free
HEAP_MMAP_THRESHOLD = 1 << 20

_heap_bounded = False


def bound_heap(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Make freed tensor memory go back to the kernel (glibc only; True when applied).

    torch's CPU tensors come from ``malloc``. glibc serves a large block from its own
    mapping, returned on ``free``, but raises that threshold to the size of every mapped
    block freed (up to 32 MB), after which blocks up to that size come from the heap,
    where a freed block stays resident while anything above it is still live. A pass
    that allocates and frees tens of MB per layer (fake-quantized weights, observer
    searches, activations) then leaves the heap at the sum of its transients: on the
    LDM-4 LSUN architecture RTN's quantize phase held 4.4 GB of freed memory beside
    3.9 GB of live tensors (2.9 GB in all with this). A fixed threshold turns the sliding one off,
    so every block of ``threshold`` bytes or more is mapped and unmapped on its own, and
    the heap is trimmed once ``threshold`` bytes are free at its top. Process-wide and
    idempotent; results do not change (where memory lies, not what it holds)."""
    global _heap_bounded
    if _heap_bounded:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to set
        return False
    _heap_bounded = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold))
    return _heap_bounded


def device_mb(cuda: bool) -> float:
    """What tensors occupy now, in MB: allocated device memory on a GPU, else this
    process's anonymous memory."""
    import torch

    return torch.cuda.memory_allocated() / 2**20 if cuda else anon_mb() or 0.0


def measure_steps(names: Sequence[tuple[str, float | None]], steps: Sequence[Callable[[], Any]],
                  cuda: bool) -> tuple[float, list[dict[str, Any]]]:
    """Run ``steps`` in order: the reading before the first (MB), and per step (named by
    ``names``: the step and what the design holds after it, in whatever unit the caller
    uses) its peak during it (``max_memory_allocated`` on a GPU, else sampled anonymous
    memory, never below the readings around it), what is held after it, and its time."""
    import time

    import torch

    base = device_mb(cuda)
    stages: list[dict[str, Any]] = []
    for (name, holds), fn in zip(names, steps, strict=True):
        before = device_mb(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with PeakMemory() as peak:
            fn()
        seconds = time.perf_counter() - start
        after = device_mb(cuda)
        top = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else peak.result()["peak_anon_mb"] or 0.0)
        stages.append({"stage": name, "before_mb": before, "after_mb": after,
                       "peak_mb": max(top, before, after), "design_holds_copies": holds,
                       "seconds": seconds})
    return base, stages

