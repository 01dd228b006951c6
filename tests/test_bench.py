"""The benchmark end to end through the real CLI, on a 2-method micro benchmark."""

import tempfile

import pandas as pd
import pytest

from gaq.bench.spec import load_benchmark
from gaq.cli import main
from gaq.errors import GaqError

pytestmark = pytest.mark.slow  # real benchmark sweeps through the CLI: every test here

MICRO = """
models = ["digits"]
bits = ["W8A8"]
methods = [
  { name = "fp" },
  { name = "rtn", preset = "cpu" },
  { name = "ptqd", config = { recon = { weight_iters = 0, act_iters = 0, cache = "memory" } } },
]

[benchmark]
name = "micro"

[sampler]
steps = 4

[calibration]
interval = 2
samples_per_step = 8

[eval]
num_images = 48
batch_size = 48
seeds = [0]
metrics = ["fid", "kid", "precision", "recall", "psnr", "eps_mse"]
heldout_trajectories = 4
"""


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("GAQ_CACHE", str(root / "cache"))
    (root / "tmp").mkdir()
    mp.setattr(tempfile, "tempdir", str(root / "tmp"))  # where cells keep their state files
    bench = root / "micro.toml"
    bench.write_text(MICRO)
    results = root / "results"
    assert main(["bench", str(bench), "--results", str(results)]) == 0
    yield root, bench, results
    mp.undo()


def test_parquet_schema_and_rows(micro_run):
    _, _, results = micro_run
    df = pd.read_parquet(results / "micro" / "metrics.parquet")
    for col in ("run_id", "cell_id", "benchmark", "model", "method", "bits", "w_bits",
                "a_bits", "seed", "setup", "metric", "value"):
        assert col in df.columns
    assert set(df["method"]) == {"fp", "rtn", "ptqd"}
    assert df["cell_id"].nunique() == 3
    rtn = df[df["method"] == "rtn"].set_index("metric")["value"]
    for m in ("fid", "kid", "precision", "recall", "psnr", "eps_mse", "calibration_seconds",
              "images_per_second", "model_size_mb"):
        assert m in rtn.index
    fp = df[df["method"] == "fp"].set_index("metric")["value"]
    assert rtn["model_size_mb"] < fp["model_size_mb"] / 3  # 8-bit weights vs fp32
    curves = pd.read_parquet(results / "micro" / "curves.parquet")
    assert curves["timestep"].nunique() == 4  # one point per sampling step


def test_cells_leave_no_temp_folders(micro_run):
    root, _, _ = micro_run
    assert not list((root / "tmp").iterdir())


def test_noise_curves_measure_the_sampler_correction(micro_run):
    """Every cell gets eps_mse and k_t per step; PTQD, whose sampler corrects eps, is
    measured after its correction (what it samples with) and before it."""
    _, _, results = micro_run
    curves = pd.read_parquet(results / "micro" / "curves.parquet")
    df = pd.read_parquet(results / "micro" / "metrics.parquet")
    kinds = {m: set(part["curve"]) for m, part in curves.groupby("method")}
    assert kinds["rtn"] == {"eps_mse", "noise_k"}
    assert kinds["ptqd"] == {"eps_mse", "noise_k", "eps_mse_uncorrected",
                             "noise_k_uncorrected"}
    ptqd = curves[curves["method"] == "ptqd"].pivot(index="timestep", columns="curve",
                                                    values="value")
    assert len(ptqd) == 4
    # the correction changes what is measured (it removes at least the bias mu_t)
    assert not ptqd["eps_mse"].equals(ptqd["eps_mse_uncorrected"])
    m = df[df["method"] == "ptqd"].set_index("metric")["value"]
    assert m["eps_mse"] == pytest.approx(ptqd["eps_mse"].mean())
    assert m["eps_mse_uncorrected"] == pytest.approx(ptqd["eps_mse_uncorrected"].mean())
    assert m["noise_k_max_abs"] == pytest.approx(ptqd["noise_k"].abs().max())
    # per held-out trajectory: the mean over trajectories is the metric itself
    per_traj = pd.read_parquet(results / "micro" / "per_trajectory.parquet")
    assert set(per_traj["method"]) == {"rtn", "ptqd"}  # FP's errors are 0: no rows
    for method, part in per_traj.groupby("method"):
        m = df[df["method"] == method].set_index("metric")["value"]
        for name, rows in part.groupby("metric"):
            assert rows["trajectory"].nunique() == len(rows) > 1
            assert rows["value"].mean() == pytest.approx(m[name], rel=1e-9)
    assert set(per_traj[per_traj["method"] == "ptqd"]["metric"]) == {
        "eps_mse", "eps_mse_uncorrected"}
    table = (results / "tables" / "micro_noise.md").read_text()
    assert "| PTQD (before correction) | W8A8 |" in table and "| RTN | W8A8 |" in table


