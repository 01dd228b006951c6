"""``gaq gpu-check``: every measurement this suite needs a GPU for, in one command.

Five sections and one on request, in this order (cheapest first, so a short lease still
brings something back), each written to ``results/gpu/`` as soon as it finishes:

``overhead``
    sampling time of the fake-quantized (RTN W4A8, frozen weights) against the FP bundled
    ``digits`` model on the GPU, paired runs at batch 32, 128 and 512
    (``sampling_overhead.md``);
``paper-scale``
    calibration time and ``max_memory_allocated`` of RTN, BRECQ, TFMQ-DM and GAQ on the
    CIFAR-10 DDPM architecture (35.7 M parameters, random weights), with the projection
    of the paper protocol (``paper_scale_ddpm-cifar10.md``; ``gaq/perf_paper.py``);
``block-memory``
    one block's AdaRound on the LDM-4 LSUN architecture (274 M, random weights), stage by
    stage in weight-sized copies of ``max_memory_allocated``, autograd keeping every
    intermediate against the loop's recomputation, then GAQ's stage on the same block
    (``block_memory_ldm4-lsun.md``; ``gaq/block_memory.py``);
``attention-memory``
    the quantized attention at Stable Diffusion's 64×64 latent, probabilities whole
    against query slices, at batch 2, 4 and 8 (``attention_memory.md``;
    ``gaq/attention_memory.py``);
``smoke``
    ``benchmarks/gpu-smoke.toml``: every registered method on the three bundled families
    end to end on CUDA (runs under ``runs/gpu-smoke``; a per-cell summary in
    ``smoke.md``);
``paper-cells`` (only when asked for with ``--only``: about an hour)
    RTN, BRECQ, TFMQ-DM, GAQ, PTQD and HTG end to end on the LDM-4 ImageNet, DiT-XL/2 and
    Stable Diffusion architectures with the ``gpu`` budget profile, time and
    ``max_memory_allocated`` per phase (``paper_cells.md``; ``gaq/paper_cells.py``).

``gpu_check.json`` records the device, torch and CUDA versions and each section's wall
time and outcome. Everything that can be checked without a GPU (sections, output folder,
benchmark file, bundled models) is checked before the CUDA requirement, so a dry run on a
CPU machine exercises all of it and then refuses in one line.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gaq.errors import GaqError, did_you_mean

__all__ = ["SECTIONS", "preflight", "run"]

SECTIONS = ("overhead", "paper-scale", "block-memory", "attention-memory", "smoke",
            "paper-cells")
#: run when no --only is given (about ten minutes on one H100); paper-cells is asked for
DEFAULT_SECTIONS = ("overhead", "paper-scale", "block-memory", "attention-memory", "smoke")
#: paper-cells: the methods the paper-size comparison needs, on the three largest models
PAPER_CELL_ARCHS = ("ldm4-cin256", "dit-xl2-256", "sd-v1-4")
PAPER_CELL_METHODS = ("rtn", "brecq", "tfmq", "gaq", "ptqd", "htg")
SMOKE_FILE = Path("benchmarks/gpu-smoke.toml")
OVERHEAD_BATCHES = (32, 128, 512)
PAPER_METHODS = ("rtn", "brecq", "tfmq", "gaq")


def _sections(names: Sequence[str] | None) -> list[str]:
    chosen = list(names) if names else list(DEFAULT_SECTIONS)
    for name in chosen:
        if name not in SECTIONS:
            hint = did_you_mean(name, SECTIONS)
            raise GaqError(f"--only: unknown section {name!r}"
                           f"{' (' + hint + ')' if hint else ''}; sections: "
                           f"{', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in chosen]  # always in the cheap-first order


def _writable(out: Path) -> None:
    """``out`` is (or can be made) a writable folder; nothing is created here."""
    if out.exists() and not out.is_dir():
        raise GaqError(f"--out: {out} is a file; pass a folder (default results/gpu)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise GaqError(f"--out: cannot write to {out} ({existing} is not a writable folder); "
                       "pass a writable folder")


def preflight(device: str, out: str | Path, sections: Sequence[str] | None = None, *,
              smoke_file: str | Path = SMOKE_FILE, require_cuda: bool = True) -> list[str]:
    """Check everything before any measurement; returns the sections to run, in order.
    The CUDA requirement comes last, so on a CPU machine every other check has run."""
    from gaq.device import check_device
    from gaq.models.bundled import BUNDLED_MODELS
    from gaq.models.loading import resolve
    from gaq.registry import get_method

    chosen = _sections(sections)
    _writable(Path(out))
    for name in PAPER_METHODS:  # a broken method install fails here, not 5 minutes in
        get_method(name)
    needed = {"digits"} if "overhead" in chosen else set()
    if "smoke" in chosen:
        from gaq.bench.spec import load_benchmark

        if not Path(smoke_file).is_file():
            raise GaqError(f"{smoke_file} does not exist; run gpu-check from the repository "
                           "root (it holds benchmarks/)")
        needed |= set(load_benchmark(smoke_file).models)
    for model in sorted(needed):
        if model in BUNDLED_MODELS:
            resolve(model)  # raises the one-line "train it with gaq train-default"
    if require_cuda and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise GaqError(f"--device: gpu-check needs a CUDA GPU and torch sees none here (torch "
                       f"{torch.__version__}, "
                       f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} "
                       "build); every other check passed: run it on a machine with a GPU")
    dev = check_device(device, "--device")
    if require_cuda and dev.type != "cuda":
        raise GaqError(f"--device: gpu-check measures the CUDA path and {device!r} is not a "
                       f"CUDA device (torch {torch.__version__}, "
                       f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'}"
                       f" build, {torch.cuda.device_count()} GPU(s) visible); run it on a "
                       "machine with a GPU")
    return chosen


def _device_name(device: str) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()


def _overhead(device: str, out: Path, batches: Sequence[int], num: int, steps: int,
              repeats: int) -> dict[str, Any]:
    from gaq.perf import sampling_overhead

    rows = sampling_overhead("digits", "W4A8", num=num, steps=steps,
                             batch_sizes=tuple(batches), repeats=repeats, device=device)
    lines = [f"# Sampling overhead of fake quantization on {_device_name(device)}", "",
             f"Bundled `digits`, RTN W4A8 with frozen weights against FP, DDIM {steps} steps, "
             f"{num} images per run; median of {repeats} paired runs (FP and quantized "
             "alternate) and the range of the per-pair ratios.", "",
             "| batch | FP (s) | fake-quant (s) | ratio | ratio range |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['fp_seconds']:.3f} | {r['quant_seconds']:.3f} "
                     f"| {r['ratio']:.2f}x | {r['ratio_min']:.2f}–{r['ratio_max']:.2f}x |")
    (out / "sampling_overhead.md").write_text("\n".join(lines) + "\n")
    return {"rows": rows}


def _paper_scale(device: str, out: Path, methods: Sequence[str], batch: int
                 ) -> dict[str, Any]:
    from gaq.perf_paper import paper_scale, write_report

    report = paper_scale("ddpm-cifar10", tuple(methods), device=device, batch=batch)
    return {"files": [str(p) for p in write_report(report, out)],
            "projected_hours": {m["method"]: m["projected_hours"] for m in report["methods"]},
            "peak_memory_mb": {m["method"]: m["peak_memory_mb"] for m in report["methods"]}}


def _block_memory(device: str, out: Path) -> dict[str, Any]:
    from gaq.block_memory import run as block_memory

    row = block_memory("ldm4-lsun", device=device, out_dir=out)
    return {"block": row["block"],
            "peak_above_start_mb": [max(s["peak_mb"] for s in v["stages"]) - v["base_mb"]
                                    for v in row["variants"]]}


def _attention_memory(device: str, out: Path) -> dict[str, Any]:
    from gaq.attention_memory import run as attention_memory

    rows = attention_memory((2, 4, 8), device=device, out_dir=out)
    return {"quantize_peak_mb": {f"{r['batch']}/{way}": r[way]["quantize"]["peak_mb"]
                                 for r in rows for way in ("whole", "sliced")}}


def _smoke(device: str, out: Path, smoke_file: Path, results: Path) -> dict[str, Any]:
    import pandas as pd

    from gaq.bench.runner import Runner
    from gaq.bench.spec import load_benchmark

    bench = load_benchmark(smoke_file)
    runner = Runner(bench, results, device=device)
    runner.run()
    folder = results / bench.name
    df = pd.read_parquet(folder / "metrics.parquet")
    keep = [k for k in ("calibration_seconds", "peak_memory_mb", "images_per_second", "fid",
                        "psnr") if k in set(df["metric"])]
    table = (df[df["metric"].isin(keep)]
             .pivot_table(index=["model", "method"], columns="metric", values="value")
             .reindex(columns=keep))
    failed = [label for label, _ in runner.failures]
    lines = [f"# gpu-smoke on {_device_name(device)}", "",
             f"`{smoke_file}`: {len(table)} cells completed, {len(failed)} failed"
             + (f" ({'; '.join(failed)})" if failed else "") + f". Runs: `{folder}`.", "",
             "| model | method | " + " | ".join(keep) + " |",
             "|---|---|" + "---:|" * len(keep)]
    for (model, method), row in table.iterrows():
        lines.append(f"| {model} | {method} | "
                     + " | ".join(f"{row[k]:.4g}" for k in keep) + " |")
    (out / "smoke.md").write_text("\n".join(lines) + "\n")
    if failed:
        raise GaqError(f"{len(failed)} gpu-smoke cell(s) failed: {'; '.join(failed)}")
    return {"cells": len(table)}


def _paper_cells(device: str, out: Path) -> dict[str, Any]:
    from gaq.paper_cells import BUDGETS, run_cells

    rows = run_cells(PAPER_CELL_ARCHS, PAPER_CELL_METHODS, device=device, out_dir=out,
                     budget=BUDGETS["gpu"])
    failed = [f"{r['arch']}/{r['method']}" for r in rows if r["status"] == "failed"]
    if failed:
        raise GaqError(f"paper-cells failed: {', '.join(failed)}")
    return {"cells": {f"{r['arch']}/{r['method']}": r["status"] for r in rows}}


def run(device: str, out: str | Path = "results/gpu", sections: Sequence[str] | None = None,
        *, smoke_file: str | Path = SMOKE_FILE, results: str | Path = "runs",
        overhead_batches: Sequence[int] = OVERHEAD_BATCHES, overhead_images: int = 512,
        overhead_steps: int = 20, repeats: int = 3, methods: Sequence[str] = PAPER_METHODS,
        paper_batch: int = 64, require_cuda: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Preflight, then each section in turn; a failing section is recorded and the next
    one still runs. Returns the summary written to ``gpu_check.json``; raises
    :class:`GaqError` at the end if any section failed."""
    chosen = preflight(device, out, sections, smoke_file=smoke_file, require_cuda=require_cuda)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "device": _device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "overhead": lambda: _overhead(device, out, overhead_batches, overhead_images,
                                      overhead_steps, repeats),
        "paper-scale": lambda: _paper_scale(device, out, methods, paper_batch),
        "block-memory": lambda: _block_memory(device, out),
        "attention-memory": lambda: _attention_memory(device, out),
        "smoke": lambda: _smoke(device, out, Path(smoke_file), Path(results)),
        "paper-cells": lambda: _paper_cells(device, out),
    }
    for name in chosen:
        log(f"gpu-check: {name} ...")
        start = time.perf_counter()
        try:
            entry = {"status": "ok", **jobs[name]()}
        except Exception as e:  # recorded; the other sections still run
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            entry = {"status": "failed", "error": f"{type(e).__name__}: {first}"}
        entry["seconds"] = time.perf_counter() - start
        summary["sections"][name] = entry
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        log(f"gpu-check: {name} {entry['status']} in {entry['seconds']:.0f} s")
    failed = [n for n, e in summary["sections"].items() if e["status"] != "ok"]
    if failed:
        raise GaqError(f"gpu-check: {', '.join(failed)} failed (see {out / 'gpu_check.json'})")
    return summary
