"""Parquet results: the source of truth for tables and plots.

Two long-format tables per benchmark, ``results/<benchmark>/metrics.parquet`` (one row per
cell and metric) and ``curves.parquet`` (one row per cell, curve and timestep). Long format
means a new metric or curve is new rows, never a schema change.

Writes replace a whole file atomically (temp file in the same folder, then ``os.replace``),
so a crash mid-write leaves the previous file intact, and an advisory lock serialises
read-modify-write across processes (several runner processes may share one benchmark).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd

from gaq.errors import GaqError

__all__ = [
    "CURVES_SCHEMA",
    "DamagedTableError",
    "FAILURES_SCHEMA",
    "METRICS_SCHEMA",
    "SUMMARY_KEYS",
    "append",
    "check_tables",
    "ci_half_width",
    "current",
    "failed_cells",
    "latest_cells",
    "read",
    "schema_for",
    "summarize",
    "t_critical",
]

_TS = "datetime64[us, UTC]"

#: Column -> pandas dtype of ``metrics.parquet``. Nullable ints: FP has no bit-widths.
METRICS_SCHEMA: dict[str, str] = {
    "run_id": "string",
    "cell_id": "string",
    "benchmark": "string",
    "model": "string",
    "method": "string",
    "preset": "string",
    "bits": "string",
    "w_bits": "Int64",
    "a_bits": "Int64",
    "seed": "int64",
    "setup": "string",
    "metric": "string",
    "value": "float64",
    "ci_group": "string",
    "timestamp": _TS,
}

#: Column -> pandas dtype of ``curves.parquet`` (per-timestep diagnostics such as eps_mse).
CURVES_SCHEMA: dict[str, str] = {
    "run_id": "string",
    "cell_id": "string",
    "benchmark": "string",
    "model": "string",
    "method": "string",
    "bits": "string",
    "seed": "int64",
    "curve": "string",
    "timestep": "int64",
    "value": "float64",
}

#: Column -> pandas dtype of ``failures.parquet``: cells that ran and failed (a diverged
#: calibration, NaN images). A cell here and not in ``metrics.parquet`` is failed; a later
#: successful run of it (``--retry-failed``, ``--force``) wins.
FAILURES_SCHEMA: dict[str, str] = {
    "run_id": "string",
    "cell_id": "string",
    "benchmark": "string",
    "model": "string",
    "method": "string",
    "preset": "string",
    "bits": "string",
    "seed": "int64",
    "error": "string",
    "timestamp": _TS,
}

_SCHEMAS = {"metrics.parquet": METRICS_SCHEMA, "curves.parquet": CURVES_SCHEMA,
            "failures.parquet": FAILURES_SCHEMA}

#: What a confidence interval is computed over (the seeds of one configuration).
SUMMARY_KEYS = ("benchmark", "model", "method", "bits", "metric")


def schema_for(path: str | Path) -> dict[str, str] | None:
    """The schema a results file follows, by its name; None for other files."""
    return _SCHEMAS.get(Path(path).name)


def _empty(schema: Mapping[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.items()})


def _fill_defaults(df: pd.DataFrame, schema: Mapping[str, str]) -> pd.DataFrame:
    df = df.copy()
    if "timestamp" in schema and "timestamp" not in df:
        df["timestamp"] = pd.Timestamp.now(tz="UTC")
    if "ci_group" in schema and "ci_group" not in df:
        # Seeds of the same configuration: everything that identifies a row except the seed.
        parts = [c for c in ("benchmark", "model", "method", "preset", "bits") if c in df]
        df["ci_group"] = df[parts].astype("string").agg("/".join, axis=1) if parts else ""
    return df


def _conform(df: pd.DataFrame, schema: Mapping[str, str], where: str) -> pd.DataFrame:
    missing = [c for c in schema if c not in df.columns]
    extra = [c for c in df.columns if c not in schema]
    if missing or extra:
        raise ValueError(
            f"{where}: columns do not match the results schema"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unexpected: {', '.join(map(str, extra))}" if extra else "")
        )
    out = df[list(schema)].copy()
    for col, dtype in schema.items():
        if dtype == _TS:
            out[col] = pd.to_datetime(out[col], utc=True).astype(dtype)
        elif dtype in ("int64", "Int64"):
            # via float would lose precision on big ints; to_numeric keeps ints as ints
            out[col] = pd.to_numeric(out[col]).astype(dtype)
        else:
            out[col] = out[col].astype(dtype)
    return out.reset_index(drop=True)


def read(path: str | Path, schema: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A results table; an empty one with the right columns and dtypes if the file is missing.

    The schema defaults to the one of the file's name (metrics.parquet or curves.parquet,
    falling back to the metrics schema for a missing file of another name).
    """
    path = Path(path)
    schema = schema or schema_for(path)
    if not path.exists():
        return _empty(schema or METRICS_SCHEMA)
    try:
        df = pd.read_parquet(path, engine="pyarrow")
        return _conform(df, schema, str(path)) if schema else df
    except (OSError, ValueError, TypeError) as e:  # truncated, not Parquet, other columns
        raise DamagedTableError(path, e) from None


class DamagedTableError(GaqError, ValueError):
    """A results table that cannot be read back (truncated, not Parquet, or columns that
    are not its schema's): one line naming the file and what to do."""

    def __init__(self, path: Path, error: Exception) -> None:
        text = " ".join(str(error).split()) or type(error).__name__
        if text.startswith(f"{path}: "):
            text = text[len(f"{path}: "):]
        super().__init__(
            f"results table {path} cannot be read ({text[:200]}); it is damaged or from "
            "another program: restore it from a copy, or move it away (the cells it held "
            "run again)")


