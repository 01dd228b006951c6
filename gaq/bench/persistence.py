"""A cell's persist step (the runner's): its sample grid, its MLflow run with the state
files, then its Parquet rows, the metric rows last (they mark the cell done); and a
failed cell's record."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from gaq.bench import labels
from gaq.bench.context import Cell, CellOutcome, _bits
from gaq.bench.context import ModelContext as _ModelContext
from gaq.bench.spec import FP

if TYPE_CHECKING:
    from gaq.bench.spec import Benchmark

__all__ = ["CellPersistence"]


class CellPersistence:
    """The runner's persistence (mixed into :class:`gaq.bench.runner.Runner`, whose
    ``bench``, ``dir``, ``world``, ``device``, ``engine`` and ``sweep_run`` it reads)."""

    bench: Benchmark

    def record_failure(self, cell: Cell, cid: str, error: str) -> None:
        from gaq.bench import results
        from gaq.bench.tracking import log_run

        ctx = self.model(cell.model)
        run_id = log_run(f"gaq-{self.bench.name}", _run_name(cell),
                         self._params(cell, ctx), {},
                         self._tags(cell, cid, ctx) | {"gaq.error": error},
                         start_time=time.time(), parent=self.sweep_run, status="FAILED")
        row = _cell_keys(cell, cid, run_id, self.bench.name) | {"error": error}
        results.append(self.dir / "failures.parquet", pd.DataFrame([row]))

    def _params(self, cell: Cell, ctx: _ModelContext) -> dict:
        return {"model": cell.model, "method": cell.method.name, "row": cell.method.row,
                "preset": cell.method.preset, "bits": cell.bits, "seed": cell.seed,
                "sampler": ctx.sampler.to_dict(),
                "calibration": ctx.calibration.to_dict(),
                "eval": self.bench.eval.to_dict(),
                "method_config": (cell.method.config().to_dict()
                                  if cell.method.name != FP else {})}

    def _tags(self, cell: Cell, cid: str, ctx: _ModelContext) -> dict[str, str]:
        from gaq.bench.provenance import provenance

        code = _method_code(cell.method.name) or {}
        tags = provenance([cell.seed]) | {f"gaq.method_code.{k}": v for k, v in code.items()}
        what = ("the full-precision model" if cell.method.name == FP else
                f"{labels.method_label(cell.method.row)} (`{cell.method.row}`, preset "
                f"`{cell.method.preset}`) at {cell.bits}")
        note = (f"Benchmark `{self.bench.name}`, model `{cell.model}`: {what}, seed "
                f"{cell.seed}. Its rows in Parquet carry cell id `{cid}`.")
        return tags | {"mlflow.note.content": note,
                       "gaq.cell_id": cid, "gaq.benchmark": self.bench.name,
                       "gaq.backend": "fake-quant (PyTorch)",
                       "gaq.engine": _engine(self.engine, self.world.size),
                       "gaq.dtype": str(ctx.pipe.dtype).replace("torch.", ""),
                       "gaq.device": self.device}

    def _persist_step(self, out: CellOutcome, state_dir: Path) -> dict[str, float]:
        """The sample grid, the MLflow run (with the state files as artifacts), then the
        Parquet rows; returns the headline metrics it logged."""
        from gaq.bench import results
        from gaq.bench.tracking import log_run

        cell, cid, ctx, metrics = out.cell, out.cid, self.model(out.cell.model), out.metrics
        stem = _file_name(f"{ctx.pipe.name}_{cell.method.row}_{cell.bits}_seed{cell.seed}")
        grid_path = self.dir / "grids" / f"{stem}.png"
        _save_grid(out.images[:64], grid_path)
        artifacts = {"samples": grid_path}  # the noise curves go as curves/*.csv and *.png
        for f in state_dir.iterdir():
            artifacts[f"state/{f.name}"] = f

        w_bits, a_bits = _bits(cell.bits)
        run_id = log_run(f"gaq-{self.bench.name}", _run_name(cell),
                         self._params(cell, ctx), metrics, self._tags(cell, cid, ctx), artifacts,
                         {f"{name}_by_timestep": list(curve.items())
                          for name, curve in out.curves.items()},
                         start_time=out.started, parent=self.sweep_run)
        setup = _setup_label(self.device, ctx.pipe.dtype, self.world.size)
        base = _cell_keys(cell, cid, run_id, self.bench.name) | {
            "w_bits": w_bits, "a_bits": a_bits, "setup": setup}
        # the columns that tie a curve or diagnostic row to its cell; the metric rows go
        # last: they mark the cell done, so a cell killed before them is re-run, and the
        # rerun's rows replace what the killed attempt appended (same cell id)
        keys = ("run_id", "cell_id", "benchmark", "model", "method", "bits", "seed")
        tables = dict(out.diagnostics)
        if out.per_image is not None:
            tables["per_image"] = out.per_image
        if out.per_trajectory is not None and cell.method.name != FP:
            tables["per_trajectory"] = out.per_trajectory
        for name, frame in tables.items():
            for k in reversed(keys):
                frame.insert(0, k, base[k])
            results.append(self.dir / f"{name}.parquet", frame)
        if out.curves:
            crow = [{k: base[k] for k in keys}
                    | {"curve": name, "timestep": int(t), "value": float(v)}
                    for name, curve in out.curves.items() for t, v in curve.items()]
            results.append(self.curves_path, pd.DataFrame(crow))
        rows = [base | {"metric": k, "value": float(v)} for k, v in metrics.items()]
        results.append(self.metrics_path, pd.DataFrame(rows))
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("fid", "kid", "psnr", "eps_mse", "calibration_seconds")}
        self.log(f"    {shown}")
        return shown


def _cell_keys(cell: Cell, cid: str, run_id: str, benchmark: str) -> dict:
    """The columns that identify a cell's rows in every results table."""
    return {"run_id": run_id, "cell_id": cid, "benchmark": benchmark, "model": cell.model,
            "method": cell.method.row, "preset": cell.method.preset, "bits": cell.bits,
            "seed": cell.seed}


