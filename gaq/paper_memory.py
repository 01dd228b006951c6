"""Peak memory of block reconstruction at paper size, against calibration rows and block size.

``gaq perf --paper-memory ARCH --rows 4,8,16`` builds the architecture with random weights
(:data:`gaq.perf_paper.ARCHITECTURES`), records a calibration set of each size, wraps the
denoiser as BRECQ does and reconstructs a few chosen blocks one at a time, each with
captures streamed from the disk cache (the paper-size setting), in a fresh process per
calibration size, so every figure is that process's own. Per block it reports the wall
time and the peak anonymous memory above what the process held before the block (the FP
model, the quantized model's wrappers around its weights and the calibration set): what
capturing and fitting that block costs; and the process's peak while it recorded the
calibration set and while it built the quantized model. The blocks are chosen from the
architecture, not by hand: the first one, the one with the most parameters, the attention
block at the highest resolution, and the last one (where the UNet's input resolution
returns with the widest skip concatenation).

Bounded means: the per-block figure does not grow with the calibration rows (captures are
streamed from disk one batch at a time), and grows with the block's parameters and the
size of one captured batch. The table shows both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gaq.errors import GaqError

__all__ = ["brecq_setup", "choose_blocks", "measure_rows", "run", "write_report"]


def choose_blocks(model: Any, blocks: list) -> list[tuple[str, Any]]:
    """(why, block) for the blocks worth measuring, in forward order, without repeats."""
    def params(b) -> int:
        return sum(p.numel() for p in model.get_submodule(b.name).parameters())

    usable = [b for b in blocks if b.kind != "temporal"]
    picks = [("first", usable[0]), ("most parameters", max(usable, key=params))]
    attention = [b for b in usable if b.kind == "attention"]
    if attention:  # forward order: the first attention block sits at the highest resolution
        picks.append(("first attention", attention[0]))
    picks.append(("last", usable[-1]))
    seen, out = set(), []
    for why, b in sorted(picks, key=lambda p: usable.index(p[1])):
        if b.name not in seen:
            seen.add(b.name)
            out.append((why, b))
    return out


@contextmanager
def brecq_setup(arch: str, trajectories: int, *, device: str, steps: int = 4,
                interval: int = 2, weight_iters: int = 2,
                cache_dir: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """The paper architecture with random weights, a recorded calibration set and BRECQ's
    quantized model (W4A8), as a paper-size block measurement starts from: yields
    ``pipe``, ``calib``, ``run``, ``cfg``, ``adapter`` and the peaks of recording
    (``record_peak_anon_mb``) and wrapping (``wrap_peak_anon_mb``). The calibration
    cache lives until the block ends."""
    from gaq.calibration import CalibrationSpec, record_calibration
    from gaq.config import QuantConfig
    from gaq.memwatch import PeakMemory
    from gaq.methods.stages import start, wrap
    from gaq.models.adapters import adapter_for
    from gaq.models.loading import load_model
    from gaq.paper_cells import BUDGETS, _method_config
    from gaq.perf_paper import ARCHITECTURES
    from gaq.registry import get_method
    from gaq.tempdirs import temp_dir

    spec_arch = ARCHITECTURES[arch]
    guidance = BUDGETS["cpu"].guidance if spec_arch.protocol.guidance else None
    sampler = "plms" if spec_arch.scheduler["_class_name"] == "PNDMScheduler" else "ddim"
    pipe = load_model(f"random:{arch}", device=device)
    spec = CalibrationSpec(steps=steps, interval=interval, samples_per_step=trajectories,
                           holdout_per_step=0, sampler_name=sampler, guidance=guidance,
                           batch_size=min(trajectories, 8))
    with temp_dir("papermem") as tmp:
        with PeakMemory() as peak:
            calib = record_calibration(pipe, spec, model_id=pipe.name,
                                       cache_dir=Path(cache_dir or tmp))
        record_peak = peak.result()["peak_anon_mb"]
        budget = BUDGETS["cpu"].__class__(weight_iters=weight_iters)
        config = _method_config("brecq", budget)
        cfg, method = config.recon, get_method("brecq")(config)
        adapter = adapter_for(pipe.denoiser)
        with PeakMemory() as peak:
            run_ = start(method, pipe.denoiser, adapter, calib, QuantConfig.from_bits("W4A8"))
            wrap(run_)
        yield {"pipe": pipe, "calib": calib, "run": run_, "cfg": cfg, "adapter": adapter,
               "record_peak_anon_mb": record_peak,
               "wrap_peak_anon_mb": peak.result()["peak_anon_mb"]}


def measure_rows(arch: str, trajectories: int, *, device: str, steps: int = 4,
                 interval: int = 2, weight_iters: int = 2,
                 cache_dir: str | Path | None = None) -> dict[str, Any]:
    """One calibration size in this process (call it in a fresh one): the chosen blocks
    reconstructed one at a time, each block's time and peak anonymous memory."""
    import torch

    from gaq.memwatch import PeakMemory
    from gaq.models.adapters import denoise
    from gaq.reconstruction import reconstruct

    with brecq_setup(arch, trajectories, device=device, steps=steps, interval=interval,
                     weight_iters=weight_iters, cache_dir=cache_dir) as setup:
        pipe, calib, run_, cfg, adapter = (setup[k] for k in
                                           ("pipe", "calib", "run", "cfg", "adapter"))
        stages = {k: setup[k] for k in ("record_peak_anon_mb", "wrap_peak_anon_mb")}
        chosen = choose_blocks(pipe.denoiser, adapter.blocks())
        # the size of one captured batch: the block's inputs and its FP target
        sizes: dict[str, float] = {}
        for _, b in chosen:
            mod = pipe.denoiser.get_submodule(b.name)
            got: list[int] = []

            def pre(module, args, kwargs, got=got):
                got.append(sum(t.numel() * t.element_size() for t in
                               [*args, *kwargs.values()] if torch.is_tensor(t)))

            h = mod.register_forward_pre_hook(pre, with_kwargs=True)
            x, t, cond, _ = next(iter(run_.batches(1)()))
            with torch.no_grad():
                denoise(pipe.denoiser, x, t, cond)
            h.remove()
            sizes[b.name] = got[0] / 2**20
        blocks = []
        for why, b in chosen:
            with PeakMemory() as before:
                pass
            base = before.result()["peak_anon_mb"] or 0.0
            start_t = time.perf_counter()
            with PeakMemory() as peak:
                reconstruct(run_.qmodel, run_.fpmodel, adapter, run_.batches(cfg.capture_batch),
                            cfg, phase="weights", blocks=[b], progress=False)
            mem = peak.result()
            blocks.append({
                "block": b.name, "why": why, "kind": b.kind,
                "parameters": sum(p.numel() for p in
                                  pipe.denoiser.get_submodule(b.name).parameters()),
                "input_mb_per_row": sizes[b.name], "seconds": time.perf_counter() - start_t,
                "baseline_anon_mb": base, "peak_anon_mb": mem["peak_anon_mb"],
                "above_baseline_mb": (mem["peak_anon_mb"] or 0.0) - base,
                "peak_rss_mb": mem["peak_rss_mb"]})
    return {"arch": arch, "trajectories": trajectories, "rows": len(calib.train()),
            "capture_batch": cfg.capture_batch, "weight_iters": weight_iters,
            "threads": torch.get_num_threads(), "blocks": blocks, **stages}


