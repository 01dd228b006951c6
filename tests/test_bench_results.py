"""Results as data: provenance, MLflow logging, Parquet tables, summaries, tables and plots
regenerated from Parquet alone, and published reference numbers."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gaq.bench import plots, provenance, published, results, tables, tracking

MODEL = "digits"


def _metric_rows(
    methods: dict[str, list[str]] | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    metrics: dict[str, float] | None = None,
    model: str = MODEL,
) -> pd.DataFrame:
    """Synthetic long-format metrics as the runner writes them (no ci_group/timestamp)."""
    methods = methods or {"fp": ["FP"], "rtn": ["W8A8", "W4A8"], "gaq": ["W8A8", "W4A8"]}
    metrics = metrics or {"fid": 10.0, "is": 5.0, "precision": 0.5, "calibration_seconds": 30.0}
    rng = np.random.default_rng(0)
    rows = []
    for method, bits_list in methods.items():
        for bits in bits_list:
            w, a = (None, None) if bits == "FP" else (int(bits[1]), int(bits[3]))
            for seed in seeds:
                for metric, base in metrics.items():
                    rows.append({
                        "run_id": f"run-{method}-{bits}-{seed}",
                        "cell_id": f"{model}-{method}-{bits}-{seed}",
                        "benchmark": "micro", "model": model, "method": method,
                        "preset": "cpu", "bits": bits, "w_bits": w, "a_bits": a,
                        "seed": seed, "setup": "cpu-0gpu", "metric": metric,
                        "value": base + float(rng.normal()),
                    })
    return pd.DataFrame(rows)


def _curve_rows(model: str = MODEL) -> pd.DataFrame:
    rows = []
    for method, bits in (("fp", "FP"), ("rtn", "W4A8"), ("gaq", "W4A8"), ("gaq", "W8A8")):
        for t in range(0, 1000, 100):
            rows.append({
                "run_id": "r", "cell_id": f"{model}-{method}-{bits}-0", "benchmark": "micro",
                "model": model, "method": method, "bits": bits, "seed": 0, "curve": "eps_mse",
                "timestep": t, "value": 0.0 if method == "fp" else (t + 1) / 1000,
            })
    return pd.DataFrame(rows)


def _write_results(root: Path, df: pd.DataFrame, curves: bool = True) -> Path:
    folder = root / "micro"
    for _, cell in df.groupby("cell_id", sort=False):
        results.append(folder / "metrics.parquet", cell)
    if curves:
        results.append(folder / "curves.parquet", _curve_rows(df["model"].iloc[0]))
    return folder


# --- provenance ----------------------------------------------------------------------------


def test_provenance_keys_all_strings(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = provenance.provenance([0, 1, 2])
    expected = {"git_commit", "git_dirty", "gaq_version", "torch_version", "diffusers_version",
                "mlflow_version", "torch_fidelity_version", "clean_fid_version",
                "pandas_version", "pyarrow_version", "python_version", "platform", "device",
                "gpu_model", "gpu_count", "world_size", "hostname", "seeds"}
    assert expected <= set(info)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())
    assert info["seeds"] == "0,1,2" and info["world_size"] == "4"
    assert info["device"] in {"cpu", "cuda"}
    assert info["git_dirty"] in {"true", "false", "unknown"}
    assert provenance.provenance()["seeds"] == ""


def test_provenance_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no git binary to find
    info = provenance.provenance()
    assert info["git_commit"] == "unknown" and info["git_dirty"] == "unknown"


def test_repo_root_is_the_checkout():
    assert (provenance.repo_root() / "pyproject.toml").is_file()
    assert (provenance.repo_root() / "gaq" / "__init__.py").is_file()


# --- MLflow ---------------------------------------------------------------------------------


def test_tracking_uri_defaults_to_repo_root(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{(provenance.repo_root() / 'mlflow.db').as_posix()}"
    assert tracking.artifact_root(uri) == (provenance.repo_root() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking.tracking_uri() == "http://localhost:5000"
    assert tracking.artifact_root() is None


def test_flatten_nests_and_truncates():
    flat = tracking.flatten({"sampler": {"steps": 50, "eta": 0.0}, "seeds": (0, 1),
                             "none": None, "empty": {}, "long": "x" * 10_000})
    assert flat["sampler.steps"] == "50" and flat["sampler.eta"] == "0.0"
    assert flat["seeds"] == "[0, 1]" and flat["none"] == "None" and flat["empty"] == "{}"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("[truncated]")


@pytest.mark.slow
def test_log_run_and_find_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG fake")
    layers = tmp_path / "layers.md"
    layers.write_text("| layer | bits |\n")
    run_id = tracking.log_run(
        "gaq-micro", "rtn W4A8 s0",
        params={"method": "rtn", "sampler": {"steps": 10, "eta": 0.0}, "seed": 0},
        metrics={"fid": 12.5, "kid": 0.01},
        tags={"git_commit": "abc"},
        artifacts={"samples": grid, "state/layers.md": layers},
        curves={"eps_mse": [(900, 0.5), (500, 0.2), (100, 0.05)]},
        cell_id="cell-123",
    )

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["sampler.steps"] == "10" and run.data.params["method"] == "rtn"
    assert run.data.metrics["fid"] == pytest.approx(12.5)
    assert run.data.tags["git_commit"] == "abc"
    assert run.data.tags[tracking.CELL_ID_TAG] == "cell-123"
    assert client.get_metric_history(run_id, "curve.eps_mse") == []  # no step series
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]
    assert [a.path for a in client.list_artifacts(run_id, "state")] == ["state/layers.md"]
    assert [a.path for a in client.list_artifacts(run_id, "curves")] == [
        "curves/eps_mse.csv", "curves/eps_mse.png"]
    csv = client.download_artifacts(run_id, "curves/eps_mse.csv", str(tmp_path / "dl"))
    assert Path(csv).read_text().splitlines()[1:] == ["100,0.05", "500,0.2", "900,0.5"]
    exp = client.get_experiment(run.info.experiment_id)
    # MLflow 3 lands on the runs table, not its GenAI view, and shows a description
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "one run per cell" in exp.tags["mlflow.note.content"]
    # artifacts live next to the database, not in whatever folder the run started from
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts").is_dir()

    assert tracking.find_run("gaq-micro", "cell-123") == run_id
    assert tracking.find_run("gaq-micro", "cell-999") is None

    # an experiment an older gaq created without the tags gets them on its next run, and
    # a tag the user set is left alone
    old = client.create_experiment("gaq-old", tags={"mlflow.note.content": "mine"})
    tracking.log_run("gaq-old", "r", {}, {}, {})
    tags = client.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "mine"
    # nox -s ui prints links that open the runs table, not MLflow 3's GenAI view
    links = tracking.ui_links("http://h:5000/")
    assert f"gaq-micro: http://h:5000/#/experiments/{run.info.experiment_id}" \
        "?workflowType=machine_learning" in links
    assert tracking.find_run("no-such-experiment", "cell-123") is None
    with pytest.raises(FileNotFoundError):
        tracking.log_run("gaq-micro", "bad", {}, {}, {}, {"x": tmp_path / "missing.png"})


# --- Parquet ---------------------------------------------------------------------------------


def test_read_missing_gives_empty_table_with_schema(tmp_path):
    m = results.read(tmp_path / "metrics.parquet")
    assert m.empty and list(m.columns) == list(results.METRICS_SCHEMA)
    assert {c: str(t) for c, t in m.dtypes.items()} == {
        c: str(pd.Series(dtype=t).dtype) for c, t in results.METRICS_SCHEMA.items()}
    c = results.read(tmp_path / "curves.parquet")
    assert c.empty and list(c.columns) == list(results.CURVES_SCHEMA)


def test_append_replaces_same_cell_and_round_trips_dtypes(tmp_path):
    path = tmp_path / "micro" / "metrics.parquet"
    df = _metric_rows()
    first = df[df["seed"] == 0]
    results.append(path, first)
    results.append(path, df[df["seed"] == 1])
    table = results.read(path)
    assert len(table) == len(first) * 2

    # A rerun of one cell replaces exactly its rows.
    cell = first["cell_id"].iloc[0]
    rerun = first[first["cell_id"] == cell].assign(value=-1.0, run_id="run-new")
    results.append(path, rerun)
    table = results.read(path)
    assert len(table) == len(first) * 2
    mine = table[table["cell_id"] == cell]
    assert (mine["value"] == -1.0).all() and (mine["run_id"] == "run-new").all()
    assert (table.loc[table["cell_id"] != cell, "value"] != -1.0).all()

    # dtypes survive Parquet, FP's missing bit-widths stay missing (nullable ints)
    assert table["w_bits"].dtype == "Int64" and table["seed"].dtype == "int64"
    assert table["value"].dtype == "float64" and str(table["timestamp"].dt.tz) == "UTC"
    assert table.loc[table["method"] == "fp", "w_bits"].isna().all()
    assert set(table.loc[table["bits"] == "W4A8", "w_bits"]) == {4}
    assert table["ci_group"].notna().all()
    raw = pd.read_parquet(path)  # a plain reader sees the same types
    assert raw["w_bits"].dtype == "Int64" and raw["seed"].dtype == "int64"


def test_append_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "micro" / "metrics.parquet"
    df = _metric_rows()
    results.append(path, df[df["seed"] == 0])
    before = path.read_bytes()

    # The table only ever appears through os.replace of a temp file in the same folder.
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    results.append(path, df[df["seed"] == 1])
    assert len(replaced) == 1
    src, dst = replaced[0]
    assert dst == path and src.parent == path.parent and src != path
    monkeypatch.setattr(os, "replace", real_replace)
    after_good = path.read_bytes()

    # A write that dies half way leaves the previous file intact and no temp file behind.
    def broken(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        results.append(path, df[df["seed"] == 2])
    assert path.read_bytes() == after_good != before
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [
        "metrics.parquet"]


def test_append_rejects_wrong_columns(tmp_path):
    df = _metric_rows().drop(columns=["setup"]).assign(extra=1)
    with pytest.raises(ValueError, match="missing: setup.*unexpected: extra"):
        results.append(tmp_path / "metrics.parquet", df)


def test_summarize_ci_matches_hand_computation():
    values = [4.1, 4.5, 3.9]
    df = pd.DataFrame({
        "benchmark": "b", "model": "m", "method": "gaq", "bits": "W4A8", "metric": "fid",
        "seed": [0, 1, 2], "value": values, "ci_group": "g",
    })
    s = results.summarize(df)
    assert len(s) == 1
    row = s.iloc[0]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(mean)
    assert row["std"] == pytest.approx(sd)
    assert row["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))  # t_{0.975, 2} = 4.303
    one = results.summarize(df[df["seed"] == 0]).iloc[0]
    assert one["n"] == 1 and math.isnan(one["ci95"]) and math.isnan(one["std"])
    assert results.t_critical(30) == pytest.approx(2.042) and results.t_critical(200) == 1.96


def test_summarize_keeps_newest_value_per_seed():
    df = pd.DataFrame({
        "benchmark": "b", "model": "m", "method": "rtn", "bits": "W4A8", "metric": "fid",
        "seed": [0, 0, 1], "value": [100.0, 1.0, 3.0],
        "timestamp": pd.to_datetime(["2024-01-01", "2024-06-01", "2024-01-01"], utc=True),
    })
    row = results.summarize(df).iloc[0]
    assert row["n"] == 2 and row["mean"] == pytest.approx(statistics.fmean([1.0, 3.0]))


# --- published numbers -------------------------------------------------------------------


def test_published_numbers_load():
    pub = published.published()
    assert not pub.empty and pub["source"].str.len().gt(0).all()
    gaq = published.published_rows("cifar10-ddim100", "W4A8")
    assert gaq.loc[gaq["method"] == "gaq", "value"].tolist() == [4.32]
    assert set(gaq["bits"]) <= {"W4A8", "FP"}
    lsun = published.published_rows("lsun-bedroom-ldm4-ddim200", "W4A8")
    fp = lsun[lsun["method"] == "fp"].set_index("metric")["value"]
    assert fp.to_dict() == {"fid": 2.98, "sfid": 7.09}
    assert published.published_rows("no-such-setting").empty
    assert published.published_rows("cifar10-ddim100")["variant"].eq("").all()
    assert len(published.published_rows("cifar10-ddim100", ablations=True)) > len(
        published.published_rows("cifar10-ddim100"))


# --- tables and plots from Parquet alone -----------------------------------------------


def test_tables_regenerate_from_parquet(tmp_path):
    _write_results(tmp_path / "results", _metric_rows())
    md_path, tex_path, *extra = tables.write_tables(tmp_path / "results", "micro",
                                                    tmp_path / "tables")
    md, tex = md_path.read_text(), tex_path.read_text()
    # three seeds: RTN's set metrics paired with GAQ's by seed, per bit-width
    assert [p.name for p in extra] == ["micro_onecol.tex", "micro_paired.md"]
    paired = extra[1].read_text()
    assert "### m, W4A8" in paired.replace(MODEL, "m") and "| RTN |" in paired
    assert "Δ FID" in paired and "FP" not in paired.split("###", 1)[1]
    assert md_path.name == "micro.md" and tex_path.name == "micro.tex"
    assert "±" in md and "FID ↓" in md and "IS ↑" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    row_labels = [ln.split("|")[1].strip() for ln in lines[1:]]
    assert row_labels == ["FP", "RTN", "GAQ"]  # FP first, RTN next, GAQ last
    assert "W8A8" in lines[0] and lines[0].index("W8A8") < lines[0].index("W4A8")
    assert "calibration" not in md  # only image metrics are table columns
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\pm" in tex
    assert r"\multicolumn{3}{c}{W4A8}" in tex and r"$\downarrow$" in tex
    assert "(paper)" not in md and "paper" not in md  # no model key: no reference rows


def test_tables_single_seed_show_bare_mean(tmp_path):
    _write_results(tmp_path / "results", _metric_rows(seeds=(0,)), curves=False)
    md = tables.write_tables(tmp_path / "results", "micro", tmp_path / "t")[0].read_text()
    assert "GAQ" in md and "±" not in md.split("\n\n")[1]


def test_published_rows_only_for_matching_model_key(tmp_path):
    root = tmp_path / "results"
    _write_results(root, _metric_rows())
    plain = tables.write_tables(root, "micro", tmp_path / "a")[0].read_text()
    assert "4.32" not in plain and "GAQ paper" not in plain
    md, tex = (p.read_text() for p in tables.write_tables(
        root, "micro", tmp_path / "b", model_key="cifar10-ddim100")[:2])
    assert "*GAQ (GAQ paper)*" in md and "*4.32*" in md and "*4.98*" in md
    assert r"\textit{GAQ (GAQ paper)}" in tex
    assert "5.08" not in md  # W4A32 is not a column of this benchmark
    other = tables.write_tables(root, "micro", tmp_path / "c",
                                model_key="lsun-bedroom-ldm4-ddim200")[0].read_text()
    assert "*3.26*" in other and "4.32" not in other and "3.26" not in plain


@pytest.mark.slow
def test_plots_regenerate_from_parquet(tmp_path):
    import matplotlib.image as mpimg

    folder = _write_results(tmp_path / "results", _metric_rows())
    grids = folder / "grids"
    grids.mkdir()
    rng = np.random.default_rng(0)
    for method, bits in (("fp", "FP"), ("rtn", "W4A8"), ("gaq", "W4A8")):
        mpimg.imsave(grids / f"{MODEL}_{method}_{bits}_seed0.png", rng.random((18, 18)),
                     cmap="gray")
    paths = plots.write_plots(tmp_path / "results", "micro", tmp_path / "plots")
    names = {p.name for p in paths}
    for stem in ("micro_fid_vs_bits", "micro_is_vs_bits", "micro_calibration_cost",
                 "micro_eps_mse_W4A8_by_timestep", "micro_eps_mse_W8A8_by_timestep",
                 "micro_samples_W4A8_seed0"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert "micro_samples_W8A8_seed0.png" not in names  # no W8A8 grids were saved

    # one paper column wide
    from PIL import Image

    with Image.open(tmp_path / "plots" / "micro_fid_vs_bits.png") as im:
        assert im.size[0] == pytest.approx(plots.COLUMN_WIDTH * 200, abs=2)


@pytest.mark.slow
def test_plots_rendered_in_parallel_are_the_serial_files(tmp_path):
    """Figures rendered by two child processes are byte for byte the serial ones (the
    PDFs carry no dates), and the same paths come back in the same order."""
    _write_results(tmp_path / "results", _metric_rows())
    serial = plots.write_plots(tmp_path / "results", "micro", tmp_path / "serial")
    parallel = plots.write_plots(tmp_path / "results", "micro", tmp_path / "par", workers=2)
    assert [p.name for p in parallel] == [p.name for p in serial] and len(serial) >= 8
    for a, b in zip(serial, parallel, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_failing_render_child_fails_the_plots(tmp_path, monkeypatch):
    _write_results(tmp_path / "results", _metric_rows())
    # a child that exits non-zero with nothing on stderr (as one killed for memory would)
    monkeypatch.setattr(plots.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="rendering figures failed"):
        plots.write_plots(tmp_path / "results", "micro", tmp_path / "par", workers=2)


def test_plot_functions_return_figures(tmp_path):
    df = _metric_rows()
    fig = plots.metric_vs_bits(df, "fid")
    assert fig.get_size_inches()[0] == pytest.approx(plots.COLUMN_WIDTH)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["W8A8", "W4A8"]
    curve_fig = plots.timestep_error(_curve_rows())
    assert {ln.get_label() for ln in curve_fig.axes[0].get_lines()} == {
        "RTN W4A8", "GAQ W4A8", "GAQ W8A8"}  # FP's zero error is not drawn
    assert plots.calibration_cost(df).axes
    out = plots.save(fig, tmp_path / "fig")
    assert [p.suffix for p in out] == [".png", ".pdf"] and all(p.is_file() for p in out)


def _figure_texts(fig) -> list[str]:
    """Every text a reader sees in ``fig``: suptitle, axes titles, labels and legends."""
    texts = [fig.get_suptitle()]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        texts += [t.get_text() for t in legend.get_texts()]
    return texts


def test_bit_settings_are_categories_not_a_line():
    """W4A6 and W3A8 are not two points of an ordered axis: each method is a marker per
    setting, and no line joins its settings (the FP line and the separators between
    settings are the only lines drawn)."""
    df = _metric_rows(methods={"fp": ["FP"], "rtn": ["W4A6", "W3A8"],
                               "gaq-mse": ["W4A6", "W3A8"], "gaq": ["W4A6", "W3A8"]})
    ax = plots.metric_vs_bits(df, "fid").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W4A6", "W3A8"]
    drawn = [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "", " ")]
    assert all(ln.get_label() == "FP" or len(set(ln.get_xdata())) == 1 for ln in drawn), \
        [ln.get_label() for ln in drawn]  # horizontal FP, vertical separators only
    # each method's markers: the data line of its error-bar container
    methods = {c.get_label(): c.lines[0] for c in ax.containers}
    assert set(methods) == {"RTN", "GAQ (no L_GM)", "GAQ"}
    for line in methods.values():
        assert line.get_linestyle() == "None" and line.get_marker() == "o"
        assert len(line.get_xdata()) == 2  # one marker per setting


def test_the_fp_band_has_a_legend_entry():
    fig = plots.metric_vs_bits(_metric_rows(), "fid")
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[:2] == ["FP", "FP 95 % CI"]
    band = [p for p in fig.axes[0].patches if p.get_label() == "FP 95 % CI"]
    assert len(band) == 1 and band[0].get_alpha() < 1
    # one seed: no interval, no band, no entry for one
    one = plots.metric_vs_bits(_metric_rows(seeds=(0,)), "fid")
    assert "FP 95 % CI" not in [t.get_text() for t in one.legends[0].get_texts()]


def test_figures_name_benchmark_model_and_feature_space(tmp_path):
    """A figure's title says which benchmark and model it shows, and a metric computed in
    a feature space says which one: the bundled models' FID is in a digit classifier's
    features, not Inception's, and the figure must not let a reader assume Inception."""
    assert plots.figure_title("w4a8", "digits", "fid") == "w4a8: digits (digit-classifier features)"
    assert plots.figure_title("b", "my-ldm", "kid") == "b: my-ldm (Inception features)"
    assert plots.figure_title("b", "digits", "fid", "inception") == "b: digits (Inception features)"
    assert plots.figure_title("w4a8", "digits-dit", "psnr") == "w4a8: digits-dit"  # no space
    df = _metric_rows()
    for fig in (plots.metric_vs_bits(df, "fid", plots.figure_title("micro", MODEL, "fid")),
                plots.calibration_cost(df, plots.figure_title("micro", MODEL)),
                plots.timestep_error(_curve_rows(), title=plots.figure_title("micro", MODEL))):
        assert "micro: digits" in fig.get_suptitle()
    assert "digit-classifier features" in _figure_texts(plots.metric_vs_bits(
        df, "fid", plots.figure_title("micro", MODEL, "fid")))[0]


