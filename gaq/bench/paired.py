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
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd

from gaq.bench import labels
from gaq.bench.results import ci_half_width

__all__ = ["BOOTSTRAP", "interval", "paired_table"]

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


def _fmt(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


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
                common = sorted(set(series[m]) & set(series[ref]))
                diffs = {s: (series[m][s] - series[ref][s]).dropna().to_numpy() for s in common}
                diffs = {s: d for s, d in diffs.items() if len(d)}
                if diffs:
                    d, dl, dh, _ = interval(diffs)
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