def check_tables(folder: str | Path) -> None:
    """Every results table (``*.parquet``) of a benchmark's folder reads back under its
    schema, checked before any work: a damaged one would otherwise fail the sweep only
    when a cell has run and appends to it. Raises :class:`DamagedTableError`."""
    for path in sorted(Path(folder).glob("*.parquet")):
        read(path)


def failed_cells(folder: str | Path) -> pd.DataFrame:
    """The failures of a benchmark's results folder whose cell has no metrics (a cell that
    failed and later succeeded is not failed)."""
    folder = Path(folder)
    failures = read(folder / "failures.parquet")
    done = set(read(folder / "metrics.parquet")["cell_id"])
    return failures[~failures["cell_id"].isin(done)].reset_index(drop=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; writes are still atomic
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, engine="pyarrow", index=False)
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def probe_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write (and remove) a probe file in it; raises
    ``OSError`` when it cannot take writes (checked in preflight, before any work)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".gaq-write-check-"):
        pass


def append(
    path: str | Path,
    df: pd.DataFrame,
    key: str = "cell_id",
    schema: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Add ``df`` to the table at ``path``, replacing existing rows with the same ``key``.

    A rerun of a cell therefore replaces its rows instead of duplicating them. Missing
    ``timestamp`` (now) and ``ci_group`` (configuration without the seed) are filled in.
    Returns the whole table as written.
    """
    path = Path(path)
    schema = schema or schema_for(path)
    if key not in df.columns:
        raise ValueError(f"{path}: rows to append have no {key!r} column")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = df
    if schema:
        new = _conform(_fill_defaults(df, schema), schema, f"rows for {path}")
    with _locked(path):
        # a temp file present while we hold the lock is a dead writer's (killed mid-write)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        old = read(path, schema) if path.exists() else None
        if old is not None and len(old):
            old = old[~old[key].isin(set(new[key]))]
            frames = [f for f in (old, new) if len(f)]
            table = pd.concat(frames, ignore_index=True) if frames else new
        else:
            table = new
        if schema:  # concat of nullable columns can decay to object; pin the dtypes again
            table = _conform(table, schema, str(path))
        _write_atomic(table, path)
    return table


# --------------------------------------------------------------------------------------
# Summaries: mean and 95 % confidence interval over seeds.
# --------------------------------------------------------------------------------------

# Two-sided 95 % Student t quantiles, t_{0.975, df} for df = 1..30 (scipy is not a dependency).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_critical(df: int) -> float:
    """t_{0.975} for ``df`` degrees of freedom; the normal 1.96 beyond the table (df > 30)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96


def ci_half_width(values: list[float]) -> float:
    """Half-width of the 95 % CI of the mean (Student t); NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    return t_critical(n - 1) * statistics.stdev(values) / math.sqrt(n)


def latest_cells(metrics: pd.DataFrame) -> set[str]:
    """The cell id of the newest run of every (benchmark, model, method, bits, seed). A
    rerun under a new cell id (after a code or config change) supersedes the old rows in
    every table and plot, as :func:`summarize` does for the metrics."""
    if metrics.empty:
        return set()
    keys = [c for c in ("benchmark", "model", "method", "bits", "seed") if c in metrics]
    return set(newest(metrics, keys)["cell_id"])


def newest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per combination of ``keys``: the newest by ``timestamp`` (without one, the
    last written)."""
    data = df.sort_values("timestamp", kind="stable") if "timestamp" in df else df
    return data.drop_duplicates(keys, keep="last")


def current(rows: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """The ``rows`` (curves, diagnostics) less those of cells a newer run superseded
    (:func:`latest_cells`). Rows of a cell with no metric rows yet are kept: nothing newer
    is known to replace them."""
    if rows.empty or "cell_id" not in rows or metrics.empty:
        return rows
    superseded = set(metrics["cell_id"]) - latest_cells(metrics)
    return rows[~rows["cell_id"].isin(superseded)]


def summarize(df: pd.DataFrame, by: tuple[str, ...] = SUMMARY_KEYS) -> pd.DataFrame:
    """Per ``by`` group (benchmark, model, method, bits, metric): n seeds, mean, std, ci95.

    One value per seed: if a seed appears twice (a rerun under a new cell id), the newest
    row wins. ``std`` is the sample standard deviation; ``std`` and ``ci95`` are NaN for n=1.
    """
    cols = [*by, "n", "mean", "std", "ci95"]
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in cols[-3:] else "object")
                             for c in cols}).astype({"n": "int64"})
    data = newest(df.dropna(subset=["value"]), [*by, "seed"])
    rows = []
    for keys, group in data.groupby(list(by), sort=True, dropna=False):
        if "ci_group" in group and group["ci_group"].nunique() > 1:
            warnings.warn(
                f"summarize: {dict(zip(by, keys, strict=True))} mixes configurations "
                f"{sorted(group['ci_group'].unique())}; its CI is over all of them",
                stacklevel=2,
            )
        values = [float(v) for v in group["value"]]
        rows.append((*keys, len(values), statistics.fmean(values),
                     statistics.stdev(values) if len(values) > 1 else math.nan,
                     ci_half_width(values)))
    return pd.DataFrame(rows, columns=cols)
