"""Result tables shaped like the GAQ paper's, regenerated from Parquet alone.

Rows are methods (FP, RTN, baselines, GAQ), column groups are bit-widths and columns the
image metrics, each "mean ± 95 % CI" over seeds. Published numbers for the same setting
appear as italic reference rows under the method they belong to, so a reader sees the
measured and the claimed number side by side and never confuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gaq.bench import labels, results
from gaq.bench.published import FP_BITS, model_keys, published_rows, short_source

__all__ = ["HEADLINE_METRICS", "Row", "TableData", "build_tables", "to_latex", "to_latex_onecol",
           "to_markdown", "write_tables"]

Cell = tuple[str, str]  # (bits group, metric)


@dataclass
class Row:
    method: str
    label: str
    values: dict[Cell, tuple[float, float]] = field(default_factory=dict)  # (mean, ci95)
    reference: bool = False  # a published number, not measured here
    sources: list[str] = field(default_factory=list)
    diverged: dict[str, int] = field(default_factory=dict)  # bits group -> failed seeds


@dataclass
class TableData:
    benchmark: str
    model: str
    groups: list[str]
    metrics: list[str]
    rows: list[Row]
    seeds: tuple[int, int]  # fewest and most seeds behind a measured cell
    model_key: str | None
    best: set[tuple[int, Cell]] = field(default_factory=set)  # (row index, cell) in bold


def _metric_frame(results_dir: Path, benchmark: str) -> pd.DataFrame:
    return results.read(Path(results_dir) / benchmark / "metrics.parquet")


def _reference_key(model: str, model_key: str | None) -> str | None:
    if model_key:
        return model_key
    return model if model in model_keys() else None


def _measured_rows(summary: pd.DataFrame, groups: list[str], metrics: list[str]) -> list[Row]:
    rows = []
    for method in labels.method_order(summary["method"]):
        part = summary[summary["method"] == method]
        row = Row(method, labels.method_label(method))
        for metric in metrics:
            at = part[part["metric"] == metric]
            if at.empty:
                continue
            if labels.is_fp(method):
                # FP does not depend on the bit-width: the same numbers head every group.
                first = at.sort_values("bits", key=lambda s: s != FP_BITS).iloc[0]
                for g in groups:
                    row.values[(g, metric)] = (first["mean"], first["ci95"])
            else:
                for _, r in at.iterrows():
                    if r["bits"] in groups:
                        row.values[(r["bits"], metric)] = (r["mean"], r["ci95"])
        rows.append(row)
    return rows


def _mark_diverged(rows: list[Row], failures: pd.DataFrame, groups: list[str]) -> list[Row]:
    """Note on each row the seeds of each bit-width that diverged (``failures.parquet``);
    a method whose every cell diverged gets a row of its own, so no failure goes unseen."""
    by_method = {r.method: r for r in rows}
    for (method, bits), part in failures.groupby(["method", "bits"]):
        if bits not in groups:
            continue
        row = by_method.get(method)
        if row is None:
            row = by_method[method] = Row(method, labels.method_label(method))
            rows.append(row)
        row.diverged[bits] = int(part["seed"].nunique())
    order = labels.method_order([r.method for r in rows])
    return sorted(rows, key=lambda r: order.index(r.method))


def _reference_rows(key: str, groups: list[str], metrics: list[str]) -> list[Row]:
    by_source: dict[tuple[str, str], Row] = {}
    for g in groups:
        pub = published_rows(key, g)
        for _, r in pub[pub["metric"].isin(metrics)].iterrows():
            src = short_source(r["source"], r["kind"])
            row = by_source.setdefault(
                (r["method"], src),
                Row(r["method"], f"{labels.method_label(r['method'])} ({src})", reference=True,
                    sources=[r["source"]]),
            )
            if r["source"] not in row.sources:
                row.sources.append(r["source"])
            targets = groups if r["bits"] == FP_BITS else [g]
            for t in targets:
                row.values[(t, r["metric"])] = (float(r["value"]), math.nan)
    # The same numbers quoted by two papers are one row naming both.
    merged: list[Row] = []
    for row in by_source.values():
        twin = next((m for m in merged if m.method == row.method and m.values == row.values),
                    None)
        if twin is None:
            merged.append(row)
        else:
            src = row.label.rsplit(" (", 1)[1].rstrip(")")
            twin.label = twin.label[:-1] + f"; {src})"
            twin.sources += [s for s in row.sources if s not in twin.sources]
    return merged


def _interleave(measured: list[Row], reference: list[Row]) -> list[Row]:
    """Each method's published rows right under its measured row."""
    order = labels.method_order([r.method for r in measured + reference])
    out = []
    for method in order:
        out += [r for r in measured if r.method == method]
        out += [r for r in reference if r.method == method]
    return out


