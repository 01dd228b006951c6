"""Every method end to end on a paper's architecture, phase by phase, with random weights.

``gaq perf --paper-cells ARCH[,ARCH...]`` runs, for each registered method (or
``--methods``) on each architecture of :data:`gaq.perf_paper.ARCHITECTURES`, the steps
of a benchmark cell through the same functions the runner and ``gaq quantize`` use
(calibration recording, the method's ``quantize``, the sampler, the metric), each cell
in a fresh process so that its memory is its own:

``build``     the model at its real size (``random:ARCH``, a fixed seed);
``record``    the calibration set at the real resolution with both guidance halves, into
              the disk cache (its size is reported);
``quantize``  the method at its ``cpu`` preset with minimal budgets
              (:class:`CellBudget`): every block reconstructed, GAQ's meta-step,
              per-timestep tables for every visited step, PTQD's statistics, HTG's fold;
``sample``    a few images, FP and quantized (with the method's sampler hook), decoded;
``score``     PSNR of the quantized images against the FP ones (the registered metric).

Each phase reports its wall time and its peak anonymous memory (sampled; what grows when
data is held in RAM, not the page cache of the mapped disk cache), and the process's
kernel peak RSS. A method that is not defined for the architecture is refused in one line
before any work. The budgets measure whether and how a method runs at this size, not
its quality: the numbers to read are time and memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gaq.errors import GaqError

__all__ = ["BUDGETS", "CellBudget", "adapter_arch", "run_cell", "run_cells", "write_report"]

PHASES = ("build", "record", "quantize", "sample", "score")


@dataclass(frozen=True)
class CellBudget:
    """The smallest budgets that still run every stage of every method."""

    steps: int = 4  # sampler steps (calibration, sampling)
    interval: int = 2  # every 2nd step kept: 2 training timesteps
    trajectories: int = 2  # per kept step (x2 with guidance)
    weight_iters: int = 2
    act_iters: int = 1
    meta_iters: int = 1
    images: int = 2
    guidance: float = 3.0  # for the conditional architectures


#: budget profiles: ``cpu`` (the smallest that runs every stage: hours on 2 cores for the
#: largest architectures) and ``gpu`` (closer to a real run's shape, minutes per cell on
#: one GPU)
BUDGETS = {"cpu": CellBudget(),
           "gpu": CellBudget(steps=20, interval=2, trajectories=8, weight_iters=100,
                             act_iters=25, meta_iters=4, images=8)}


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@contextmanager
def _phase(out: dict[str, Any], name: str, device: str) -> Iterator[None]:
    import torch

    from gaq.memwatch import PeakMemory

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with PeakMemory() as peak:
        yield
    if cuda:
        torch.cuda.synchronize(device)
    mem = peak.result()
    out[name] = {"seconds": time.perf_counter() - start, "peak_anon_mb": mem["peak_anon_mb"],
                 "peak_rss_mb": mem["peak_rss_mb"]}
    if cuda:
        out[name]["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def _method_config(method: str, budget: CellBudget):
    """The method's ``cpu`` preset with the budget's iterations and the block data
    streamed from the disk cache (what a paper-size run needs), merged as a benchmark
    file's overrides are."""
    from gaq.bench.spec import MethodEntry
    from gaq.registry import get_method

    fields = get_method(method).from_preset("cpu").config.to_dict()
    over: dict[str, Any] = {}
    if "recon" in fields:
        over["recon"] = {"weight_iters": budget.weight_iters, "act_iters": budget.act_iters,
                         "cache": "disk", "batch_size": 2, "capture_batch": 2}
    if "meta" in fields:
        over["meta"] = {"iters": budget.meta_iters}
    return MethodEntry(method, "cpu", over).config()


