"""Figures for the paper, regenerated from Parquet (and the runner's sample grids) alone.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas instead of pyplot:
no global backend switch, no figure registry to leak memory in long runs, and safe in
headless jobs. Widths default to one paper column (3.3 in); each figure is written as PNG
and PDF.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import subprocess
import sys
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gaq.bench import labels, results
from gaq.bench.published import FP_BITS
from gaq.eval.curve_names import UNCORRECTED

__all__ = [
    "COLUMN_WIDTH",
    "calibration_cost",
    "default_workers",
    "figure_title",
    "method_color",
    "metric_vs_bits",
    "new_figure",
    "plot_style",
    "sample_grids",
    "save",
    "timestep_error",
    "write_plots",
]

COLUMN_WIDTH = 3.3  # inches: one column of a two-column paper
PAGE_WIDTH = 6.9

_RC = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6,
    "xtick.labelsize": 6, "ytick.labelsize": 6, "lines.linewidth": 1.0,
    "lines.markersize": 3.5, "axes.spines.top": False, "axes.spines.right": False,
    "savefig.dpi": 200, "pdf.fonttype": 42,  # TrueType in PDFs: editable, accepted by venues
}  # fmt: skip

# Fixed colours per known method, so a method looks the same in every figure.
_PALETTE = mpl.colormaps["tab10"].colors
_TAB20B = mpl.colormaps["tab20b"].colors
# tab20b's and tab20c's two darker tones of each hue: their two lighter ones are too pale
# for a 1-pt line or a small marker on white
_WIDE_PALETTE = tuple(c for i, c in enumerate(_TAB20B + mpl.colormaps["tab20c"].colors)
                      if i % 4 < 2)
_COLOR_SLOTS = ("fp", "rtn", "brecq", "ptq4dm", "qdiffusion", "ptqd", "tdq", "tfmq", "gaq",
                "gaq-uniform")
# Every other row's own colour is declared where the row is (``Method.color``, a variant's
# ``RowStyle.color``), so no two rows of a shipped benchmark file share one
# (tests/test_bench_results.py checks every file's rows).


def method_color(method: str) -> tuple[float, ...]:
    m = method.lower()
    if m in _COLOR_SLOTS:
        return _PALETTE[_COLOR_SLOTS.index(m) % len(_PALETTE)]
    declared = labels.declared_color(m)
    if declared is not None:
        return tuple(mpl.colors.to_rgb(declared))
    # other rows (new methods and variants): 20 colours, none of tab10 (a hash can still
    # collide with another unknown row; the legend tells them apart by marker order)
    return _WIDE_PALETTE[zlib.crc32(m.encode()) % len(_WIDE_PALETTE)]


def _legend_below(ax) -> None:
    """The legend under the axes, never over the data: the figure keeps its width (one
    paper column) and grows in height by the legend's rows."""
    handles, names = ax.get_legend_handles_labels()
    n = len(handles)
    # as many columns (at most 3) as the longest name lets fit the figure's width: wider
    # columns would push the legend past the figure's edges, where saving cuts it off
    size = mpl.rcParams["legend.fontsize"]
    size = size if isinstance(size, (int, float)) else 6.0
    entry_pt = (0.55 * size * max((len(t) for t in names), default=1)  # ~ a character's width
                + (1.5 + 0.8 + 1.0) * size)  # handle, its gap, the column spacing (ems)
    fits = int(ax.figure.get_figwidth() * 72 // entry_pt)
    ncol = max(1, min(3 if n > 4 else n, fits))
    fig = ax.figure
    fig.set_figheight(fig.get_figheight() + 0.13 * -(-n // ncol) + 0.05)
    fig.legend(handles, names, loc="outside lower center", frameon=False, ncol=ncol,
               handlelength=1.5, columnspacing=1.0)


def figure_title(benchmark: str, model: str | None = None, metric: str | None = None,
                 feature_space: str = "auto") -> str:
    """What a figure shows, in its title: the benchmark and model (figures are per
    benchmark and model, and look alike across them) and, for a metric computed in a
    feature space (FID, KID...), that space: the bundled models are scored in a digit
    classifier's features, not Inception's, and the numbers compare only within one."""
    text = f"{benchmark}: {model}" if model else benchmark
    if model and metric is not None and labels.in_feature_space(metric):
        text += f" ({labels.feature_space_label(model, feature_space)})"
    return text


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    with mpl.rc_context(_RC):
        yield


def new_figure(width: float = COLUMN_WIDTH, height: float = 2.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# Set inside ``write_plots(..., workers > 1)``: ``save`` then queues pickled figures here
# instead of rendering them. Rendering (layout, rasterising, PDF font subsetting) is ~90 % of
# the time of writing a benchmark's figures, and it parallelises across processes.
_QUEUE: contextvars.ContextVar[list[tuple[bytes, Path]] | None] = contextvars.ContextVar(
    "gaq_plot_queue", default=None)


def _render(fig: Figure, stem: Path) -> None:
    FigureCanvasAgg(fig)  # an unpickled figure has no canvas
    with plot_style():
        fig.savefig(f"{stem}.png")
        fig.savefig(f"{stem}.pdf", metadata={"CreationDate": None, "ModDate": None})


def _render_pickled(path: Path) -> None:
    with open(path, "rb") as f:
        items: list[tuple[bytes, Path]] = pickle.load(f)  # written by this module's caller
    for blob, stem in items:
        _render(pickle.loads(blob), stem)


def save(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf``; the PDF carries no creation date, so
    regenerating unchanged results gives unchanged files."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    queue = _QUEUE.get()
    if queue is None:
        _render(fig, stem)
    else:
        queue.append((pickle.dumps(fig), stem))
    return [Path(f"{stem}.png"), Path(f"{stem}.pdf")]


@contextlib.contextmanager
def _parallel_saves(workers: int) -> Iterator[None]:
    """Within the block ``save`` only queues figures; on leaving it they are rendered by
    ``workers`` processes, each taking every ``workers``-th figure (figures are queued in
    a fixed order, so the split and the files are the same on every run). The files are
    byte-identical to a serial ``save``."""
    queue: list[tuple[bytes, Path]] = []
    token = _QUEUE.set(queue)
    try:
        yield
    finally:
        _QUEUE.reset(token)
    shares = [queue[i::workers] for i in range(workers) if queue[i::workers]]
    if len(shares) <= 1:
        for blob, stem in queue:
            _render(pickle.loads(blob), stem)
        return
    # Plain child processes rather than multiprocessing: spawn would re-import the caller's
    # main script (breaking scripts without a __main__ guard), fork would copy torch's and
    # Ray's threads.
    from gaq.tempdirs import temp_dir

    with temp_dir("plots") as tmp:
        procs = []
        for i, share in enumerate(shares):
            path = tmp / f"share{i}.pickle"
            path.write_bytes(pickle.dumps(share))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gaq.bench.plots", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = []
        for proc in procs:
            err = proc.communicate()[1] or ""
            if proc.returncode:
                errors.append((err.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
    if errors:
        raise RuntimeError(f"rendering figures failed: {errors[0]}")


def default_workers() -> int:
    """Processes for rendering figures: the cores this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _ylabel(metric: str) -> str:
    unit = labels.metric_unit(metric)
    name = labels.metric_label(metric) + (f" ({unit})" if unit else "")
    return f"{name} {labels.arrow(metric)}".strip()


def metric_vs_bits(df: pd.DataFrame, metric: str, title: str = "") -> Figure:
    """``metric`` (mean ± 95 % CI over seeds) per bit setting, one marker per method and
    setting, methods side by side within a setting; FP is a dashed horizontal line with
    its CI as a band, each with a legend entry.

    Settings are categories, never joined by a line: W4A6 and W3A8 trade weight bits for
    activation bits, so neither lies "between" the other and a slope would be read as a
    trend along an axis that does not exist."""
    summary = results.summarize(df[df["metric"] == metric])
    with plot_style():
        fig = new_figure()
        ax = fig.add_subplot()
        if title:
            fig.suptitle(title)
        quant = summary[~summary["method"].map(labels.is_fp)]
        order = labels.bits_order(quant["bits"])
        x = {b: i for i, b in enumerate(order)}
        methods = [m for m in labels.method_order(summary["method"]) if not labels.is_fp(m)]
        # dodge: methods side by side around each bit-width, so equal values stay visible
        step = min(0.5 / max(len(methods), 1), 0.08)
        offset = {m: (k - (len(methods) - 1) / 2) * step for k, m in enumerate(methods)}
        for method in labels.method_order(summary["method"]):
            part = summary[summary["method"] == method]
            if labels.is_fp(method):
                mean, ci = part["mean"].iloc[0], np.nan_to_num(part["ci95"].iloc[0])
                name = labels.method_label(method)
                ax.axhline(mean, color=method_color(method), ls="--", label=name)
                if ci > 0:  # a shaded area no legend explains reads as anything
                    ax.axhspan(mean - ci, mean + ci, color=method_color(method), alpha=0.15, lw=0,
                               label=f"{name} 95 % CI")
                continue
            part = part.assign(x=part["bits"].map(x) + offset[method]).sort_values("x")
            ax.errorbar(part["x"], part["mean"], yerr=np.nan_to_num(part["ci95"]),
                        color=method_color(method), marker="o", ms=3, capsize=2, ls="none",
                        label=labels.method_label(method))
        # thin rules between settings: each is a group of its own
        for i in range(len(order) - 1):
            ax.axvline(i + 0.5, color="0.85", lw=0.6, zorder=0)
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.5, max(len(order), 1) - 0.5)
        n_max = int(summary["n"].max()) if len(summary) else 0
        ax.set_xlabel("bit setting" + (f"  (bars: 95 % CI over {n_max} seeds)" if n_max > 1
                                       else "  (one seed: no interval)"))
        ax.set_ylabel(_ylabel(metric))
        if len(summary):
            _legend_below(ax)
    return fig


# curves that are not registered metrics (PTQD's fitted slopes)
_CURVE_LABELS = {"noise_k": "correlated noise k_t (0 = none)"}


def _curve_label(curve: str) -> str:
    from gaq.eval.registry import find_metric

    m = find_metric(curve)
    if m is not None and m.curve_label:
        return m.curve_label
    return _CURVE_LABELS.get(curve, _ylabel(curve))


def _curve_metrics() -> list[str]:
    from gaq.eval.registry import known_metrics

    return [m.name for m in known_metrics() if m.kind == "curve"]


def timestep_error(curves_df: pd.DataFrame, curve: str = "eps_mse", title: str = "") -> Figure:
    """A per-timestep curve against FP (``eps_mse``, ``noise_k``), averaged over seeds; one
    line per method (and bit-width, when several are present). FP is left out: its error
    is 0. A method measured before its sampler correction too (PTQD) gets that curve as a
    dashed line of its colour."""
    quant = curves_df[~curves_df["method"].map(labels.is_fp)]
    data = quant[quant["curve"] == curve]
    raw = quant[quant["curve"] == curve + UNCORRECTED]
    several_bits = data["bits"].nunique() > 1
    with plot_style():
        fig = new_figure()
        ax = fig.add_subplot()
        if title:
            fig.suptitle(title)
        for method in labels.method_order(data["method"]):
            for bits in labels.bits_order(data.loc[data["method"] == method, "bits"]):
                label = labels.method_label(method) + (f" {bits}" if several_bits else "")
                drawn = None
                for part, ls, suffix in ((data, "-", ""), (raw, "--", " (uncorrected)")):
                    part = part[(part["method"] == method) & (part["bits"] == bits)]
                    mean = part.groupby("timestep")["value"].mean().sort_index()
                    if len(mean) and not mean.equals(drawn):  # skip a correction that was off
                        ax.plot(mean.index, mean.values, color=method_color(method), ls=ls,
                                label=label + suffix)
                    drawn = mean
        # Errors span decades between early and late steps: log scale when it is defined.
        if len(data) and (pd.concat([data, raw])["value"] > 0).all():
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="0.5", lw=0.6)
        ax.set_xlabel("timestep t")
        ax.set_ylabel(_curve_label(curve))
        if len(data):
            _legend_below(ax)
    return fig


def _shade(i: int, n: int) -> tuple[float, ...]:
    # Bit-widths as shades of one hue: method colours stay reserved for methods.
    return mpl.colormaps["Greys"](0.8 - 0.5 * i / max(1, n - 1))


def calibration_cost(df: pd.DataFrame, title: str = "") -> Figure:
    """Calibration time per method (horizontal bars, so every method's name stays readable;
    95 % CI whiskers where there are several seeds), grouped by bit-width."""
    metric = "calibration_seconds"
    summary = results.summarize(df[df["metric"] == metric])
    summary = summary[~summary["method"].map(labels.is_fp)]
    methods = labels.method_order(summary["method"])
    order = labels.bits_order(summary["bits"])
    scale, unit = (60.0, "min") if len(summary) and summary["mean"].max() > 600 else (1.0, "s")
    with plot_style():
        fig = new_figure(height=0.9 + 0.22 * max(1, len(methods)) * max(1, len(order)) ** 0.5)
        ax = fig.add_subplot()
        if title:
            fig.suptitle(title)
        height = 0.8 / max(1, len(order))
        for j, bits in enumerate(order):
            part = summary[summary["bits"] == bits].set_index("method")
            ys = [i + (j - (len(order) - 1) / 2) * height for i, m in enumerate(methods)
                  if m in part.index]
            rows = part.loc[[m for m in methods if m in part.index]]
            ci = rows["ci95"].to_numpy(dtype=float) / scale
            ax.barh(ys, rows["mean"] / scale, height, label=bits, color=_shade(j, len(order)),
                    xerr=None if np.isnan(ci).all() else np.nan_to_num(ci), capsize=2)
        ax.set_yticks(range(len(methods)), [labels.method_label(m) for m in methods])
        ax.invert_yaxis()  # the first method on top, as in the tables
        ax.set_xlabel(f"calibration time ({unit}) ↓")
        if len(order) > 1:
            ax.legend(frameon=False, loc="lower right")
    return fig


def sample_grids(paths: Mapping[str, Path], out: str | Path, title: str = "") -> list[Path]:
    """Sample grids side by side, titled by method under the figure's ``title``; writes
    ``<out>.png`` and ``<out>.pdf``."""
    import matplotlib.image as mpimg

    items = [(m, Path(p)) for m, p in paths.items()]
    if not items:
        raise ValueError("sample_grids needs at least one image")
    images = [mpimg.imread(p) for _, p in items]
    n = len(images)
    # at most four grids a row, so each stays large enough to read a digit and each title
    # has a quarter of the page; more methods wrap onto further rows
    cols = min(n, 4)
    rows = -(-n // cols)
    width = COLUMN_WIDTH if n <= 2 else PAGE_WIDTH
    aspect = max(img.shape[0] / img.shape[1] for img in images)
    with plot_style():
        fig = new_figure(width, rows * (width / cols * aspect + 0.3) + (0.2 if title else 0.0))
        if title:
            fig.suptitle(title)
        for i, ((method, _), img) in enumerate(zip(items, images, strict=True)):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(labels.method_label(method))
            ax.set_axis_off()
    out = Path(out)
    return save(fig, out.with_suffix("") if out.suffix in (".png", ".pdf") else out)


def _grid_path(grids: Path, model: str, method: str, bits: str, seed: int) -> Path | None:
    # The runner names grids "<model>_<method>_<bits>_seed<k>.png"; the bare form is accepted
    # too, so hand-made or older result folders still plot.
    for name in (f"{model}_{method}_{bits}_seed{seed}.png", f"{method}_{bits}_seed{seed}.png"):
        if (grids / name).is_file():
            return grids / name
    return None


def _grid_figures(metrics: pd.DataFrame, grids: Path, model: str, stem: str,
                  title: str) -> list[Path]:
    cells = metrics[["method", "bits", "seed"]].drop_duplicates()
    fp = cells[cells["method"].map(labels.is_fp)]
    quant = cells[~cells["method"].map(labels.is_fp)]
    written = []
    for bits in labels.bits_order(quant["bits"]):
        at = quant[quant["bits"] == bits]
        for seed in sorted(at["seed"].unique()):
            chosen: dict[str, Path] = {}
            for method in labels.method_order(pd.concat([fp["method"], at["method"]])):
                rows = (fp if labels.is_fp(method) else at)
                for b in rows.loc[(rows["method"] == method) & (rows["seed"] == seed), "bits"]:
                    path = _grid_path(grids, model, method, b, int(seed))
                    if path is not None:
                        chosen[method] = path
                        break
            if any(not labels.is_fp(m) for m in chosen):  # the first seed that has grids
                written += sample_grids(chosen, f"{stem}_samples_{bits}_seed{int(seed)}",
                                        f"{title}, {bits}, seed {int(seed)}")
                break
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text)


def write_plots(results_dir: Path, benchmark: str, out_dir: Path,
                workers: int = 1, feature_space: str = "auto") -> list[Path]:
    """All figures of a benchmark into ``out_dir``; returns the files written.

    Reads ``metrics.parquet``, ``curves.parquet`` and the sample grids the runner saved under
    ``results_dir/<benchmark>/grids/``; nothing else. ``workers`` > 1 renders the figures in
    that many processes (same files, about ``workers`` times faster). ``feature_space`` is
    the benchmark file's ``eval.feature_space``, which the titles name (the results do not
    record it).
    """
    if workers > 1:
        with _parallel_saves(workers):
            return write_plots(results_dir, benchmark, out_dir, feature_space=feature_space)
    folder = Path(results_dir) / benchmark
    out_dir = Path(out_dir)
    metrics = results.read(folder / "metrics.parquet")
    curves = results.current(results.read(folder / "curves.parquet"), metrics)
    models = sorted(set(metrics["model"].dropna()) | set(curves["model"].dropna()))
    written: list[Path] = []
    for model in models:
        stem = str(out_dir / benchmark) + (f"_{_slug(model)}" if len(models) > 1 else "")
        m = metrics[metrics["model"] == model]
        quantized = m[~m["method"].map(labels.is_fp) & (m["bits"] != FP_BITS)]
        title = figure_title(benchmark, model)
        for metric in (*labels.table_metrics(), *_curve_metrics()):
            if (quantized["metric"] == metric).any():
                written += save(metric_vs_bits(m, metric, figure_title(
                    benchmark, model, metric, feature_space)), f"{stem}_{metric}_vs_bits")
        if (quantized["metric"] == "calibration_seconds").any():
            written += save(calibration_cost(m, title), f"{stem}_calibration_cost")
        # astype(bool): mapping an empty string column (no held-out trajectories) keeps
        # its string dtype, which ~ and & refuse
        c = curves[(curves["model"] == model) & ~curves["method"].map(labels.is_fp).astype(bool)]
        for curve in sorted(n for n in c["curve"].unique() if not n.endswith(UNCORRECTED)):
            for bits in labels.bits_order(c.loc[c["curve"] == curve, "bits"]):
                part = c[c["curve"].isin([curve, curve + UNCORRECTED]) & (c["bits"] == bits)]
                written += save(timestep_error(part, curve, f"{title}, {bits}"),
                                f"{stem}_{curve}_{bits}_by_timestep")
        grids = folder / "grids"
        if grids.is_dir():
            written += _grid_figures(m, grids, model, stem, title)
    from gaq.bench.reports import method_reports

    for report, frames in method_reports(folder):
        for suffix, fig in report.figures(frames, benchmark):
            written += save(fig, f"{out_dir / benchmark}_{suffix}")
    return written


if __name__ == "__main__":  # a figure-rendering child of _parallel_saves
    _render_pickled(Path(sys.argv[1]))
