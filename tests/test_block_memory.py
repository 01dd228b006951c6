"""One block's AdaRound memory, item by item: the saved-tensor counter on cases whose
saved tensors are known, and the driver on a tiny stand-in architecture."""

from __future__ import annotations

import json

import pytest
import torch
from test_paper_cells import _TINY_UNET

from gaq import block_memory
from gaq.errors import GaqError
from gaq.perf_paper import ARCHITECTURES


def test_the_counter_sees_what_autograd_saves_once_per_storage():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(5, 7)
    shapes = {(64, 32)}
    # sigmoid's backward reads its output: one weight-shaped tensor
    _, got = block_memory.saved_for_backward(lambda: torch.sigmoid(w).sum(), shapes)
    assert got["weight_tensors"] == 1
    assert got["weight_mb"] == pytest.approx(w.numel() * 4 / 2**20)
    assert got["other_mb"] == 0
    # scaling by a number saves nothing
    _, got = block_memory.saved_for_backward(lambda: (w * 3.0).sum(), shapes)
    assert got == {"weight_mb": 0.0, "weight_tensors": 0, "other_mb": 0.0}

    # s·s saves s twice: one storage, counted once; exp of another shape is "other"
    def two() -> torch.Tensor:
        s = torch.sigmoid(w)
        return (s * s).sum() + torch.exp(x * w[0, 0]).sum()

    _, got = block_memory.saved_for_backward(two, shapes)
    assert got["weight_tensors"] == 1
    assert got["other_mb"] >= x.numel() * 4 / 2**20


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(ARCHITECTURES, "tiny-unet", _TINY_UNET)
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_every_stage_is_measured_and_the_report_round_trips(tiny, tmp_path):
    row = block_memory.run("tiny-unet", device="cpu", out_dir=tmp_path,
                           measure=lambda a: block_memory.itemise(a, device="cpu"))
    keep, loop = row["variants"]
    assert (keep["recompute"], loop["recompute"]) == (False, True)
    for v in (keep, loop):
        names = [s["stage"] for s in v["stages"]]
        assert names[0].startswith("rounding variables") and names[-1].startswith("freeze")
        assert len(names) == 6 and all(s["after_mb"] > 0 for s in v["stages"])
    # every quantized layer but the block's first sees an input that depends on V, so
    # its soft weight is saved for the input gradient, whether recomputed or not
    assert loop["saved"]["weight_tensors"] >= row["layers"] - 1 > 0
    # keeping every intermediate saves several weight-shaped tensors per layer more
    assert keep["saved"]["weight_tensors"] >= loop["saved"]["weight_tensors"] + 3 * row["layers"]
    assert row["weight_mb"] > 0 and row["parameters"] > 0
    # GAQ's stage: every step measured, in order (a tiny block's copies are within the
    # allocator's noise, so only the paper-size report reads them)
    meta = row["meta"]
    assert [s["stage"] for s in meta["stages"]][-1] == "the view released"
    assert meta["timesteps"] >= 1 and meta["diagnostic_rows"] >= meta["rows"] > 0
    assert all(s["after_mb"] > 0 and s["seconds"] >= 0 for s in meta["stages"])
    saved = json.loads((tmp_path / "block_memory_tiny-unet.json").read_text())
    assert saved["block"] == row["block"] and len(saved["variants"]) == 2
    md = (tmp_path / "block_memory_tiny-unet.md").read_text()
    assert row["block"] in md and "weight-shaped tensors" in md and "GAQ's stage" in md


def test_a_named_block_must_exist_and_unknown_architectures_fail_first(tiny, tmp_path):
    with pytest.raises(GaqError, match="unknown architecture"):
        block_memory.run("nope", device="cpu", out_dir=tmp_path)
    with pytest.raises(GaqError, match="not a block"):
        block_memory.itemise("tiny-unet", device="cpu", block="no.such.block")
    assert not list(tmp_path.glob("block_memory_*"))
