"""Every metric the suite knows, in one registry: its kind (what the runner must provide),
its direction, its label and precision in tables and plots, and the function computing it.

The benchmark files' ``eval.metrics``, the runner's dispatch, tables and plots all read
this registry, so a metric of an existing kind is one new file: a :class:`Metric` and its
function, registered here or by a package through the ``gaq.metrics`` entry-point group
(the entry point names the :class:`Metric` object) in the one plug-in registry
(:class:`gaq.registry.Registry`). The kinds are fixed because each needs
different inputs from the runner (:data:`KINDS`).

Imports nothing heavy: computing functions are ``"module:function"`` targets, imported
when a cell first computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gaq.errors import GaqError
from gaq.registry import Registry, UnknownPluginError, import_target

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "METRICS",
    "Metric",
    "MetricRegistry",
    "UnknownMetricError",
    "get_metric",
    "known_metrics",
    "metrics_of_kind",
    "register_metric",
    "requestable",
]

ENTRY_POINT_GROUP = "gaq.metrics"

Kind = Literal["image", "paired", "classes", "curve", "cost"]

#: What the runner hands each kind's function, and when it runs it.
KINDS: dict[str, str] = {
    "image": "distribution of the generated images against the model's reference set in a "
             "feature space: f(images_uint8, reference_features, space, keys, seed=) -> dict",
    "paired": "per image against the FP model's images from the same noise: "
              "f(images, fp_images) -> dict (``<name>_per_image`` kept for paired tests)",
    "classes": "class-conditional models with a classifier of their classes: the share of "
               "samples read as the requested class",
    "curve": "per sampler timestep against FP on held-out FP trajectories; the cell's value "
             "is the curve's mean",
    "cost": "measured for every cell (time, memory, size); not requested in eval.metrics",
}


@dataclass(frozen=True)
class Metric:
    """One metric. ``better`` is "lower", "higher" or None (no best to mark); ``table``
    makes it a column of the paper tables (registry order); ``compute`` is the
    ``"module:function"`` that computes it (one call serves every requested metric of its
    kind that names the same function, as torch-fidelity computes FID and KID together)."""

    name: str
    kind: Kind
    label: str
    better: Literal["lower", "higher"] | None = None
    decimals: int = 2
    unit: str = ""
    table: bool = False
    compute: str | None = None
    #: the y-axis label of its per-timestep figure (curve metrics)
    curve_label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r}: kind must be one of "
                             f"{', '.join(KINDS)}, got {self.kind!r}")
        if self.better not in (None, "lower", "higher"):
            raise ValueError(f"metric {self.name!r}: better must be 'lower', 'higher' or "
                             f"None, got {self.better!r}")

    @property
    def arrow(self) -> str:
        return {"lower": "↓", "higher": "↑"}.get(self.better or "", "")

    def function(self) -> Callable[..., dict[str, Any]]:
        if self.compute is None:
            raise GaqError(f"metric {self.name!r} is measured by the runner, not computed")
        return import_target(self.compute)


_IMAGE = "gaq.eval.metrics:image_metrics"
_PAIRED = "gaq.eval.metrics:paired_metrics"

# Table columns follow this order (FID first, as the papers print them).
_BUILTIN: tuple[Metric, ...] = (
    Metric("fid", "image", "FID", "lower", table=True, compute=_IMAGE),
    Metric("sfid", "image", "sFID", "lower", table=True, compute=_IMAGE),
    Metric("is", "image", "IS", "higher", table=True, compute=_IMAGE),
    Metric("precision", "image", "Prec.", "higher", 3, table=True, compute=_IMAGE),
    Metric("recall", "image", "Rec.", "higher", 3, table=True, compute=_IMAGE),
    Metric("kid", "image", "KID", "lower", 4, unit="raw MMD²", table=True, compute=_IMAGE),
    Metric("psnr", "paired", "PSNR", "higher", unit="dB", table=True, compute=_PAIRED),
    Metric("class_acc", "classes", "Class acc.", "higher", 3, table=True),
    Metric("eps_mse", "curve", "ε-MSE", "lower", 4,
           curve_label="noise-prediction MSE ↓"),
    Metric("calibration_seconds", "cost", "Calib. time (s)", "lower"),
    Metric("calibration_gpu_hours", "cost", "Calib. (GPU-h)", "lower"),
    Metric("peak_memory_mb", "cost", "Peak memory (MB)", "lower"),
    Metric("model_size_mb", "cost", "Model size (MB)", "lower"),
    Metric("images_per_second", "cost", "Images/s", "higher"),
)

class UnknownMetricError(UnknownPluginError):
    """A metric name nothing registered; the message suggests close names."""

    kind = "metric"


class MetricRegistry(Registry):
    """Name -> :class:`Metric` (``gaq.metrics`` entry points, each naming a Metric object
    under the metric's own name); listed in registration order, built-ins first in their
    table order."""

    kind = "metric"
    base = "gaq.eval.registry:Metric"
    instances = True
    known_in_order = True
    unknown = UnknownMetricError

    def __init__(self, builtins: Iterable[Metric] = (),
                 entry_point_group: str | None = ENTRY_POINT_GROUP) -> None:
        super().__init__({m.name: m for m in builtins}, entry_point_group)


METRICS = MetricRegistry(_BUILTIN)


def register_metric(metric: Metric) -> Metric:
    """Add ``metric``; registering the same spec again is a no-op, another under a taken
    name is refused."""
    if metric.name in METRICS:
        if find_metric(metric.name) != metric:
            raise GaqError(f"metric {metric.name!r} is already registered differently")
        return metric
    METRICS.register(metric.name, metric)
    return metric


def known_metrics() -> list[Metric]:
    """Every registered metric, built-in ones first in their table order (a plugin metric
    that cannot be imported is warned about and left out)."""
    return METRICS.loaded()


def requestable() -> list[str]:
    """Names a benchmark may list in ``eval.metrics`` (every kind but cost)."""
    return [m.name for m in known_metrics() if m.kind != "cost"]


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def find_metric(name: str) -> Metric | None:
    """The registered metric ``name``, or None (derived rows such as ``kid_std``)."""
    return METRICS.get(name) if name in METRICS else None


def metrics_of_kind(names: Iterable[str], kind: str) -> list[str]:
    """The names among ``names`` whose metric is of ``kind``, in the given order."""
    return [n for n in names if (m := find_metric(n)) is not None and m.kind == kind]


def by_function(names: Iterable[str]) -> list[tuple[Callable[..., dict[str, Any]], list[str]]]:
    """``names`` grouped by the function computing them, each function once, in order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(get_metric(n).compute or "", []).append(n)
    return [(get_metric(keys[0]).function(), keys) for keys in groups.values()]


def compute_grouped(names: Iterable[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call each distinct function of ``names`` once with the names it serves (``keys``,
    after ``args``) and merge what they return (image metrics: one torch-fidelity pass)."""
    out: dict[str, Any] = {}
    for fn, keys in by_function(names):
        out.update(fn(*args, keys, **kwargs))
    return out