def _best(rows: list[Row], groups: list[str], metrics: list[str]) -> set[tuple[int, Cell]]:
    best = set()
    for g in groups:
        for metric in metrics:
            direction = labels.better(metric)
            if direction is None:
                continue
            lower = direction == "lower"
            cands = [(i, r.values[(g, metric)][0]) for i, r in enumerate(rows)
                     if not r.reference and not labels.is_fp(r.method)
                     and (g, metric) in r.values and not math.isnan(r.values[(g, metric)][0])]
            if len(cands) < 2:  # a lone quantized row is not "best" of anything
                continue
            # Bold only a best that is resolved: its 95 % interval clear of every other
            # row's. Without intervals (one seed) nothing is bold: the tables never rank
            # on noise (a "most negative" KID is estimator noise around 0, not a result).
            ci = {i: rows[i].values[(g, metric)][1] for i, _ in cands}
            sign = 1 if lower else -1
            order = sorted(cands, key=lambda c: sign * c[1])
            (i0, v0), others = order[0], order[1:]
            if math.isnan(ci[i0]) or any(math.isnan(ci[i]) for i, _ in others):
                continue
            if all(sign * (v - v0) > ci[i] + ci[i0] for i, v in others):
                best.add((i0, (g, metric)))
    return best


def build_tables(
    results_dir: Path, benchmark: str, model_key: str | None = None
) -> list[TableData]:
    """One table per model of the benchmark, from ``metrics.parquet`` only."""
    df = _metric_frame(results_dir, benchmark)
    columns = labels.table_metrics()
    df = df[df["metric"].isin(columns)]
    failures = results.failed_cells(Path(results_dir) / benchmark)
    tables = []
    for model in sorted(df["model"].dropna().unique()):
        summary = results.summarize(df[df["model"] == model])
        metrics = [m for m in columns if m in set(summary["metric"])]
        quantized = summary[~summary["method"].map(labels.is_fp)]
        failed = failures[failures["model"] == model]
        groups = labels.bits_order(pd.concat([quantized["bits"], failed["bits"]])) or [FP_BITS]
        rows = _mark_diverged(_measured_rows(summary, groups, metrics), failed, groups)
        key = _reference_key(model, model_key)
        if key is not None:
            rows = _interleave(rows, _reference_rows(key, groups, metrics))
        ns = summary["n"].astype(int)
        tables.append(TableData(benchmark, model, groups, metrics, rows,
                                (int(ns.min()), int(ns.max())), key,
                                _best(rows, groups, metrics)))
    return tables


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


BOLD_NOTE = ("bold: the best quantized method where its interval is clear of every other "
             "row's (none at one seed)")
KID_NOTE = "KID: unbiased MMD² (cubic kernel), raw, on the evaluation features"
DIVERGED = "diverged"
DIVERGED_NOTE = ("diverged: every seed's calibration or sampling produced NaN or infinite "
                 "values; ‡: some seeds did, and the value is over the others only (the "
                 "failures and their errors are in failures.parquet)")


def _cell_text(row: Row, g: str, m: str, pm: str) -> str | None:
    """A measured cell's number, ``diverged``, or None where there is nothing."""
    n_bad = row.diverged.get(g, 0)
    if (g, m) not in row.values:
        return DIVERGED if n_bad else None
    text = _number(m, *row.values[(g, m)], pm)
    return f"{text} ‡" if n_bad else text


