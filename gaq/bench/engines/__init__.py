"""How a benchmark's grid of cells is executed: one engine per file, one registry.

An engine takes a prepared :class:`gaq.bench.runner.Runner` (preflight passed, the sweep's
MLflow parent run open) and the cells :func:`plan` says are left to run, and runs them.
``local`` runs them one after another in this process; ``ray`` as one Ray task per cell.
Another package adds an engine (a Slurm or submitit one, say) as one
:class:`~gaq.bench.engines.base.Engine` subclass, registered through the ``gaq.engines``
entry-point group; ``gaq bench --engine NAME`` and ``[setup] engine`` then name it.
"""

from __future__ import annotations

from gaq.registry import Registry

__all__ = ["ENGINES", "EngineRegistry", "get_engine"]

BUILTIN_ENGINES: dict[str, str] = {
    "local": "gaq.bench.engines.local:LocalEngine",
    "ray": "gaq.bench.engines.ray_tasks:RayEngine",
}


class EngineRegistry(Registry):
    kind = "engine"
    base = "gaq.bench.engines.base:Engine"

    def __init__(self, builtins: dict[str, str] | None = None,
                 entry_point_group: str | None = "gaq.engines") -> None:
        super().__init__(builtins, entry_point_group)


ENGINES = EngineRegistry(BUILTIN_ENGINES)


def get_engine(name: str):
    """The engine registered as ``name`` (an instance); unknown names suggest close ones."""
    return ENGINES.get(name)()
