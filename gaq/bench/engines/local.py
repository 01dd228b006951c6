"""The local engine: the cells one after another in this process (under torchrun, each
cell's sampling is spread over the ranks; see :mod:`gaq.dist`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gaq.bench.engines.base import Engine, plan

if TYPE_CHECKING:
    import pandas as pd

    from gaq.bench.runner import Runner

__all__ = ["LocalEngine"]


class LocalEngine(Engine):
    name = "local"

    def run(self, runner: Runner, *, threads: int | None = None,
            address: str | None = None) -> pd.DataFrame:
        import torch

        self.check(address)
        if threads:
            torch.set_num_threads(threads)
        runner.preflight()
        with runner.sweep():
            return self.run_planned(runner)

    def run_planned(self, runner: Runner) -> pd.DataFrame:
        """The sweep's cells, in grid order, each claimed first so that two processes on
        one results folder never run the same cell."""
        import pandas as pd

        from gaq.bench import results

        grid, todo = plan(runner)
        spent, ran = 0.0, 0
        for k, p in enumerate(todo):
            tag = f"[{p.index + 1}/{len(grid)}] {p.cell.label}"
            eta = f", ETA {(spent / ran) * (len(todo) - k) / 60:.1f} min" if ran else ""
            with runner.claim(p.cid) as mine:
                if not mine:
                    runner.log(f"{tag}: running in another process, skipped")
                    continue
                if not runner.force and p.cid in set(results.read(runner.metrics_path)["cell_id"]):
                    runner.log(f"{tag}: done by another process")
                    continue
                runner.log(f"{tag}{eta}")
                start = time.perf_counter()
                runner.attempt_cell(p.cell, p.cid)
            spent += time.perf_counter() - start
            ran += 1
        if not runner.world.main:
            return pd.DataFrame()
        runner.write_reports()
        return results.read(runner.metrics_path)
