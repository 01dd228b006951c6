"""The Ray engine on a local Ray runtime with fake GPU resources: every cell is a task
placed on one (fake) GPU, a worker crash is recovered, a half-finished sweep resumes,
and the results equal the local engine's."""

from __future__ import annotations

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from gaq.bench.runner import Runner, cells  # noqa: E402
from gaq.bench.spec import load_benchmark  # noqa: E402

MICRO = """
models = ["digits"]
bits = ["W8A8"]
methods = [
  "fp", "rtn",
  { name = "brecq", config = { recon = { weight_iters = 2, act_iters = 2 } } },
]

[benchmark]
name = "{name}"

[sampler]
steps = 3

[calibration]
interval = 2
samples_per_step = 4

[eval]
num_images = 8
batch_size = 8
seeds = [0]
metrics = ["fid", "psnr", "eps_mse"]
heldout_trajectories = 2

[setup]
gpus = 1
"""
TIMING = {"calibration_seconds", "images_per_second", "peak_memory_mb"}


def _bench(tmp_path, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(MICRO.replace("{name}", name))
    return load_benchmark(path)


def _values(folder):
    df = pd.read_parquet(folder / "metrics.parquet")
    df = df[~df["metric"].isin(TIMING)]
    return df.set_index(["method", "bits", "metric"])["value"].sort_index()


@pytest.fixture(scope="module")
def ray_runtime():
    # fake GPUs: placement is checked by Ray's accounting, the cells run on the CPU
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_places_recovers_resumes_and_matches_local(ray_runtime, tmp_path,
                                                              monkeypatch):
    from gaq.bench.engines.ray_tasks import CRASH_ONCE_ENV, run_ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    # the local engine, for reference, with the thread count the Ray tasks get: float
    # results depend on it (why the engine sets it in every worker)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Runner(_bench(tmp_path, "local"), tmp_path / "results", log=lambda _t: None).run()
        # half a sweep: only FP has run when the sweep is interrupted
        bench = _bench(tmp_path, "swept")
        half = Runner(bench, tmp_path / "results", log=lambda _t: None)
        half.preflight()
        fp_cell = next(c for c in cells(bench) if c.method.name == "fp")
        half.run_cell(fp_cell, half.cell_id(fp_cell))
    finally:
        torch.set_num_threads(before)
    # resume on Ray, with the first task's worker killed mid-flight
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    runner = Runner(bench, tmp_path / "results", device="cpu", log=lambda _t: None)
    run_ray(runner, threads=1)
    assert marker.exists()  # a worker did crash, and its cell was retried
    statuses = sorted(p["status"] for p in runner.placements)
    assert statuses == ["done", "done"]  # FP was skipped before submission
    assert all(len(p["gpu_ids"]) == 1 for p in runner.placements)
    local, swept = _values(tmp_path / "results" / "local"), _values(tmp_path / "results" / "swept")
    assert list(local.index) == list(swept.index)
    differ = local[local.to_numpy() != swept.to_numpy()]
    assert differ.empty, (differ, swept[differ.index])  # exact (0.0 == -0.0 included)
    df = pd.read_parquet(tmp_path / "results" / "swept" / "metrics.parquet")
    assert df.groupby("method")["cell_id"].nunique().to_dict() == {"brecq": 1, "fp": 1,
                                                                   "rtn": 1}
