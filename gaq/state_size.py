"""Quantization state sizes, format 1 against the compact format 2, for every method on the
bundled models: ``python -m gaq.state_size`` writes ``results/perf/state_size.md`` (and
its figures as ``state_size.json``).

Format 1 stored every quantized weight in full precision; format 2 stores integer codes
packed at their bit-width with a scale and zero point per channel, so a state is about
``bits/32`` of the quantized weights plus the activation tables. Each method runs with
the smallest budgets that still run its every stage: sizes depend on the layers, the
bit-widths and the tables, not on how long a method learned.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

FAMILIES = ("digits", "digits-ldm", "digits-dit")

# every registered method with the smallest budgets that still run each of its stages
_GRID = """
models = ["digits"]
bits = ["W4A8"]
methods = "all"

[method_overrides.recon]
weight_iters = 2
act_iters = 1
batch_size = 4
capture_batch = 4
cache = "memory"

[method_overrides.meta]
iters = 1

[benchmark]
name = "smallest"
"""


def smallest_budget_entries() -> dict:
    """Every registered method's benchmark entry (``cpu`` preset) with the smallest
    budgets that still run each of its stages, by name: what the state-size report and
    the whole-grid tests quantize with."""
    from gaq.bench.spec import load_benchmark
    from gaq.tempdirs import temp_dir

    with temp_dir("grid") as root:
        (root / "grid.toml").write_text(_GRID)
        return {e.name: e for e in load_benchmark(root / "grid.toml").methods
                if e.name != "fp"}


def _bytes(folder: Path, name: str) -> int:
    return (folder / name).stat().st_size


def measure(families: tuple[str, ...] = FAMILIES, bits: str = "W4A8") -> list[dict]:
    """One row per method and model: bytes of ``state.safetensors`` in format 1 and in
    format 2, what format 2 spends on weight codes, how many weights fell back to full
    precision (and why), and preflight's bound for the cell."""
    from safetensors.torch import load_file, save_file

    from gaq.calibration import CalibrationSpec, record_calibration
    from gaq.cell import save_quantized, state_size_bound
    from gaq.config import QuantConfig
    from gaq.models.adapters import adapter_for
    from gaq.models.loading import load_model
    from gaq.quantize import _state_tensors, quant_layers, state_weight_storage
    from gaq.registry import get_method

    quant = QuantConfig.from_bits(bits)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gaq-state-size-") as tmp:
        root = Path(tmp)
        entries = list(smallest_budget_entries().values())
        for family in families:
            pipe = load_model(family)
            adapter = adapter_for(pipe.denoiser)
            guidance = None if family == "digits" else 3.0
            spec = CalibrationSpec(steps=4, interval=2, samples_per_step=2,
                                   holdout_per_step=1, guidance=guidance,
                                   act_every_step=True)
            calib = record_calibration(pipe, spec, cache=False)
            for entry in sorted(entries, key=lambda e: e.name):
                cls = get_method(entry.name)
                if cls.unsupported(adapter.arch):
                    continue
                method = cls(entry.config())
                result = method.quantize(pipe.denoiser, adapter, calib, quant)
                new = save_quantized(result, root / f"{family}-{entry.name}", pipe)
                old = root / f"{family}-{entry.name}-format1.safetensors"
                save_file(_state_tensors(result.model), str(old))
                tensors = load_file(str(new / "state.safetensors"))
                storage = state_weight_storage(new)
                full = {n: e["reason"] for n, e in storage.items() if e["stored"] == "full"}
                weights = [lay.frozen_weight for _, lay in quant_layers(result.model)]
                rows.append({
                    "model": family, "method": entry.name, "bits": bits,
                    "layers": len(weights),
                    "weight_params": sum(w.numel() for w in weights),
                    "weight_fp32_bytes": sum(w.numel() * 4 for w in weights),
                    "format1_bytes": old.stat().st_size,
                    "format2_bytes": _bytes(new, "state.safetensors"),
                    "codes_bytes": sum(t.numel() for k, t in tensors.items()
                                       if k.endswith(".codes")),
                    "json_bytes": _bytes(new, "state.json"),
                    "bound_bytes": state_size_bound(pipe, method, quant),
                    "full_precision_layers": full,
                })
    return rows


