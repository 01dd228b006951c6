"""README and docs sections written from ``results/``, never typed by hand.

A section is the text between ``<!-- gen:NAME -->`` and ``<!-- /gen:NAME -->``; NAME picks
its generator, which reads only committed files under ``results/`` (``table:BENCH`` embeds
``results/tables/BENCH.md``). ``gaq readme`` rewrites every section of the README and of
every page under ``docs/``; ``gaq readme --check`` fails when a section's text is not what
its files give (a number typed or edited by hand, or files regenerated without the pages),
naming the page, the section and its source.

Numbers outside generated sections are checked too (:func:`unsourced`): the README may
hold none (a measured number there lives in a generated section), and a results page's
prose may quote only numbers that one of the ``results/`` files it cites gives, to the
digits quoted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from gaq.errors import GaqError

__all__ = ["GENERATORS", "check", "check_pages", "pages", "render", "unsourced", "update"]

_BLOCK = re.compile(r"(<!-- gen:(?P<name>[\w.:/-]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)",
                    re.S)


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _rerun(results: Path, benchmark: str = "w4a8") -> str:
    """The committed record of a plain run of the main job against its reference."""
    path = results / "protocol" / f"{benchmark}_rerun.json"
    rec = json.loads(path.read_text(encoding="utf-8"))
    setup = rec.get("setup", {})
    how = ", ".join(f"{k} {v}" for k, v in setup.items() if v is not None)
    wall = f"took **{_minutes(rec['wall_seconds'])}**" if rec.get("wall_seconds") else "ran"
    if rec.get("load_avg_1min") is not None:  # 2 on this machine: its two cores busy
        wall += f" (1-minute load {rec['load_avg_1min']:g} at its end)"
    done = rec.get("computed_cells")
    cells = (f"computed {done} of its {rec['cells']} cells" if done is not None
             else f"covered {rec['cells']} cells")
    return (f"A run of the main job ({how}) {cells}, {wall} on {rec['date']} "
            f"({rec['machine']}), and ended with the verdict line\n\n"
            f"```\n{rec['verdict']}\n```\n\n"
            f"(source: `{path.as_posix()}`)\n")


def _tolerance(results: Path, benchmark: str = "w4a8") -> str:
    """The measured numerical tolerance of the main job's reference, per metric."""
    from gaq.bench.verdict import COUNTS, read_tolerance

    tol = read_tolerance(results / benchmark)
    if tol is None:
        raise GaqError(f"no {results / benchmark / 'tolerance.json'}: run nox -s tolerance")
    conds = list(tol.conditions)
    lines = ["| metric | " + " | ".join(f"largest change, {c}" for c in conds)
             + " | tolerance |", "|---|" + "---:|" * (len(conds) + 1)]
    for metric, e in tol.metrics.items():
        if not e.get("compared"):
            lines.append(f"| {metric} | " + " | ".join("not rerun" for _ in conds)
                         + f" | {e['rel']:.2g} rel |")
            continue
        if metric in COUNTS:
            cells = [f"{e['max_change'].get(c, 0)} img" for c in conds]
            allowed = f"{e['images']} images"
        else:
            cells = [f"{e['max_change'].get(c, 0):.2g}" for c in conds]
            allowed = f"{e['rel']:.2g} rel, {e['abs']:.2g} abs"
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {allowed} |")
    return ("\n".join(lines) + "\n\n"
            f"Measured {tol.measured}, margin {tol.margin:g}× (source: "
            f"`{(results / benchmark / 'tolerance.json').as_posix()}`).\n")


def _frame(results: Path, benchmark: str):
    from gaq.bench import results as stored

    path = results / benchmark / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    return stored.read(path), path


def _per_row(results: Path, benchmark: str, metric: str):
    """``metric`` as a (method x model) table of seed means, rows in table order."""
    from gaq.bench.labels import method_order

    frame, path = _frame(results, benchmark)
    sub = frame[frame["metric"] == metric]
    table = sub.pivot_table(index="method", columns="model", values="value", aggfunc="mean")
    return table.loc[method_order(table.index), _model_order(benchmark, table.columns)], \
        path, frame