@pytest.mark.slow
def test_write_plots_titles_every_figure_by_model(tmp_path, monkeypatch):
    """Every figure ``write_plots`` makes carries the benchmark and its model in its title
    (two models: each figure its own)."""
    rows = pd.concat([_metric_rows(), _metric_rows(model="digits-ldm")], ignore_index=True)
    _write_results(tmp_path / "results", rows)
    titles: dict[str, str] = {}

    def keep(fig, stem):
        titles[Path(stem).name] = fig.get_suptitle()
        return []

    monkeypatch.setattr(plots, "save", keep)
    plots.write_plots(tmp_path / "results", "micro", tmp_path / "plots")
    assert titles and "micro_digits-ldm_fid_vs_bits" in titles
    for stem, title in titles.items():
        model = "digits-ldm" if "digits-ldm" in stem else "digits"
        assert title.startswith(f"micro: {model}"), (stem, title)
    assert titles["micro_digits_fid_vs_bits"].endswith("(digit-classifier features)")
    assert "features" not in titles["micro_digits_calibration_cost"]


def _lab(rgb) -> np.ndarray:
    """sRGB (0-1) to CIELAB (D65)."""
    c = np.asarray(rgb[:3], dtype=float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_rows_of_one_benchmark_file_have_distinguishable_colours():
    """The rows one benchmark file puts in a figure differ in colour by at least ΔE 20
    (CIELAB; tab10's closest pair, Q-Diffusion's purple and TDQ's pink, is 28), none is
    too pale for a thin line on white (L* ≤ 80), and at most one is near-black (L* < 30):
    on a 1-pt line a dark navy and black read as one colour, as GAQ (ω per t) and GAQ
    (no L_GM) did."""
    import itertools
    import warnings

    from gaq.bench.spec import load_benchmark

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a method without a CPU preset here: not our concern
        files = {p.name: [e.row for e in load_benchmark(p).methods]
                 for p in sorted(root.glob("*.toml"))}
    assert "w4a8.toml" in files and "gaq-mse" in files["w4a8.toml"]
    for name, rows in files.items():
        lab = {r: _lab(plots.method_color(r)) for r in rows}
        for a, b in itertools.combinations(rows, 2):
            assert np.linalg.norm(lab[a] - lab[b]) >= 20, (name, a, b)
        assert all(v[0] <= 80 for v in lab.values()), name
        assert sum(v[0] < 30 for v in lab.values()) <= 1, (name, [r for r in rows
                                                                  if lab[r][0] < 30])
    timestep, mse = _lab(plots.method_color("gaq-timestep")), _lab(plots.method_color("gaq-mse"))
    assert abs(timestep[0] - mse[0]) >= 30  # told apart by lightness, not only by hue


def test_every_variant_row_is_declared_by_its_method():
    """A variant row of a shipped benchmark file (``label = "ptqd-base"``) has its label and
    colour declared on its method (``Method.rows``), where the row is defined, so tables
    and figures never show the bare row name."""
    import warnings

    from gaq.bench import labels
    from gaq.bench.spec import load_benchmark

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = {e.row: e.name for p in sorted(root.glob("*.toml"))
                    for e in load_benchmark(p).methods if e.row != e.name}
    assert "ptqd-base" in variants and "tfmq-quant-skips" in variants
    for row, method in variants.items():
        style = labels.row_style(row)
        assert style is not None and row.startswith(f"{method}-"), row
        assert labels.method_label(row) == style.label and style.color is not None, row


def _compile(tmp_path: Path, tex: Path, options: str = "twocolumn") -> str | None:
    """pdflatex's log for ``tex`` in a plain article with booktabs, None without pdflatex."""
    import shutil
    import subprocess

    if shutil.which("pdflatex") is None:
        return None
    doc = tmp_path / f"doc_{tex.stem}.tex"
    doc.write_text(f"\\documentclass[{options}]{{article}}\n\\usepackage{{booktabs}}\n"
                   f"\\begin{{document}}\n\\input{{{tex}}}\n\\end{{document}}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log = (tmp_path / f"{doc.stem}.log").read_text(errors="replace")
    assert run.returncode == 0, log[-2000:]
    return log


@pytest.mark.slow
def test_the_main_jobs_one_column_table_fits_a_column(tmp_path):
    """The main job's shape (three models, every method, one seed): its one-column table
    is a ``table`` (never ``table*``) of the headline metrics only, short row labels, the
    three models side by side, and it compiles in a two-column article with no overfull
    box (checked when pdflatex is installed)."""
    from gaq.registry import list_methods

    methods = {"fp": ["FP"]} | {m: ["W4A8"] for m in list_methods()}
    metrics = {"fid": 18.0, "kid": 0.5, "precision": 0.8, "recall": 0.9, "psnr": 30.0,
               "class_acc": 0.99}
    rows = pd.concat([_metric_rows(methods, seeds=(0,), metrics=metrics, model=m)
                      for m in ("digits", "digits-ldm", "digits-dit")], ignore_index=True)
    _write_results(tmp_path / "results", rows, curves=False)
    paths = tables.write_tables(tmp_path / "results", "micro", tmp_path / "t")
    onecol = next(p for p in paths if p.name == "micro_onecol.tex")
    tex = onecol.read_text()
    assert r"\begin{table}" in tex and r"\end{table}" in tex and "table*" not in tex
    assert tex.isascii() and tex.count(r"\begin{tabular}") == 1  # models side by side
    head = next(ln for ln in tex.splitlines() if ln.startswith("Method &"))
    assert head == "Method & " + " & ".join(["FID", "PSNR"] * 3) + r" \\"
    assert "Prec." not in tex.split(r"\caption")[0] and "KID" not in tex
    for model in ("digits", "digits-ldm", "digits-dit"):
        assert rf"\multicolumn{{2}}{{c}}{{{model}}}" in tex
    assert "GAQ unif. $\\omega$ &" in tex and "GAQ (uniform" not in tex.split(r"\caption")[0]
    assert "digit-classifier features" in tex
    log = _compile(tmp_path, onecol)
    if log is not None:
        assert "Overfull \\hbox" not in log
    # the full tables stay as they were: every metric, both columns
    assert "table*" in next(p for p in paths if p.name == "micro.tex").read_text()


def test_one_column_table_stacks_what_does_not_fit_side_by_side(tmp_path):
    """Intervals over three seeds are too wide for two bit-widths side by side in one
    column: one tabular per bit-width, stacked, still a ``table`` that compiles with no
    overfull box."""
    rows = _metric_rows(metrics={"fid": 10.0, "psnr": 30.0, "is": 5.0},
                        methods={"fp": ["FP"], "rtn": ["W8A8", "W4A8"],
                                 "gaq-uniform": ["W8A8", "W4A8"], "gaq": ["W8A8", "W4A8"]})
    _write_results(tmp_path / "results", rows, curves=False)
    paths = tables.write_tables(tmp_path / "results", "micro", tmp_path / "t")
    onecol = next(p for p in paths if p.name == "micro_onecol.tex")
    tex = onecol.read_text()
    assert "table*" not in tex and r"$\pm$" in tex
    assert tex.count(r"\begin{tabular}") == 2 and "{W8A8}" in tex and "{W4A8}" in tex
    assert "IS" not in tex.split(r"\caption")[0]  # headline metrics only
    log = _compile(tmp_path, onecol)
    if log is not None:
        assert "Overfull \\hbox" not in log


def test_report_settings_carry_the_feature_space(tmp_path):
    from gaq.bench.spec import report_settings

    (tmp_path / "a.toml").write_text('[benchmark]\nname = "a"\nanchor = "rtn"\n'
                                     '[eval]\nfeature_space = "inception"\n')
    (tmp_path / "b.toml").write_text('[benchmark]\nname = "b"\n')
    assert report_settings(tmp_path) == {"a": {"anchor": "rtn", "feature_space": "inception"},
                                         "b": {}}


def test_empty_results_still_write_tables(tmp_path):
    paths = tables.write_tables(tmp_path / "results", "micro", tmp_path / "tables")
    assert all(p.is_file() for p in paths)
    assert plots.write_plots(tmp_path / "results", "micro", tmp_path / "plots") == []


def test_a_rerun_under_a_new_cell_id_supersedes_the_old_curves():
    """After a code change the same (method, bits, seed) runs again under a new cell id;
    curves and diagnostics must follow the newest run, as the metric summaries do."""
    t0, t1 = pd.Timestamp("2026-01-01", tz="UTC"), pd.Timestamp("2026-02-01", tz="UTC")
    base = {"benchmark": "b", "model": "m", "method": "rtn", "bits": "W4A8", "seed": 0}
    metrics = pd.DataFrame([base | {"cell_id": "old", "timestamp": t0},
                            base | {"cell_id": "new", "timestamp": t1},
                            base | {"seed": 1, "cell_id": "other", "timestamp": t0}])
    assert results.latest_cells(metrics) == {"new", "other"}
    curves = pd.DataFrame({"cell_id": ["old", "new", "other"], "value": [1.0, 2.0, 3.0]})
    assert list(results.current(curves, metrics)["value"]) == [2.0, 3.0]
    # A cell with curves but no metric rows yet (or no metrics at all) is not superseded.
    orphan = pd.DataFrame({"cell_id": ["pending"], "value": [4.0]})
    assert list(results.current(orphan, metrics)["value"]) == [4.0]
    assert list(results.current(curves, metrics.iloc[0:0])["value"]) == [1.0, 2.0, 3.0]


def test_noise_table_keeps_models_apart():
    """Two models with different schedules: each gets its own table, its rows are its own
    means, and its step count is its own (never the models' steps pooled)."""
    from gaq.bench.noise import noise_table

    rows = []
    for model, steps, scale in (("pixel", 10, 1.0), ("latent", 4, 100.0)):
        for t in range(steps):
            for curve, value in (("eps_mse", scale * (t + 1)), ("noise_k", -0.01 * scale)):
                rows.append({"model": model, "method": "rtn", "bits": "W4A8", "seed": 0,
                             "curve": curve, "timestep": t * 100, "value": value})
    md = noise_table(pd.DataFrame(rows), "micro")
    pixel, latent = md.split("## pixel")[1], md.split("## latent")[1].split("## pixel")[0]
    assert "| RTN | W4A8 | 5.50000 |" in pixel and "0/10 |" in pixel
    assert "| RTN | W4A8 | 250.00000 |" in latent and "0/4 |" in latent


def test_latex_tables_compile_and_bold_only_resolved_bests(tmp_path):
    """Tables compile with a plain two-column article + booktabs (when pdflatex exists),
    with math-mode symbols, true minus signs, no overfull box; bold marks a best only where
    its interval is clear of every other row's."""
    rows = _metric_rows(methods={"fp": ["FP"], "rtn": ["W8A8", "W4A8"],
                                 "gaq-uniform": ["W8A8", "W4A8"], "gaq": ["W8A8", "W4A8"]},
                        metrics={"fid": 10.0, "kid": -0.05, "precision": 0.5, "psnr": 30.0})
    rows.loc[(rows["method"] == "rtn") & (rows["metric"] == "psnr"), "value"] -= 40.0
    _write_results(tmp_path / "results", rows, curves=False)
    md_path, tex_path = tables.write_tables(tmp_path / "results", "micro", tmp_path / "t")[:2]
    tex, md = tex_path.read_text(), md_path.read_text()
    assert tex.isascii() and "$\\omega$" in tex and "$-$" in tex
    assert " -0." not in tex and "& -" not in tex  # no hyphen as a minus sign
    # psnr: rtn is 40 dB below the others, gaq and gaq-uniform tie within noise: the
    # best is not resolved, so nothing is bold there; nothing is bold for KID either
    assert "**" not in md and "\\textbf" not in tex
    log = _compile(tmp_path, tex_path)
    if log is not None:  # without pdflatex the source checks above still ran
        assert "Overfull \\hbox" not in log


def test_a_resolved_best_is_bold():
    from gaq.bench.tables import Row, _best

    def row(method, value):
        return Row(method, method.upper(), {("W4A8", "psnr"): value})

    rows = [row("fp", (float("nan"), float("nan"))), row("rtn", (24.0, 0.5)),
            row("gaq", (31.0, 0.5)), row("tfmq", (30.8, 0.5))]
    assert _best(rows, ["W4A8"], ["psnr"]) == set()  # 0.2 dB apart, intervals ±0.5
    rows[3] = row("tfmq", (29.0, 0.5))
    assert _best(rows, ["W4A8"], ["psnr"]) == {(2, ("W4A8", "psnr"))}