def paper_bounds(bits: str = "W4A8") -> list[dict]:
    """Preflight's per-cell state estimate at the papers' sizes, from parameter counts and
    bit-widths alone (each architecture built on the ``meta`` device: no weights are
    allocated), against what it was before format 2: the denoiser's own bytes. Each
    method with its ``paper`` preset where it has one."""
    from gaq.cell import state_size_bound
    from gaq.config import QuantConfig
    from gaq.models.adapters import adapter_for
    from gaq.perf_paper import ARCHITECTURES, build_pipeline
    from gaq.registry import get_method, list_methods

    quant = QuantConfig.from_bits(bits)
    rows = []
    for name in ARCHITECTURES:
        pipe = build_pipeline(name, "meta")
        arch = adapter_for(pipe.denoiser).arch
        params = sum(p.numel() for p in pipe.denoiser.parameters())
        bounds = {}
        for method in sorted(list_methods()):
            cls = get_method(method)
            if cls.unsupported(arch):
                continue
            instance = cls.from_preset("paper") if "paper" in cls.presets else cls(cls.Config())
            bounds[method] = state_size_bound(pipe, instance, quant)
        rows.append({"architecture": name, "bits": bits, "params": params,
                     "fp32_bytes": sum(p.numel() * p.element_size()
                                       for p in pipe.denoiser.parameters()),
                     "bounds": bounds})
    return rows


def render(rows: list[dict], paper: list[dict] | None = None) -> str:
    """``state_size.md``: one row per model and method; then, with ``paper``, preflight's
    estimate at the papers' sizes."""
    md = ["# Quantization state size per cell: format 1 against format 2", "",
          "Bytes of `state.safetensors` of one benchmark cell (`gaq quantize --out`), format "
          "1 (every quantized weight in full precision) against format 2 (integer codes "
          "packed at their bit-width, a scale and zero point per channel; activation "
          "tables and method tensors unchanged). *codes*: format 2's packed weight codes; "
          "*codes / FP32*: against the same weights in float32 (bits/32 expected). "
          "*bound*: preflight's disk estimate for the cell (`state.safetensors` and "
          "`state.json`). Generated by `python -m gaq.state_size`.", "",
          "| model | method | bits | quantized layers | weights | format 1 | format 2 | "
          "format 2 / format 1 | codes | codes / FP32 | state.json | bound | "
          "full-precision layers |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        full = r["full_precision_layers"]
        md.append(
            f"| {r['model']} | {r['method']} | {r['bits']} | {r['layers']} | "
            f"{r['weight_params']:,} | {r['format1_bytes']:,} | {r['format2_bytes']:,} | "
            f"{r['format2_bytes'] / r['format1_bytes']:.3f} | {r['codes_bytes']:,} | "
            f"{r['codes_bytes'] / r['weight_fp32_bytes']:.3f} | {r['json_bytes']:,} | "
            f"{r['bound_bytes']:,} | "
            f"{'; '.join(f'{n}: {why}' for n, why in full.items()) if full else 'none'} |")
    if paper:
        mb = 2**20
        md += ["", "## Preflight's state estimate per cell at the papers' sizes", "",
               "Random-weight architectures of `gaq perf --paper-scale` (built on the meta "
               "device: nothing is allocated), each method with its `paper` preset. "
               "*before*: the estimate of format 1, the denoiser's bytes; *format 2*: "
               "`gaq.cell.state_size_bound` (codes at their bit-width, a scale and zero point "
               "per channel, every activation quantizer as a 1000-row table, state.json), "
               "smallest and largest over the methods.", "",
               "| architecture | bits | parameters | before (MB) | format 2, least (MB) | "
               "format 2, most (MB) | most / before |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for r in paper:
            low = min(r["bounds"], key=r["bounds"].__getitem__)
            high = max(r["bounds"], key=r["bounds"].__getitem__)
            md.append(f"| {r['architecture']} | {r['bits']} | {r['params']:,} | "
                      f"{r['fp32_bytes'] / mb:,.0f} | {r['bounds'][low] / mb:,.0f} ({low}) | "
                      f"{r['bounds'][high] / mb:,.0f} ({high}) | "
                      f"{r['bounds'][high] / r['fp32_bytes']:.3f} |")
    return "\n".join(md) + "\n"


def write(out_dir: str | Path = "results/perf", families: tuple[str, ...] = FAMILIES,
          bits: str = "W4A8") -> list[dict]:
    """Measure and write ``state_size.md`` and ``state_size.json`` under ``out_dir``."""
    rows = measure(families, bits)
    paper = paper_bounds(bits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "state_size.json").write_text(json.dumps({"cells": rows, "paper": paper},
                                                    indent=1) + "\n")
    (out / "state_size.md").write_text(render(rows, paper))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    write()
