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

import resource
import threading
from pathlib import Path

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
            anon = s["RssAnon"] + s.get("RssShmem", 0.0)
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
