"""Display names and orderings shared by tables and plots, so both read the same: methods' from
the methods, metrics' from the metric registry (:mod:`gaq.eval.registry`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gaq.methods.base import RowStyle

__all__ = [
    "FP_METHODS",
    "arrow",
    "better",
    "bits_order",
    "decimals",
    "declared_color",
    "feature_space_label",
    "in_feature_space",
    "is_fp",
    "method_label",
    "method_order",
    "metric_label",
    "metric_unit",
    "row_style",
    "short_label",
    "table_metrics",
]

FP_METHODS = frozenset({"fp", "fp32", "fp16", "full_precision"})

# Rows that are not registered methods: FP and the methods of published tables that the
# suite does not implement. A registered method's label is its class's ``label`` (plugins
# included), a variant row's the one its method declares (``Method.rows``).
_ROW_LABELS = {"fp": "FP", "ptq4dm": "PTQ4DM"}
# ablations first, the full method last, as the paper's ablation tables list them
_GAQ_ORDER = ("gaq-uniform", "gaq-timestep", "gaq-mse", "gaq")
# Baselines roughly by publication date, as papers list them; unknown methods sort after
# them alphabetically, and GAQ variants come last (the method under study, as in the paper).
_KNOWN_ORDER = ("brecq", "ptq4dm", "qdiffusion", "ptqd", "tdq", "apqdm", "tfmq", "htg")

_BITS_RE = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


def is_fp(method: str) -> bool:
    return method.lower() in FP_METHODS


def method_label(method: str) -> str:
    """A row's display name: the label its method declares, else the row name itself."""
    m = method.lower()
    if m in _ROW_LABELS:
        return _ROW_LABELS[m]
    style = row_style(m)
    if style is not None:
        return style.label
    return _declared_label(m) or method


def short_label(method: str) -> str:
    """A row's name in a narrow table: the short form its method (``Method.short``) or
    variant (``RowStyle.short``) declares, else :func:`method_label`."""
    style = row_style(method)
    cls = _method_class(method.lower())
    declared = None if cls is None else cls.__dict__.get("short")
    return declared or (style and style.short) or method_label(method)


def _method_class(name: str) -> type | None:
    from gaq.errors import GaqError
    from gaq.registry import get_method

    try:
        return get_method(name)
    except GaqError:  # not a method (a row name), or a plugin that cannot be loaded here
        return None


def row_style(row: str) -> RowStyle | None:
    """How a variant row shows, as its method declares it (``Method.rows``; the method is
    the row name up to its first dash), or None for any other row."""
    m = row.lower()
    cls = _method_class(m.split("-", 1)[0]) if "-" in m else None
    return None if cls is None else cls.__dict__.get("rows", {}).get(m)


def declared_color(row: str) -> str | tuple[float, float, float] | None:
    """The colour declared for ``row``: its variant style's, else its method's own
    (``Method.color``), else None."""
    style = row_style(row)
    if style is not None:
        return style.color
    cls = _method_class(row.lower())
    return None if cls is None else cls.__dict__.get("color")


def _declared_label(name: str) -> str | None:
    cls = _method_class(name)
    return None if cls is None else cls.label


def _method_key(method: str) -> tuple[int, str]:
    m = method.lower()
    if m in FP_METHODS:
        return (0, m)
    if m == "rtn":
        return (1, m)
    if m in _KNOWN_ORDER:
        return (2 + _KNOWN_ORDER.index(m), m)
    base = m.split("-", 1)[0]
    if base in _KNOWN_ORDER:  # a variant row of a baseline ("ptqd-base") sorts beside it
        return (2 + _KNOWN_ORDER.index(base), m)
    if m in _GAQ_ORDER:
        return (100 + _GAQ_ORDER.index(m), m)
    if m.startswith(("gaq-", "gaq_")):
        return (99, m)
    return (50, m)


def method_order(methods: Iterable[str]) -> list[str]:
    """FP first, then RTN, baselines, other methods, GAQ last; stable across runs."""
    return sorted(set(methods), key=_method_key)


def bits_order(bits: Iterable[str]) -> list[str]:
    """Higher precision first (W8A8, W4A32, W4A8...), FP before all, unparsable labels last."""

    def key(label: str) -> tuple[int, int, int, str]:
        m = _BITS_RE.match(label)
        if label.upper() == "FP":
            return (0, 0, 0, label)
        if m is None:
            return (2, 0, 0, label)
        return (1, -int(m.group(1)), -int(m.group(2)), label)

    return sorted(set(bits), key=key)


def _metric(name: str):
    from gaq.eval.registry import find_metric

    return find_metric(name)


def table_metrics() -> list[str]:
    """Metrics of the paper tables, in column order (the metric registry's)."""
    from gaq.eval.registry import known_metrics

    return [m.name for m in known_metrics() if m.table]


def better(metric: str) -> str | None:
    """"lower", "higher", or None for a metric with no best (or not registered)."""
    m = _metric(metric)
    return None if m is None else m.better


def arrow(metric: str) -> str:
    m = _metric(metric)
    return "" if m is None else m.arrow


def metric_label(metric: str) -> str:
    m = _metric(metric)
    return metric if m is None else m.label


def metric_unit(metric: str) -> str:
    m = _metric(metric)
    return "" if m is None else m.unit


def decimals(metric: str) -> int:
    m = _metric(metric)
    return 2 if m is None else m.decimals


def in_feature_space(metric: str) -> bool:
    """Whether ``metric`` is computed in a feature space (FID, KID, precision, recall...): a
    figure or caption showing it names the space, since the numbers mean nothing without."""
    m = _metric(metric)
    return m is not None and m.kind == "image"


# How figures and captions name the feature spaces of ``gaq.eval.features``.
_SPACE_LABELS = {"classifier": "digit-classifier features", "inception": "Inception features"}


def feature_space_label(model: str, setting: str = "auto") -> str:
    """The space ``model``'s image metrics were computed in, as a reader should see it:
    the benchmark file's ``eval.feature_space``, or with "auto" the model's scoring entry
    (the bundled digit classifier for the bundled models, Inception for any other), which
    is how the runner chose it."""
    from gaq.models.bundled import scoring_for

    space = scoring_for(model).feature_space if setting == "auto" else setting
    return _SPACE_LABELS.get(space, f"{space} features")
