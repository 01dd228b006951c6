"""Bad inputs and faults end in one clear line and a non-zero exit, before any compute
where the input allows it, with nothing written and no MLflow run left behind: output
paths, damaged results tables, disk space, model folders, benchmark keys; and the MLflow
store survives kills and concurrent first use."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch
from isolation import isolate_stores

from gaq.cli import main
from gaq.errors import GaqError

pytestmark = pytest.mark.usefixtures("one_thread")

# an FP-only sweep: no calibration, a few seconds
FP_ONLY = """
models = ["digits"]
bits = ["W8A8"]
methods = [{ name = "fp" }]

[benchmark]
name = "fponly"

[sampler]
steps = 4

[calibration]
interval = 2
samples_per_step = 8

[eval]
num_images = 16
batch_size = 16
seeds = [0]
metrics = ["fid"]
"""


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gaq: error: "), err
    assert "\x1b" not in err
    return err


def _runs(root: pathlib.Path) -> list:
    """Every MLflow run in the test's store (none if the store was never made)."""
    if not (root / "mlflow.db").exists():
        return []
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _snapshot(root: pathlib.Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def stores(tmp_path, monkeypatch):
    isolate_stores(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture
def no_compute(monkeypatch):
    """Loading a model or calibrating fails the test: the check must come first."""
    import gaq.cell
    import gaq.models.loading

    def forbidden(*a, **k):
        raise AssertionError("computed before the input was checked")

    monkeypatch.setattr(gaq.models.loading, "load_model", forbidden)
    monkeypatch.setattr(gaq.cell, "quantize_pipeline", forbidden)


# -- output paths ------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("file", "is a file, not a folder"),
    ("parent_file", "is a file, not a folder; choose another path"),
    ("not_empty", "exists and is not empty (it holds keep.txt); choose a new folder"),
    ("earlier_state", "holds an earlier quantization state; choose a new folder, or add "
                      "--overwrite"),
    ("overwrite_foreign", "no earlier quantization state, the only thing --overwrite"),
])
def test_quantize_out_is_checked_before_calibration(tmp_path, capsys, no_compute, case,
                                                    message):
    out = tmp_path / "out"
    extra = []
    if case == "file":
        out.write_text("mine")
    elif case == "parent_file":
        (tmp_path / "f").write_text("mine")
        out = tmp_path / "f" / "out"
    elif case in ("not_empty", "overwrite_foreign"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        extra = ["--overwrite"] if case == "overwrite_foreign" else []
    else:
        out.mkdir()
        (out / "state.json").write_text("{}")
        (out / "state.safetensors").write_bytes(b"old")
    before = _snapshot(tmp_path)
    assert main(["quantize", "--out", str(out), *extra]) == 2
    assert message in _one_line(capsys)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {p.relative_to(tmp_path).parts[0] for p in before})  # no temp folder either


