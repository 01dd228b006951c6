"""Reference against run: did this machine reproduce the committed results?

The committed ``results/<benchmark>/`` are the *reference*. A benchmark run writes into a
working store (``runs/`` by default) and ends by comparing every value it computed with
the reference value of the same cell (model, method, bit-width, seed) and metric, and the
conclusions its tables state with the reference's (:mod:`gaq.bench.verdict`):

- **identical**: equal to 1e-9 (relative);
- **within tolerance**: equal within the metric's numerical tolerance, measured by rerunning
  the reference's cells under other thread counts, engines and SIMD paths
  (``tolerance.json`` next to the reference; :func:`gaq.bench.verdict.derive_tolerance`);
- **differs**: beyond it.

A rerun draws the same noise and images as the reference, so the yardstick is numerical;
the noise floor (FP's spread across seeds, :func:`noise_floor`) is what the tables use to
say which method differences a benchmark resolves, and is not part of this comparison.

Timing and memory are shown but not judged: they measure the machine, not the method.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from gaq.bench import results
from gaq.bench.verdict import COUNTS, MIN_REL, Tolerance, _units

__all__ = ["COST_METRICS", "compare", "noise_floor", "report", "summary",
           "update_reference"]

#: What the machine, not the method, decides: never judged.
COST_METRICS = frozenset({"calibration_seconds", "images_per_second", "peak_memory_mb",
                          "diagnostics_seconds", "meta_seconds"})
#: Bookkeeping values, not results.
_SKIP = frozenset({"n_images", "n_reference", "kid_subset_size", "validation_rows",
                   "temporal_layers", "temporal_pairs", "conditioned_quantizers"})
_KEYS = ["model", "method", "bits", "seed", "metric"]
EXACT = 1e-9
FLOOR_SDS = 2.0
FLOOR_FILE = "noise_floor.parquet"
#: Extra FP seeds measured for the noise floor when a run becomes the reference.
FLOOR_SEEDS = 6


def _latest(metrics: pd.DataFrame) -> pd.DataFrame:
    return results.newest(metrics, _KEYS)[[*_KEYS, "value"]]


def compare(run: pd.DataFrame, reference: pd.DataFrame,
            tolerance: Tolerance | None = None) -> pd.DataFrame:
    """One row per value this run computed: reference, run, difference, tolerance (the
    largest numerical change allowed at that value) and verdict (``identical``,
    ``within tolerance``, ``differs``, ``new`` where the reference has no such cell,
    ``cost`` for timing and memory). Without a measured ``tolerance`` every metric gets
    the least one (:data:`gaq.bench.verdict.MIN_REL`, no image of a count)."""
    tolerance = tolerance or Tolerance()
    units = _units(reference)
    run = _latest(run[~run["metric"].isin(_SKIP)]).rename(columns={"value": "run"})
    ref = _latest(reference[~reference["metric"].isin(_SKIP)]).rename(
        columns={"value": "reference"})
    table = run.merge(ref, on=_KEYS, how="left")
    table["difference"] = table["run"] - table["reference"]

    def units_of(r) -> float | None:
        col = COUNTS.get(r.metric)
        if col is None or col not in units:
            return None
        return units[col].get((r.model, r.method, r.bits, r.seed))

    table["tolerance"] = [tolerance.bound(r.metric, r.reference, units_of(r))
                          if not pd.isna(r.reference) else float("nan")
                          for r in table.itertuples(index=False)]
    exact = EXACT * table["reference"].abs().clip(lower=1.0)
    diff = table["difference"].abs()
    verdict = pd.Series("differs", index=table.index)
    verdict[diff <= table["tolerance"]] = "within tolerance"
    verdict[(diff <= exact) | (table["run"].isna() & table["reference"].isna())] = "identical"
    verdict[table["reference"].isna() & table["run"].notna()] = "new"
    verdict[table["metric"].isin(COST_METRICS)] = "cost"
    table["verdict"] = verdict
    return table


def summary(table: pd.DataFrame) -> str:
    """One line: how many judged values reproduced, and how."""
    judged = table[table["verdict"] != "cost"]
    counts = judged["verdict"].value_counts()
    parts = [f"{counts.get(v, 0)} {v}" for v in ("identical", "within tolerance", "differs",
                                                  "new") if counts.get(v, 0)]
    cells = judged.groupby(["model", "method", "bits", "seed"]).ngroups
    return (f"numbers against the reference: {len(judged)} values of {cells} cells: "
            f"{', '.join(parts) or 'nothing to compare'}")


def report(table: pd.DataFrame, benchmark: str, reference_dir: Path,
           checks: pd.DataFrame | None = None, tolerance: Tolerance | None = None,
           line: str = "") -> str:
    """Markdown: the verdict, how it is reached, the values that are not identical (all
    of them when nothing is) and every conclusion of the reference with its status."""
    from gaq.bench.verdict import describe, tolerance_markdown

    how = ("measured (below)" if tolerance is not None and tolerance.metrics else
           f"not measured for this reference: every metric gets {MIN_REL:g} relative, no "
           "image of a count")
    lines = [f"# {benchmark}: reproduction against the reference", "",
             f"**{line}**" if line else "", "", summary(table) + ".", "",
             f"Reference: `{reference_dir}`. A value is *identical* to 1e-9 (relative); "
             "*within tolerance* when its change is within the metric's numerical tolerance, "
             f"{how}; otherwise it *differs*. Timing and memory are not judged. A conclusion "
             "is a comparison the reference's tables resolve (a paired interval against the "
             "anchor that excludes 0, a bold best row): it must be resolved in the same "
             "direction; an unresolved one must not become resolved the other way.", ""]
    shown = table[~table["verdict"].isin(("identical", "cost"))]
    if shown.empty:
        lines.append("Every judged value is identical to the reference.")
    else:
        lines += ["| model | method | bits | seed | metric | reference | this run | "
                  "difference | tolerance | verdict |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---|"]
        for r in shown.itertuples(index=False):
            lines.append(f"| {r.model} | {r.method} | {r.bits} | {r.seed} | {r.metric} | "
                         f"{_num(r.reference)} | {_num(r.run)} | {_num(r.difference)} | "
                         f"{_num(r.tolerance)} | {r.verdict} |")
    if checks is not None and len(checks):
        lines += ["", "## Conclusions", "", "| status | comparison (reference → this run) |",
                  "|---|---|"]
        order = {"reversed": 0, "lost": 1, "preserved": 2, "unresolved": 3, "not run": 4}
        ranked = checks.assign(_o=checks["status"].map(order)).sort_values("_o", kind="stable")
        for r in ranked.itertuples(index=False):
            if r.status == "unresolved":
                continue  # neither resolved nor reversed: nothing is claimed
            lines.append(f"| {r.status} | {describe(r)} |")
    if tolerance is not None and tolerance.metrics:
        lines += ["", tolerance_markdown(tolerance, benchmark)]
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.4g}"


def noise_floor(runner, seeds: list[int]) -> pd.DataFrame:
    """Per model and image metric: the FP row's standard deviation across ``seeds`` (each
    a full sample of the benchmark's image count, scored as a cell is)."""
    from gaq.eval.registry import compute_grouped, metrics_of_kind
    from gaq.sampling import to_uint8

    wanted = metrics_of_kind(runner.bench.eval.metrics, "image")
    rows = []
    for model_id in runner.bench.models:
        ctx = runner.model(model_id)
        for seed in seeds:
            images, _ = runner._sample(ctx, ctx.pipe.denoiser, seed, None)
            # through the registry, as a cell is scored: a plugin's image metric gets a
            # noise floor too (calling the built-in function named it unknown)
            values = compute_grouped(wanted, to_uint8(images), ctx.reference(), ctx.space,
                                     seed=seed) if wanted else {}
            if "class_acc" in runner.bench.eval.metrics and ctx.judges_classes:
                values["class_acc"] = runner.class_accuracy(ctx, images)
            rows += [{"model": model_id, "metric": k, "seed": seed, "value": float(v)}
                     for k, v in values.items() if k not in _SKIP]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["model", "metric", "n", "sd"])
    out = df.groupby(["model", "metric"])["value"].agg(n="count", sd="std").reset_index()
    return out