def _run_name(cell: Cell) -> str:
    """A cell's MLflow run name: the row's label first (the UI cuts long names at the
    right, and GAQ's variants differ only in their label's end), then model, bit-width
    and seed (one experiment holds every model of a benchmark)."""
    return f"{labels.method_label(cell.method.row)} · {cell.model} {cell.bits} s{cell.seed}"


def _engine(engine: str, world_size: int) -> str:
    return "torchrun" if world_size > 1 else engine


def _method_code(name: str) -> dict[str, str] | None:
    from gaq.bench.provenance import method_code
    from gaq.bench.spec import FP
    from gaq.registry import get_method

    return None if name == FP else method_code(get_method(name))


def _setup_label(device: str, dtype: torch.dtype, world_size: int) -> str:
    """The setup a row was measured on, for tables and plots to pivot on: device type and
    GPU model, world size, dtype and engine (e.g. ``cpu x1 float32 local``)."""
    dev = torch.device(device)
    name = dev.type
    if dev.type == "cuda":
        name += f" {torch.cuda.get_device_name(dev)}"
    dtype_name = str(dtype).replace("torch.", "")
    # a Ray task runs its cell exactly as the local engine does (identical results at the
    # same thread count), so its rows pivot with the local ones; the run's tags name Ray
    return f"{name} x{world_size} {dtype_name} {_engine('local', world_size)}"


def _file_name(text: str) -> str:
    """A name that stays one file inside its folder: model ids may be paths or hub ids."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text).lstrip(".") or "_"


def _model_size_mb(model: torch.nn.Module, report) -> float:
    """Storage of the denoiser: quantized weights at their bit-width, everything else fp32."""
    bits = {d.name: d.weight_bits for d in report or [] if d.weight_bits is not None}
    total = 0
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        total += p.numel() * (bits[layer] if name.endswith(".weight") and layer in bits else 32)
    return total / 8 / 2**20


def _save_grid(images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, int(len(images) ** 0.5))
    big = torch.nn.functional.interpolate((images + 1) / 2, scale_factor=2, mode="nearest")
    save_image(big, str(path), nrow=n, padding=1, pad_value=1.0)
