"""Paper-size cells, phase by phase: the driver on tiny stand-ins of the architecture
table (one pixel UNet, one guided DiT), refusals before work, resume, the report."""

from __future__ import annotations

import json

import pytest
import torch
from test_perf_paper import _TINY_CONDITIONAL

from gaq import paper_cells
from gaq.errors import GaqError
from gaq.perf_paper import ARCHITECTURES, Architecture, Protocol

_TINY_DIT = _TINY_CONDITIONAL["class"]  # one tiny guided DiT for both files

_TINY_UNET = Architecture(
    description="tiny pixel UNet",
    unet={"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
          "block_out_channels": (8, 16), "norm_num_groups": 4,
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
          "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 4},
    protocol=Protocol("test", steps=10, images=100, calibration_rows=40, trajectories=8),
)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "tiny-dit", _TINY_DIT)
    monkeypatch.setitem(ARCHITECTURES, "tiny-unet", _TINY_UNET)
    calls = []

    def in_process(arch, method, budget, device, cache_dir, threads):
        calls.append((arch, method))
        return paper_cells.run_cell(arch, method, budget, device, cache_dir)

    # a child process would not see the monkeypatched architectures
    monkeypatch.setattr(paper_cells, "_in_child", in_process)
    return calls


@pytest.mark.slow
def test_every_phase_runs_and_is_measured(tiny, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    rows = paper_cells.run_cells(["tiny-unet", "tiny-dit"], ["rtn", "htg", "ptqd"],
                                 device="cpu", out_dir=tmp_path / "out",
                                 cache_dir=tmp_path / "calib", log=lambda s: None)
    by = {(r["arch"], r["method"]): r for r in rows}
    # HTG is defined for DiT only: refused on the UNet before any work, run on the DiT
    assert by[("tiny-unet", "htg")]["status"] == "refused"
    assert "DiT" in by[("tiny-unet", "htg")]["error"]
    assert ("tiny-unet", "htg") not in tiny
    for key in [("tiny-unet", "rtn"), ("tiny-unet", "ptqd"), ("tiny-dit", "rtn"),
                ("tiny-dit", "htg"), ("tiny-dit", "ptqd")]:
        r = by[key]
        assert r["status"] == "ok", r
        assert set(r["phases"]) == set(paper_cells.PHASES)
        assert all(p["seconds"] > 0 and p["peak_rss_mb"] > 0 for p in r["phases"].values())
        assert r["cache_mb"] > 0 and r["calibration_rows"] > 0
    # guided: both halves of every kept step (2 trajectories x 2 timesteps x 2 halves)
    assert by[("tiny-dit", "rtn")]["calibration_rows"] == 8
    assert by[("tiny-unet", "rtn")]["calibration_rows"] == 4
    md = (tmp_path / "out" / "paper_cells.md").read_text()
    assert "| tiny-dit | htg | ok |" in md and "| tiny-unet | htg | refused:" in md

    # a second run keeps the finished cells and runs nothing again
    tiny.clear()
    again = paper_cells.run_cells(["tiny-unet", "tiny-dit"], ["rtn", "htg", "ptqd"],
                                  device="cpu", out_dir=tmp_path / "out",
                                  cache_dir=tmp_path / "calib", log=lambda s: None)
    assert tiny == [] and len(again) == len(rows)
    saved = json.loads((tmp_path / "out" / "paper_cells.json").read_text())
    assert len(saved["cells"]) == 6


def test_bad_names_fail_before_any_cell(tiny, tmp_path):
    with pytest.raises(GaqError, match="unknown architecture"):
        paper_cells.run_cells(["tiny-unet", "nope"], ["rtn"], device="cpu",
                              out_dir=tmp_path, log=lambda s: None)
    with pytest.raises(GaqError, match="unknown method"):
        paper_cells.run_cells(["tiny-unet"], ["rtn", "brecqq"], device="cpu",
                              out_dir=tmp_path, log=lambda s: None)
    assert tiny == [] and not (tmp_path / "paper_cells.json").exists()
