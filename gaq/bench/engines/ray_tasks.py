"""The Ray engine: one Ray task per cell of a benchmark grid, across a cluster's GPUs.

Ray does the scheduling, placement and recovery; the suite adds nothing of its own. Each
task runs one cell exactly as the local engine does (:meth:`Runner.run_cell`) and
persists it itself (Parquet appends are locked, MLflow runs are per cell), so a retried
task or a restarted sweep skips every finished cell by its content-hashed id. Tasks are
retried after a worker crash and after exceptions (``max_retries``).

Threads: Ray starts workers with one intra-op thread, which changes float results
against a local run; every task sets ``threads`` explicitly and reserves as many CPUs.
GPUs per cell come from the benchmark's ``[setup] gpus`` (default: 1 on a CUDA device, 0
on the CPU).

Ray is an optional extra (``pip install 'gaq[ray]'``); the local engine needs none.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import pandas as pd

from gaq.bench.engines.base import Engine, plan
from gaq.errors import GaqError

__all__ = ["RayEngine", "run_ray"]

#: Fault injection for the recovery test, read by the driver and handed to the tasks: a
#: path; the first task to find it missing creates it and kills its own worker process,
#: as a crash would.
CRASH_ONCE_ENV = "GAQ_RAY_CRASH_ONCE"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise GaqError("--engine ray needs Ray: pip install 'gaq[ray]' (or use the default "
                       "local engine)") from None
    return ray


def _run_cell(bench: Any, results_dir: str, device: str, index: int, cid: str,
              threads: int, crash_marker: str | None = None,
              force: bool = False, sweep_run: str | None = None,
              retry_failed: bool = False) -> dict[str, Any]:
    """One cell in a Ray worker; returns what the driver logs and checks."""
    import torch

    from gaq.bench import results
    from gaq.bench.runner import Runner, cells

    torch.set_num_threads(threads)
    if crash_marker and not Path(crash_marker).exists():
        Path(crash_marker).touch()
        os._exit(1)  # a worker crash: Ray restarts the task elsewhere
    # Ray reuses worker processes: one runner per benchmark and worker keeps each model's
    # pipeline, reference features and FP samples across that worker's cells
    key = (pickle.dumps(bench), results_dir, device)
    runner = _RUNNERS.get(key)
    if runner is None:
        _RUNNERS.clear()
        runner = _RUNNERS[key] = Runner(bench, results_dir, device=device,
                                        retry_failed=retry_failed, log=lambda _text: None)
        runner.join_local()
        runner.engine = "ray"
    runner.sweep_run = sweep_run  # the driver's MLflow parent run
    cell = cells(bench)[index]
    gpu_ids = _gpu_ids()
    with runner.claim(cid) as mine:
        if not mine:  # another sweep on the same results folder is running it
            return {"index": index, "status": "running elsewhere", "gpu_ids": gpu_ids}
        if not force and cid in set(results.read(runner.metrics_path)["cell_id"]):
            return {"index": index, "status": "skipped", "gpu_ids": gpu_ids}
        # a diverged cell is recorded as failed by the worker and not retried by Ray
        runner.failures.clear()
        shown = runner.attempt_cell(cell, cid)
    if runner.failures:
        return {"index": index, "status": "failed", "error": runner.failures[0][1],
                "gpu_ids": gpu_ids}
    return {"index": index, "status": "done", "gpu_ids": gpu_ids, "threads": threads,
            "shown": shown}


#: This worker process's runner (see _run_cell); one benchmark at a time.
_RUNNERS: dict[tuple, Any] = {}


def _gpu_ids() -> list:
    import ray

    if not ray.is_initialized():  # outside Ray: asking would start a Ray runtime here
        return []
    try:
        return list(ray.get_gpu_ids())
    except Exception:  # outside a Ray worker
        return []


def run_ray(runner: Any, address: str | None = None, threads: int | None = None,
            max_retries: int = 3) -> pd.DataFrame:
    """Run ``runner``'s grid as Ray tasks (``address``: an existing cluster, e.g.
    ``ray://head:10001`` or ``auto``; None starts a local runtime)."""
    import torch

    ray = _import_ray()
    runner.preflight()  # everything that can fail, before any task is submitted
    bench = runner.bench
    threads = threads or torch.get_num_threads()
    on_cuda = torch.device(runner.device).type == "cuda"
    # GPUs per cell: the benchmark's [setup] gpus, else one on a CUDA device
    gpus = float(bench.setup.get("gpus", 1 if on_cuda else 0))
    grid, planned = plan(runner)
    todo = [(p.index, p.cid) for p in planned]
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports by default
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(_run_cell).options(num_cpus=threads, num_gpus=gpus,
                                         max_retries=max_retries, retry_exceptions=True)
    crash = os.environ.get(CRASH_ONCE_ENV)
    with runner.sweep():
        return _run_tasks(ray, runner, task, todo, grid, threads, gpus, crash)


def _run_tasks(ray, runner, task, todo, grid, threads, gpus, crash) -> pd.DataFrame:
    from gaq.bench import results

    pending = {task.remote(runner.bench, str(runner.dir.parent), runner.device, i, cid,
                           threads, crash, runner.force, runner.sweep_run,
                           runner.retry_failed): i
               for i, cid in todo}
    slots = int(ray.cluster_resources().get("CPU", 1) // threads)
    runner.log(f"ray: {len(pending)} cells as tasks ({threads} threads, {gpus:g} GPU each; "
               f"{slots} at a time on this cluster's CPUs)")
    placed = []
    start = time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        out = ray.get(ready[0])
        placed.append(out)
        minutes = (time.perf_counter() - start) / 60
        runner.log(f"[{i + 1}/{len(grid)}] {grid[i].label}: {out['status']} "
                   f"({minutes:.1f} min, {len(pending)} to go)")
        if out.get("shown"):
            runner.log(f"    {out['shown']}")
        if out["status"] == "failed":
            runner.failures.append((grid[i].label, out["error"]))
            runner.log(f"    FAILED: {out['error']}; the sweep goes on")
    runner.write_reports()
    runner.placements = placed
    return results.read(runner.metrics_path)


class RayEngine(Engine):
    """One Ray task per cell (:func:`run_ray`)."""

    name = "ray"

    def check(self, address: str | None) -> None:
        _import_ray()  # one line, before any work, when Ray is not installed

    def run(self, runner: Any, *, threads: int | None = None,
            address: str | None = None) -> pd.DataFrame:
        return run_ray(runner, address=address, threads=threads)
