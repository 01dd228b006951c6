"""Methods' own reports: a method that writes diagnostics tables (``QuantResult.diagnostics``,
stored as ``<table>.parquet`` beside the metrics) declares a :class:`MethodReport` that
renders them (``Method.report``, a lazy ``"module:Class"`` target). ``gaq tables`` and
``gaq plots`` render whatever the benchmark's methods declare; they know no method by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MethodReport", "method_reports"]


class MethodReport:
    """What a method shows of its diagnostics. ``tables``: the diagnostics table names its
    cells write. Both renderers receive those tables (the rows of every method in the
    benchmark that wrote them, superseded cells dropped), keyed by name."""

    tables: tuple[str, ...] = ()

    def markdown(self, frames: dict[str, pd.DataFrame], benchmark: str) -> dict[str, str]:
        """Markdown files, as ``{suffix: text}``: written as ``<benchmark>_<suffix>.md``."""
        return {}

    def figures(self, frames: dict[str, pd.DataFrame],
                benchmark: str) -> Iterator[tuple[str, Figure]]:
        """Figures, as ``(suffix, figure)``: saved as ``<benchmark>_<suffix>.{pdf,png}``.
        Each names ``benchmark`` and the model it shows in its title, as the suite's own
        figures do (:func:`gaq.bench.plots.figure_title`)."""
        return iter(())


def _load(target: str) -> MethodReport:
    from gaq.registry import import_target

    return import_target(target)()


def method_reports(folder: Path) -> list[tuple[MethodReport, dict[str, pd.DataFrame]]]:
    """The registered methods' reports whose tables ``folder`` (a benchmark's results)
    holds, each report once (a method and its ablations share one), with those tables.
    Rows are matched by table, not by method name: a benchmark's variant rows carry
    their own names."""
    from gaq.bench import results
    from gaq.errors import GaqError
    from gaq.registry import get_method, list_methods

    if not any(folder.glob("*.parquet")):
        return []
    metrics = results.read(folder / "metrics.parquet")
    targets: dict[str, None] = {}
    for name in list_methods():
        try:
            target = get_method(name).report
        except GaqError:  # a plugin that cannot be imported here
            continue
        if target:
            targets[target] = None
    out = []
    for target in targets:
        report = _load(target)
        frames = {n: results.current(pd.read_parquet(folder / f"{n}.parquet"), metrics)
                  for n in report.tables if (folder / f"{n}.parquet").exists()}
        if frames:
            out.append((report, frames))
    return out
