"""Reference against run: did this machine reproduce the committed results?

The committed ``results/<benchmark>/`` are the *reference*. A benchmark run writes into a
working store (``runs/`` by default) and ends by comparing every value it computed with
the reference value of the same cell (model, method, bit-width, seed) and metric:

- **identical**: equal to 1e-9 (relative), which is what the same code on the same kind
  of machine at the same thread count gives;
- **within noise**: the difference is below the metric's noise floor, twice the standard
  deviation of the FP row's value across seeds at the benchmark's image count (measured
  when the reference was written, :func:`noise_floor`); a difference that small cannot be
  told from sampling noise by this protocol, so it is not a failure to reproduce;
- **differs**: above the floor, or, for a metric without one, any difference beyond 1e-9.

Paired metrics (PSNR and ε-MSE against FP) are 0 for FP by construction, so their floor
is per cell: twice the standard error of the reference value over its sampling units,
the images for PSNR and the held-out trajectories for ε-MSE (:func:`paired_floor`, from
the reference's ``per_image`` and ``per_trajectory`` rows). A smaller difference is below
what that cell's sample resolves, which is what a float-level change on another CPU
leaves after calibration amplifies it. Paired summaries without per-unit values (the
slope ``k``, ``mse``) keep no floor.

Timing and memory are shown but not judged: they measure the machine, not the method.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from gaq.bench import results

__all__ = ["COST_METRICS", "compare", "noise_floor", "paired_floor", "report",
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
            floor: pd.DataFrame | None = None,
            paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per value this run computed: reference, run, difference, tolerance, verdict
    (``identical``, ``within noise``, ``differs``, ``new`` where the reference has no such
    cell, ``cost`` for timing and memory). ``floor``: per model and image metric, the FP
    row's SD across seeds; ``paired``: per cell and paired metric, the standard error of
    the reference value (:func:`paired_floor`)."""
    run = _latest(run[~run["metric"].isin(_SKIP)]).rename(columns={"value": "run"})
    ref = _latest(reference[~reference["metric"].isin(_SKIP)]).rename(
        columns={"value": "reference"})
    table = run.merge(ref, on=_KEYS, how="left")
    table["difference"] = table["run"] - table["reference"]
    tol = pd.Series(float("nan"), index=table.index)
    if floor is not None and len(floor):
        sd = floor.set_index(["model", "metric"])["sd"]
        keys = list(zip(table["model"], table["metric"], strict=True))
        tol = pd.Series([FLOOR_SDS * sd.get(k, float("nan")) for k in keys], index=table.index)
    if paired is not None and len(paired):
        se = paired.set_index(_KEYS)["se"]
        keys = list(zip(*(table[k] for k in _KEYS), strict=True))
        cell_tol = pd.Series([FLOOR_SDS * se.get(k, float("nan")) for k in keys],
                             index=table.index)
        tol = tol.where(tol.notna(), cell_tol)
    table["tolerance"] = tol
    exact = EXACT * table["reference"].abs().clip(lower=1.0)
    diff = table["difference"].abs()
    verdict = pd.Series("differs", index=table.index)
    verdict[diff <= tol] = "within noise"
    verdict[(diff <= exact) | (table["run"].isna() & table["reference"].isna())] = "identical"
    verdict[table["reference"].isna() & table["run"].notna()] = "new"
    verdict[table["metric"].isin(COST_METRICS)] = "cost"
    table["verdict"] = verdict
    return table


def summary(table: pd.DataFrame) -> str:
    """One line: how many judged values reproduced, and how."""
    judged = table[table["verdict"] != "cost"]
    counts = judged["verdict"].value_counts()
    parts = [f"{counts.get(v, 0)} {v}" for v in ("identical", "within noise", "differs", "new")
             if counts.get(v, 0)]
    cells = judged.groupby(["model", "method", "bits", "seed"]).ngroups
    worst = ""
    differing = judged[judged["verdict"] == "differs"]
    if len(differing):
        cells_differing = differing.groupby(["model", "method", "bits", "seed"]).ngroups
        worst = f"; {cells_differing} of {cells} cells have a value beyond its noise floor"
    return (f"reproduction against the reference: {len(judged)} values of {cells} cells: "
            f"{', '.join(parts) or 'nothing to compare'}{worst}")


