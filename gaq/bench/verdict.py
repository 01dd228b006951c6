"""Did a rerun reproduce the reference? Two questions, answered separately.

**Numbers.** A rerun draws the same noise, the same images and the same calibration rows
as the reference, so whether its values are the reference's is a question of arithmetic,
not of sampling. Each value is *identical* (to 1e-9, relative), *within tolerance* (equal
within numerical tolerance) or *differs*. The tolerance is measured per metric
(:func:`derive_tolerance`): the reference's cells are rerun under the conditions a user's
machine varies (intra-op thread count, the local engine against Ray, another SIMD path of
torch's CPU kernels) and each metric's largest observed change, times :data:`MARGIN`, is
its tolerance, stored next to the reference in ``tolerance.json``. Metrics that count
images (class accuracy and precision over the generated images, recall over the reference
images) move in whole images, so their tolerance is a number of images. A metric whose
reruns never moved gets :data:`MIN_REL`, since identical reruns on one machine say nothing
about the last bits another CPU's float32 reductions give.

**Conclusions.** Every comparison the reference resolves must still be resolved, in the
same direction: the paired differences against the benchmark's anchor whose 95 % interval
excludes 0 (``*_paired.md``: per-image PSNR, and set metrics paired by seed) and the
bold best rows of the main tables. A comparison the reference leaves unresolved may
become resolved, but not against the direction of the reference's estimate (a resolved
reversal).

The noise floor (FP's spread across seeds) is not part of this verdict: it says which
method differences a benchmark resolves, and it stays in the tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from gaq.bench import labels, results

__all__ = ["COUNTS", "MARGIN", "MIN_REL", "TOLERANCE_FILE", "Tolerance", "check_conclusions",
           "conclusions", "derive_tolerance", "read_tolerance", "tolerance_markdown",
           "verdict", "write_tolerance"]

TOLERANCE_FILE = "tolerance.json"
#: Tolerance = MARGIN x the largest change seen across the measured conditions: a few
#: conditions on one machine sample only part of what other machines vary.
MARGIN = 4.0
#: The least relative tolerance: float32 reductions over 10^3-10^5 terms (features,
#: pixels, kernel sums) on another CPU differ in about the 5th significant digit at most.
MIN_REL = 1e-4
#: Values smaller than this fraction of a metric's typical size (its median magnitude) are
#: judged absolutely: a relative change of a value that crosses 0 (KID, a mean slope) means
#: nothing, and would inflate the metric's relative tolerance for every other value.
NEAR_ZERO = 0.1
#: Metrics that count images: the bookkeeping metric that holds the count's denominator.
COUNTS = {"class_acc": "n_images", "precision": "n_images", "recall": "n_reference"}
_KEYS = ["model", "method", "bits", "seed"]


@dataclass
class Tolerance:
    """Per metric: ``rel`` and ``abs`` (a value passes if its change is at most the larger
    of ``abs`` and ``rel`` x |reference|), or for a count ``images`` (whole units of its
    denominator). Metrics not listed get :data:`MIN_REL`."""

    metrics: dict[str, dict] = field(default_factory=dict)
    margin: float = MARGIN
    how: str = ""
    conditions: dict[str, str] = field(default_factory=dict)
    measured: str = ""

    def bound(self, metric: str, reference: float, units: float | None = None) -> float:
        """The largest change of ``metric`` at ``reference`` that is numerical; ``units``:
        the count behind a counted metric (its images)."""
        spec = self.metrics.get(metric)
        if metric in COUNTS:
            images = spec.get("images", 0) if spec else 0
            n = units if units and units > 0 else math.nan
            # a count's last bit of float32 rounding is not a changed image
            return images / n + 1e-6 if images else MIN_REL * abs(reference)
        if spec is None:
            return MIN_REL * abs(reference)
        return max(spec["abs"], spec["rel"] * abs(reference))

    def measured_for(self, metric: str) -> bool:
        return metric in self.metrics

    def to_json(self) -> dict:
        return {"margin": self.margin, "min_rel": MIN_REL, "near_zero": NEAR_ZERO,
                "measured": self.measured, "how": self.how, "conditions": self.conditions,
                "metrics": self.metrics}

    @classmethod
    def from_json(cls, data: Mapping) -> Tolerance:
        return cls(metrics=dict(data.get("metrics", {})), margin=float(data.get("margin", 0)),
                   how=str(data.get("how", "")), conditions=dict(data.get("conditions", {})),
                   measured=str(data.get("measured", "")))


def read_tolerance(reference_dir: Path) -> Tolerance | None:
    path = Path(reference_dir) / TOLERANCE_FILE
    if not path.exists():
        return None
    return Tolerance.from_json(json.loads(path.read_text(encoding="utf-8")))


def write_tolerance(reference_dir: Path, tolerance: Tolerance) -> Path:
    path = Path(reference_dir) / TOLERANCE_FILE
    path.write_text(json.dumps(tolerance.to_json(), indent=1, sort_keys=False) + "\n",
                    encoding="utf-8")
    return path


def _values(metrics: pd.DataFrame) -> pd.DataFrame:
    from gaq.bench.reproduce import _SKIP, COST_METRICS

    df = results.newest(metrics, [*_KEYS, "metric"])
    df = df[~df["metric"].isin(_SKIP | COST_METRICS)]
    return df[[*_KEYS, "metric", "value"]]


def _units(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per cell: the counts behind counted metrics (n_images, n_reference)."""
    df = results.newest(metrics, [*_KEYS, "metric"])
    df = df[df["metric"].isin(set(COUNTS.values()))]
    return df.pivot_table(index=_KEYS, columns="metric", values="value", aggfunc="last")