def update_reference(run_dir: Path, reference_dir: Path, floor: pd.DataFrame) -> list[Path]:
    """Make this run the reference: its Parquet tables (each cell's newest rows), sample
    grids and noise floor replace the reference benchmark folder's (tables and plots are
    regenerated by the caller). The measured numerical tolerance (``tolerance.json``)
    stays: it belongs to the benchmark's protocol and code, not to one set of values."""
    reference_dir.mkdir(parents=True, exist_ok=True)
    for stale in reference_dir.glob("*.parquet"):  # the reference is this run, nothing older
        stale.unlink()
    # A run into a store that already held results (e.g. a copy of the reference, so that
    # only the cells a change touched are computed) also holds the rows those cells
    # replaced: the reference keeps only each cell's newest run.
    metrics_path = run_dir / "metrics.parquet"
    metrics = pd.read_parquet(metrics_path) if metrics_path.exists() else pd.DataFrame()
    written = []
    for path in sorted(run_dir.glob("*.parquet")):
        target = reference_dir / path.name
        table = pd.read_parquet(path)
        # on metrics.parquet itself this keeps exactly the newest cells
        kept = results.current(table, metrics) if "cell_id" in metrics else table
        if len(kept) == len(table):
            shutil.copyfile(path, target)
        else:
            kept.reset_index(drop=True).to_parquet(target, index=False)
        written.append(target)
    grids = run_dir / "grids"
    if grids.is_dir():
        shutil.rmtree(reference_dir / "grids", ignore_errors=True)
        shutil.copytree(grids, reference_dir / "grids")
    floor.to_parquet(reference_dir / FLOOR_FILE, index=False)
    written.append(reference_dir / FLOOR_FILE)
    return written


def kept_floor(metrics_path: Path, reference_dir: Path) -> pd.DataFrame | None:
    """The reference's noise floor, if a run that replaces the reference may keep it: the
    floor is FP's spread over other seeds, so it stands while every FP cell of the run is
    one the reference already holds (same code, config and seeds). None: measure it."""
    floor = read_floor(reference_dir)
    reference = reference_metrics(reference_dir)
    run = results.read(metrics_path)
    if floor is None or reference.empty or run.empty:
        return None
    from gaq.bench.spec import FP

    fp_run = set(run.loc[run["method"] == FP, "cell_id"])
    fp_ref = set(reference.loc[reference["method"] == FP, "cell_id"])
    return floor if fp_run and fp_run <= fp_ref else None


def read_floor(reference_dir: Path) -> pd.DataFrame | None:
    path = reference_dir / FLOOR_FILE
    return pd.read_parquet(path) if path.exists() else None


def reference_metrics(reference_dir: Path) -> pd.DataFrame:
    return results.read(reference_dir / "metrics.parquet")
