"""The quantized attention's memory at Stable Diffusion's largest self-attention.

``gaq perf --attention-memory`` builds one attention layer of SD v1.4's first down block
(320 channels, 8 heads of 40, the 64×64 latent's 4,096 tokens), gives it the quantized
processor (q, k, v and the softmax output at 8 bits) and runs it while the quantizers
observe their ranges and then while they quantize, at several batch sizes, once with the
probabilities taken whole and once in query slices
(:attr:`gaq.quant.attention.QuantAttnProcessor.chunk_elements`). It reads the peak memory
above the start (:func:`gaq.memwatch.measure_steps`) and how far apart the two outputs
are. Each batch size runs in a fresh process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["measure", "run", "write_report"]

#: SD v1.4's first down block: 320 channels, 8 heads, 64×64 latent
LAYER = {"query_dim": 320, "heads": 8, "dim_head": 40, "tokens": 64 * 64}


def _one(batch: int, sliced: bool, device: str) -> tuple[dict[str, Any], torch.Tensor]:
    """One layer at ``batch`` rows, observe then quantize: peaks above the start, times
    and the output."""
    from diffusers.models.attention_processor import Attention

    from gaq.memwatch import measure_steps
    from gaq.quant.attention import QuantAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=LAYER["query_dim"], heads=LAYER["heads"],
                     dim_head=LAYER["dim_head"]).eval().to(device)
    processor = QuantAttnProcessor.build(bits=8, softmax_bits=8, device=device)
    if not sliced:
        processor.chunk_elements = None
    attn.set_processor(processor)
    x = torch.randn(batch, LAYER["tokens"], LAYER["query_dim"], device=device)
    held: dict[str, torch.Tensor] = {}

    def forward(observe: bool) -> None:
        for _, q in processor.quantizers():
            q.observe(observe)
        with torch.no_grad():
            held["y"] = attn(x)
        if observe:
            for _, q in processor.quantizers():
                q.finalize()

    base, stages = measure_steps((("observe", None), ("quantize", None)),
                                 (lambda: forward(True), lambda: forward(False)),
                                 torch.device(device).type == "cuda")
    out = {s["stage"]: {"peak_mb": s["peak_mb"] - base, "seconds": s["seconds"]}
           for s in stages}
    return out, held["y"].cpu()


def measure(batch: int, device: str) -> dict[str, Any]:
    """Whole, then sliced, in this process (large blocks go back to the system when freed:
    :func:`gaq.memwatch.bound_heap`), and how far apart their outputs are: the largest
    difference over the largest output (the quantizer can round a probability one step
    differently when a slice's matrix product differs in the last bit)."""
    whole, y_whole = _one(batch, False, device)
    sliced, y_sliced = _one(batch, True, device)
    diff = float((y_whole - y_sliced).abs().max() / y_whole.abs().max().clamp_min(1e-30))
    return {"batch": batch, "whole": whole, "sliced": sliced, "max_rel_difference": diff}


def run(batches: tuple[int, ...], *, device: str, out_dir: str | Path,
        threads: int | None = None) -> list[dict[str, Any]]:
    """:func:`measure` for every batch, each in a fresh process."""
    from gaq.errors import GaqError
    from gaq.paper_cells import child_json

    threads = threads or torch.get_num_threads()
    rows = []
    for batch in batches:
        row, error = child_json("from gaq.attention_memory import measure",
                                f"measure({batch}, {device!r})", threads)
        if row is None:
            raise GaqError(f"--attention-memory at batch {batch} failed: {error}")
        rows.append(row)
    write_report(rows, out_dir, device, threads)
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, device: str,
                 threads: int) -> list[Path]:
    from gaq.quant.attention import CHUNK_ELEMENTS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "attention_memory.json"
    js.write_text(json.dumps({"device": device, "layer": LAYER, "threads": threads,
                              "chunk_elements": CHUNK_ELEMENTS, "rows": rows}, indent=1) + "\n")
    probs_mb = LAYER["heads"] * LAYER["tokens"] ** 2 * 4 / 2**20
    lines = ["# Quantized attention at Stable Diffusion's 64×64 latent", "",
             f"Device: {device}, {threads} threads. One self-attention layer of SD v1.4's first "
             f"down block ({LAYER['query_dim']} channels, {LAYER['heads']} heads of "
             f"{LAYER['dim_head']}, {LAYER['tokens']} tokens) with q, k, v and the softmax "
             "output fake-quantized at 8 bits. The softmax output has no fused kernel, so it "
             f"is materialised: {probs_mb:.0f} MB per batch row in float32. Peak "
             "memory above the start (anonymous memory of the process, sampled; "
             "`max_memory_allocated` on a GPU), MB, and seconds, while the quantizers observe "
             "their ranges and while they quantize; whole: the probabilities in one piece; "
             f"sliced: query slices of at most {CHUNK_ELEMENTS:,} elements "
             "(`gaq/quant/attention.py`); the largest difference of the two outputs over the "
             "largest output (a probability rounded one step the other way where a slice's "
             "product differs in the last bit).", "",
             "| batch rows | whole: observe | sliced: observe | whole: quantize | "
             "sliced: quantize | output difference |", "|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["batch"]):
        cells = [f"{r[way][phase]['peak_mb']:,.0f} MB / {r[way][phase]['seconds']:.1f} s"
                 for phase in ("observe", "quantize") for way in ("whole", "sliced")]
        lines.append(f"| {r['batch']} | " + " | ".join(cells)
                     + f" | {r['max_rel_difference']:.1e} |")
    md = out / "attention_memory.md"
    md.write_text("\n".join(lines) + "\n")
    return [js, md]
