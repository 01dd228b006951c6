"""`gaq perf` sections: re-measuring some keeps the others, and every figure says when it
was measured. The measurements themselves are replaced by cheap stand-ins (speed figures
are benchmarks, never timed tests)."""

from __future__ import annotations

import json

import pytest

from gaq import perf
from gaq.errors import GaqError

SAMPLING = [{"model": "digits", "bits": "W4A8", "images": 8, "steps": 2, "batch_size": 4,
             "fp_seconds": 1.0, "quant_seconds": 1.2, "ratio": 1.2, "ratio_min": 1.1,
             "ratio_max": 1.3, "repeats": 3, "backend": "fake-quant, PyTorch CPU",
             "threads": 1}]
MEMORY = {"method": "brecq", "preset": "cpu", "bits": "W4A8", "calibration_rows": 64,
          "peak_rss_mb": 900.0}


@pytest.fixture
def fake_sections(monkeypatch):
    calls: list[str] = []

    def measure(name, value):
        def run():
            calls.append(name)
            return value
        return run

    monkeypatch.setattr(perf, "SECTIONS", {
        "sampling": measure("sampling", SAMPLING),
        "calibration_memory": measure("calibration_memory", MEMORY),
        "memory_scaling": measure("memory_scaling", []),
        "gaq_overhead": measure("gaq_overhead", None),
    })
    return calls


def test_only_remeasures_the_named_section_and_keeps_the_rest(tmp_path, fake_sections):
    earlier = {"gaq_overhead": {"bits": "W4A8", "preset": "cpu", "calibration_rows": 320,
                                "uniform_seconds": 52.0, "gaq_seconds": 63.0,
                                "meta_seconds": 13.0, "ratio": 1.21, "ratio_min": 1.16,
                                "ratio_max": 1.26, "repeats": 2, "threads": 2},
               "stamps": {"gaq_overhead": {"measured": "2026-11-25", "git_commit": "abc",
                                           "cpu": "x86_64", "cores": 2, "torch": "2",
                                           "threads": 2}}}
    (tmp_path / "perf.json").write_text(json.dumps(earlier))
    report = perf.run(tmp_path, ["sampling"])
    assert fake_sections == ["sampling"]
    stored = json.loads((tmp_path / "perf.json").read_text())
    assert stored == report
    assert stored["gaq_overhead"] == earlier["gaq_overhead"]
    assert stored["stamps"]["gaq_overhead"] == earlier["stamps"]["gaq_overhead"]
    assert stored["sampling"] == SAMPLING and "measured" in stored["stamps"]["sampling"]
    assert not (tmp_path / "perf.partial.json").exists()
    md = (tmp_path / "perf.md").read_text()
    assert "1.20x" in md and "1.21x" in md and "2026-11-25, 2 cores, 2 threads" in md
    # the two sections never measured are named, with the command that measures them
    assert "`gaq perf --only calibration_memory,memory_scaling`" in md


def test_unknown_section_is_refused_before_anything_runs(tmp_path, fake_sections):
    with pytest.raises(GaqError, match="did you mean 'sampling'"):
        perf.run(tmp_path, ["samplng"])
    assert fake_sections == [] and not (tmp_path / "perf.json").exists()