def derive_tolerance(reference: pd.DataFrame, reruns: Mapping[str, pd.DataFrame],
                     margin: float = MARGIN, how: str = "",
                     conditions: Mapping[str, str] | None = None) -> Tolerance:
    """Each metric's tolerance from the changes between the reference's values and the
    same cells' values in each rerun (``reruns``: condition -> its metrics table).

    A continuous metric gets ``rel`` = margin x its largest relative change over values
    of normal size and ``abs`` = margin x its largest change of a value near 0 (below
    :data:`NEAR_ZERO` of the metric's median size), each at least :data:`MIN_REL`
    (relative to that median for ``abs``); a count gets margin x its largest change in
    images, rounded up. The observed changes are kept with it, per condition."""
    ref = _values(reference).rename(columns={"value": "reference"})
    units = _units(reference)
    changes = []
    for label, run in reruns.items():
        both = _values(run).merge(ref, on=[*_KEYS, "metric"], how="inner")
        both["condition"] = label
        changes.append(both)
    data = pd.concat(changes, ignore_index=True) if changes else ref.iloc[0:0]
    data = data.dropna(subset=["value", "reference"])
    data["change"] = (data["value"] - data["reference"]).abs()
    out: dict[str, dict] = {}
    for metric in sorted(set(ref["metric"])):
        part = data[data["metric"] == metric]
        per = {c: float(g["change"].max()) for c, g in part.groupby("condition")}
        entry: dict = {"compared": int(len(part)), "changed": int((part["change"] > 0).sum()),
                       "max_change": per}
        if metric in COUNTS:
            denom = units.get(COUNTS[metric]) if COUNTS[metric] in units else None
            n = (part.set_index(_KEYS).index.map(denom) if denom is not None
                 else pd.Series(math.nan, index=part.index))
            # float32 fractions of a count: rounded to whole images
            moved = (part["change"] * pd.Series(n, index=part.index)).round()
            entry["max_change"] = {c: int(moved[g.index].max())
                                   for c, g in part.groupby("condition")}
            worst = int(moved.max()) if len(moved) and not math.isnan(moved.max()) else 0
            entry.update({"images": int(math.ceil(margin * worst)), "observed_images": worst,
                          "unit": COUNTS[metric]})
        else:
            size = float(ref.loc[ref["metric"] == metric, "reference"].abs().median())
            size = size if size > 0 else 1.0
            normal = part[part["reference"].abs() >= NEAR_ZERO * size]
            small = part[part["reference"].abs() < NEAR_ZERO * size]
            rel = float((normal["change"] / normal["reference"].abs()).max()) if len(normal) \
                else 0.0
            small_abs = float(small["change"].max()) if len(small) else 0.0
            entry.update({"rel": max(MIN_REL, margin * rel),
                          "abs": max(MIN_REL * size, margin * small_abs),
                          "observed_rel": rel, "observed_abs": float(part["change"].max())
                          if len(part) else 0.0, "size": size})
        out[metric] = entry
    return Tolerance(out, margin, how, dict(conditions or {}),
                     datetime.now(timezone.utc).strftime("%Y-%m-%d"))


