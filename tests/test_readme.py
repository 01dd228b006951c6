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


def test_the_gaq_ablation_section_states_gaqs_gain_with_its_sign(tmp_path):
    # GAQ 0.5 dB closer to FP than uniform ω on every image of every seed (a little noise
    # per seed), equal to no L_GM: the section must say +0.5 (GAQ better), bold, and ~0
    import pandas as pd

    rows = []
    for seed, jitter in enumerate((0.0, 0.02, -0.02)):
        for image in range(4):
            for method, v in (("gaq", 30.5 + jitter), ("gaq-uniform", 30.0),
                              ("gaq-mse", 30.5 + jitter)):
                rows.append({"model": "digits", "bits": "W4A8", "seed": seed, "image": image,
                             "cell_id": f"{method}{seed}", "method": method, "metric": "psnr",
                             "value": v + 0.001 * image})
    (tmp_path / "results" / "w4a8-full").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "results" / "w4a8-full" / "per_image.parquet")
    text = readme.render("gaq-ablations", tmp_path / "results")
    line = next(x for x in text.splitlines() if x.startswith("| w4a8-full |"))
    assert "3 × 4" in line
    assert "vs GAQ (uniform ω) **+0.500**" in line
    assert "vs GAQ (no L_GM) +0.000" in line
