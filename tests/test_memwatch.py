"""`gaq.memwatch.PeakMemory` tells memory the process owns from pages of a memory-mapped
file (the reconstruction's disk cache is read that way), which ``ru_maxrss`` mixes."""

from __future__ import annotations

import mmap
import sys
import time

import pytest
import torch

from gaq.memwatch import PeakMemory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="RssAnon/RssFile are Linux's /proc fields")

MB = 2**20


def test_an_allocation_counts_as_anonymous():
    with PeakMemory(interval=0.005) as peak:
        base = peak.peak_anon_mb
        x = torch.ones(200 * MB // 4)  # 200 MB, written, so resident
        time.sleep(0.05)
        del x
    r = peak.result()
    assert r["peak_anon_mb"] - base >= 180
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
