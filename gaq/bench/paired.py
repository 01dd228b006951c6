"""Paired differences with confidence intervals: which method differences a benchmark
resolves.

Every quantized row of a cell samples from the same initial noise as FP, so the per-image
PSNR against FP pairs image ``i`` of one method with image ``i`` of another. The
difference of two methods is computed image by image, which cancels the image-to-image
spread that makes FID unable to rank methods at small image counts.

The interval of a mean (a method's PSNR, or a difference of two methods):

- with several seeds: Student t over the per-seed means. Each seed re-records the
  calibration set and re-calibrates, so the interval includes calibration variance;
- with one seed: a percentile bootstrap over images (2,000 resamples, fixed RNG seed).
  It covers image sampling only, not calibration variance, and the table says so.

A difference is *resolved* when its 95 % interval excludes zero.

Set metrics (FID, KID, precision, recall) have no per-image value, but with several seeds
they pair by seed: both rows of a seed start from the same noise, so their per-seed
difference cancels the part of FID's spread that the noise draws share
(:func:`seed_paired_table`, t over the per-seed differences).
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd

from gaq.bench import labels
from gaq.bench.results import ci_half_width, newest

__all__ = ["BOOTSTRAP", "interval", "paired_comparisons", "paired_table",
           "seed_paired_comparisons", "seed_paired_table"]

BOOTSTRAP = 2000
_RNG_SEED = 0


def interval(per_seed: dict[int, np.ndarray]) -> tuple[float, float, float, str]:
    """``(mean, low, high, how)`` of the mean of per-image values grouped by seed."""
    means = [float(v.mean()) for v in per_seed.values()]
    if len(means) >= 2:
        half = ci_half_width(means)
        mean = statistics.fmean(means)
        return mean, mean - half, mean + half, f"t over {len(means)} seeds"
    (values,) = per_seed.values()
    rng = np.random.default_rng(_RNG_SEED)
    idx = rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))
    boot = values[idx].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(values.mean()), float(low), float(high), f"bootstrap over {len(values)} images"


def _by_seed(rows: pd.DataFrame) -> dict[int, pd.Series]:
    return {int(s): g.set_index("image")["value"].sort_index()
            for s, g in rows.groupby("seed", sort=True)}


def _fmt(x: float, decimals: int = 3) -> str:
    return f"{x:+.{decimals}f}".replace("-", "−")


def _difference(method: dict[int, pd.Series], anchor: dict[int, pd.Series]
                ) -> tuple[float, float, float] | None:
    """``(mean, low, high)`` of ``method - anchor`` taken image by image over the seeds
    both have; None when they share no image."""
    common = sorted(set(method) & set(anchor))
    diffs = {s: (method[s] - anchor[s]).dropna().to_numpy() for s in common}
    diffs = {s: d for s, d in diffs.items() if len(d)}
    if not diffs:
        return None
    d, dl, dh, _ = interval(diffs)
    return d, dl, dh


def paired_comparisons(per_image: pd.DataFrame, metric: str = "psnr",
                       anchor: str = "gaq") -> pd.DataFrame:
    """The differences :func:`paired_table` shows, one row each: model, bits, metric,
    method, versus (the anchor), estimate, low, high (its 95 % interval) and resolved."""
    cols = ["model", "bits", "metric", "method", "versus", "estimate", "low", "high",
            "resolved"]
    rows = per_image[per_image["metric"] == metric] if len(per_image) else per_image
    out = []
    if rows is not None and not rows.empty:
        for (model, bits), part in rows.groupby(["model", "bits"], sort=True):
            methods = labels.method_order(part["method"].unique())
            if anchor not in methods:
                continue
            series = {m: _by_seed(part[part["method"] == m]) for m in methods}
            for m in methods:
                diff = None if m == anchor else _difference(series[m], series[anchor])
                if diff is not None:
                    d, dl, dh = diff
                    out.append({"model": model, "bits": bits, "metric": metric, "method": m,
                                "versus": anchor, "estimate": d, "low": dl, "high": dh,
                                "resolved": bool(dl > 0 or dh < 0)})
    return pd.DataFrame(out, columns=cols)


def paired_table(per_image: pd.DataFrame, benchmark: str, metric: str = "psnr",
                 anchor: str = "gaq") -> str | None:
    """Markdown: per model and bit-width, each method's mean per-image ``metric`` with its
    interval, and its paired difference from ``anchor`` (the method under study) with
    the interval and whether it is resolved. None without per-image rows."""
    rows = per_image[per_image["metric"] == metric] if len(per_image) else per_image
    if rows is None or rows.empty:
        return None
    unit = " (dB)" if metric == "psnr" else ""
    out = [f"## {benchmark}: paired {labels.metric_label(metric)} differences", "",
           f"Per-image {labels.metric_label(metric)}{unit} against FP images from the same "
           "initial noise; differences are taken image by image. 95 % intervals: Student t "
           "over seeds where there are several (calibration re-run per seed, so its variance "
           "is included), else a bootstrap over images (image sampling only). **resolved**: "
           "the interval excludes 0.", ""]
    for (model, bits), part in rows.groupby(["model", "bits"], sort=True):
        methods = labels.method_order(part["method"].unique())
        ref = anchor if anchor in methods else None
        head = f"| method | {labels.metric_label(metric)}{unit} | 95 % CI |"
        sep = "|---|---:|---|"
        if ref:
            head += f" Δ vs {labels.method_label(ref)} | 95 % CI | |"
            sep += "---:|---|---|"
        out += [f"### {model}, {bits}", "", head, sep]
        series = {m: _by_seed(part[part["method"] == m]) for m in methods}
        how = ""
        for m in methods:
            mean, low, high, how = interval({s: v.to_numpy() for s, v in series[m].items()})
            line = f"| {labels.method_label(m)} | {mean:.3f} | [{low:.3f}, {high:.3f}] |"
            if ref and m != ref:
                diff = _difference(series[m], series[ref])
                if diff is not None:
                    d, dl, dh = diff
                    resolved = dl > 0 or dh < 0
                    line += (f" {_fmt(d)} | [{_fmt(dl)}, {_fmt(dh)}] | "
                             f"{'**resolved**' if resolved else 'not resolved'} |")
                else:
                    line += " – | – | |"
            elif ref:
                line += " – | – | |"
            out.append(line)
        out += ["", f"Intervals: {how}.", ""]
    return "\n".join(out)


def _set_metrics() -> list[str]:
    from gaq.eval.registry import find_metric

    return [m for m in labels.table_metrics()
            if (spec := find_metric(m)) is not None and spec.kind == "image"]


def _seed_difference(table: pd.DataFrame, method: str, anchor: str, min_seeds: int
                     ) -> tuple[float, float, float] | None:
    """``(mean, half, independent half)`` of ``method - anchor`` over the seeds (rows of
    ``table``, a seed x method pivot) both have; None with fewer than ``min_seeds``."""
    both = table[[method, anchor]].dropna() if method in table else table.iloc[0:0]
    if len(both) < min_seeds:
        return None
    d = (both[method] - both[anchor]).tolist()
    indep = (ci_half_width(both[method].tolist()) ** 2
             + ci_half_width(both[anchor].tolist()) ** 2) ** 0.5
    return statistics.fmean(d), ci_half_width(d), indep


def seed_paired_comparisons(metrics: pd.DataFrame, anchor: str = "gaq",
                            min_seeds: int = 2) -> pd.DataFrame:
    """The differences :func:`seed_paired_table` shows, one row each (columns as
    :func:`paired_comparisons`); resolved where the t interval over seeds excludes 0."""
    cols = ["model", "bits", "metric", "method", "versus", "estimate", "low", "high",
            "resolved"]
    names = _set_metrics()
    df = metrics[metrics["metric"].isin(names)]
    out = []
    if not df.empty and anchor in set(df["method"]):
        data = newest(df.dropna(subset=["value"]),
                      ["model", "method", "bits", "metric", "seed"])
        for (model, bits), part in data.groupby(["model", "bits"], sort=True):
            if labels.is_fp(bits) or anchor not in set(part["method"]):
                continue
            for metric in [m for m in names if m in set(part["metric"])]:
                t = part[part["metric"] == metric].pivot(index="seed", columns="method",
                                                         values="value")
                for method in labels.method_order(part["method"].unique()):
                    if method == anchor or labels.is_fp(method):
                        continue
                    diff = _seed_difference(t, method, anchor, min_seeds)
                    if diff is None:
                        continue
                    mean, half, _ = diff
                    out.append({"model": model, "bits": bits, "metric": metric,
                                "method": method, "versus": anchor, "estimate": mean,
                                "low": mean - half, "high": mean + half,
                                "resolved": bool(mean - half > 0 or mean + half < 0)})
    return pd.DataFrame(out, columns=cols)


def seed_paired_table(metrics: pd.DataFrame, benchmark: str, anchor: str = "gaq",
                      min_seeds: int = 2) -> str | None:
    """Markdown: per model and bit-width, each method's per-seed difference from ``anchor``
    in every set metric of the tables (registry kind ``image``: FID, KID, precision,
    recall), with its 95 % t interval over the seeds both rows have; and, for comparison,
    the half-width the same difference would get if the rows were independent (the two
    rows' own t intervals added in quadrature), which shows what the pairing buys.
    None without ``min_seeds`` common seeds anywhere, or without ``anchor``."""
    names = _set_metrics()
    df = metrics[metrics["metric"].isin(names)]
    if df.empty or anchor not in set(df["method"]):
        return None
    data = newest(df.dropna(subset=["value"]), ["model", "method", "bits", "metric", "seed"])
    out: list[str] = []
    for (model, bits), part in data.groupby(["model", "bits"], sort=True):
        if labels.is_fp(bits) or anchor not in set(part["method"]):
            continue
        present = [m for m in names if m in set(part["metric"])]
        table = {m: part[part["metric"] == m].pivot(index="seed", columns="method",
                                                    values="value") for m in present}
        methods = [m for m in labels.method_order(part["method"].unique())
                   if m != anchor and not labels.is_fp(m)]
        lines = []
        for method in methods:
            cells = []
            for metric in present:
                diff = _seed_difference(table[metric], method, anchor, min_seeds)
                if diff is None:
                    cells.append("–")
                    continue
                mean, half, indep = diff
                k = labels.decimals(metric)
                text = f"{_fmt(mean, k)} [{_fmt(mean - half, k)}, {_fmt(mean + half, k)}]"
                if mean - half > 0 or mean + half < 0:
                    text = f"**{text}**"
                cells.append(f"{text} (±{indep:.{k}f})")
            if any(c != "–" for c in cells):
                lines.append(f"| {labels.method_label(method)} | " + " | ".join(cells) + " |")
        if not lines:
            continue
        n = int(part["seed"].nunique())
        out += [f"### {model}, {bits}", "",
                "| method | " + " | ".join(f"Δ {labels.metric_label(m)}" for m in present)
                + " |", "|---|" + "---:|" * len(present), *lines, "",
                f"Seeds: up to {n}.", ""]
    if not out:
        return None
    head = [f"## {benchmark}: paired set-metric differences over seeds", "",
            f"Each cell: the mean over seeds of (method − {labels.method_label(anchor)}), each "
            "seed's two rows sampled from the same noise and each calibrated on that seed's "
            "own set; in brackets the 95 % t interval over those per-seed differences, **bold** "
            "where it excludes 0; in parentheses the half-width the same difference would "
            "have if the rows were independent (their own intervals in quadrature), which is "
            "what the main table's ± allows one to read. KID as in the main table (raw "
            "unbiased MMD²).", ""]
    return "\n".join(head + out)