def _number(metric: str, mean: float, ci: float, pm: str) -> str:
    d = labels.decimals(metric)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{d}f}" if math.isnan(ci) else f"{mean:.{d}f}{pm}{ci:.{d}f}"


def _floor_markdown(folder: Path) -> str:
    """The reference's noise floor (FP's standard deviation across seeds), so a reader
    sees which differences in the tables above can be resolved at all."""
    from gaq.bench.reproduce import FLOOR_SDS, read_floor

    floor = read_floor(folder)
    if floor is None or floor.empty:
        return ""
    shown = [m for m in ("fid", "kid", "precision", "recall", "class_acc")
             if m in set(floor["metric"])]
    wide = floor.pivot(index="model", columns="metric", values="sd")
    n = int(floor["n"].max())
    lines = ["", f"Noise floor: FP's standard deviation across {n} further seeds at this image "
             f"count. A gap between two one-seed rows is resolved only above about "
             f"{FLOOR_SDS * 2 ** 0.5:.1f}× it (two values, 95 %); rows sampled from the same "
             "noise are correlated, so this is conservative.", "",
             "| model | " + " | ".join(labels.metric_label(m) for m in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for model, row in wide.iterrows():
        cells = ["–" if pd.isna(row.get(m)) else f"{row[m]:.{labels.decimals(m)}f}"
                 for m in shown]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seeds_note(t: TableData) -> str:
    lo, hi = t.seeds
    if hi == 1:  # nothing to average: say so instead of "over n = 1 seeds"
        return "one seed per value, no interval"
    n = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return f"mean ± 95 % CI half-width over n = {n} seeds (Student t); a bare number is n = 1"


def _sources(t: TableData) -> list[str]:
    seen: list[str] = []
    for r in t.rows:
        seen += [s for s in r.sources if s not in seen]
    return seen


def to_markdown(t: TableData) -> str:
    head = ["Method"] + [f"{g} {labels.metric_label(m)} {labels.arrow(m)}".rstrip()
                         for g in t.groups for m in t.metrics]
    lines = [f"## {t.benchmark}: {t.model}", "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for i, row in enumerate(t.rows):
        cells = [f"*{row.label}*" if row.reference else row.label]
        for g in t.groups:
            for m in t.metrics:
                text = _cell_text(row, g, m, " ± ")
                if text is None:
                    cells.append("–")
                    continue
                if row.reference:
                    text = f"*{text}*"
                elif (i, (g, m)) in t.best:
                    text = f"**{text}**"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    kid = f" {KID_NOTE}." if "kid" in t.metrics else ""
    lines += ["", f"Values: {_seeds_note(t)}; {BOLD_NOTE}.{kid}"]
    if any(r.diverged for r in t.rows):
        lines.append(f"{DIVERGED_NOTE[0].upper()}{DIVERGED_NOTE[1:]}.")
    if any(r.reference for r in t.rows):
        lines.append(f"Italic rows: published numbers for `{t.model_key}`, not measured here. "
                     "Sources: " + "; ".join(_sources(t)) + ".")
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                   "^": r"\textasciicircum{}"}


# Text that pdflatex cannot typeset from UTF-8 with a plain article + booktabs preamble:
# math-mode symbols instead (applied after escaping, so their backslashes survive).
_TEX_SYMBOLS = {"L\\_GM": r"$\mathcal{L}_{\mathrm{GM}}$", "ω": r"$\omega$", "ε": r"$\epsilon$",
                "Δ": r"$\Delta$", "σ": r"$\sigma$", "×": r"$\times$", "±": r"$\pm$",
                "−": r"$-$", "–": "--", "≤": r"$\leq$", "≥": r"$\geq$", "·": r"$\cdot$",
                "²": r"$^2$", "↓": r"$\downarrow$", "↑": r"$\uparrow$"}


def _tex(text: str) -> str:
    out = "".join(_LATEX_SPECIALS.get(c, c) for c in text)
    for plain, symbol in _TEX_SYMBOLS.items():
        out = out.replace(plain, symbol)
    return out


def _tex_number(text: str) -> str:
    """A formatted number with a true minus sign (a hyphen is not one in LaTeX)."""
    return text.replace("-", "$-$").replace("–", "--")


# Rough widths (pt) of \small text, to choose between a column-wide table and a table*
# spanning both columns of a two-column paper; COLUMN is a typical two-column \columnwidth.
# (This estimate runs 5-11 % over pdflatex's widths, which COLUMN allows for.)
_PT_PER_CHAR, _PT_PER_COLUMN, _COLUMN = 5.0, 12.0, 240.0
# The one-column table's: \footnotesize with \tabcolsep 3 pt, within 5 pt of pdflatex's
# widths on the shipped tables, so it is held to a real \columnwidth, the standard
# two-column article's (10 pt), narrower than most venues'.
_TIGHT_PT_PER_CHAR, _TIGHT_PT_PER_COLUMN, _ARTICLE_COLUMN = 4.3, 6.0, 229.5


def _visible(cell: str) -> int:
    """Characters a LaTeX cell shows (markup stripped, a math group as one)."""
    import re

    cell = re.sub(r"\\(textbf|textit)\{(.*)\}", r"\2", cell)
    cell = re.sub(r"\$[^$]*\$", "x", cell)
    return len(cell.replace("--", "-"))


def _column_widths(rows: list[list[str]], pt_per_char: float = _PT_PER_CHAR,
                   pt_per_column: float = _PT_PER_COLUMN) -> list[float]:
    """Estimated widths (pt) of the columns of a tabular whose cells are ``rows``."""
    return [max(_visible(r[j]) for r in rows) * pt_per_char + pt_per_column
            for j in range(len(rows[0]))]


def _width_pt(rows: list[list[str]]) -> float:
    """Estimated width of a \\small tabular whose cells are ``rows``."""
    return sum(_column_widths(rows))


def _tex_arrow(metric: str) -> str:
    a = labels.arrow(metric)
    return {"↓": r" $\downarrow$", "↑": r" $\uparrow$"}.get(a, "")


def _tex_metric(metric: str) -> str:
    return _tex(labels.metric_label(metric))


def _tex_cell(row: Row, g: str, m: str, bold: bool) -> str:
    """A cell in LaTeX: true minus signs, ``--`` where there is nothing, italic for a
    published number, bold for a resolved best."""
    plain = _cell_text(row, g, m, " ± ")
    if plain is None:
        return "--"
    text = _tex_number(plain).replace(" ± ", r" $\pm$ ").replace(" ‡", r"$^\ddagger$")
    if row.reference:
        return rf"\textit{{{text}}}"
    return rf"\textbf{{{text}}}" if bold else text


def _latex_block(t: TableData, groups: list[str]) -> tuple[list[str], float]:
    """One tabular for ``groups`` (all the table's rows) and its estimated width."""
    k = len(t.metrics)
    spec = "l" + " ".join("c" * k for _ in groups)
    group_head = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{_tex(g)}}}" for g in groups)
    rules = " ".join(rf"\cmidrule(lr){{{2 + j * k}-{1 + (j + 1) * k}}}"
                     for j in range(len(groups)))
    heads = [f"{_tex_metric(m)}{_tex_arrow(m)}" for _ in groups for m in t.metrics]
    body: list[list[str]] = []
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", rf" & {group_head} \\", rules,
             "Method & " + " & ".join(heads) + r" \\", r"\midrule"]
    for i, row in enumerate(t.rows):
        cells = [rf"\textit{{{_tex(row.label)}}}" if row.reference else _tex(row.label)]
        cells += [_tex_cell(row, g, m, (i, (g, m)) in t.best) for g in groups for m in t.metrics]
        body.append(cells)
        lines.append(" & ".join(cells) + r" \\")
        if labels.is_fp(row.method) and i + 1 < len(t.rows) \
                and not labels.is_fp(t.rows[i + 1].method):
            lines.append(r"\midrule")  # FP rows apart from the quantized ones, as in papers
    lines += [r"\bottomrule", r"\end{tabular}"]
    return lines, _width_pt([["Method", *heads], *body])