def _in_child(arch: str, trajectories: int, weight_iters: int, device: str,
              threads: int) -> dict[str, Any]:
    from gaq.paper_cells import child_json

    row, error = child_json(
        "from gaq.paper_memory import measure_rows",
        f"measure_rows({arch!r}, {trajectories}, weight_iters={weight_iters}, "
        f"device={device!r})", threads)
    if row is None:
        return {"arch": arch, "trajectories": trajectories, "status": "failed",
                "error": error}
    return row | {"status": "ok"}


def run(arch: str, trajectories: Sequence[int], *, device: str, out_dir: str | Path,
        weight_iters: int = 2, threads: int | None = None,
        log: Callable[[str], None] = print,
        measure: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every calibration size of ``trajectories`` (per kept step) in its own process;
    written to ``out_dir/paper_memory_ARCH.json`` and ``.md`` after each."""
    import torch

    from gaq.perf_paper import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise GaqError(f"--paper-memory: unknown architecture {arch!r}; known: "
                       + ", ".join(ARCHITECTURES))
    if not trajectories or any(n < 1 for n in trajectories):
        raise GaqError(f"--rows must list positive trajectory counts, got {list(trajectories)}")
    threads = threads or torch.get_num_threads()
    measure = measure or (lambda a, n: _in_child(a, n, weight_iters, device, threads))
    rows: list[dict[str, Any]] = []
    for n in trajectories:
        log(f"paper-memory: {arch}, {n} trajectories per kept step ...")
        rows.append(measure(arch, n))
        write_report(rows, out_dir, device)
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, device: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = rows[0]["arch"]
    js = out / f"paper_memory_{arch}.json"
    js.write_text(json.dumps({"device": device, "runs": rows}, indent=1) + "\n")
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = [f"# Block reconstruction memory at paper size: {arch} (random weights)", "",
             f"Device: {device}. BRECQ's weight reconstruction (W4A8) of the chosen blocks, "
             "one at a time, captures streamed from the disk cache; per block: the process's "
             "peak anonymous memory while it ran, in parentheses the rise over what the "
             "process held just before (FP model, the quantized model's quantizers, calibration "
             "set, and what an earlier step kept, so a rise can hide under an earlier "
             "high), and wall seconds. `gaq/paper_memory.py` says how the blocks are chosen.",
             ""]
    if ok:
        head = "| block | why | parameters (M) | one row's input (MB) | " + " | ".join(
            f"{r['rows']} rows: peak MB (above) / s" for r in ok) + " |"
        lines += [head, "|---|---|---:|---:|" + "---:|" * len(ok)]
        for i, b in enumerate(ok[0]["blocks"]):
            cells = []
            for r in ok:
                m = r["blocks"][i]
                cells.append(f"{m['peak_anon_mb']:.0f} ({m['above_baseline_mb']:+.0f}) / "
                             f"{m['seconds']:.1f}")
            lines.append(f"| `{b['block']}` | {b['why']} | {b['parameters'] / 1e6:.1f} | "
                         f"{b['input_mb_per_row']:.1f} | " + " | ".join(cells) + " |")
        lines += ["", "Process baseline before the first block (FP model, quantizers, "
                  "calibration set), MB: " + ", ".join(
                      f"{r['rows']} rows {r['blocks'][0]['baseline_anon_mb']:.0f}" for r in ok)
                  + ". Peak while recording the calibration set, then while building the "
                  "quantized model (weight ranges included), MB: " + ", ".join(
                      f"{r['rows']} rows {r.get('record_peak_anon_mb') or 0:.0f}, "
                      f"{r.get('wrap_peak_anon_mb') or 0:.0f}" for r in ok)
                  + f". Capture batch {ok[0]['capture_batch']} rows, "
                  f"{ok[0]['weight_iters']} AdaRound iterations per block, "
                  f"{ok[0]['threads']} threads."]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"\n{r['trajectories']} trajectories: failed: {r.get('error', '')}")
    md = out / f"paper_memory_{arch}.md"
    md.write_text("\n".join(lines) + "\n")
    return [js, md]