def test_mlflow_runs_carry_provenance(micro_run):
    import json

    import mlflow

    from gaq.bench.labels import method_label
    from gaq.bench.tracking import VIEW_KEY, ui_links

    root, _, _ = micro_run
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gaq-micro")
    everything = client.search_runs([exp.experiment_id])
    runs = [r for r in everything if "gaq.sweep" not in r.data.tags]
    assert len(runs) == 3
    (sweep,) = [r for r in everything if r.data.tags.get("gaq.sweep") == "1"]
    assert sweep.info.status == "FINISHED" and sweep.data.params["cells"] == "3"
    # the experiment's saved view: every run, the benchmark's metrics as columns, and the
    # link to the experiment opens it
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert "metrics.`fid`" in view["selectedColumns"] and view["runsHiddenMode"] == "SHOW_ALL"
    (link,) = ui_links("http://127.0.0.1:5000", f"sqlite:///{root / 'mlflow.db'}")
    assert link.endswith(f"/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")
    for run in runs:
        tags = run.data.tags
        for key in ("git_commit", "git_dirty", "torch_version", "device", "gaq.cell_id", "seeds"):
            assert key in tags, key
        assert "fid" in run.data.metrics
        # a top-level run tagged with its sweep: the runs table shows it without a click
        assert tags["gaq.sweep_id"] == sweep.info.run_id and "mlflow.parentRunId" not in tags
        # the run spans its cell (sampling, metrics, ...), not just the logging at its end:
        # at least the sampling the cell itself timed (48 images at its images/s)
        sampling_ms = 1000 * 48 / run.data.metrics["images_per_second"]
        assert run.info.end_time - run.info.start_time >= sampling_ms
        assert sweep.info.start_time <= run.info.start_time <= sweep.info.end_time
        assert not any(k.startswith("_") or "._" in k for k in run.data.params)
        # named and described for a reader of the UI: the row's label first (the UI cuts
        # names at the right), the model in both
        method, cell = run.data.params["row"], tags["gaq.cell_id"]
        assert tags["mlflow.runName"].startswith(f"{method_label(method)} · digits ")
        assert "model `digits`" in tags["mlflow.note.content"]
        assert cell in tags["mlflow.note.content"]


def test_a_killed_sweep_is_marked_killed_by_the_next(tmp_path, monkeypatch):
    import mlflow

    from gaq.bench import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dead = tracking.open_sweep("gaq-x", "x sweep", {}, {})
    client = mlflow.MlflowClient(tracking.tracking_uri())
    client.set_tag(dead, "gaq.pid", "999999999")  # a process that no longer exists
    alive = tracking.open_sweep("gaq-x", "x sweep", {}, {})  # this process: still running
    assert tracking.mark_stale_sweeps("gaq-x") == []  # the first was marked by open_sweep
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"
    tracking.close_sweep(alive)
    assert client.get_run(alive).info.status == "FINISHED"