def run_cell(arch: str, method: str, budget: CellBudget, device: str,
             cache_dir: str | Path) -> dict[str, Any]:
    """One cell in this process (call it in a fresh one: the memory figures are the
    process's). Returns the phases' time and memory, the cache size and the score."""
    import torch

    from gaq.calibration import CalibrationSpec, record_calibration
    from gaq.config import QuantConfig
    from gaq.eval.metrics import paired_metrics
    from gaq.models.adapters import adapter_for
    from gaq.models.loading import load_model
    from gaq.perf_paper import ARCHITECTURES
    from gaq.registry import get_method
    from gaq.sampling import SamplerConfig, sample_batch

    phases: dict[str, Any] = {}
    spec_arch = ARCHITECTURES[arch]
    guidance = budget.guidance if spec_arch.protocol.guidance else None
    sampler = "plms" if spec_arch.scheduler["_class_name"] == "PNDMScheduler" else "ddim"
    cache = Path(cache_dir)
    with _phase(phases, "build", device):
        pipe = load_model(f"random:{arch}", device=device)
    spec = CalibrationSpec(steps=budget.steps, interval=budget.interval,
                           samples_per_step=budget.trajectories, holdout_per_step=1,
                           sampler_name=sampler, guidance=guidance, act_every_step=True,
                           batch_size=budget.trajectories)
    with _phase(phases, "record", device):
        calib = record_calibration(pipe, spec, model_id=pipe.name, cache_dir=cache)
    cls = get_method(method)
    with _phase(phases, "quantize", device):  # on the set just recorded, not read again
        result = cls(_method_config(method, budget)).quantize(
            pipe.denoiser, adapter_for(pipe.denoiser), calib, QuantConfig.from_bits("W4A8"))
    run = SamplerConfig(steps=budget.steps, name=sampler, guidance=guidance)
    with _phase(phases, "sample", device):
        indices = list(range(budget.images))
        fp = sample_batch(pipe, indices, seed=0, sampler=run)
        q = sample_batch(pipe, indices, seed=0, sampler=run, hook=result.sampler_hook,
                         denoiser=result.model)
    with _phase(phases, "score", device):
        psnr = float(paired_metrics(q, fp)["psnr"])
    return {"arch": arch, "method": method, "status": "ok", "phases": phases,
            "calibration_rows": len(calib.train()), "cache_mb": _dir_mb(cache),
            "parameters": sum(p.numel() for p in pipe.denoiser.parameters()),
            "psnr_db": psnr, "threads": torch.get_num_threads(),
            # the machine's load when the cell ended: timings taken beside other work
            # are slower than the cell alone, and the table says so
            "load_avg_1min": os.getloadavg()[0]}


def child_json(setup: str, call: str, threads: int) -> tuple[dict[str, Any] | None, str]:
    """``call`` (an expression whose value is JSON-able) evaluated after ``setup`` (its
    imports) in a fresh Python process with ``threads`` intra-op threads, so that every
    memory figure is that process's own: (its value, "") or (None, its error's last line)."""
    code = (f"import json, torch\nfrom gaq.memwatch import bound_heap\nbound_heap()\n"
            f"torch.set_num_threads({threads})\n{setup}\n"
            f"print(json.dumps({call}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def _in_child(arch: str, method: str, budget: CellBudget, device: str, cache_dir: Path,
              threads: int) -> dict[str, Any]:
    row, error = child_json(
        "from gaq.paper_cells import CellBudget, run_cell",
        f"run_cell({arch!r}, {method!r}, CellBudget(**{asdict(budget)!r}), {device!r}, "
        f"{str(cache_dir)!r})", threads)
    if row is None:
        return {"arch": arch, "method": method, "status": "failed", "error": error}
    return row


