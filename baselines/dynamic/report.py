"""How close each static row comes to dynamic ranges: the benchmark's paired tables with
``dynamic`` as the anchor (``<benchmark>_vs_dynamic.md``), beside the benchmark's own
paired tables (anchored on the method under study). Written wherever a benchmark has a
``dynamic`` row."""

from __future__ import annotations

import pandas as pd

from gaq.bench.reports import MethodReport

ANCHOR = "dynamic"


class DynamicReport(MethodReport):
    """Reads the benchmark's own per-image and per-cell rows (no diagnostics of its own:
    the dynamic method learns nothing to report)."""

    tables = ("per_image", "metrics")

    def markdown(self, frames: dict[str, pd.DataFrame], benchmark: str) -> dict[str, str]:
        from gaq.bench.paired import paired_table, seed_paired_table

        metrics = frames.get("metrics")
        if metrics is None or ANCHOR not in set(metrics["method"]):
            return {}
        per_image = frames.get("per_image")
        parts = [paired_table(per_image, benchmark, anchor=ANCHOR)
                 if per_image is not None else None,
                 seed_paired_table(metrics, benchmark, anchor=ANCHOR)]
        text = "\n".join(t for t in parts if t is not None)
        return {"vs_dynamic": text} if text else {}