def _model_order(benchmark: str, models) -> list[str]:
    """The benchmark file's model order (the order its tables use), else alphabetical."""
    from gaq.bench.spec import load_benchmark

    listed: list[str] = []
    path = Path("benchmarks") / f"{benchmark}.toml"
    if path.is_file():
        listed = [str(m) for m in load_benchmark(path).models]
    return sorted(models, key=lambda m: (listed.index(m) if m in listed else len(listed), m))


def _headline(results: Path, benchmark: str = "w4a8") -> str:
    """The main job's headline: PSNR against FP and FID per row and model."""
    from gaq.bench.labels import is_fp, method_label

    psnr, path, frame = _per_row(results, benchmark, "psnr")
    fid, _, _ = _per_row(results, benchmark, "fid")
    models = list(fid.columns)
    seeds = sorted(frame["seed"].unique())
    images = frame.loc[frame["metric"] == "n_images", "value"]
    lines = ["| row | " + " | ".join(f"{m} PSNR (dB) ↑" for m in models) + " | "
             + " | ".join(f"{m} FID ↓" for m in models) + " |",
             "|---|" + "---:|" * (2 * len(models))]
    def cell(table, method: str, model: str) -> str:
        value = table.loc[method, model] if method in table.index else float("nan")
        return "–" if value != value else f"{value:.2f}"  # NaN: not defined for the model

    for method in fid.index:
        cells = [("–" if is_fp(method) else cell(psnr, method, m)) for m in models]
        cells += [cell(fid, method, m) for m in models]
        lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    n = int(images.max()) if len(images) else 0
    return ("\n".join(lines) + "\n\n"
            f"{len(seeds)} seed(s), {n} images per cell; PSNR of each quantized image against "
            "the FP image from the same noise; FID in the features of the bundled digit "
            "classifier against all real digits (not Inception). – : not defined for the model. "
            f"Source: `{path.as_posix()}`.\n")


def _cost(results: Path, benchmark: str = "w4a8") -> str:
    """Calibration seconds per row and model, as the reference measured them."""
    from gaq.bench.labels import is_fp, method_label

    secs, path, frame = _per_row(results, benchmark, "calibration_seconds")
    models = list(secs.columns)
    lines = ["| row | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for method in secs.index:
        if is_fp(method):
            continue
        lines.append(f"| {method_label(method)} | " + " | ".join(
            "–" if secs.loc[method, m] != secs.loc[method, m] else f"{secs.loc[method, m]:.1f}"
            for m in models) + " |")
    setups = ", ".join(sorted(frame["setup"].unique()))
    return ("\n".join(lines) + "\n\n"
            f"Calibration wall seconds per cell, as the reference recorded them (setup: "
            f"{setups}; threads and engine as the benchmark file's `[setup]` sets them). "
            f"Source: `{path.as_posix()}`.\n")


def _embed(results: Path, rel: str) -> str:
    """A Markdown file under ``results/`` verbatim, its headings nested two levels
    deeper (it sits under a page's section)."""
    path = results / f"{rel}.md"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text,
                  flags=re.M)
    return text.rstrip("\n") + f"\n\n(source: `{path.as_posix()}`)\n"


def _gaq_tuning(results: Path) -> str:
    """GAQ's tuning study in a few lines (the table is in docs/gaq.md)."""
    import json

    from gaq.gaq_tuning import headline

    path = results / "gaq_tuning" / "study.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    return headline(record) + f"\nSource: `{path.as_posix()}`.\n"


#: the GAQ comparisons the README states: benchmark, and the rows GAQ is paired against
_GAQ_PAIRS = (("w4a8-full", ("gaq-uniform", "gaq-mse", "gaq-timestep")),
              ("lowbit", ("gaq-uniform", "gaq-mse", "gaq-timestep")),
              ("gaq", ("gaq-uniform", "gaq-mse", "gaq-timestep")))