def run_cells(archs: Sequence[str], methods: Sequence[str] | None, *, device: str,
              out_dir: str | Path, budget: CellBudget = CellBudget(),
              cache_dir: str | Path | None = None, threads: int | None = None,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every method on every architecture, a fresh process per cell; written to
    ``out_dir/paper_cells.json`` (and ``.md``) after each cell, so a long run keeps what
    it finished. A cell already in the JSON (same architecture, method and budget) is
    not run again."""
    import torch

    from gaq.perf_paper import ARCHITECTURES
    from gaq.registry import get_method, usable_methods
    from gaq.tempdirs import remove_dead_temp_dirs, temp_dir

    for a in archs:  # every name checked before the first cell
        if a not in ARCHITECTURES:
            raise GaqError(f"--paper-cells: unknown architecture {a!r}; known: "
                           + ", ".join(ARCHITECTURES))
    names = list(methods) if methods else usable_methods("cpu")[0]
    for m in names:
        get_method(m)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "paper_cells.json"
    rows: list[dict[str, Any]] = (json.loads(json_path.read_text())["cells"]
                                  if json_path.is_file() else [])
    done = {(r["arch"], r["method"]) for r in rows
            if r.get("budget") == asdict(budget) and r["status"] != "failed"}
    threads = threads or torch.get_num_threads()
    adapters = {a: adapter_arch(a) for a in archs}
    remove_dead_temp_dirs()  # a killed earlier run's calibration caches
    for arch in archs:
        with temp_dir("papercells") as tmp:
            cache = Path(cache_dir or tmp) / arch
            for method in names:
                if (arch, method) in done:
                    continue
                why = get_method(method).unsupported(adapters[arch])
                if why:
                    row = {"arch": arch, "method": method, "status": "refused", "error": why}
                else:
                    log(f"paper-cells: {method} on {arch} ...")
                    start = time.perf_counter()
                    row = _in_child(arch, method, budget, device, cache, threads)
                    row["wall_seconds"] = time.perf_counter() - start
                row["budget"] = asdict(budget)
                rows = [r for r in rows if (r["arch"], r["method"]) != (arch, method)]
                rows.append(row)
                write_report(rows, out, device)
                log(f"paper-cells: {method} on {arch}: {row['status']}")
    return rows


def adapter_arch(arch: str) -> str:
    """The adapter architecture a method's ``archs`` names (UNet2DModel, DiT, ...)."""
    from gaq.models.adapters import ADAPTERS
    from gaq.perf_paper import ARCHITECTURES

    return ADAPTERS.get(ARCHITECTURES[arch].denoiser).arch


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, device: str) -> list[Path]:
    """``paper_cells.json`` and a Markdown table: per architecture and method, the status,
    wall time and peak anonymous memory of each phase, and the calibration cache size."""
    out = Path(out_dir)
    json_path = out / "paper_cells.json"
    json_path.write_text(json.dumps({"device": device, "cells": rows}, indent=1) + "\n")
    head = ("| architecture | method | status | " + " | ".join(PHASES)
            + " | cache (MB) | rows | PSNR (dB) | load |")
    lines = ["# Every method end to end at paper size (random weights)", "",
             f"Device: {device}. Each phase: wall seconds / peak anonymous memory (GB) during "
             "it; `gaq/paper_cells.py` says how each is measured; load: the 1-minute load average "
             "when the cell ended (2 means the cores were busy with the cell alone). Budgets: "
             + (", ".join(f"{k} {v}" for k, v in rows[0]["budget"].items()) if rows else "-")
             + ".", "", head, "|---|---|---|" + "---:|" * (len(PHASES) + 4)]
    from gaq.perf_paper import ARCHITECTURES

    order = list(ARCHITECTURES)  # smallest architecture first, then methods by name
    for r in sorted(rows, key=lambda r: (order.index(r["arch"]) if r["arch"] in order
                                         else len(order), r["arch"], r["method"])):
        if r["status"] != "ok":
            cells = ["–"] * len(PHASES) + ["–", "–", "–", "–"]
            status = f"{r['status']}: {r.get('error', '')}"
        else:
            cells = [f"{r['phases'][p]['seconds']:.1f} s / "
                     f"{(r['phases'][p]['peak_anon_mb'] or 0) / 1024:.1f}" for p in PHASES]
            cells += [f"{r['cache_mb']:.2f}", str(r["calibration_rows"]),
                      f"{r['psnr_db']:.1f}", f"{r.get('load_avg_1min', float('nan')):.1f}"]
            status = "ok"
        lines.append(f"| {r['arch']} | {r['method']} | {status} | " + " | ".join(cells) + " |")
    md = out / "paper_cells.md"
    md.write_text("\n".join(lines) + "\n")
    return [json_path, md]