def tolerance_markdown(tolerance: Tolerance, benchmark: str) -> str:
    """The tolerance table: per metric the observed largest change per condition and the
    tolerance derived from it."""
    conds = sorted({c for e in tolerance.metrics.values() for c in e.get("max_change", {})})
    lines = [f"## {benchmark}: numerical tolerance of a rerun", "",
             f"Measured {tolerance.measured or '–'}: {tolerance.how}".rstrip() + "", "",
             "Largest change of each metric against the reference under each condition; the "
             f"tolerance is {tolerance.margin:g}× the largest, at least {MIN_REL:g} relative "
             "(counts: in whole images). A rerun's value passes when its change is within "
             "the larger of *abs* and *rel* × |reference|.", ""]
    for label, cmd in tolerance.conditions.items():
        lines.append(f"- `{label}`: `{cmd}`")
    lines += ["", "| metric | " + " | ".join(f"max Δ {c}" for c in conds)
              + " | tolerance rel | tolerance abs |",
              "|---|" + "---:|" * len(conds) + "---:|---:|"]
    for metric, e in tolerance.metrics.items():
        if not e.get("compared"):  # no rerun gave it: the least tolerance
            cells = ["not rerun"] * len(conds)
            tol = [f"{MIN_REL:g}", "–"]
        elif metric in COUNTS:
            cells = [f"{e['max_change'].get(c, 0)} images" for c in conds]
            tol = ["–", f"{e['images']} images"]
        else:
            cells = [f"{e['max_change'].get(c, math.nan):.3g}" for c in conds]
            tol = [f"{e['rel']:.3g}", f"{e['abs']:.3g}"]
        lines.append(f"| {metric} | " + " | ".join(cells) + " | " + " | ".join(tol) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Conclusions
# --------------------------------------------------------------------------------------

_CONCLUSION_COLS = ["kind", "model", "bits", "metric", "method", "versus", "estimate", "low",
                    "high", "resolved"]


def conclusions(folder: Path, anchor: str = "gaq", model_key: str | None = None
                ) -> pd.DataFrame:
    """Every comparison a benchmark folder's tables state: the paired per-image
    differences and the seed-paired set-metric differences against ``anchor`` (kind
    ``paired`` / ``seed-paired``, as in ``*_paired.md``), and the bold best row of each
    column of the main tables (kind ``best``, versus every other row). ``resolved``: the
    interval excludes 0 (for ``best``: the row is bold)."""
    from gaq.bench.paired import paired_comparisons, seed_paired_comparisons
    from gaq.bench.tables import build_tables

    folder = Path(folder)
    metrics = results.read(folder / "metrics.parquet")
    frames = []
    per_image = folder / "per_image.parquet"
    if per_image.exists() and not metrics.empty:
        rows = results.current(results.read(per_image), metrics)
        for metric in sorted(set(rows["metric"])) if len(rows) else []:
            frames.append(paired_comparisons(rows, metric, anchor).assign(kind="paired"))
    if not metrics.empty:
        frames.append(seed_paired_comparisons(metrics, anchor).assign(kind="seed-paired"))
        best = []
        for t in build_tables(folder.parent, folder.name, model_key):
            measured = sorted({r.method for r in t.rows if not r.reference
                               and not labels.is_fp(r.method)})
            for bits in t.groups:  # what each group measured, whatever it resolves
                best.append({"kind": "rows", "model": t.model, "bits": bits, "metric": "",
                             "method": "", "versus": ",".join(measured),
                             "estimate": math.nan, "low": math.nan, "high": math.nan,
                             "resolved": False})
            for i, (bits, metric) in t.best:
                direction = 1.0 if labels.better(metric) == "higher" else -1.0
                # the rows it beat: a run of fewer rows cannot confirm or deny it
                best.append({"kind": "best", "model": t.model, "bits": bits, "metric": metric,
                             "method": t.rows[i].method, "versus": ",".join(measured),
                             "estimate": direction, "low": math.nan, "high": math.nan,
                             "resolved": True})
        frames.append(pd.DataFrame(best, columns=_CONCLUSION_COLS))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=_CONCLUSION_COLS)
    return pd.concat(frames, ignore_index=True)[_CONCLUSION_COLS]


