"""README sections that quote results are generated from results/ and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gaq import readme
from gaq.errors import GaqError

ROOT = Path(__file__).resolve().parents[1]


def test_the_readmes_generated_sections_are_what_results_give(monkeypatch):
    monkeypatch.chdir(ROOT)  # sections name their sources relative to the repository
    text = Path("README.md").read_text(encoding="utf-8")
    assert "<!-- gen:" in text
    assert readme.check(text, Path("results")) == []


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    (results / "protocol").mkdir(parents=True)
    (results / "protocol" / "w4a8_rerun.json").write_text(json.dumps({
        "verdict": "REPRODUCED: 3 values: 3 identical", "wall_seconds": 418.2,
        "date": "2026-01-01", "machine": "cpu", "setup": {"engine": "ray", "threads": 1},
        "cells": 3, "computed_cells": 3}))
    return results


def test_a_number_typed_into_a_generated_section_fails_the_check(tmp_path):
    results = _results(tmp_path)
    text = "intro\n<!-- gen:w4a8-rerun -->\nold\n<!-- /gen:w4a8-rerun -->\nend\n"
    fresh = readme.update(text, results)
    assert "**6 min 58 s**" in fresh and "REPRODUCED: 3 values" in fresh
    assert readme.check(fresh, results) == []
    typed = fresh.replace("6 min 58 s", "7 min")
    (problem,) = readme.check(typed, results)
    assert "gen:w4a8-rerun" in problem and "7 min" in problem
    assert fresh.startswith("intro\n") and fresh.endswith("end\n")  # the rest untouched


def test_a_section_without_a_source_fails(tmp_path):
    results = _results(tmp_path)
    with pytest.raises(GaqError, match="no generator"):
        readme.check("<!-- gen:nothing -->\n1\n<!-- /gen:nothing -->\n", results)
    with pytest.raises(GaqError, match="tolerance.json"):
        readme.check("<!-- gen:w4a8-tolerance -->\n1\n<!-- /gen:w4a8-tolerance -->\n",
                     results)
