"""Helpers for tests that run benchmarks: their stores kept inside a test's folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


def isolate_stores(mp: pytest.MonkeyPatch, root: Path) -> dict[str, str]:
    """Point the MLflow store, the calibration cache and the temp folder (cells' state
    folders) under ``root``; returns the environment variables, for subprocesses too."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "GAQ_CACHE": str(root / "cache")}
    for key, value in env.items():
        mp.setenv(key, value)
    mp.setattr(tempfile, "tempdir", str(root))
    return env