def _sign(x: float) -> int:
    return 0 if not x or math.isnan(x) else (1 if x > 0 else -1)


def check_conclusions(reference: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """The reference's comparisons against the run's: ``status`` is *preserved* (resolved
    in both, same direction), *lost* (no longer resolved), *reversed* (resolved the other
    way; also an unresolved one the run resolves against the reference's estimate),
    *unresolved* (in both, or newly resolved in the estimate's direction) or *not run*."""
    key = ["kind", "model", "bits", "metric", "method"]
    run_best = run[run["kind"] == "best"]
    rows = run[run["kind"] == "rows"]
    run_rows = {(m, b): set(v.split(",")) for m, b, v in
                rows[["model", "bits", "versus"]].itertuples(index=False)}
    other = run[run["kind"] != "best"]
    table = reference.merge(other.drop(columns=["versus"]), on=key, how="left",
                            suffixes=("", "_run"))
    status = []
    for r in table.itertuples(index=False):
        if r.kind == "rows":
            status.append("unresolved")  # bookkeeping for the best rows' check
            continue
        if r.kind == "best":
            rival = run_best[(run_best["model"] == r.model) & (run_best["bits"] == r.bits)
                             & (run_best["metric"] == r.metric)]
            if not run_rows.get((r.model, r.bits), set()) >= set(r.versus.split(",")):
                status.append("not run")
            elif r.method in set(rival["method"]):
                status.append("preserved")
            else:
                status.append("reversed" if len(rival) else "lost")
            continue
        if pd.isna(r.estimate_run):
            status.append("not run")
            continue
        run_resolved = bool(r.resolved_run)
        ref_dir, run_dir = _sign(r.estimate), _sign(r.estimate_run)
        if r.resolved:
            status.append("preserved" if run_resolved and run_dir == ref_dir
                          else "reversed" if run_resolved else "lost")
        else:
            status.append("reversed" if run_resolved and ref_dir and run_dir != ref_dir
                          else "unresolved")
    table["status"] = status
    return table


def describe(row) -> str:
    """One conclusion in words: 'digits W4A8 PSNR: TFMQ-DM − GAQ +0.085 [+0.041, +0.140]'."""
    name = f"{row.model} {row.bits} {labels.metric_label(row.metric)}"
    if row.kind == "best":
        return f"{name}: {labels.method_label(row.method)} best"
    k = 3

    def fmt(x: float) -> str:
        return f"{x:+.{k}f}".replace("-", "−")

    text = (f"{name}: {labels.method_label(row.method)} − {labels.method_label(row.versus)} "
            f"{fmt(row.estimate)} [{fmt(row.low)}, {fmt(row.high)}]")
    if hasattr(row, "estimate_run") and not pd.isna(row.estimate_run):
        text += (f" → {fmt(row.estimate_run)} [{fmt(row.low_run)}, {fmt(row.high_run)}]")
    return text


# --------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------

FIRST = 3  # offenders named in the verdict line


def verdict(values: pd.DataFrame, checks: pd.DataFrame | None) -> tuple[bool, str]:
    """``(reproduced, line)``: REPRODUCED when every judged value is identical or within
    its numerical tolerance and every conclusion is preserved (none reversed), else NOT
    REPRODUCED with the counts and the first offenders."""
    judged = values[values["verdict"].isin(("identical", "within tolerance", "differs"))]
    differs = judged[judged["verdict"] == "differs"]
    counts = judged["verdict"].value_counts()
    number_part = (f"{len(judged)} values: {counts.get('identical', 0)} identical, "
                   f"{counts.get('within tolerance', 0)} within numerical tolerance, "
                   f"{len(differs)} differ")
    checks = checks if checks is not None else pd.DataFrame(columns=["status"])
    held = checks[checks["resolved"].astype(bool)] if len(checks) else checks
    held = held[held["status"] != "not run"] if len(held) else held
    preserved = int((held["status"] == "preserved").sum()) if len(held) else 0
    flips = checks[checks["status"].isin(("lost", "reversed"))] if len(checks) else checks
    concl = f"conclusions preserved: {preserved} of {len(held)}"
    if judged.empty:
        return False, ("NOT REPRODUCED: no value of the reference was computed by this run "
                       f"({concl})")
    if differs.empty and flips.empty:
        return True, f"REPRODUCED: {number_part}; {concl}"
    first = []
    for r in differs.head(FIRST).itertuples(index=False):
        first.append(f"{r.model}/{r.method}/{r.bits}/seed {r.seed} {r.metric} "
                     f"{r.reference:.6g} → {r.run:.6g} (tolerance ±{r.tolerance:.2g})")
    for r in flips.head(FIRST).itertuples(index=False):
        first.append(f"{r.status}: {describe(r)}")
    parts = []
    if len(differs):
        parts.append(f"{len(differs)} of {len(judged)} values differ beyond numerical "
                     "tolerance")
    if len(flips):
        parts.append(f"{len(flips)} conclusion(s) flipped")
    return False, (f"NOT REPRODUCED: {', '.join(parts)}; {concl}; first: "
                   + "; ".join(first))


# --------------------------------------------------------------------------------------
# Measuring the tolerance
# --------------------------------------------------------------------------------------

#: What a user's machine varies, each against the reference's own setup (the benchmark
#: file's engine and threads, torch's default SIMD path): extra `gaq bench` flags and
#: environment. ``local`` runs at two threads so that, set against ``threads-2``, it
#: isolates the engine.
CONDITIONS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "threads-2": (("--threads", "2"), {}),
    "local": (("--engine", "local", "--threads", "2"), {}),
    "avx2": ((), {"ATEN_CPU_CAPABILITY": "avx2"}),
}