def test_resume_skips_completed_cells(micro_run, capsys):
    _, bench, results = micro_run
    before = pd.read_parquet(results / "micro" / "metrics.parquet")
    assert main(["bench", str(bench), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 3
    after = pd.read_parquet(results / "micro" / "metrics.parquet")
    pd.testing.assert_frame_equal(before, after)


def test_per_image_psnr_is_stored_and_averages_to_the_cell_psnr(micro_run):
    import pandas as pd

    _, _, results = micro_run
    per = pd.read_parquet(results / "micro" / "per_image.parquet")
    metrics = pd.read_parquet(results / "micro" / "metrics.parquet")
    for method in ("rtn", "ptqd"):
        rows = per[per["method"] == method]
        assert sorted(rows["image"]) == list(range(48))
        cell = metrics[(metrics["method"] == method) & (metrics["metric"] == "psnr")]
        assert rows["value"].mean() == pytest.approx(float(cell["value"].iloc[0]), rel=1e-12)
    assert "fp" not in set(per["method"])  # FP is what PSNR is measured against
    md = (results / "tables" / "micro_paired.md").read_text()
    assert "bootstrap over 48 images" in md and "| RTN |" in md


def test_tables_and_plots_regenerate_from_parquet_alone(micro_run):
    _, _, results = micro_run
    for d in ("tables", "plots"):
        for f in (results / d).glob("*"):
            f.unlink()
    assert main(["tables", "--results", str(results)]) == 0
    assert main(["plots", "--results", str(results)]) == 0
    md = (results / "tables" / "micro.md").read_text()
    assert "rtn" in md.lower() and "fp" in md.lower()
    assert any((results / "plots").glob("*.png")) and any((results / "plots").glob("*.pdf"))
    assert (results / "tables" / "micro_noise.md").exists()
    assert (results / "plots" / "micro_noise_k_W8A8_by_timestep.png").exists()
    assert not any((results / "plots").glob("*_uncorrected_*"))  # drawn dashed, not alone


def test_gaq_tables_measures_against_the_benchmark_files_anchor(micro_run, tmp_path):
    """Without GAQ among the rows the paired table has no differences; with the file's
    ``anchor`` (found by benchmark name under --benchmarks) every row is measured against it,
    as the run itself tabulates it."""
    _, bench, results = micro_run
    assert "Δ vs" not in (results / "tables" / "micro_paired.md").read_text()
    files = tmp_path / "benchmarks"
    files.mkdir()
    (files / "renamed.toml").write_text(bench.read_text().replace(
        'name = "micro"', 'name = "micro"\nanchor = "rtn"'))
    (files / "broken.toml").write_text("[benchmark\n")  # skipped, not fatal for tables
    assert load_benchmark(files / "renamed.toml").anchor == "rtn"
    assert main(["tables", "--results", str(results), "--benchmarks", str(files)]) == 0
    md = (results / "tables" / "micro_paired.md").read_text()
    ptqd = next(line for line in md.splitlines() if line.startswith("| PTQD |"))
    assert "Δ vs RTN" in md and ptqd.count("|") == 7 and "resolved" in ptqd
    assert main(["tables", "--results", str(results)]) == 0  # no file for micro: GAQ, absent
    assert "Δ vs" not in (results / "tables" / "micro_paired.md").read_text()


def test_an_anchor_that_is_not_a_row_is_refused(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text(MICRO.replace('name = "micro"', 'name = "micro"\nanchor = "ptdq"'))
    with pytest.raises(GaqError, match=r"benchmark.anchor.*did you mean 'ptqd'"):
        load_benchmark(path)


def test_malformed_benchmark_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(MICRO.replace("steps = 4", "stepz = 4"))
    with pytest.raises(GaqError, match=r"bad\.toml: key 'sampler\.stepz'.*did you mean 'steps'"):
        load_benchmark(bad)
    bad.write_text(MICRO.replace('bits = ["W8A8"]', 'bits = ["W9A8"]'))
    assert main(["bench", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "'bits'" in err and not (tmp_path / "r").exists()
    bad.write_text(MICRO.replace('bits = ["W8A8"]', 'bits = ["W8A8", "w8a8"]'))
    with pytest.raises(GaqError, match=r"bad\.toml: key 'bits' lists W8A8 more than once"):
        load_benchmark(bad)
    bad.write_text(MICRO.replace('bits = ["W8A8"]', 'bits = ["W99A8"]'))
    with pytest.raises(GaqError, match=r"key 'bits' has 'W99A8'.*2\.\.8"):
        load_benchmark(bad)
    bad.write_text(MICRO.replace('name = "micro"', 'name = "../../escaped"'))
    with pytest.raises(GaqError, match=r"key 'benchmark\.name' '\.\./\.\./escaped' is not a "
                       "usable name"):
        load_benchmark(bad)
    bad.write_text(MICRO.replace('name = "rtn"', 'name = "rtm"'))
    with pytest.raises(GaqError, match="did you mean 'rtn'"):
        load_benchmark(bad)


@pytest.mark.parametrize("setup, message", [
    ('engine = "dask"', r"key 'setup\.engine' must be one of local, ray, got 'dask'"),
    ("threads = 0", r"key 'setup\.threads' must be a positive integer, got 0"),
    ('threads = "2"', r"key 'setup\.threads' must be a positive integer, got '2'"),
    ("workers = 2", r"key 'setup\.workers' is not a known key"),
])
def test_bad_setup_keys_name_file_and_key(tmp_path, setup, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(MICRO + f"\n[setup]\n{setup}\n")
    with pytest.raises(GaqError, match=rf"bad\.toml: {message}"):
        load_benchmark(bad)


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "a,b"], "--seeds: 'a,b' is not a comma-separated list of integers"),
    (["--seeds", "-1"], "--seeds: must be integers in 0..4294967295, got -1"),
    (["--seeds", "1,1"], "--seeds: lists a seed more than once"),
    (["--num-images", "0"], "--num-images: must be a positive integer"),
    (["--num-images", "1000000000"], "--num-images: must be at most 1,000,000"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_bad_flags_name_the_flag_before_any_work(tmp_path, capsys, flags, message):
    path = tmp_path / "micro.toml"
    path.write_text(MICRO)
    assert main(["bench", str(path), "--results", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_every_shipped_benchmark_loads_and_feeds_gaq():
    """The shipped files validate, and any that runs GAQ records its validation rows."""
    import math

    from gaq.bench.provenance import repo_root
    from gaq.bench.spec import load_benchmark

    files = sorted((repo_root() / "benchmarks").glob("*.toml"))
    assert {"w4a8.toml", "gaq.toml"} <= {f.name for f in files}
    for f in files:
        bench = load_benchmark(f)
        if any(m.name.startswith("gaq") for m in bench.methods):
            cal = bench.calibration
            assert cal.holdout_per_step >= math.ceil(0.05 * cal.samples_per_step), f.name


def test_method_overrides_reach_every_method_that_has_the_key(tmp_path):
    from gaq.registry import get_method

    path = tmp_path / "b.toml"
    path.write_text('methods = "all"\nmethod_overrides = { recon = { weight_iters = 7 } }\n')
    bench = load_benchmark(path)
    for entry in bench.methods:
        cfg = entry.config()
        if cfg is None:
            continue
        recon = getattr(cfg, "recon", None)
        if recon is not None:
            assert recon.weight_iters == 7, entry.name
            preset = get_method(entry.name).from_preset("cpu").config
            assert recon.act_iters == preset.recon.act_iters  # the rest stays the preset's
    path.write_text('methods = "all"\nmethod_overrides = { recno = { weight_iters = 7 } }\n')
    with pytest.raises(GaqError, match="method_overrides.recno"):
        load_benchmark(path)


@pytest.mark.parametrize("broken", ["results_file", "store", "disk_full"])
def test_unwritable_results_or_store_fail_before_any_cell(tmp_path, monkeypatch, capsys, broken):
    path = tmp_path / "micro.toml"
    path.write_text(MICRO)
    results = tmp_path / "r"
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    if broken == "results_file":
        results.write_text("not a folder")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        expected = "--results: cannot write to"
    elif broken == "store":
        (tmp_path / "corrupt.db").write_bytes(b"this is not a sqlite database" * 100)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'corrupt.db'}")
        expected = "corrupt.db cannot be used"
    else:  # 2 quantized cells keep a state of the model's size each: more than is free
        import shutil
        from collections import namedtuple

        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9, 10**5))
        expected = "MB free for the MLflow artifact store"
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["bench", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()  # no calibration set was recorded
    assert {p: p.read_bytes() for p in before} == before  # nothing damaged


def test_a_cell_held_by_another_process_is_skipped_then_run(tmp_path, monkeypatch):
    """Two sweeps on one results folder run each cell once: a cell whose lock another
    process holds is skipped (flock locks conflict across open files, as across
    processes), and runs once the lock is free."""
    import fcntl

    from gaq.bench.runner import Runner, cells

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "micro.toml"
    path.write_text(MICRO.replace('  { name = "ptqd"', '  # { name = "ptqd"'))
    bench = load_benchmark(path)
    logs = []
    runner = Runner(bench, tmp_path / "r", log=logs.append)
    rtn = next(c for c in cells(bench) if c.method.name == "rtn")
    lock = runner.dir / ".running" / f"{runner.cell_id(rtn)}.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        runner.run()
    done = pd.read_parquet(runner.metrics_path)
    assert set(done["method"]) == {"fp"}
    assert any("rtn" in line and "running in another process" in line for line in logs)
    Runner(bench, tmp_path / "r", log=logs.append).run()
    assert set(pd.read_parquet(runner.metrics_path)["method"]) == {"fp", "rtn"}


def test_a_run_reproduces_the_reference_it_made(tmp_path, monkeypatch, capsys):
    """The committed results are the reference: a run writes only its working store; with
    --update-reference it becomes the reference (with a measured noise floor); a second
    run from scratch on this machine then reproduces every judged value exactly."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "micro.toml"
    path.write_text(MICRO.replace('  { name = "ptqd"', '  # { name = "ptqd"'))
    ref = tmp_path / "reference"
    args = ["bench", str(path), "--reference", str(ref)]
    assert main([*args, "--results", str(tmp_path / "run1")]) == 0
    assert "no reference under" in capsys.readouterr().out
    assert not ref.exists()  # a run never writes into the reference
    assert main([*args, "--results", str(tmp_path / "run1"), "--update-reference"]) == 0
    assert (ref / "micro" / "metrics.parquet").exists()
    floor = pd.read_parquet(ref / "micro" / "noise_floor.parquet")
    assert set(floor["metric"]) >= {"fid", "kid", "precision", "recall"}
    assert (floor["n"] == 6).all() and (floor.set_index("metric")["sd"]["fid"] > 0)
    assert (ref / "tables" / "micro.md").exists()
    before = (ref / "micro" / "metrics.parquet").read_bytes()
    capsys.readouterr()
    assert main([*args, "--results", str(tmp_path / "run2")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("REPRODUCED: ") and " 0 differ" in last, last
    assert "0 within numerical tolerance" in last and "conclusions preserved: " in last
    report = (tmp_path / "run2" / "tables" / "micro_reproduction.md").read_text()
    assert "Every judged value is identical to the reference." in report
    assert (ref / "micro" / "metrics.parquet").read_bytes() == before
    # a reference value that the run does not give: the verdict fails, and so does the exit
    # code, unless only the report is wanted (the run's cells are done: nothing reruns)
    metrics = pd.read_parquet(ref / "micro" / "metrics.parquet")
    metrics.loc[(metrics["method"] == "rtn") & (metrics["metric"] == "fid"), "value"] += 1.0
    metrics.to_parquet(ref / "micro" / "metrics.parquet")
    assert main([*args, "--results", str(tmp_path / "run2")]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("NOT REPRODUCED: 1 of ") and "/rtn/W8A8/seed 0 fid" in last, last
    assert main([*args, "--results", str(tmp_path / "run2"), "--report-only"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("NOT REPRODUCED")


def test_reproduction_verdicts_follow_the_numerical_tolerance():
    from gaq.bench import reproduce
    from gaq.bench.verdict import Tolerance

    base = {"model": "m", "method": "rtn", "bits": "W4A8", "seed": 0}
    ref = pd.DataFrame([base | {"metric": "fid", "value": 10.0},
                        base | {"metric": "kid", "value": 1.0},
                        base | {"metric": "psnr", "value": 30.0},
                        base | {"metric": "calibration_seconds", "value": 5.0}])
    run = ref.copy()
    run["value"] = [10.0005, 1.01, 30.0, 9.0]
    new = pd.DataFrame([base | {"method": "gaq", "metric": "fid", "value": 8.0}])
    tol = Tolerance({"fid": {"rel": 1e-4, "abs": 0.0}, "kid": {"rel": 1e-3, "abs": 0.0}})
    table = reproduce.compare(pd.concat([run, new]), ref, tol).set_index(["method", "metric"])
    assert table.loc[("rtn", "fid"), "verdict"] == "within tolerance"  # 5e-4 <= 1e-3
    assert table.loc[("rtn", "kid"), "verdict"] == "differs"  # 0.01 > 1e-3
    assert table.loc[("rtn", "psnr"), "verdict"] == "identical"
    assert table.loc[("rtn", "calibration_seconds"), "verdict"] == "cost"
    assert table.loc[("gaq", "fid"), "verdict"] == "new"
    line = reproduce.summary(table.reset_index())
    assert "1 identical, 1 within tolerance, 1 differs, 1 new" in line


def test_a_method_for_other_architectures_is_left_out_once(tmp_path):
    from gaq.bench.runner import Runner, cells

    path = tmp_path / "b.toml"
    path.write_text(MICRO.replace('  { name = "rtn", preset = "cpu" },',
                                  '  { name = "htg", preset = "cpu" },')
                    .replace('seeds = [0]', 'seeds = [0, 1]'))
    logs: list[str] = []
    runner = Runner(load_benchmark(path), tmp_path / "results", log=logs.append)
    reasons = {(c.method.row, c.seed): runner.left_out(c) for c in cells(runner.bench)}
    assert reasons[("fp", 0)] is None and reasons[("ptqd", 1)] is None
    assert "htg is defined for DiT models, not UNet2DModel" in reasons[("htg", 0)]
    assert reasons[("htg", 1)] == reasons[("htg", 0)]
    assert logs == ["digits / htg: left out, htg is defined for DiT models, not UNet2DModel"]


def test_fid_spread_scores_disjoint_sets_like_a_cell(tmp_path, capsys):
    """`gaq fid-spread`: FP samples cut into disjoint sets of each size, each set's FID the
    FID a cell of that many images gets (the first set is image 0..n-1 of seed 0, which is
    what FP's cell samples)."""
    from gaq.bench.fid_spread import spread_table
    from gaq.bench.runner import Runner
    from gaq.eval.metrics import image_metrics
    from gaq.sampling import sample, to_uint8

    bench = tmp_path / "micro.toml"
    bench.write_text(MICRO)
    out = tmp_path / "protocol"
    assert main(["fid-spread", str(bench), "--images", "64", "--sizes", "16,32",
                 "--out", str(out)]) == 0
    df = pd.read_parquet(out / "fid_spread.parquet")
    assert sorted(df.groupby("images")["set"].count().items()) == [(16, 4), (32, 2)]
    assert df["fid"].nunique() == len(df)  # disjoint sets, different values
    runner = Runner(load_benchmark(bench), tmp_path / "r")
    ctx = runner.model("digits")
    first = to_uint8(sample(ctx.pipe, 32, seed=0, sampler=ctx.sampler, batch_size=48))
    direct = image_metrics(first, ctx.reference(), ctx.space, ["fid"], cleanfid_check=False)
    got = df[(df["images"] == 32) & (df["set"] == 0)]["fid"].item()
    assert got == pytest.approx(direct["fid"], rel=1e-6)
    table = spread_table(df)
    sd16 = df[df["images"] == 16]["fid"].std()
    assert f"| {2 * 2 ** 0.5 * sd16:.2f} |" in table.splitlines()[2]
    assert "FID spread" in capsys.readouterr().out
    assert main(["fid-spread", str(bench), "--images", "8", "--sizes", "16",
                 "--out", str(out)]) == 2  # a set larger than the sample: one clear line


def test_space_needed_counts_activation_rows_and_skips_left_out_cells(tmp_path):
    """The preflight's disk estimate: act_every_step records the training trajectories at
    every step (twice the rows at interval 2), and a method left out of a model (HTG on a
    UNet) keeps no state."""
    from gaq.bench.runner import Runner

    runners = []

    def needed(text: str):
        path = tmp_path / "b.toml"
        path.write_text(text)
        runners.append(Runner(load_benchmark(path), tmp_path / "r"))
        return runners[-1].space_needed()

    base = MICRO.replace("samples_per_step = 8", "samples_per_step = 8\nholdout_per_step = 0")
    art, cache, _ = needed(base)
    _, cache_every, _ = needed(base.replace("holdout_per_step = 0",
                                            "holdout_per_step = 0\nact_every_step = true"))
    assert cache_every == 2 * cache  # 4 steps against the 2 kept at interval 2
    art_htg, _, _ = needed(base.replace('  { name = "rtn", preset = "cpu" },',
                                        '  { name = "htg", preset = "cpu" },'))
    # rtn and ptqd keep a state (codes at their bit-width, tables); htg on a UNet does
    # not, nor does it run (no grid, curves)
    from gaq.cell import state_size_bound
    from gaq.config import QuantConfig
    from gaq.registry import get_method

    bench = runners[0].bench
    state = {e.name: state_size_bound(runners[0].model("digits").pipe,
                                      get_method(e.name)(e.config()),
                                      QuantConfig.from_bits(bench.bits[0]))
             for e in bench.methods if e.name != "fp"}
    per_cell = (art - state["rtn"] - state["ptqd"]) / 3  # fp, rtn, ptqd: grid and curves
    assert per_cell > 0 and art_htg == state["ptqd"] + 2 * per_cell
