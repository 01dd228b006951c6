"""Published numbers (``published.toml``) as reference rows for the result tables.

Kept as package data rather than code so a number and its source are reviewed together,
and so adding one is a data change.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import pandas as pd

from gaq.config import loads_toml

__all__ = ["COLUMNS", "FP_BITS", "model_keys", "published", "published_rows", "short_source"]

FP_BITS = "FP"

COLUMNS = (
    "method", "model_key", "dataset", "model", "sampler", "bits", "metric", "value",
    "kind", "variant", "source", "note",
)  # fmt: skip

_REQUIRED = ("method", "model_key", "bits", "values", "source")


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, Any]:
    text = resources.files("gaq.bench").joinpath("published.toml").read_text(encoding="utf-8")
    return loads_toml(text)


def published() -> pd.DataFrame:
    """Every published number, one row per metric, in file order."""
    data = _load()
    settings = data.get("settings", {})
    rows = []
    for i, entry in enumerate(data.get("result", [])):
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:  # a packaging-time mistake: fail loudly, naming the entry
            raise ValueError(f"published.toml result #{i + 1} lacks {', '.join(missing)}")
        key = entry["model_key"]
        if key not in settings:
            raise ValueError(f"published.toml result #{i + 1}: unknown model_key {key!r}")
        for metric, value in entry["values"].items():
            rows.append({
                "method": entry["method"],
                "model_key": key,
                "dataset": settings[key].get("dataset", ""),
                "model": settings[key].get("model", ""),
                "sampler": settings[key].get("sampler", ""),
                "bits": entry["bits"],
                "metric": metric,
                "value": float(value),
                "kind": entry.get("kind", "paper"),
                "variant": entry.get("variant", ""),
                "source": entry["source"],
                "note": entry.get("note", ""),
            })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def model_keys() -> list[str]:
    """The settings published numbers exist for (what a benchmark's ``model_key`` may name)."""
    return sorted(_load().get("settings", {}))


def published_rows(
    model_key: str, bits: str | None = None, *, ablations: bool = False
) -> pd.DataFrame:
    """Published numbers for exactly this setting (e.g. ``"cifar10-ddim100"``).

    With ``bits``, rows at that bit-width plus the full-precision rows, which are the
    reference of every bit-width. Ablation variants are left out unless asked for.
    """
    df = published()
    df = df[df["model_key"] == model_key]
    if bits is not None:
        df = df[(df["bits"] == bits) | (df["bits"] == FP_BITS)]
    if not ablations:
        df = df[df["variant"] == ""]
    return df.reset_index(drop=True)


def short_source(source: str, kind: str = "paper") -> str:
    """A table label for a source: "GAQ paper", "Q-Diffusion paper", "re-run"."""
    if kind == "rerun":
        return "re-run"
    return f"{source.split(' (', 1)[0].strip()} paper"