def condition_command(bench_file: str, label: str, out: Path) -> tuple[list[str], dict]:
    """The `gaq bench` command line and environment of one condition, writing into
    ``out/<label>`` from scratch: its own calibration cache (recorded under the
    condition, not reused from the reference's machine) and its own MLflow store (these
    runs measure arithmetic, they are not results to browse)."""
    flags, env = CONDITIONS[label]
    folder = Path(out) / label
    cmd = ["gaq", "bench", str(bench_file), "--results", str(folder), "--report-only", *flags]
    env = {**env, "GAQ_CACHE": str(folder / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{(folder / 'mlflow.db').resolve().as_posix()}"}
    return cmd, env


def machine() -> str:
    """CPU model, core count, torch version and default SIMD path, for the record."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, default SIMD "
            f"{torch.backends.cpu.get_cpu_capability()}")


def record(values: pd.DataFrame, checks: pd.DataFrame | None, ok: bool, line: str,
           wall_seconds: float | None, **setup) -> dict:
    """The verdict as data (``<benchmark>_reproduction.json`` beside the report): the
    line, the counts, the run's wall time, the machine and the date."""
    counts = values["verdict"].value_counts()
    held = checks[checks["resolved"].astype(bool) & (checks["status"] != "not run")] \
        if checks is not None and len(checks) else pd.DataFrame(columns=["status"])
    return {"reproduced": bool(ok), "verdict": line,
            "values": {k: int(counts.get(k, 0)) for k in
                       ("identical", "within tolerance", "differs", "new")},
            "cells": int(values.groupby(_KEYS).ngroups),
            "conclusions": {"preserved": int((held["status"] == "preserved").sum()),
                            "of": int(len(held))},
            "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": machine(), "setup": {k: v for k, v in setup.items()}}
