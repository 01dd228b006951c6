"""Block-reconstruction memory at paper size: the driver on a tiny stand-in architecture."""

from __future__ import annotations

import json

import pytest
import torch
from test_paper_cells import _TINY_DIT, _TINY_UNET

from gaq import paper_memory
from gaq.errors import GaqError
from gaq.models.adapters import adapter_for
from gaq.models.loading import load_model
from gaq.perf_paper import ARCHITECTURES


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(ARCHITECTURES, "tiny-unet", _TINY_UNET)
    monkeypatch.setitem(ARCHITECTURES, "tiny-dit", _TINY_DIT)
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_the_chosen_blocks_are_first_largest_first_attention_and_last(tiny):
    pipe = load_model("random:tiny-unet")
    blocks = [b for b in adapter_for(pipe.denoiser).blocks() if b.kind != "temporal"]
    chosen = paper_memory.choose_blocks(pipe.denoiser, blocks)
    names = [b.name for _, b in chosen]
    size = {b.name: sum(p.numel() for p in pipe.denoiser.get_submodule(b.name).parameters())
            for b in blocks}
    assert names[0] == blocks[0].name and names[-1] == blocks[-1].name
    assert max(size, key=size.get) in names
    first_attention = next(b.name for b in blocks if b.kind == "attention")
    assert first_attention in names
    assert names == [b.name for b in blocks if b.name in names]  # forward order, no repeats


@pytest.mark.parametrize("arch", ["tiny-unet", "tiny-dit"])
def test_every_size_measures_every_chosen_block(tiny, tmp_path, arch):
    runs = paper_memory.run(arch, [1, 2], device="cpu", out_dir=tmp_path,
                            measure=lambda a, n: paper_memory.measure_rows(a, n, device="cpu")
                            | {"status": "ok"},
                            log=lambda s: None)
    assert [r["status"] for r in runs] == ["ok", "ok"]
    # two kept steps; the guided DiT records both halves of each
    halves = 2 if ARCHITECTURES[arch].protocol.guidance else 1
    assert [r["rows"] for r in runs] == [2 * halves, 4 * halves]
    for r in runs:
        assert len(r["blocks"]) >= 2
        for b in r["blocks"]:
            assert b["seconds"] > 0 and b["parameters"] > 0 and b["input_mb_per_row"] > 0
            assert b["peak_anon_mb"] >= b["baseline_anon_mb"] > 0
    md = (tmp_path / f"paper_memory_{arch}.md").read_text()
    assert "2 rows" in md or f"{runs[0]['rows']} rows" in md
    saved = json.loads((tmp_path / f"paper_memory_{arch}.json").read_text())
    assert len(saved["runs"]) == 2


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(GaqError, match="unknown architecture"):
        paper_memory.run("nope", [2], device="cpu", out_dir=tmp_path)
    with pytest.raises(GaqError, match="positive"):
        paper_memory.run("ddpm-cifar10", [0], device="cpu", out_dir=tmp_path)
