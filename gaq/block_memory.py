"""What one block's AdaRound step holds, item by item, on a paper architecture.

``gaq perf --block-memory ARCH`` builds the architecture with random weights, records a
small calibration set, wraps the denoiser as BRECQ does (W4A8) and takes the block with
the most parameters through AdaRound one stage at a time: the rounding variables, one
forward of the block loss with the rounding regulariser (the iteration after the warm-up,
the costliest), its backward, Adam's first step, a second whole iteration, and the
freeze that ends the block. After each stage it reads the process's anonymous memory;
during each, its peak. The same figures are divided by the block's weight bytes
(float32), so they read as weight-sized copies.

Two accountings stand side by side, so neither is judged by itself: the measured rises,
and the tensors autograd saves for backward, taken from
``torch.autograd.graph.saved_tensors_hooks`` during the forward (each storage counted
once) and split into those shaped like one of the block's weights and the rest (the
activations of the captured rows). What the design needs is written next to them: two
weight-sized tensors per layer for the rounding (``V`` and ``⌊W/Δ⌋``), one for ``V``'s
gradient, two for Adam's moments, and one for the frozen weight the block keeps.

Then GAQ's stage on the same block, as ``gaq.methods.gaq.MetaWeighting`` takes it before
the block's AdaRound: the soft-rounding view (its own V and ⌊W/Δ⌋, the block's weights
shared), θ, the inner step's scale, two meta-gradients and the conflict diagnostics.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from gaq.errors import GaqError

__all__ = ["itemise", "run", "saved_for_backward", "write_report"]


def saved_for_backward(fn, weight_shapes: set[tuple[int, ...]]) -> tuple[Any, dict[str, float]]:
    """``fn()`` with every tensor autograd saves for backward counted once per storage:
    MB shaped like a weight (``weight_mb``, ``weight_tensors``) and the rest
    (``other_mb``)."""
    seen: set[int] = set()
    out = {"weight_mb": 0.0, "weight_tensors": 0, "other_mb": 0.0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and storage.nbytes():
            seen.add(key)
            mb = storage.nbytes() / 2**20
            if tuple(t.shape) in weight_shapes:
                out["weight_mb"] += mb
                out["weight_tensors"] += 1
            else:
                out["other_mb"] += mb
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, out


#: the stages, and what the design holds above the start after each, in weight copies
STAGES = (("rounding variables V and ⌊W/Δ⌋", 2.0),
          ("forward: block loss and rounding regulariser", None),
          ("backward: the graph freed, V's gradient kept", 3.0),
          ("Adam's first step: two moments", 5.0),
          ("a second whole iteration", 5.0),
          ("freeze: the hard-rounded weight kept, the rest freed", 1.0))


def _walk(module: torch.nn.Module, rec: dict, cfg: Any, beta: float | None,
          recompute: bool, cuda: bool) -> dict[str, Any]:
    """The stages of :data:`STAGES` on ``module`` (changed in place), as the AdaRound loop
    takes them, with ``recompute`` set as that loop sets it or not; ``cuda``: read device
    memory instead of the process's."""
    from gaq.memwatch import measure_steps
    from gaq.reconstruction import (
        block_forward,
        block_layers,
        split_reg_scales,
        weighted_error,
        with_rounding_term,
    )

    layers = block_layers(module)
    shapes = {tuple(w.shape) for lay in layers for w in lay.weight_parts()}
    held: dict[str, Any] = {}
    saved: dict[str, float] = {}

    def variables() -> None:
        for lay in layers:
            lay.set_mode("weight")
        held["q"] = [q.set_soft(True, recompute) for lay in layers for q in lay.use_adaround()]
        held["opt"] = torch.optim.Adam([q.alpha for q in held["q"]], lr=cfg.weight_lr)
        held["regularised"] = [(s, q) for s, q in zip(split_reg_scales(layers, cfg.split_reg),
                                                      held["q"], strict=True) if s != 0]

    def loss() -> torch.Tensor:
        with torch.enable_grad():
            return with_rounding_term(
                weighted_error(block_forward(module, rec), rec["target"], None),
                held["regularised"], cfg.reg_weight, beta)

    def forward() -> None:
        held["loss"], got = saved_for_backward(loss, shapes)
        saved.update(got)

    def backward() -> None:
        held["opt"].zero_grad(set_to_none=True)
        held["loss"].backward()
        del held["loss"]

    def iteration() -> None:
        value = loss()
        held["opt"].zero_grad(set_to_none=True)
        value.backward()
        held["opt"].step()

    def freeze() -> None:
        for q in held["q"]:
            q.set_soft(False)
        for lay in layers:
            lay.freeze_weights()
        for q in held["q"]:
            q.release()
        held.clear()

    steps = (variables, forward, backward, lambda: held["opt"].step(), iteration, freeze)
    base, stages = measure_steps(STAGES, steps, cuda)
    return {"recompute": recompute, "base_mb": base, "saved": saved, "stages": stages}