def _gaq_ablations(results: Path) -> str:
    """GAQ against its ablations: paired per-image PSNR differences (t over seeds)."""
    from gaq.bench import labels
    from gaq.bench.paired import paired_comparisons

    lines = ["| benchmark | model, bits | seeds × images | GAQ − ablation (PSNR dB, 95 % CI) |",
             "|---|---|---|---|"]
    sources = []
    for bench, versus in _GAQ_PAIRS:
        path = results / bench / "per_image.parquet"
        per_image = _frame_of(path)
        if per_image is None:
            continue
        sources.append(f"`{path.as_posix()}`")
        comp = paired_comparisons(per_image, "psnr", "gaq")
        comp = comp[comp["method"].isin(versus)]
        for (model, bits), part in comp.groupby(["model", "bits"], sort=True):
            rows = per_image[(per_image["model"] == model) & (per_image["bits"] == bits)
                             & (per_image["method"] == "gaq") & (per_image["metric"] == "psnr")]
            size = f"{rows['seed'].nunique()} × {len(rows) // max(rows['seed'].nunique(), 1):,}"
            cells = []
            for m in versus:
                r = part[part["method"] == m]
                if r.empty:
                    continue
                r = r.iloc[0]
                # the table holds (ablation − GAQ): GAQ's gain is its negative
                est, low, high = (round(-v, 3) + 0.0 for v in (r["estimate"], r["high"],
                                                                r["low"]))
                mark = "**" if r["resolved"] else ""
                signed = [f"{v:+.3f}".replace("-", "−") for v in (est, low, high)]
                cells.append(f"vs {labels.method_label(m)} {mark}{signed[0]}{mark} "
                             f"[{signed[1]}, {signed[2]}]")
            lines.append(f"| {bench} | {model}, {bits} | {size} | {'; '.join(cells)} |")
    return ("\n".join(lines) + "\n\nPositive: GAQ's images are closer to FP's; **bold**: the "
            "interval excludes 0. Sources: " + ", ".join(sources) + ".\n")


def _frame_of(path: Path):
    import pandas as pd

    return pd.read_parquet(path) if path.exists() else None


GENERATORS: dict[str, Callable[[Path], str]] = {
    "gaq-tuning": _gaq_tuning,
    "gaq-ablations": _gaq_ablations,
    "w4a8-rerun": _rerun,
    "w4a8-tolerance": _tolerance,
    "w4a8-headline": _headline,
    "w4a8-cost": _cost,
}
#: generators taking an argument: ``gen:md:tables/w4a8`` embeds results/tables/w4a8.md
PARAMETRIC: dict[str, Callable[[Path, str], str]] = {"md": _embed}


def render(name: str, results: Path) -> str:
    kind, _, arg = name.partition(":")
    if name not in GENERATORS and not (arg and kind in PARAMETRIC):
        raise GaqError(f"README section gen:{name} has no generator (known: "
                       f"{', '.join([*GENERATORS, *(k + ':PATH' for k in PARAMETRIC)])})")
    try:
        if name in GENERATORS:
            return GENERATORS[name](Path(results))
        return PARAMETRIC[kind](Path(results), arg)
    except FileNotFoundError as e:
        raise GaqError(f"README section gen:{name}: its source {e.filename} is missing") \
            from None


