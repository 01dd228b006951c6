"""The attention-memory benchmark: whole and sliced give the same output up to a
quantization step, the slicing is taken, and the report round-trips (a tiny layer stands
in for SD's)."""

from __future__ import annotations

import json

import pytest
import torch

import gaq.attention_memory as attention_memory
import gaq.quant.attention as quant_attention


@pytest.fixture
def tiny_layer(monkeypatch):
    monkeypatch.setitem(attention_memory.LAYER, "query_dim", 16)
    monkeypatch.setitem(attention_memory.LAYER, "heads", 2)
    monkeypatch.setitem(attention_memory.LAYER, "dim_head", 8)
    monkeypatch.setitem(attention_memory.LAYER, "tokens", 64)
    torch.set_num_threads(1)


def test_whole_and_sliced_agree_and_the_report_round_trips(tiny_layer, monkeypatch, tmp_path):
    calls = []
    original = quant_attention.QuantAttnProcessor._attend

    def counted(self, attn, query, key, value, mask):
        calls.append(self._slices(query, key))
        return original(self, attn, query, key, value, mask)

    monkeypatch.setattr(quant_attention.QuantAttnProcessor, "_attend", counted)
    monkeypatch.setattr(quant_attention, "CHUNK_ELEMENTS", 2 * 64 * 4)  # 4 query rows at batch 1
    rows = [attention_memory.measure(1, "cpu")]
    assert calls == [64, 64, 4, 4]  # whole (observe, quantize), then sliced
    assert quant_attention.CHUNK_ELEMENTS == 2 * 64 * 4  # untouched: set per processor
    rows.append(attention_memory.measure(2, "cpu"))
    for r in rows:
        assert r["max_rel_difference"] <= 2e-2  # at most a few probabilities a step apart
        assert r["whole"]["quantize"]["seconds"] >= 0 and "peak_mb" in r["sliced"]["observe"]
    attention_memory.write_report(rows, tmp_path, "cpu", 1)
    saved = json.loads((tmp_path / "attention_memory.json").read_text())
    assert len(saved["rows"]) == 2 and saved["layer"]["tokens"] == 64
    md = (tmp_path / "attention_memory.md").read_text()
    assert "| 1 |" in md and "| 2 |" in md


def test_the_command_refuses_bad_batch_sizes_before_measuring(tmp_path, capsys):
    from gaq.cli import main

    for bad in ("0", "2,x"):
        assert main(["perf", "--attention-memory", bad, "--out", str(tmp_path)]) == 2
        assert "--attention-memory" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