def report(table: pd.DataFrame, benchmark: str, reference_dir: Path) -> str:
    """Markdown: the summary, how verdicts are reached, and the values that are not
    identical (all of them when nothing is)."""
    lines = [f"# {benchmark}: reproduction against the reference", "",
             summary(table) + ".", "",
             f"Reference: `{reference_dir}`. A value is *identical* to 1e-9 (relative); *within "
             f"noise* when the difference is below {FLOOR_SDS:g} standard deviations of the "
             "FP row's value across seeds at this image count (the noise floor, measured when "
             "the reference was written; a smaller difference cannot be resolved by this "
             "protocol); for a paired metric (PSNR, ε-MSE) the floor is per cell, "
             f"{FLOOR_SDS:g} standard errors of the reference value over its images or "
             "held-out trajectories; otherwise it *differs*. Paired summaries without "
             "per-unit values (the slope k, mse) have no floor. Timing and memory are not "
             "judged.", ""]
    shown = table[~table["verdict"].isin(("identical", "cost"))]
    if shown.empty:
        lines.append("Every judged value is identical to the reference.")
        return "\n".join(lines) + "\n"
    lines += ["| model | method | bits | seed | metric | reference | this run | difference "
              "| tolerance | verdict |", "|---|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in shown.itertuples(index=False):
        lines.append(f"| {r.model} | {r.method} | {r.bits} | {r.seed} | {r.metric} | "
                     f"{_num(r.reference)} | {_num(r.run)} | {_num(r.difference)} | "
                     f"{_num(r.tolerance)} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.4g}"


def noise_floor(runner, seeds: list[int]) -> pd.DataFrame:
    """Per model and image metric: the FP row's standard deviation across ``seeds`` (each
    a full sample of the benchmark's image count, scored as a cell is)."""
    from gaq.eval.metrics import image_metrics
    from gaq.eval.registry import metrics_of_kind
    from gaq.sampling import to_uint8

    wanted = metrics_of_kind(runner.bench.eval.metrics, "image")
    rows = []
    for model_id in runner.bench.models:
        ctx = runner.model(model_id)
        for seed in seeds:
            images, _ = runner._sample(ctx, ctx.pipe.denoiser, seed, None)
            values = image_metrics(to_uint8(images), ctx.reference(), ctx.space, wanted,
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
    """Make this run the reference: its Parquet tables, sample grids and noise floor replace
    the reference benchmark folder's (tables and plots are regenerated by the caller)."""
    reference_dir.mkdir(parents=True, exist_ok=True)
    for stale in reference_dir.glob("*.parquet"):  # the reference is this run, nothing older
        stale.unlink()
    written = []
    for path in sorted(run_dir.glob("*.parquet")):
        target = reference_dir / path.name
        shutil.copyfile(path, target)
        written.append(target)
    grids = run_dir / "grids"
    if grids.is_dir():
        shutil.rmtree(reference_dir / "grids", ignore_errors=True)
        shutil.copytree(grids, reference_dir / "grids")
    floor.to_parquet(reference_dir / FLOOR_FILE, index=False)
    written.append(reference_dir / FLOOR_FILE)
    return written


#: Per-unit rows of paired metrics: the file, its unit column, the metrics it holds.
PAIRED_UNITS = {"per_image.parquet": "image", "per_trajectory.parquet": "trajectory"}


def paired_floor(reference_dir: Path) -> pd.DataFrame:
    """Per cell (model, method, bits, seed) and paired metric of the reference: the number
    of sampling units ``n`` (images, held-out trajectories) and the standard error of their
    mean, ``se = sd / √n``."""
    metrics = reference_metrics(reference_dir)
    frames = []
    for name in PAIRED_UNITS:
        path = reference_dir / name
        if path.exists():
            frames.append(results.current(pd.read_parquet(path), metrics))
    cols = [*_KEYS, "n", "se"]
    if not frames:
        return pd.DataFrame(columns=cols)
    rows = pd.concat(frames, ignore_index=True)
    grouped = rows.groupby(_KEYS)["value"].agg(n="count", sd="std").reset_index()
    grouped["se"] = grouped["sd"] / grouped["n"].pow(0.5)
    return grouped[cols]


def read_floor(reference_dir: Path) -> pd.DataFrame | None:
    path = reference_dir / FLOOR_FILE
    return pd.read_parquet(path) if path.exists() else None


def reference_metrics(reference_dir: Path) -> pd.DataFrame:
    return results.read(reference_dir / "metrics.parquet")