def update(text: str, results: Path) -> str:
    """``text`` with every generated section rewritten from ``results``."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), results) + m.group(4),
                      text)


def check(text: str, results: Path) -> list[str]:
    """One line per section whose text is not what its source files give."""
    problems = []
    for m in _BLOCK.finditer(text):
        want = render(m.group("name"), results)
        if m.group("body") != want:
            got = m.group("body").splitlines()
            exp = want.splitlines()
            first = next((i for i, (a, b) in enumerate(zip(got, exp, strict=False)) if a != b),
                         min(len(got), len(exp)))
            line = text[:m.start("body")].count("\n") + 1 + first
            shown = got[first] if first < len(got) else "(section ends)"
            problems.append(f"README line {line}, section gen:{m.group('name')}: "
                            f"{shown.strip()[:120]!r} is not what its source gives; "
                            "run `gaq readme` to rewrite it from results/")
    return problems


# What a measured number looks like in prose: a decimal, a percentage, or an amount with a
# unit of time, size or ratio ("6 min", "418 s", "2.7 GB", "1.3×"). Integers alone are
# protocol facts (128 images, 20 steps) and are not checked.
_NUMBER = re.compile(r"(?<![\w.])[+−-]?(\d[\d,]*\.\d+|\d[\d,]*(?= ?(?:%|min\b|s\b|h\b|ms\b|"
                     r"[KMG]B\b|dB\b|×(?!\d))))")  # 16×16 is a size, 1.3× a ratio
_CODE = re.compile(r"```.*?```|`[^`\n]*`|<!--.*?-->|\]\([^)]*\)", re.S)
_CITED = re.compile(r"[\w./-]+\.(?:md|json|csv|jsonl)")
_ANY_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _prose(text: str) -> str:
    """``text`` without generated sections, code and link targets, line numbers kept."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731 - keeps offsets
    return _CODE.sub(blank, _BLOCK.sub(blank, text))


def _pool(text: str, root: Path) -> list[float]:
    """Every number in the ``results/`` files ``text`` cites (a path under ``results/``, or
    a table's bare file name such as ``w4a8_paired.md``) and in its generated sections."""
    found = "".join(m.group("body") for m in _BLOCK.finditer(text))
    for name in sorted(set(_CITED.findall(text))):
        for path in (root / name, root / "results" / "tables" / name):
            if path.is_file() and "results" in path.parts:
                found += "\n" + path.read_text(encoding="utf-8")
                break
    return [float(v) for v in _ANY_NUMBER.findall(found)]


def _sourced(token: str, pool: list[float]) -> bool:
    digits = token.lstrip("+−-").replace(",", "")
    decimals = len(digits.partition(".")[2])
    for y in pool:
        for v in (abs(y), abs(y) * 100):  # a share quoted as a percentage
            if f"{v:.{decimals}f}" == digits:
                return True
    return False


def unsourced(text: str, root: Path = Path("."), *, strict: bool = False) -> list[str]:
    """Measured numbers in ``text``'s prose with no source. ``strict`` (the README): every
    one is a problem, since a measured number belongs in a generated section. Otherwise a
    number is sourced when a number in the ``results/`` files the page cites (paths
    relative to ``root``) rounds to it at the digits quoted. Short numbers can match by
    chance, so this catches most stale or mistyped values, not all of them."""
    prose = _prose(text)
    pool = [] if strict else _pool(text, root)
    problems = []
    for m in _NUMBER.finditer(prose):
        if strict or not _sourced(m.group(1), pool):
            line = prose[:m.start()].count("\n") + 1
            problems.append(f"line {line}: {m.group(0).strip()!r} has no source"
                            + ("" if strict else " in the results/ files the page cites"))
    return problems


#: pages whose prose numbers are checked against the results/ files they cite (the
#: README holds none outside generated sections)
CHECKED_PAGES = ("docs/results.md",)


def pages(root: Path = Path(".")) -> list[Path]:
    """The README and every documentation page."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def check_pages(paths: list[Path], results: Path, root: Path = Path(".")) -> list[str]:
    """Every problem of every page: generated sections that are not what their sources
    give, and unsourced numbers (the README: any; :data:`CHECKED_PAGES`: any its cited
    files do not give)."""
    problems = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        rel = path.resolve().relative_to(root.resolve()).as_posix() \
            if path.resolve().is_relative_to(root.resolve()) else path.as_posix()
        problems += [f"{rel}: {p.removeprefix('README ')}" for p in check(text, results)]
        if rel == "README.md":
            problems += [f"{rel} {p}" for p in unsourced(text, root, strict=True)]
        elif rel in CHECKED_PAGES:
            problems += [f"{rel} {p}" for p in unsourced(text, root)]
    return problems
