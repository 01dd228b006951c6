"""How far FID moves between equally good samples: the spread the evaluation protocol
has to beat before a difference between two rows means anything.

FP images are sampled once and cut into disjoint sets of each size; every set is scored
against the same reference exactly as a benchmark cell is. Image ``i`` of run ``seed`` is
drawn from its own noise stream (:mod:`gaq.sampling`), so disjoint index ranges are
independent samples, as different seeds are: the spread across sets is the spread across
seeds of a benchmark at that image count. FID is biased upward at small sizes, so the
table gives the mean next to the standard deviation, and the difference between two rows
that one seed resolves (2·√2·SD: two independent rows, each with that SD).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

__all__ = ["measure_fid_spread", "spread_table", "write_fid_spread"]


def measure_fid_spread(runner, model_id: str, sizes: list[int], total: int,
                       seed: int = 0, log=print) -> pd.DataFrame:
    """FID of every disjoint set of each size among ``total`` FP images of ``model_id``,
    sampled with the benchmark's sampler (one row per size and set)."""
    from gaq.eval.metrics import image_metrics
    from gaq.sampling import sample, to_uint8

    if any(n > total for n in sizes):
        raise ValueError(f"every size must fit in {total} images, got sizes {sizes}")
    ctx = runner.model(model_id)
    start = time.perf_counter()
    images = to_uint8(sample(ctx.pipe, total, seed=seed, sampler=ctx.sampler,
                             batch_size=runner.bench.eval.batch_size, progress=True))
    log(f"sampled {total} FP images of {model_id} in {time.perf_counter() - start:.0f} s")
    reference = ctx.reference()
    rows = []
    for n in sizes:
        for k in range(total // n):
            part = images[k * n:(k + 1) * n]
            fid = image_metrics(part, reference, ctx.space, ["fid"], seed=seed,
                                cleanfid_check=False)["fid"]
            rows.append({"model": model_id, "images": n, "set": k, "fid": float(fid)})
    return pd.DataFrame(rows)


def spread_table(df: pd.DataFrame) -> str:
    """Markdown: per size, how many sets, FID's mean, SD and range, and the smallest
    difference between two single-seed rows that lies outside two SDs of their
    difference (2·√2·SD)."""
    lines = ["| model | images | sets | FID mean | SD | min | max "
             "| resolvable difference, 1 seed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, n), part in df.groupby(["model", "images"]):
        sd = part["fid"].std()
        lines.append(f"| {model} | {n:,} | {len(part)} | {part['fid'].mean():.2f} | {sd:.2f} "
                     f"| {part['fid'].min():.2f} | {part['fid'].max():.2f} "
                     f"| {2 * 2 ** 0.5 * sd:.2f} |")
    return "\n".join(lines)


def write_fid_spread(df: pd.DataFrame, out: Path, benchmark: str, seconds: float) -> Path:
    """``fid_spread.parquet`` and ``fid_spread.md`` under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "fid_spread.parquet", index=False)
    largest = int(df["images"].max()) if len(df) else 0
    md = out / "fid_spread.md"
    md.write_text(
        f"# FID spread of FP samples ({benchmark})\n\n"
        "Disjoint sets of FP samples, each scored against the same reference as a benchmark "
        "cell (the bundled classifier's features, all 1,797 digits). The sets are "
        "independent noise draws, so their spread is the seed-to-seed spread of a "
        "benchmark row at that image count. Last column: the smallest difference between "
        "two rows of one seed each that lies outside two standard deviations of their "
        "difference. Measured in "
        f"{seconds / 60:.1f} min (largest set: {largest:,} images).\n\n"
        + spread_table(df) + "\n", encoding="utf-8")
    return md
