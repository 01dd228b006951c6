"""What every engine shares: the plan of cells left to run, and the interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from gaq.bench.runner import Cell, Runner

__all__ = ["Engine", "Planned", "plan"]


@dataclass(frozen=True)
class Planned:
    """A cell to run: its position in the grid (for the log), the cell and its id."""

    index: int
    cell: Cell
    cid: str


def plan(runner: Runner) -> tuple[list[Cell], list[Planned]]:
    """The grid and the cells of it left to run: every cell the benchmark defines for its
    model, less those already done (or failed, unless retried) in the results folder,
    each skip logged once with its reason. The same for every engine."""
    from gaq.bench.runner import cells, skip_reason

    grid = cells(runner.bench)
    done, failed = runner.earlier()
    todo = []
    for i, cell in enumerate(grid):
        if runner.left_out(cell):
            continue
        cid = runner.cell_id(cell)
        skip = skip_reason(cid, done, failed)
        if skip:
            runner.log(f"[{i + 1}/{len(grid)}] {cell.label}: {skip}")
        else:
            todo.append(Planned(i, cell, cid))
    return grid, todo


class Engine:
    """Runs a benchmark's grid. Subclasses set ``name`` and implement :meth:`run`."""

    name = ""

    def run(self, runner: Runner, *, threads: int | None = None,
            address: str | None = None) -> pd.DataFrame:
        """Preflight, open the sweep, run what :func:`plan` leaves, write the reports;
        returns the results folder's metrics. ``threads``: intra-op threads per cell;
        ``address``: the cluster to join, for engines that have one."""
        raise NotImplementedError

    def check(self, address: str | None) -> None:
        """Refuse options this engine does not take, before any work."""
        if address:
            from gaq.errors import GaqError

            raise GaqError(f"--address is for --engine ray (an engine with a cluster), "
                           f"not {self.name}")
