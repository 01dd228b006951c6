"""README sections written from ``results/``, never typed by hand.

A section is the text between ``<!-- gen:NAME -->`` and ``<!-- /gen:NAME -->``; NAME picks
its generator, which reads only committed files under ``results/``. ``gaq readme``
rewrites every section; ``gaq readme --check`` fails when a section's text is not what its
files give (a number typed or edited by hand, or files regenerated without the README),
naming the section and its source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from gaq.errors import GaqError

__all__ = ["GENERATORS", "check", "render", "update"]

_BLOCK = re.compile(r"(<!-- gen:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)",
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


GENERATORS: dict[str, Callable[[Path], str]] = {
    "w4a8-rerun": _rerun,
    "w4a8-tolerance": _tolerance,
}


def render(name: str, results: Path) -> str:
    if name not in GENERATORS:
        raise GaqError(f"README section gen:{name} has no generator (known: "
                       f"{', '.join(GENERATORS)})")
    try:
        return GENERATORS[name](Path(results))
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