def _spaces_note(models: list[str], metrics: list[str], feature_space: str) -> str:
    """"FID, KID in digit-classifier features" for the image metrics shown, or ""."""
    shown = [labels.metric_label(m) for m in metrics if labels.in_feature_space(m)]
    if not shown:
        return ""
    spaces = sorted({labels.feature_space_label(m, feature_space) for m in models})
    return f"{', '.join(shown)} in {' / '.join(spaces)}"


def to_latex(t: TableData, feature_space: str = "auto") -> str:
    """A booktabs table that compiles with a plain ``article`` + ``booktabs`` preamble
    (math-mode symbols, true minus signs). It takes one column when it fits one, both
    columns (``table*``) when not, and stacks one tabular per bit-width when even that is
    too narrow for all of them side by side. ``feature_space`` is the benchmark file's
    ``eval.feature_space``, which the caption names."""
    whole, width = _latex_block(t, t.groups)
    blocks = [whole]
    if width > 2 * _COLUMN and len(t.groups) > 1:
        per_group = [_latex_block(t, [g]) for g in t.groups]
        blocks = [lines for lines, _ in per_group]
        width = max(w for _, w in per_group)
    env = "table" if width <= _COLUMN else "table*"
    kid = f"; {KID_NOTE}" if "kid" in t.metrics else ""
    space = _spaces_note([t.model], t.metrics, feature_space)
    space = f"; {space}" if space else ""
    caption = _tex(f"{t.benchmark} ({t.model}): {_seeds_note(t)}; {BOLD_NOTE}{kid}{space}")
    if any(r.reference for r in t.rows):
        caption += r"; italic rows: published numbers, not measured here"
    if any(r.diverged for r in t.rows):
        caption += "; " + _tex(DIVERGED_NOTE).replace("‡", r"$^\ddagger$")
    lines = ["% generated by gaq.bench.tables from metrics.parquet and failures.parquet; "
             "do not edit by hand",
             rf"\begin{{{env}}}[t]", r"\centering", r"\small"]
    if width > 2 * _COLUMN:  # still too wide for the text width: tighter columns
        lines += [r"\footnotesize", r"\setlength{\tabcolsep}{3pt}"]
    for j, block in enumerate(blocks):
        if j:
            lines += [r"\par\medskip"]
        lines += block
    lines += [rf"\caption{{{caption}.}}",
              rf"\label{{tab:{_label(t.benchmark)}-{_label(t.model)}}}", rf"\end{{{env}}}"]
    return "\n".join(lines) + "\n"


