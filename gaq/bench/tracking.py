"""MLflow logging: where people browse runs. Parquet (``gaq.bench.results``) stays the
source of truth, so nothing downstream reads back from MLflow except :func:`find_run`.

The client API is used instead of the fluent one (``mlflow.start_run``) so no global
"active run" leaks between cells and a failed cell is marked FAILED, not left RUNNING.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from gaq.bench.provenance import repo_root
from gaq.tempdirs import alive, temp_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "CELL_ID_TAG",
    "SWEEP_ID_TAG",
    "SWEEP_TAG",
    "VIEW_KEY",
    "artifact_root",
    "check_store",
    "close_sweep",
    "mark_stale_sweeps",
    "open_sweep",
    "find_run",
    "flatten",
    "log_run",
    "store_lock",
    "tracking_uri",
]

CELL_ID_TAG = "gaq.cell_id"
SWEEP_TAG = "gaq.sweep"  # on the run of one `gaq bench` invocation
# on each cell's run: its sweep's run id. Cells are top-level runs tagged with their sweep,
# not nested under it: MLflow's runs table shows nested runs only after a click on their
# parent, and the parent's row has no metric columns of its own
SWEEP_ID_TAG = "gaq.sweep_id"
# the experiment's saved view (an `mlflow.sharedViewState.<key>` experiment tag, which the
# UI opens from a link with ?viewStateShareKey=<key>): every cell, headline metrics as columns
VIEW_KEY = "gaq-cells"
_VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"

# MLflow's own limits (mlflow.utils.validation); copied so importing this module stays cheap.
_MAX_PARAM_VAL = 6000
_MAX_TAG_VAL = 8000
_MAX_KEY = 250
_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_TRUNCATED = "...[truncated]"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the repo root's ``mlflow.db``.

    ``mlflow ui`` started in the repo root opens ``sqlite:///mlflow.db`` by default, so the
    runs show up there with no flags, whatever folder the benchmark ran from.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(repo_root() / 'mlflow.db').as_posix()}"


def artifact_root(uri: str | None = None) -> str | None:
    """Folder for new experiments' artifacts: ``mlartifacts/`` next to a SQLite database.

    MLflow would otherwise resolve ``./mlartifacts`` against the working directory, which
    scatters artifacts per launch folder. For servers (http...) the server decides: None.
    """
    db = _sqlite_file(uri or tracking_uri())
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def _quiet() -> None:
    # mlflow logs INFO lines on every new database (schema migrations) and alembic may add
    # its own; an explicit MLFLOW_LOGGING_LEVEL from the user still wins.
    if "MLFLOW_LOGGING_LEVEL" in os.environ:
        return
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


_READY: set[str] = set()  # stores this process has opened (schema created or migrated)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for servers and in-memory stores."""
    if urlparse(uri).scheme != "sqlite":
        return None
    db = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return None if not db or db == ":memory:" else Path(db)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the advisory lock of a SQLite store (``.<db>.lock`` next to the database) for
    the block. MLflow creates or migrates the schema when a process first opens a store;
    two processes doing so at once on a fresh database make one of them fail mid-migration,
    so gaq opens a store under this lock. A no-op for servers, where the lock file cannot
    be made (a read-only folder: opening fails on its own, with a clear message) and on
    Windows (no flock)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    db = _sqlite_file(uri)
    if fcntl is None or db is None or not db.parent.is_dir():
        yield
        return
    try:
        handle = db.with_name(f".{db.name}.lock").open("a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(uri: str) -> MlflowClient:
    # no usage reports leave the machine unless the user asks for them
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    _quiet()  # after the import: importing mlflow configures (and resets) its loggers
    if uri in _READY:
        return MlflowClient(tracking_uri=uri)
    with store_lock(uri):  # one process at a time creates or migrates a fresh schema
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store: schema made or checked
    _READY.add(uri)
    return client


def _experiment_id(client: MlflowClient, uri: str, name: str, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if create:  # a store written by an older gaq: its experiment gets the tags it lacks
            for key, value in _experiment_tags(name).items():
                if key not in exp.tags:
                    client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    if not create:
        return None
    location = artifact_root(uri)
    if location is not None:
        location = f"{location}/{_safe_folder(name)}"
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags=_experiment_tags(name))
    except Exception:
        # Another process created it between our lookup and create: use theirs.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _experiment_tags(name: str) -> dict[str, str]:
    """MLflow 3 opens an untyped experiment in its GenAI view (traces); these runs are model
    evaluations, so the experiment says so and the UI lands on the runs table. The note is
    the experiment's description in the UI."""
    bench = name.removeprefix("gaq-")
    return {"mlflow.experimentKind": "custom_model_development",
            "mlflow.note.content": (
                f"gaq benchmark `{bench}`: one run per cell (model x method x bit-width x "
                "seed), named method · model bits seed and tagged `gaq.sweep_id` with the "
                "run of the `gaq bench` invocation that made it. Metrics are "
                "the cell's image and paired metrics; per-timestep curves are artifacts "
                "(curves/*.csv and *.png); the layer report, sample grid and quantization "
                "state are artifacts too.")}


def _safe_folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _stringify(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_stringify(v) for v in value) + "]"
    if value is None:
        return "None"
    return str(value)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys (``sampler.steps``); values become (truncated) strings."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if str(key).startswith("_"):  # serializer internals (_type, _version), not settings
            continue
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, f"{full}."))
            else:  # keep "no overrides" visible instead of dropping the key
                out[full] = "{}"
        else:
            out[full] = _truncate(_stringify(value), _MAX_PARAM_VAL)
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _artifact_dir(key: str, path: Path) -> str | None:
    """Artifact folder for one file: the key is a folder, unless it already names the file
    (``"state/layers.md"`` -> ``state/``), so ``state/<f.name>`` keys do not nest twice."""
    key = key.strip("/")
    parts = key.split("/")
    if parts[-1] == path.name:
        parent = "/".join(parts[:-1])
        return parent or None
    return key or None