def test_an_output_folder_is_written_whole_or_not_at_all(tmp_path):
    from gaq.outputs import output_folder

    out = tmp_path / "state"
    flags = {"what": "quantization state", "marker": "state.json"}
    with pytest.raises(RuntimeError), output_folder(out, "--out", **flags) as tmp:
        (tmp / "state.json").write_text("half")
        raise RuntimeError("killed midway")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp sibling
    with output_folder(out, "--out", **flags) as tmp:
        (tmp / "state.json").write_text("old")
        (tmp / "old.csv").write_text("old")
    with pytest.raises(GaqError, match="--overwrite"), output_folder(out, "--out", **flags):
        pass
    with output_folder(out, "--out", overwrite=True, **flags) as tmp:
        (tmp / "state.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["state.json"]  # replaced, not merged
    assert (out / "state.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_quantize_overwrite_replaces_an_earlier_state_whole(tmp_path, capsys):
    out = tmp_path / "state"
    out.mkdir()
    (out / "state.json").write_text('{"format": 0}')
    (out / "old_diagnostics.csv").write_text("from the earlier run")
    assert main(["quantize", "--steps", "4", "--interval", "2", "--samples-per-step", "4",
                 "--out", str(out), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["layers.md", "state.json",
                                                     "state.safetensors"]
    assert json.loads((out / "state.json").read_text())["meta"]["model"] == "digits"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no temp sibling left


@pytest.mark.parametrize("case", ["file", "not_empty"])
def test_convert_ldm_out_is_checked_first(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    # the checkpoint is not even read: the output path is wrong first
    assert main(["convert-ldm", str(tmp_path / "none.ckpt"), "--preset", "lsun-bedroom",
                 "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"--out {out}" in err and ("is a file" if case == "file" else "not empty") in err
    assert _snapshot(tmp_path) == before


def test_sample_out_that_is_a_folder_fails_before_sampling(tmp_path, capsys, no_compute):
    assert main(["sample", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in _one_line(capsys)


# -- model folders -------------------------------------------------------------------------

def test_pickled_unet_weights_are_refused_unread(tiny_pipeline_dir, tiny_unet, tmp_path,
                                                 capsys):
    unet = tiny_pipeline_dir / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    # a pickle whose loading would run code (here: create the marker file)
    payload = type("Payload", (), {"__reduce__": lambda self: (pathlib.Path.touch,
                                                                (marker,))})()
    torch.save({**tiny_unet.state_dict(), "x": payload}, unet / "diffusion_pytorch_model.bin")
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--num", "1", "--steps", "2",
                 "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "component 'unet' holds only pickled weights (diffusion_pytorch_model.bin)" in err
    assert "safetensors weights only" in err
    assert not marker.exists() and not out.exists()


def test_a_flow_matching_scheduler_config_under_another_class_name_is_refused(
        tiny_pipeline_dir, tmp_path, capsys):
    config = tiny_pipeline_dir / "scheduler" / "scheduler_config.json"
    doc = json.loads(config.read_text())
    doc.update({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    config.write_text(json.dumps(doc))
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]  # what the index claims
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--num", "1", "--steps", "2",
                 "--out", str(out)]) == 2
    assert "FlowMatchEulerDiscreteScheduler (flow matching" in _one_line(capsys)
    assert not out.exists()


# -- benchmark files and keys --------------------------------------------------------------

def test_a_folder_given_as_benchmark_is_named_as_given(tmp_path, capsys):
    folder = tmp_path / "mybench"
    folder.mkdir()
    (folder / "a.toml").write_text(FP_ONLY)
    assert main(["bench", str(folder), "--results", str(tmp_path / "r")]) == 2
    err = _one_line(capsys)
    assert f"benchmark file {folder} is a folder (it holds a.toml)" in err
    assert main(["bench", str(tmp_path / "nope"), "--results", str(tmp_path / "r")]) == 2
    assert f"benchmark file {tmp_path / 'nope'} does not exist" in _one_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("gpus", ['"two"', "-1", "true", "inf"])
def test_setup_gpus_must_be_a_number(tmp_path, capsys, gpus):
    path = tmp_path / "b.toml"
    path.write_text(FP_ONLY + f"\n[setup]\ngpus = {gpus}\nengine = \"ray\"\n")
    assert main(["bench", str(path), "--results", str(tmp_path / "r")]) == 2
    err = _one_line(capsys)
    assert f"{path}: key 'setup.gpus' must be a number of GPUs per cell" in err
    assert not (tmp_path / "r").exists()


def test_more_steps_than_training_timesteps_fail_in_preflight(stores, capsys):
    path = stores / "b.toml"
    path.write_text(FP_ONLY.replace("steps = 4", "steps = 1000000"))
    results = stores / "r"
    assert main(["bench", str(path), "--results", str(results)]) == 2
    err = _one_line(capsys)
    assert "key 'sampler.steps' is 1000000, more steps than the model's 1000 training" in err
    assert not results.exists() and _runs(stores) == []


def test_unknown_metric_line_separates_the_known_ones():
    from gaq.eval.registry import UnknownMetricError

    assert "unknown metric 'bogus'; known: fid, " in str(UnknownMetricError("bogus",
                                                                             ["fid", "kid"]))


def test_error_lines_drop_escape_codes_and_line_breaks(tmp_path, capsys):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": GaqError("x")}, ckpt)  # torch's message is bold
    assert main(["convert-ldm", str(ckpt), "--preset", "lsun-bedroom",
                 "--out", str(tmp_path / "out")]) == 2
    assert "weights_only=True" in _one_line(capsys)


# -- results stores and disk space ---------------------------------------------------------

def _damage(folder: pathlib.Path, case: str) -> pathlib.Path:
    folder.mkdir(parents=True)
    rows = pd.DataFrame({"run_id": ["r"], "cell_id": ["c"], "benchmark": ["fponly"],
                         "model": ["digits"], "method": ["fp"], "bits": ["FP"], "seed": [0],
                         "curve": ["eps_mse"], "timestep": [1], "value": [0.5]})
    if case == "truncated_curves":
        path = folder / "curves.parquet"
        rows.to_parquet(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "corrupt_metrics":
        path = folder / "metrics.parquet"
        path.write_bytes(b"PAR1 not really parquet")
    elif case == "drifted_metrics":  # another program's columns under the name
        path = folder / "metrics.parquet"
        rows.rename(columns={"value": "score"}).to_parquet(path)
    else:  # a diagnostics table with no schema of its own
        path = folder / "per_image.parquet"
        path.write_bytes(b"\x00" * 100)
    return path


@pytest.mark.parametrize("case", ["truncated_curves", "corrupt_metrics", "drifted_metrics",
                                  "corrupt_per_image"])
def test_a_damaged_results_table_fails_before_any_cell_and_any_run(stores, capsys, case):
    path = stores / "fponly.toml"
    path.write_text(FP_ONLY)
    results = stores / "r"
    damaged = _damage(results / "fponly", case)
    before = _snapshot(results)
    assert main(["bench", str(path), "--results", str(results)]) == 2
    err = _one_line(capsys)
    assert f"results table {damaged} cannot be read" in err and "move it away" in err
    assert _snapshot(results) == before  # nothing written, no grid
    assert _runs(stores) == []  # no sweep run, FAILED or otherwise
    assert not (stores / "cache").exists()


def test_a_nearly_full_results_disk_fails_before_any_cell(stores, capsys, monkeypatch):
    """The FP sweep keeps no state, so only the results (grids, Parquet, tables, plots)
    need room: on a file system with 1 MB free it must stop before sampling."""
    import shutil
    from collections import namedtuple

    path = stores / "fponly.toml"
    path.write_text(FP_ONLY)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9, 2**20))
    results = stores / "r"
    assert main(["bench", str(path), "--results", str(results)]) == 2
    err = _one_line(capsys)
    assert "MB free for the results (sample grids, Parquet tables" in err
    assert "but 1 MB are free" in err and "choose another --results" in err
    assert not results.exists() and _runs(stores) == []


def test_space_needed_counts_every_file_a_cell_writes(tmp_path):
    from gaq.bench.runner import Runner
    from gaq.bench.spec import load_benchmark

    path = tmp_path / "b.toml"
    path.write_text(FP_ONLY)
    small = Runner(load_benchmark(path), tmp_path / "r").space_needed()
    path.write_text(FP_ONLY.replace("seeds = [0]", "seeds = [0, 1, 2]"))
    more = Runner(load_benchmark(path), tmp_path / "r").space_needed()
    assert small.results > 0 and small.artifacts > 0  # the grid, in both places
    assert more.results > small.results and more.artifacts == 3 * small.artifacts


def test_a_clean_sweep_leaves_no_lock_files_and_removes_dead_temp_folders(stores):
    """After an FP sweep no ``.running`` lock remains, and the temp folders of a process
    that is gone (killed mid-logging: curves, state) are removed at the start; a live
    process's are kept."""
    import tempfile

    dead, alive = _dead_pid(), os.getpid()
    left = [pathlib.Path(tempfile.gettempdir()) / f"gaq-{kind}-{dead}-x1"
            for kind in ("curves", "state", "cleanfid")]
    live = pathlib.Path(tempfile.gettempdir()) / f"gaq-curves-{alive}-x2"
    for folder in (*left, live):
        folder.mkdir()
        (folder / "f.csv").write_text("1")
    path = stores / "fponly.toml"
    path.write_text(FP_ONLY)
    results = stores / "r"
    assert main(["bench", str(path), "--results", str(results),
                 "--reference", str(stores / "none")]) == 0
    assert not (results / "fponly" / ".running").exists()
    assert not [p for p in left if p.exists()] and live.exists()
    assert [r.info.status for r in _runs(stores)] == ["FINISHED", "FINISHED"]


def test_tables_a_run_no_longer_gives_are_removed(tmp_path):
    from gaq.bench.tables import write_tables

    out = tmp_path / "tables"
    out.mkdir()
    for suffix in ("noise", "paired"):
        (out / f"micro_{suffix}.md").write_text("stale")
    paths = write_tables(tmp_path / "results", "micro", out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert not (out / "micro_noise.md").exists() and not (out / "micro_paired.md").exists()


# -- MLflow: kills and concurrent processes ------------------------------------------------

KILL_AFTER_CREATE = textwrap.dedent("""
    import os, signal, sys
    import mlflow
    from gaq.bench import tracking

    sweep = tracking.open_sweep("gaq-kill", "kill sweep", {}, {})
    orig = mlflow.MlflowClient.create_run
    def create_run(self, *a, **k):
        run = orig(self, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # the moment right after the run exists
    mlflow.MlflowClient.create_run = create_run
    tracking.log_run("gaq-kill", "cell", {"a": 1}, {"m": 1.0}, {"gaq.x": "y"},
                     cell_id="abc", parent=sweep)
""")

KILL_WHILE_LOGGING_CURVES = textwrap.dedent("""
    import os, signal, sys
    from gaq.bench import tracking

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    tracking._write_curve_png = die
    tracking.log_run("gaq-kill", "cell", {}, {}, {}, curves={"eps_mse": [(1, 0.5)]})
""")


def _killed(script: str, root: pathlib.Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "TMPDIR": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_cell_run_killed_right_after_creation_is_closed_by_the_next_sweep(stores):
    from gaq.bench.tracking import CELL_ID_TAG, mark_stale_sweeps

    _killed(KILL_AFTER_CREATE, stores)
    runs = {r.info.run_name: r for r in _runs(stores)}
    cell = runs["cell"]  # its identity was written with it, in one step
    assert cell.data.tags[CELL_ID_TAG] == "abc"
    assert cell.data.tags["gaq.sweep_id"] == runs["kill sweep"].info.run_id
    assert len(mark_stale_sweeps("gaq-kill")) == 1
    assert {r.info.run_name: r.info.status for r in _runs(stores)} == {
        "kill sweep": "KILLED", "cell": "KILLED"}


@pytest.mark.slow
def test_a_kill_while_logging_curves_leaves_a_temp_folder_the_next_start_removes(stores):
    from gaq.tempdirs import remove_dead_temp_dirs

    _killed(KILL_WHILE_LOGGING_CURVES, stores)
    left = list(stores.glob("gaq-curves-*"))
    assert len(left) == 1  # named by the killed process's pid
    assert remove_dead_temp_dirs(stores) == left and not left[0].exists()


OPEN_STORE = textwrap.dedent("""
    import sys, time
    from gaq.bench.tracking import check_store
    check_store(sys.argv[1])
    print(time.time())
""")


def _open_store(root: pathlib.Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", OPEN_STORE, name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_store_initialisation_waits_for_the_store_lock(tmp_path):
    """A process opening a fresh store waits while another holds its lock (migrating the
    schema), then opens it."""
    from gaq.bench.tracking import store_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with store_lock(uri):
        proc = _open_store(tmp_path, "gaq-a")
        time.sleep(6)  # long enough to import mlflow and reach the lock
        assert proc.poll() is None, proc.communicate()
        released = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert float(out.strip()) >= released
    assert (tmp_path / ".mlflow.db.lock").exists()


@pytest.mark.slow
def test_two_processes_open_a_fresh_store_at_once(tmp_path):
    procs = [_open_store(tmp_path, f"gaq-{i}") for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
