"""A cell that diverges is recorded as failed and the sweep goes on: the other cells run,
the tables say "diverged", MLflow has a FAILED run with the error, the command exits
non-zero in one line at the end, a rerun skips the failed cell, --retry-failed reruns it."""


import mlflow
import pandas as pd
import pytest
import torch
from isolation import isolate_stores

from gaq.cli import main
from gaq.methods.rtn import RTN

BENCH = """
models = ["digits"]
bits = ["W8A8", "W4A8"]
methods = [{ name = "fp" }, { name = "rtn", preset = "cpu" }]

[benchmark]
name = "div"

[sampler]
steps = 4

[calibration]
interval = 2
samples_per_step = 8

[eval]
num_images = 32
batch_size = 32
seeds = [0]
metrics = ["fid", "psnr"]
"""


@pytest.fixture
def bench(tmp_path, monkeypatch):
    isolate_stores(monkeypatch, tmp_path)
    path = tmp_path / "div.toml"
    path.write_text(BENCH)
    return path


def _poison_w4(monkeypatch):
    """RTN at W4A8 returns a model whose output is NaN (as a diverged calibration would,
    past the parameter check): the cell fails when it samples."""
    original = RTN.quantize

    def quantize(self, model, adapter, calib, quant):
        result = original(self, model, adapter, calib, quant)
        if quant.weight.bits == 4:
            result.model.register_forward_hook(lambda _m, _i, out: _nan(out))
        return result

    monkeypatch.setattr(RTN, "quantize", quantize)


def _nan(out):
    sample = out.sample if hasattr(out, "sample") else out[0]
    sample.fill_(float("nan"))
    return out


@pytest.mark.slow
def test_a_diverged_cell_is_recorded_and_the_sweep_goes_on(bench, tmp_path, monkeypatch,
                                                            capsys):
    results = tmp_path / "results"
    args = ["bench", str(bench), "--results", str(results), "--reference",
            str(tmp_path / "none")]
    with monkeypatch.context() as mp:
        _poison_w4(mp)
        assert main(args) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err
    assert "1 cell(s) failed" in err and "--retry-failed" in err
    assert "digits / rtn / W4A8 / seed 0" in err
    assert "FAILED" in out and "the sweep goes on" in out

    # the other cells ran and are stored; the failure is stored with its error
    metrics = pd.read_parquet(results / "div" / "metrics.parquet")
    assert {(m, b) for m, b in zip(metrics["method"], metrics["bits"], strict=True)} == {
        ("fp", "FP"), ("rtn", "W8A8")}
    failures = pd.read_parquet(results / "div" / "failures.parquet")
    assert list(failures["method"]) == ["rtn"] and list(failures["bits"]) == ["W4A8"]
    assert "NaN" in failures["error"][0]

    # the tables show it, in Markdown and LaTeX
    md = (results / "tables" / "div.md").read_text()
    w4_row = next(line for line in md.splitlines() if line.startswith("| RTN"))
    assert "diverged" in w4_row and "Diverged:" in md
    assert "diverged" in (results / "tables" / "div.tex").read_text()

    # MLflow: a FAILED run carrying the error, next to the finished ones
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["gaq-div"])
    failed = runs[runs["status"] == "FAILED"]
    assert len(failed) == 1 and "NaN" in failed["tags.gaq.error"].iloc[0]
    assert failed["run_id"].iloc[0] == failures["run_id"][0]

    # a rerun skips the failed cell (it would diverge again) and succeeds
    assert main(args) == 0
    assert "failed earlier, skipped" in capsys.readouterr().out

    # --retry-failed runs it again; now that it succeeds it is no longer failed
    assert main(args + ["--retry-failed"]) == 0
    metrics = pd.read_parquet(results / "div" / "metrics.parquet")
    assert ("rtn", "W4A8") in set(zip(metrics["method"], metrics["bits"], strict=True))
    assert "diverged" not in (results / "tables" / "div.md").read_text()
    assert torch.isfinite(torch.tensor(metrics["value"].to_numpy())).all()


class _FakeRay:
    """Runs Ray tasks synchronously in this process (what matters here is how the engine
    handles a task's result, not Ray's scheduling, which tests/test_ray_engine.py covers)."""

    def __init__(self):
        self.results = {}

    def cluster_resources(self):
        return {"CPU": 2}

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return self.results[ref]

    def task(self, fn):
        fake = self

        class Task:
            @staticmethod
            def remote(*args):
                ref = object()
                fake.results[ref] = fn(*args)
                return ref

        return Task


@pytest.mark.slow
def test_the_ray_engine_records_a_diverged_cell_and_goes_on(bench, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from gaq.bench.engines import ray_tasks as ray_engine
    from gaq.bench.runner import Runner, cells
    from gaq.bench.spec import load_benchmark

    _poison_w4(monkeypatch)
    spec = load_benchmark(bench)
    runner = Runner(spec, tmp_path / "results", log=lambda _t: None)
    runner.preflight()
    grid = cells(spec)
    todo = [(i, runner.cell_id(c)) for i, c in enumerate(grid)]
    fake = _FakeRay()
    monkeypatch.setattr(ray_engine, "_RUNNERS", {})
    # outside a Ray worker, ray.get_gpu_ids() would start a Ray runtime in this process
    monkeypatch.setattr(ray_engine, "_gpu_ids", lambda: [])
    ray_engine._run_tasks(fake, runner, fake.task(ray_engine._run_cell), todo, grid, 1, 0,
                          None)
    assert [label for label, _ in runner.failures] == ["digits / rtn / W4A8 / seed 0"]
    failures = pd.read_parquet(tmp_path / "results" / "div" / "failures.parquet")
    assert list(failures["bits"]) == ["W4A8"] and "NaN" in failures["error"][0]
    metrics = pd.read_parquet(tmp_path / "results" / "div" / "metrics.parquet")
    assert set(zip(metrics["method"], metrics["bits"], strict=True)) == {
        ("fp", "FP"), ("rtn", "W8A8")}