#: The one-column table's metrics: FID, the distribution metric papers lead with, and
#: PSNR against FP's image from the same noise, the paired one that separates rows at one
#: seed. The full tables carry every metric.
HEADLINE_METRICS = ("fid", "psnr")


def _onecol_block(tables: list[TableData], groups: list[tuple[int, str]],
                  names: dict[tuple[int, str], str], metrics: list[str],
                  methods: list[str]) -> tuple[list[str], float]:
    """One tabular of the one-column table: ``groups`` are (table index, bit-width) column
    groups headed by ``names`` (none when empty), each with the ``metrics`` its table has;
    rows are ``methods``' measured rows, less those with nothing in these columns. Metric
    heads carry no arrows (the caption gives the directions): an arrow widens every PSNR
    column by a third, which is what the main job's three models side by side lack."""
    cols = [(ti, g, m) for ti, g in groups for m in metrics if m in tables[ti].metrics]
    lines = [rf"\begin{{tabular}}{{@{{}}l{'r' * len(cols)}@{{}}}}", r"\toprule"]
    if any(names[gr] for gr in groups):
        start, spans, rules = 2, [], []
        for group in groups:
            k = sum(1 for c in cols if c[:2] == group)
            spans.append(rf"\multicolumn{{{k}}}{{c}}{{{_tex(names[group])}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + k - 1}}}")
            start += k
        lines += [" & " + " & ".join(spans) + r" \\", " ".join(rules)]
    heads = [_tex_metric(m) for _, _, m in cols]
    lines += ["Method & " + " & ".join(heads) + r" \\", r"\midrule"]
    body: list[list[str]] = []
    for method in methods:
        cells = [_tex(labels.short_label(method))]
        for ti, g, m in cols:
            at = [(i, r) for i, r in enumerate(tables[ti].rows)
                  if r.method == method and not r.reference]
            cells.append(_tex_cell(at[0][1], g, m, (at[0][0], (g, m)) in tables[ti].best)
                         if at else "--")
        if all(c == "--" for c in cells[1:]):
            continue  # nothing here: a row of another model (HTG runs on DiTs only)
        body.append(cells)
        lines.append(" & ".join(cells) + r" \\")
        if labels.is_fp(method):
            lines.append(r"\midrule")  # FP apart from the quantized rows, as in papers
    lines += [r"\bottomrule", r"\end{tabular}"]
    widths = _column_widths([["Method", *heads], *body], _TIGHT_PT_PER_CHAR,
                            _TIGHT_PT_PER_COLUMN)
    # a group name wider than its columns widens them
    extra = sum(max(0.0, _visible(_tex(names[gr])) * _TIGHT_PT_PER_CHAR
                    - sum(w for w, c in zip(widths[1:], cols, strict=True) if c[:2] == gr))
                for gr in groups if names[gr])
    return lines, sum(widths) + extra