def _write_curve_csv(folder: Path, name: str, points: list[tuple[int, float]]) -> Path:
    path = folder / f"{_safe_folder(name)}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestep", name])
        writer.writerows(sorted((int(s), float(v)) for s, v in points))
    return path


def _write_curve_png(folder: Path, name: str, points: list[tuple[int, float]],
                     title: str = "") -> Path:
    """A small plot of one per-timestep curve, for the run page (MLflow's metric charts
    plot against a step and show a curve over t as a spike)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gaq.eval.curve_names import curve_label

    fig = Figure(figsize=(4.8, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ordered = sorted((int(s), float(v)) for s, v in points)
    steps, values = [s for s, _ in ordered], [v for _, v in ordered]
    ax.plot(steps, values, marker="o", ms=2)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # spans orders of magnitude (ε-MSE from t = 0 to T)
    label, what = curve_label(name)
    ax.set_xlabel("timestep t (sampling runs from right to left)")
    ax.set_ylabel(label)
    ax.set_title("\n".join(x for x in (title, what) if x), fontsize=8)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120)
    return path


def log_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    artifacts: Mapping[str, Path] | None = None,
    curves: Mapping[str, list[tuple[int, float]]] | None = None,
    *,
    cell_id: str | None = None,
    start_time: float | None = None,
    parent: str | None = None,
    status: str = "FINISHED",
) -> str:
    """Log one cell as an MLflow run and return its run id.

    ``params`` may nest (flattened with dots); ``artifacts`` maps an artifact folder to a
    file (or a directory, logged whole); ``curves`` maps a name to ``(timestep, value)``
    points, logged as ``curves/<name>.csv`` and ``curves/<name>.png``. ``cell_id``
    is a shortcut for the :data:`CELL_ID_TAG` tag that :func:`find_run` looks up.
    ``start_time`` (seconds since the epoch) is when the cell started, so the run's
    duration in the UI is the cell's, though it is logged once the cell is done (a killed
    cell leaves no half-logged run); ``parent``, its sweep's run id, is written as the
    :data:`SWEEP_ID_TAG` tag (a top-level run, not a nested one). A cell that failed is
    logged with ``status="FAILED"`` (and its error as a tag).
    """
    from mlflow.entities import Metric, Param

    artifacts = {k: Path(v) for k, v in (artifacts or {}).items()}
    missing = [f"{k}: {p}" for k, p in artifacts.items() if not p.exists()]
    if missing:  # before creating the run, so a bad call leaves no half-logged run behind
        raise FileNotFoundError("artifacts do not exist: " + "; ".join(missing))

    all_tags = {str(k): _truncate(str(v), _MAX_TAG_VAL) for k, v in tags.items()}
    if cell_id is not None:
        all_tags[CELL_ID_TAG] = cell_id
    if parent is not None:
        all_tags[SWEEP_ID_TAG] = parent

    uri = tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment, create=True)
    # the tags go with the run's creation, in one transaction: a process killed right
    # after it still leaves a run its sweep (gaq.sweep_id) and cell (gaq.cell_id) identify,
    # which mark_stale_sweeps then closes
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags,
                            start_time=None if start_time is None else int(start_time * 1000))
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        flat = flatten(params)
        for batch in _chunks([Param(k[:_MAX_KEY], v) for k, v in flat.items()],
                             _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=batch)
        points = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for batch in _chunks(points, _METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch)
        for key, path in artifacts.items():
            if path.is_dir():
                client.log_artifacts(run_id, str(path), key.strip("/") or None)
            else:
                client.log_artifact(run_id, str(path), _artifact_dir(key, path))
        if curves:
            # named by this process, so a kill mid-logging leaves nothing the next start
            # does not remove (gaq.tempdirs)
            with temp_dir("curves") as tmp:
                for name, curve in curves.items():
                    for path in (_write_curve_csv(tmp, name, curve),
                                 _write_curve_png(tmp, name, curve, run_name)):
                        client.log_artifact(run_id, str(path), "curves")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, status)
    return run_id


def ui_links(base_url: str, uri: str | None = None) -> list[str]:
    """``name: link`` for each gaq experiment in the store. The links open the runs table:
    MLflow 3's UI otherwise starts in its GenAI view (traces), whatever the experiment's
    kind, until "Model training" is chosen once at its top left."""
    client = _client(uri or tracking_uri())
    # the saved view opens only on the runs tab's own route (/runs), not the experiment's
    return [f"{e.name}: {base_url.rstrip('/')}/#/experiments/{e.experiment_id}"
            + (f"/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
               if _VIEW_TAG in e.tags else "?workflowType=machine_learning")
            for e in client.search_experiments() if e.name.startswith("gaq-")]


#: Columns of the saved view besides the headline metrics: what tells cells apart.
_VIEW_PARAMS = ("model", "row", "bits", "seed")
#: Headline metrics in the order the tables show them; others a benchmark measures follow.
_HEADLINE = ("fid", "kid", "precision", "recall", "psnr", "eps_mse", "class_acc")


def default_view(headline: list[str]) -> dict:
    """The saved view's state: every run shown (charts included, not the first ten), the
    cells' identifying parameters and ``headline`` metrics as table columns, newest
    first."""
    ordered = [m for m in _HEADLINE if m in headline] + [m for m in headline
                                                          if m not in _HEADLINE]
    columns = ([f"params.`{p}`" for p in _VIEW_PARAMS]
               + [f"metrics.`{m}`" for m in ordered])
    return {"selectedColumns": columns, "columnOrder": columns, "runsHiddenMode": "SHOW_ALL",
            "orderByKey": "attributes.start_time", "orderByAsc": False,
            "searchFilter": "", "hideEmptyCharts": True,
            # the chart view's filter is a regular expression over metric names
            "chartsSearchFilter": "^(" + "|".join(ordered) + ")$"}


def set_default_view(experiment: str, headline: list[str]) -> None:
    """Store :func:`default_view` as the experiment's saved view (the link
    :func:`ui_links` prints opens it)."""
    import json

    uri = tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment, create=True)
    client.set_experiment_tag(exp_id, _VIEW_TAG, json.dumps(default_view(headline)))


def check_store(experiment: str) -> str:
    """Open the tracking store and create ``experiment`` in it (idempotent), before any
    work: a bad ``MLFLOW_TRACKING_URI``, an unreadable or corrupt database or a read-only
    folder is one line here, not a traceback after the first cell's calibration. Returns
    the experiment id."""
    from gaq.errors import GaqError

    uri = tracking_uri()
    try:
        exp_id = _experiment_id(_client(uri), uri, experiment, create=True)
    except Exception as e:  # any store failure: name the store and how to fix it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GaqError(f"MLflow store {uri} cannot be used ({type(e).__name__}: "
                       f"{first[:200]}); fix it or set MLFLOW_TRACKING_URI to another store, "
                       "e.g. sqlite:///mlflow.db") from None
    location = artifact_root(uri)
    if location is not None:  # artifacts are copied there after every cell
        from gaq.bench.results import probe_writable

        folder = Path(unquote(urlparse(location).path))
        try:
            probe_writable(folder)
        except OSError as e:
            raise GaqError(f"MLflow artifact folder {folder} is not writable ({e.strerror}); "
                           "fix its permissions or set MLFLOW_TRACKING_URI to another store"
                           ) from None
    return exp_id


def find_run(experiment: str, cell_id: str) -> str | None:
    """The newest FINISHED run of ``experiment`` tagged with this cell id, or None."""
    if "'" in cell_id or "\\" in cell_id:
        raise ValueError(f"cell id {cell_id!r} may not contain quotes or backslashes")
    uri = tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment, create=False)
    if exp_id is None:
        return None
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{CELL_ID_TAG}` = '{cell_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_sweep(experiment: str, run_name: str, params: Mapping[str, Any],
               tags: Mapping[str, str]) -> str:
    """The run of one benchmark invocation, RUNNING until :func:`close_sweep`; its cells'
    runs carry its id (:data:`SWEEP_ID_TAG`). It records this process's host and pid, so
    a sweep that was killed is recognised later (:func:`mark_stale_sweeps`). The
    experiment's saved view gets the benchmark's metrics (``params["eval"]["metrics"]``)
    as columns."""
    import socket

    from mlflow.entities import Param

    uri = tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment, create=True)
    mark_stale_sweeps(experiment)
    all_tags = {**{str(k): _truncate(str(v), _MAX_TAG_VAL) for k, v in tags.items()},
                SWEEP_TAG: "1", "gaq.host": socket.gethostname(), "gaq.pid": str(os.getpid())}
    # created with its tags at once: a sweep killed at any moment is one the next start
    # recognises (by SWEEP_TAG, host and pid) and marks KILLED
    run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    for batch in _chunks([Param(k[:_MAX_KEY], v) for k, v in flatten(params).items()],
                         _PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch)
    metrics = (params.get("eval") or {}).get("metrics") if isinstance(params, Mapping) else None
    if metrics:
        set_default_view(experiment, list(metrics))
    return run_id


def close_sweep(run_id: str, status: str = "FINISHED") -> None:
    """End a sweep's parent run: FINISHED, FAILED (an error) or KILLED (interrupted)."""
    _client(tracking_uri()).set_terminated(run_id, status)


def mark_stale_sweeps(experiment: str) -> list[str]:
    """Sweep runs of ``experiment`` still RUNNING although the process that opened them
    (on this host) is gone, e.g. killed: marked KILLED with any cell run of theirs still
    RUNNING, so the UI does not show them as running forever. Sweeps of other hosts are
    left alone. Returns their run ids."""
    import socket

    uri = tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment, create=False)
    if exp_id is None:
        return []
    runs = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '1' and "
                              "attributes.status = 'RUNNING'")
    host, stale = socket.gethostname(), []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("gaq.pid", "")
        if tags.get("gaq.host") != host or not pid.isdigit() or alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
        # a cell killed while its run was being logged: that run ends KILLED too (cells
        # of stores written before cells were top-level runs are nested instead)
        for tag in (SWEEP_ID_TAG, "mlflow.parentRunId"):
            for child in client.search_runs([exp_id], filter_string=(
                    f"tags.`{tag}` = '{run.info.run_id}' and attributes.status = 'RUNNING'")):
                client.set_terminated(child.info.run_id, "KILLED")
    return stale
