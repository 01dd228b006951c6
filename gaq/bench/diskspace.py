"""The disk a benchmark sweep writes, estimated before any cell runs: per place (the MLflow
artifact store, the calibration cache, the results folder), and checked against the free
space of the file systems those places share. Preflight (:meth:`Runner.preflight`) calls
:func:`check_free_space`, so a sweep that would fill a disk stops before its first cell
instead of after hours of work."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote, urlparse

from gaq.bench.context import cells
from gaq.bench.spec import FP
from gaq.config import QuantConfig
from gaq.errors import GaqError
from gaq.eval.registry import metrics_of_kind

if TYPE_CHECKING:
    from gaq.bench.runner import Runner

__all__ = ["SpaceNeeded", "check_free_space", "space_needed"]

# the disk estimate's allowances (space_needed): curves a cell logs (eps_mse before and
# after a sampler correction, slopes), each curve's PNG on the run page, a Parquet row,
# diagnostics rows of a quantized cell, the tables and plots (per bit-width, and fixed)
_CURVES_PER_CELL = 4
_CURVE_PNG_BYTES = 200 * 2**10
_PARQUET_ROW_BYTES = 128
_DIAGNOSTIC_ROWS = 10_000
_REPORT_BYTES_PER_BITS = 4 * 2**20
_REPORT_BYTES = 4 * 2**20


class SpaceNeeded(NamedTuple):
    """Bytes a sweep writes (:func:`space_needed`), per place."""

    artifacts: int  # the MLflow artifact store
    cache: int  # the calibration cache
    results: int  # the results folder (grids, Parquet, tables, plots)

def space_needed(runner: Runner) -> SpaceNeeded:
    """Bytes the sweep writes, per place (an upper estimate: every file a cell
    writes). The MLflow artifact store: each quantized cell's state (weight codes at
    their bit-width and activation tables, :func:`gaq.cell.state_size_bound`; cells a
    method is left out of keep nothing), and each cell's sample grid and curve files.
    The calibration cache: each model's calibration sets. The results folder: each
    cell's sample grid, its Parquet rows (twice: a table is rewritten beside the old
    one, then renamed) and the tables and plots. Block caches streamed during
    reconstruction are transient and not counted."""
    from gaq.cell import state_size_bound
    from gaq.registry import get_method

    grid = cells(runner.bench)
    ev = runner.bench.eval
    artifacts = cache = written = 0
    for model_id in runner.bench.models:
        ctx = runner.model(model_id)
        run = [c for c in grid if c.model == model_id and (
            c.method.name == FP
            or not get_method(c.method.name).unsupported(ctx.adapter.arch))]
        quantized = sum(1 for c in run if c.method.name != FP)
        bounds: dict[tuple[int, str], int] = {}  # a method's seeds share a state size
        for c in run:
            if c.method.name != FP and (id(c.method), c.bits) not in bounds:
                bounds[id(c.method), c.bits] = state_size_bound(
                    ctx.pipe, get_method(c.method.name)(c.method.config()),
                    QuantConfig.from_bits(c.bits))
            if c.method.name != FP:
                artifacts += bounds[id(c.method), c.bits]
        # the grid of up to 64 images at twice their size, as uncompressed RGB at
        # most; a copy goes to the artifact store
        _, h, w = ctx.pipe.latent_shape
        if ctx.pipe.autoencoder is not None:
            scale = 2 ** (len(getattr(ctx.pipe.autoencoder.config, "block_out_channels",
                                      (0,))) - 1)
            h, w = h * scale, w * scale
        images = min(64, ev.num_images)
        grid_bytes = images * 3 * (2 * h + 2) * (2 * w + 2) + 2**16
        curves = (_CURVES_PER_CELL if metrics_of_kind(ev.metrics, "curve")
                  and ev.heldout_trajectories > 0 else 0)
        steps = ctx.sampler.steps + 1
        artifacts += len(run) * (grid_bytes + curves * (_CURVE_PNG_BYTES + 32 * steps))
        rows = (len(ev.metrics) + 16 + curves * (steps + ev.heldout_trajectories)
                + ev.num_images * len(metrics_of_kind(ev.metrics, "paired")))
        written += len(run) * (grid_bytes + 2 * rows * _PARQUET_ROW_BYTES)
        written += quantized * 2 * _DIAGNOSTIC_ROWS * _PARQUET_ROW_BYTES
        written += len(runner.bench.bits) * _REPORT_BYTES_PER_BITS
        cal = ctx.calibration
        kept = len(cal.kept_steps())  # held-out rows at each; training rows too (interval)
        # training trajectories: at the kept steps (interval, a step selection such as
        # srm), at every step with activation-only rows, at one step each (gaussian)
        train_steps = (cal.steps if cal.act_every_step
                       else kept if cal.protocol != "gaussian" else 1)
        rows = (cal.num_train_trajectories * train_steps
                + cal.holdout_per_step * kept) * (2 if cal.guidance else 1)
        per_row = 2 * math.prod(ctx.pipe.latent_shape) * 4  # x_t and the FP noise
        cache += len(runner.bench.eval.seeds) * rows * per_row
    return SpaceNeeded(artifacts, cache, written + _REPORT_BYTES)

def check_free_space(runner: Runner) -> None:
    """Enough free disk for :func:`space_needed`, checked before any cell runs: per
    place, and summed over the places that share a file system."""
    from gaq.bench.tracking import artifact_root
    from gaq.calibration import default_cache_dir

    need = space_needed(runner)
    root = artifact_root()
    places = [(Path(unquote(urlparse(root).path)) if root else runner.dir, need.artifacts,
               "the MLflow artifact store (a quantized state per cell)",
               "or move the store (MLFLOW_TRACKING_URI)"),
              (default_cache_dir(), need.cache, "the calibration cache ($GAQ_CACHE)",
               "or move the cache (GAQ_CACHE)"),
              (runner.dir, need.results, "the results (sample grids, Parquet tables, "
               "tables and plots)", "or choose another --results")]
    devices: dict[int, list] = {}
    for folder, bytes_, what, fix in places:
        probe = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if probe is None or bytes_ == 0:
            continue
        devices.setdefault(probe.stat().st_dev, []).append((folder, bytes_, what, fix,
                                                            probe))
    for shared in devices.values():
        free = shutil.disk_usage(shared[0][4]).free
        for folder, bytes_, what, fix, _ in shared:
            if bytes_ * 1.1 > free:
                raise GaqError(f"{runner.bench.path}: this sweep needs about {_size(bytes_)} "
                               f"free for {what} under {folder}, but {_size(free)} are "
                               f"free; free some space, {fix}")
        total = sum(b for _, b, *_ in shared)
        if total * 1.1 > free:
            names = "; ".join(f"{_size(b)} for {what} under {folder}"
                              for folder, b, what, _, _ in shared)
            raise GaqError(f"{runner.bench.path}: this sweep needs about {_size(total)} "
                           f"free on one file system ({names}), but {_size(free)} are "
                           "free; free some space, or move the MLflow store, the cache "
                           "(MLFLOW_TRACKING_URI, GAQ_CACHE) or --results elsewhere")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
