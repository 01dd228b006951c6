"""`gaq.memwatch.PeakMemory` tells memory the process owns from pages of a memory-mapped
file (the reconstruction's disk cache is read that way), which ``ru_maxrss`` mixes."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import time

import pytest

from gaq.memwatch import PeakMemory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="RssAnon/RssFile are Linux's /proc fields")

MB = 2**20


@pytest.mark.slow
def test_an_allocation_counts_as_anonymous():
    # in a fresh process, as gaq perf measures: a long test session's allocator already
    # holds freed memory that a new tensor reuses without raising RssAnon
    code = (
        "import json, time, torch\n"
        "from gaq.memwatch import PeakMemory\n"
        "with PeakMemory(interval=0.005) as peak:\n"
        "    base = peak.peak_anon_mb\n"
        "    x = torch.ones(200 * 2**20 // 4)\n"
        "    time.sleep(0.05)\n"
        "    del x\n"
        "print(json.dumps({'base': base, **peak.result()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak_anon_mb"] - r["base"] >= 180
    assert r["peak_rss_sampled_mb"] >= r["peak_anon_mb"]


def test_pages_of_a_mapped_file_are_resident_but_not_anonymous(tmp_path):
    path = tmp_path / "cache.bin"
    with open(path, "wb") as f:
        f.truncate(200 * MB)
    with open(path, "rb") as f, PeakMemory(interval=0.005) as peak:
        anon0, rss0 = peak.peak_anon_mb, peak.peak_rss_sampled_mb
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        total = sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))  # touch every page
        time.sleep(0.05)
        peak._sample()
        m.close()
    assert total == 0
    assert peak.peak_rss_sampled_mb - rss0 >= 150
    assert peak.peak_anon_mb - anon0 < 50


@pytest.mark.slow
def test_bounded_heap_returns_freed_transients():
    # in a fresh process: transients of a few MB freed while small tensors stay live
    # between them (a layer's fake-quantized weight, then its tiny step size) stay
    # resident under glibc's sliding threshold; bound_heap gives them back
    code = (
        "import json, torch\n"
        "from gaq.memwatch import _status_mb, bound_heap\n"
        "applied = bound_heap()\n"
        "base = _status_mb()['RssAnon']\n"
        "keep = []\n"
        "for i in range(200):\n"
        "    big = torch.ones((4 + i % 8) * 2**20 // 4)\n"
        "    keep.append(big[:16].clone())\n"
        "    del big\n"
        "print(json.dumps({'applied': applied, 'rise': _status_mb()['RssAnon'] - base}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"]
    assert r["rise"] < 64  # MB: not the ~1.5 GB of transients allocated
