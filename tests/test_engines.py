"""Engines are plug-ins: one registry, one plan of the cells left to run, and a new engine
is one class (here a test's, registered as another package would)."""

from __future__ import annotations

import pandas as pd
import pytest
from isolation import isolate_stores

from gaq.bench.engines import ENGINES, get_engine
from gaq.bench.engines.base import Engine, plan
from gaq.bench.engines.local import LocalEngine
from gaq.cli import main

BENCH = """
models = ["digits"]
bits = ["W8A8"]
methods = [{ name = "fp" }, { name = "rtn", preset = "cpu" }]

[benchmark]
name = "eng"

[sampler]
steps = 3

[calibration]
interval = 3
samples_per_step = 4

[eval]
num_images = 8
batch_size = 8
seeds = [0]
metrics = ["psnr"]
heldout_trajectories = 0
"""

SEEN: list[list[str]] = []


class ReversedEngine(Engine):
    """Runs the planned cells last first: what another engine would reuse is the plan,
    the claim and the runner's cell step, nothing else."""

    name = "reversed"

    def run(self, runner, *, threads=None, address=None):
        self.check(address)
        runner.preflight()
        with runner.sweep():
            grid, todo = plan(runner)
            SEEN.append([p.cell.label for p in todo])
            for p in reversed(todo):
                with runner.claim(p.cid) as mine:
                    if mine:
                        runner.attempt_cell(p.cell, p.cid)
            runner.write_reports()
        return pd.read_parquet(runner.metrics_path)


@pytest.fixture
def bench(tmp_path, monkeypatch):
    isolate_stores(monkeypatch, tmp_path)
    monkeypatch.setattr(ENGINES, "_targets", dict(ENGINES._targets))
    ENGINES.register("reversed", ReversedEngine)
    SEEN.clear()
    path = tmp_path / "eng.toml"
    path.write_text(BENCH)
    return path


def test_the_builtin_engines_are_registered():
    assert {"local", "ray"} <= set(ENGINES.names())
    assert isinstance(get_engine("local"), LocalEngine)


@pytest.mark.slow
def test_a_registered_engine_runs_a_benchmark_and_resumes(bench, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", str(bench), "--results", str(out), "--engine", "reversed"]) == 0
    assert len(SEEN[0]) == 2  # FP and RTN, planned once
    df = pd.read_parquet(out / "eng" / "metrics.parquet")
    assert set(df["method"]) == {"fp", "rtn"}
    # a second run plans nothing: every cell is done, whichever engine ran it
    assert main(["bench", str(bench), "--results", str(out), "--engine", "local"]) == 0
    assert main(["bench", str(bench), "--results", str(out), "--engine", "reversed"]) == 0
    assert SEEN[-1] == []


def test_an_unknown_engine_is_one_line_with_a_suggestion(bench, tmp_path, capsys):
    assert main(["bench", str(bench), "--results", str(tmp_path / "r"),
                 "--engine", "reversd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown engine 'reversd'" in err[0] and "reversed" in err[0]
    assert not (tmp_path / "r" / "eng").exists()


def test_address_is_refused_by_an_engine_without_a_cluster(bench, tmp_path, capsys):
    assert main(["bench", str(bench), "--results", str(tmp_path / "r"),
                 "--address", "auto"]) == 2
    assert "--address" in capsys.readouterr().err