#: GAQ's meta stage on the same block, and what its design holds after each step
META_STAGES = (("the view: its own V and ⌊W/Δ⌋, the block's weights shared", 2.0),
               ("θ = V, on the view's storage", 2.0),
               ("the inner step's scale: one gradient of the training loss", 2.0),
               ("one meta-gradient: inner step, per-group gradients, their gradient", 2.0),
               ("a second meta-gradient", 2.0),
               ("diagnostics: per-timestep gradients into their Gram matrix", 2.0),
               ("the view released", 0.0))


def _meta_walk(module: torch.nn.Module, data: Any, rec: dict, row_t: torch.Tensor,
               cuda: bool) -> dict[str, Any]:
    """GAQ's stage before the block's AdaRound (``gaq.methods.gaq.MetaWeighting``), step
    by step: the rounding view, θ, the inner step's scale, two meta-gradients and the
    diagnostics. ``rec`` is the training minibatch; the first captured rows stand in for
    the validation rows (this measurement records no held-out rows; what matters to memory
    is their number and how many timestep groups they span: one per-group gradient each)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gaq.memwatch import measure_steps
    from gaq.meta import (
        MetaConfig,
        MetaProblem,
        gradient_diagnostics,
        inner_parameters,
        rounding_view,
        timestep_groups,
    )

    cfg = MetaConfig(iters=1, batch_size=len(rec["index"]))
    held: dict[str, Any] = {}
    train, val = rec, data.head(2 * len(rec["index"]))
    val_groups = timestep_groups(val["t"], cfg.groups)

    def view() -> None:
        held["view"] = rounding_view(module)

    def theta() -> None:
        held["problem"] = MetaProblem(held["view"], inner_parameters(held["view"]), val,
                                      val_groups, row_t, cfg)

    def meta_gradient() -> None:
        s = torch.zeros(held["problem"].num_logits, device=rec["t"].device)
        held["problem"].meta_gradient(s, train)

    def diagnostics() -> None:
        rows = data.head(cfg.diagnostic_rows)
        held["timesteps"] = len(gradient_diagnostics(
            held["problem"], rows, torch.ones(len(row_t), device=rec["t"].device))["timesteps"])
        held["diagnostic_rows"] = len(rows["index"])

    def release() -> None:
        del held["problem"], held["view"]

    steps = (view, theta, lambda: held["problem"].set_inner_scale(train), meta_gradient,
             meta_gradient, diagnostics, release)
    with sdpa_kernel(SDPBackend.MATH):  # as GAQ's stage runs: no fused attention kernels
        base, stages = measure_steps(META_STAGES, steps, cuda)
    return {"base_mb": base, "stages": stages, "rows": len(rec["index"]),
            "validation_rows": len(val["index"]), "groups": int(val_groups.max()) + 1,
            "diagnostic_rows": held["diagnostic_rows"], "timesteps": held["timesteps"]}


def itemise(arch: str, *, device: str, trajectories: int = 2, steps: int = 4,
            interval: int = 2, block: str | None = None) -> dict[str, Any]:
    """The stages of one block's AdaRound in this process (call it in a fresh one), on two
    copies of the block: autograd keeping every intermediate, and the loop's setting
    (the soft weight and the regulariser recomputed in backward)."""
    from gaq.paper_memory import brecq_setup, choose_blocks
    from gaq.quant.adaround import annealed_beta
    from gaq.quantize import set_mode
    from gaq.reconstruction import block_layers, capture

    with brecq_setup(arch, trajectories, device=device, steps=steps,
                     interval=interval) as setup:
        run_, cfg, adapter = setup["run"], setup["cfg"], setup["adapter"]
        blocks = adapter.blocks()
        if block is None:
            chosen = dict(choose_blocks(setup["pipe"].denoiser, blocks))["most parameters"]
        else:
            named = [b for b in blocks if b.name == block]
            if not named:
                raise GaqError(f"--block: {block!r} is not a block of {arch}")
            chosen = named[0]
        module = run_.qmodel.get_submodule(chosen.name)
        layers = block_layers(module)
        weight_mb = sum(w.numel() * 4 for lay in layers for w in lay.weight_parts()) / 2**20
        set_mode(run_.qmodel, "weight")  # as the block loop captures: activations off
        data = capture(run_.qmodel, run_.fpmodel, chosen.name,
                       run_.batches(cfg.capture_batch), "disk")
        try:
            gen = torch.Generator().manual_seed(cfg.seed)
            rec = data.sample(cfg.batch_size, gen, cfg.minibatch)
            beta = annealed_beta(cfg.weight_iters, cfg.weight_iters, cfg.warmup,
                                 cfg.beta_start, cfg.beta_end)
            cuda = torch.device(device).type == "cuda"
            # each on its own copy: the block stays as it was
            variants = [_walk(copy.deepcopy(module), rec, cfg, beta, recompute, cuda)
                        for recompute in (False, True)]
            meta = _meta_walk(module, data, rec, setup["calib"].train().t, cuda)
        finally:
            data.close()
    return {"arch": arch, "block": chosen.name, "kind": chosen.kind,
            "memory": "max_memory_allocated" if cuda else "anonymous",
            "parameters": sum(p.numel() for p in module.parameters()),
            "weight_mb": weight_mb, "layers": len(layers), "rows": len(setup["calib"].train()),
            "minibatch_rows": len(rec["index"]), "beta": beta, "variants": variants, "meta": meta,
            "threads": torch.get_num_threads()}


def run(arch: str, *, device: str, out_dir: str | Path, block: str | None = None,
        threads: int | None = None, measure=None) -> dict[str, Any]:
    """:func:`itemise` in a fresh process; written to ``out_dir/block_memory_ARCH.json``
    and ``.md``."""
    from gaq.paper_cells import child_json
    from gaq.perf_paper import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise GaqError(f"--block-memory: unknown architecture {arch!r}; known: "
                       + ", ".join(ARCHITECTURES))
    threads = threads or torch.get_num_threads()
    if measure is not None:
        row = measure(arch)
    else:
        row, error = child_json("from gaq.block_memory import itemise",
                                f"itemise({arch!r}, device={device!r}, block={block!r})",
                                threads)
        if row is None:
            raise GaqError(f"--block-memory on {arch} failed: {error}")
    write_report(row, out_dir, device)
    return row


def write_report(row: dict[str, Any], out_dir: str | Path, device: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"block_memory_{row['arch']}.json"
    js.write_text(json.dumps({"device": device, **row}, indent=1) + "\n")
    w = row["weight_mb"]
    keep, loop = row["variants"]
    lines = [f"# One block's AdaRound, item by item: {row['arch']} (random weights)", "",
             f"Device: {device}. Block `{row['block']}` ({row['kind']}, "
             f"{row['parameters'] / 1e6:.1f} M parameters, {row['layers']} quantized layers; "
             f"one weight-sized copy in float32 = {w:.0f} MB), BRECQ's W4A8 weight "
             f"reconstruction, a minibatch of {row['minibatch_rows']} captured rows, "
             f"rounding regulariser at β = {row['beta']}, {row['threads']} threads. "
             + ("Allocated device memory (`max_memory_allocated` for the peaks)"
                if row.get("memory") == "max_memory_allocated"
                else "Anonymous memory of the process") +
             " above what it held when the stages began, "
             "in weight copies, peak during the stage / held after it: first with autograd "
             "keeping every intermediate, then as the AdaRound loop runs (the soft weight "
             "and the regulariser keep only V and are recomputed in backward). "
             "`gaq/block_memory.py` says how each stage is taken.", "",
             "| stage | autograd keeps all: peak / held | recomputed: peak / held | "
             "the design holds |", "|---|---:|---:|---:|"]
    for a, b in zip(keep["stages"], loop["stages"], strict=True):
        holds = a["design_holds_copies"]
        cells = [f"{(v['peak_mb'] - base) / w:+.1f} / {(v['after_mb'] - base) / w:+.1f}"
                 for v, base in ((a, keep["base_mb"]), (b, loop["base_mb"]))]
        lines.append(f"| {a['stage']} | {cells[0]} | {cells[1]} | "
                     + ("–" if holds is None else f"{holds:+.0f}") + " |")
    peak = [max(s["peak_mb"] for s in v["stages"]) - v["base_mb"] for v in (keep, loop)]
    sk, sl = keep["saved"], loop["saved"]
    lines += ["", f"Saved for backward by the forward, each storage once: "
              f"{sk['weight_tensors']} weight-shaped tensors, {sk['weight_mb']:.0f} MB "
              f"({sk['weight_mb'] / w:.1f} copies) when autograd keeps all; "
              f"{sl['weight_tensors']} ({sl['weight_mb']:.0f} MB, {sl['weight_mb'] / w:.1f} "
              f"copies) recomputed, the soft weights the layers keep for their input "
              f"gradients and V itself, held anyway; other tensors (the minibatch's activations) "
              f"{sk['other_mb']:.0f} and {sl['other_mb']:.0f} MB. The block's peak above "
              f"the start: {peak[0]:.0f} MB against {peak[1]:.0f} MB. "
              f"Starts: {keep['base_mb']:.0f} and {loop['base_mb']:.0f} MB (the FP model, "
              "the quantized model, the calibration set, the block's copy)."]
    times = [v["stages"][4].get("seconds") for v in (keep, loop)]
    if None not in times:
        lines[-1] += (f" A whole iteration took {times[0]:.2f} s and {times[1]:.2f} s "
                      "(one timing each, on a machine that may have been busy).")
    meta = row.get("meta")
    if meta:
        lines += ["", f"**GAQ's stage before this block's AdaRound** (`gaq/methods/gaq.py`: the "
                  "rounding view, the sample-weight meta-gradients, the conflict diagnostics), "
                  f"on the same block: {meta['rows']} training rows per meta-iteration, "
                  f"{meta['validation_rows']} captured rows standing in for the validation rows "
                  f"({meta['groups']} timestep groups: one per-group gradient each); "
                  "diagnostics over "
                  f"{meta['diagnostic_rows']} rows and {meta['timesteps']} timesteps. Weight "
                  "copies above the stage's start, peak during the step / held after it.", "",
                  "| step | peak / held | the design holds |", "|---|---:|---:|"]
        for st in meta["stages"]:
            lines.append(f"| {st['stage']} | {(st['peak_mb'] - meta['base_mb']) / w:+.1f} / "
                         f"{(st['after_mb'] - meta['base_mb']) / w:+.1f} | "
                         f"{st['design_holds_copies']:+.0f} |")
        top = max(st["peak_mb"] for st in meta["stages"]) - meta["base_mb"]
        lines += ["", f"GAQ's stage peaks at {top:.0f} MB above its start "
                  f"({top / w:.1f} copies); a meta-gradient took "
                  f"{meta['stages'][4]['seconds']:.1f} s, the diagnostics "
                  f"{meta['stages'][5]['seconds']:.1f} s."]
    md = out / f"block_memory_{row['arch']}.md"
    md.write_text("\n".join(lines) + "\n")
    return [js, md]
