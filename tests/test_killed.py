"""A sweep killed (SIGKILL) at each phase of a cell loses nothing and resumes to the same
numbers: the results already written stay readable, the killed cell is re-run from the
start, its rows appear once, a temp file left by a write cut short and the killed cell's
temp folder are cleaned up, and the killed sweep's MLflow run (and a cell run cut short
while being logged) is marked KILLED by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlflow
import pandas as pd
import pytest
from isolation import isolate_stores

from gaq.cli import main

BENCH = """
models = ["digits"]
bits = ["W4A8"]
methods = [{ name = "fp" }, { name = "rtn", preset = "cpu" }]

[benchmark]
name = "kill"

[sampler]
steps = 4

[calibration]
interval = 2
samples_per_step = 8

[eval]
num_images = 32
batch_size = 16
seeds = [0]
metrics = ["fid", "psnr"]
"""

TIMING = {"calibration_seconds", "images_per_second", "peak_memory_mb"}

# Run the CLI with one function patched to SIGKILL the process at a phase of the second
# cell (rtn; the first, fp, completes): as a kill -9 or an out-of-memory kill would.
KILLER = textwrap.dedent("""
    import os, signal, sys
    phase = sys.argv[1]
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if phase == "calibrating":
        from gaq.methods.rtn import RTN
        RTN.quantize = lambda *a, **k: die()
    elif phase == "sampling":
        import gaq.sampling as s
        orig_sample = s.sample_batch
        def sample_batch(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # fp took two batches: the rtn cell's first batch
                die()
            return orig_sample(*a, **k)
        s.sample_batch = sample_batch
    elif phase == "logged":
        import gaq.bench.tracking as t
        orig_log = t.log_run
        def log_run(*a, **k):
            run_id = orig_log(*a, **k)
            calls["n"] += 1
            if calls["n"] == 2:  # the rtn cell is in MLflow, not yet in Parquet
                die()
            return run_id
        t.log_run = log_run
    elif phase == "metrics":
        import gaq.eval.metrics as m
        orig_metrics = m.image_metrics
        def image_metrics(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:  # the rtn cell's FID
                die()
            return orig_metrics(*a, **k)
        m.image_metrics = image_metrics
    elif phase == "logging":
        import mlflow
        orig_artifact = mlflow.MlflowClient.log_artifact
        def log_artifact(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:  # fp logged one (its grid): the rtn cell's run is RUNNING
                die()
            return orig_artifact(self, *a, **k)
        mlflow.MlflowClient.log_artifact = log_artifact
    elif phase == "writing":
        import gaq.bench.results as r
        orig_write = r._write_atomic
        def write(df, path):
            if path.name == "metrics.parquet" and path.exists():  # the rtn cell's rows
                tmp = path.parent / f".{path.name}.dead.tmp"
                tmp.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
                die()
            return orig_write(df, path)
        r._write_atomic = write
    from gaq.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _values(results) -> pd.Series:
    df = pd.read_parquet(results / "kill" / "metrics.parquet")
    df = df[~df["metric"].isin(TIMING)]
    return df.set_index(["method", "bits", "metric"])["value"].sort_index()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The same benchmark, never killed: the numbers every resumed run must give."""
    root = tmp_path_factory.mktemp("clean")
    (root / "kill.toml").write_text(BENCH)
    mp = pytest.MonkeyPatch()
    isolate_stores(mp, root)
    assert main(["bench", str(root / "kill.toml"), "--results", str(root / "results"),
                 "--reference", str(root / "none")]) == 0
    mp.undo()
    return _values(root / "results")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["calibrating", "sampling", "metrics", "logging", "logged",
                                   "writing"])
def test_a_sweep_killed_at_each_phase_resumes_to_the_same_numbers(clean, tmp_path,
                                                                  monkeypatch, phase):
    (tmp_path / "kill.toml").write_text(BENCH)
    results = tmp_path / "results"
    args = ["bench", str(tmp_path / "kill.toml"), "--results", str(results),
            "--reference", str(tmp_path / "none")]
    env = {**os.environ, **isolate_stores(monkeypatch, tmp_path), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, phase, *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = list(tmp_path.glob("gaq-state-*"))  # the killed cell's temp folder, if it had one

    # what was written before the kill is intact: the fp cell, readable, once
    metrics = pd.read_parquet(results / "kill" / "metrics.parquet")
    assert set(metrics["method"]) == {"fp"} and metrics["cell_id"].nunique() == 1

    assert main(args) == 0

    metrics = pd.read_parquet(results / "kill" / "metrics.parquet")
    assert metrics.groupby(["cell_id", "metric"]).size().max() == 1  # no duplicate rows
    pd.testing.assert_series_equal(_values(results), clean)
    assert not list((results / "kill").glob(".*.tmp"))
    assert not [p for p in left if p.exists()]  # removed by the next start

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweeps = [r for r in client.search_runs(
        [client.get_experiment_by_name("gaq-kill").experiment_id])
        if r.data.tags.get("gaq.sweep") == "1"]
    assert sorted(r.info.status for r in sweeps) == ["FINISHED", "KILLED"]
    runs = client.search_runs([client.get_experiment_by_name("gaq-kill").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]  # none left running
    for run_id in metrics["run_id"].unique():  # every stored row points at a finished run
        assert client.get_run(run_id).info.status == "FINISHED"