def to_latex_onecol(tables: list[TableData], feature_space: str = "auto") -> str | None:
    """The benchmark's headline table for one column of a two-column paper (``table``, never
    ``table*``): the measured rows of every model, :data:`HEADLINE_METRICS` only, short row
    labels, ``\footnotesize`` with tight column gaps. Models (or bit-widths) sit side by side
    where they fit the column, else one tabular each, stacked. None when the results have
    none of the headline metrics."""
    tables = [t for t in tables if any(m in t.metrics for m in HEADLINE_METRICS)]
    if not tables:
        return None
    metrics = [m for m in HEADLINE_METRICS if any(m in t.metrics for t in tables)]
    methods = labels.method_order(r.method for t in tables for r in t.rows if not r.reference)
    groups = [(ti, g) for ti, t in enumerate(tables) for g in t.groups]
    # a group is named by what varies across the table: the model, the bit-width, or both
    several_models, several_bits = len(tables) > 1, len({g for _, g in groups}) > 1
    names = {(ti, g): " ".join(([tables[ti].model] if several_models else [])
                               + ([g] if several_bits else [])) for ti, g in groups}
    # all groups side by side, else one tabular per model, else one per (model, bit-width)
    for split in ([groups], [[gr for gr in groups if gr[0] == ti] for ti in range(len(tables))],
                  [[gr] for gr in groups]):
        blocks = [_onecol_block(tables, part, names, metrics, methods) for part in split]
        if max(w for _, w in blocks) <= _ARTICLE_COLUMN - 6.0:  # 6 pt for the estimate's error
            break
    benchmark = tables[0].benchmark
    models = [t.model for t in tables]
    lo, hi = min(t.seeds[0] for t in tables), max(t.seeds[1] for t in tables)
    seeds = _seeds_note(TableData(benchmark, "", [], [], [], (lo, hi), None))
    directions = ", ".join(f"{labels.metric_label(m)} {labels.arrow(m)}".rstrip()
                           for m in metrics)
    notes = [f"{benchmark}, headline metrics ({directions}) of {', '.join(models)}", seeds,
             _spaces_note(models, metrics, feature_space)]
    if "psnr" in metrics:
        notes.append("PSNR (dB): each image against FP's from the same noise")
    short = [f"{labels.short_label(m)}: {labels.method_label(m)}" for m in methods
             if labels.short_label(m) != labels.method_label(m)]
    if short:
        notes.append("; ".join(short))
    notes += [BOLD_NOTE, f"every metric and the published rows: {benchmark}.tex"]
    caption = _tex("; ".join(n for n in notes if n))
    if any(r.diverged for t in tables for r in t.rows):
        caption += "; " + _tex(DIVERGED_NOTE).replace("‡", r"$^\ddagger$")
    lines = ["% generated by gaq.bench.tables from metrics.parquet and failures.parquet; "
             "do not edit by hand",
             r"\begin{table}[t]", r"\centering", r"\footnotesize",
             r"\setlength{\tabcolsep}{3pt}"]
    for j, (block, _) in enumerate(blocks):
        if j:
            lines += [r"\par\medskip"]
        lines += block
    lines += [rf"\caption{{{caption}.}}", rf"\label{{tab:{_label(benchmark)}-onecol}}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def _label(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text)


def _write_or_remove(path: Path, text: str | None, written: list[Path]) -> None:
    """Write ``text`` to ``path`` (added to ``written``), or, when the results no longer
    give that table (None), remove the file an earlier run wrote: a stale table would
    contradict the main one, which is always rewritten."""
    if text is None:
        path.unlink(missing_ok=True)
        return
    path.write_text(text, encoding="utf-8")
    written.append(path)


def write_tables(
    results_dir: Path, benchmark: str, out_dir: Path, *, model_key: str | None = None,
    anchor: str = "gaq", feature_space: str = "auto",
) -> list[Path]:
    """Write ``<benchmark>.md`` and ``<benchmark>.tex`` into ``out_dir``, the one-column
    headline table ``<benchmark>_onecol.tex``, and the noise, paired and per-method tables
    the results allow; return their paths.

    Reads only the Parquet files under ``results_dir/<benchmark>``. ``model_key`` (the
    benchmark's setting, e.g. ``"cifar10-ddim100"``) selects published reference rows;
    without it a model id that is itself a published key is used. ``anchor`` is the row the
    paired tables measure the others against. ``feature_space`` (the benchmark file's
    ``eval.feature_space``) is named in the LaTeX captions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(Path(results_dir), benchmark, model_key)
    if tables:
        md = "\n".join(to_markdown(t) for t in tables)
        tex = "\n".join(to_latex(t, feature_space) for t in tables)
    else:
        md = f"## {benchmark}\n\nNo results with table metrics yet.\n"
        tex = f"% {benchmark}: no results with table metrics yet\n"
    md += _floor_markdown(Path(results_dir) / benchmark)
    paths = [out_dir / f"{benchmark}.md", out_dir / f"{benchmark}.tex"]
    paths[0].write_text(md, encoding="utf-8")
    paths[1].write_text(tex, encoding="utf-8")
    _write_or_remove(out_dir / f"{benchmark}_onecol.tex",
                     to_latex_onecol(tables, feature_space), paths)
    from gaq.bench.noise import noise_table

    folder = Path(results_dir) / benchmark
    metrics = results.read(folder / "metrics.parquet")
    noise = noise_table(results.current(results.read(folder / "curves.parquet"), metrics),
                        benchmark)
    _write_or_remove(out_dir / f"{benchmark}_noise.md", noise, paths)

    from gaq.bench.paired import paired_table, seed_paired_table

    per_image = folder / "per_image.parquet"
    paired = (paired_table(results.current(results.read(per_image), metrics), benchmark,
                           anchor=anchor)
              if per_image.exists() else None)
    sets = seed_paired_table(metrics, benchmark, anchor=anchor)
    text = "\n".join(t for t in (paired, sets) if t is not None)
    _write_or_remove(out_dir / f"{benchmark}_paired.md", text or None, paths)

    from gaq.bench.reports import method_reports

    for report, frames in method_reports(folder):
        for suffix, text in report.markdown(frames, benchmark).items():
            paths.append(out_dir / f"{benchmark}_{suffix}.md")
            paths[-1].write_text(text, encoding="utf-8")
    return paths
