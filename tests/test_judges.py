"""The independent digit judge (an RBF SVC on scikit-learn's 8x8 digits) and `gaq judge`:
the SVC is accurate on real held-out digits, keeps that accuracy on real digits passed
through the suite's 16x16 preprocessing and back, its results file round-trips, a tiny run
writes every field, and the committed run agrees with the bundled quality figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gaq.data import load_digits, train_test_split_digits
from gaq.errors import GaqError
from gaq.eval.judges import (
    FORMAT,
    read_judges,
    real_digit_scores,
    svc_scores,
    to_svc_scale,
    train_svc_judge,
    write_judges,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RESULTS = Path(__file__).parents[1] / "results" / "bundled"


@pytest.mark.slow
def test_svc_is_accurate_on_real_heldout_digits():
    judge = train_svc_judge()
    assert judge.heldout_accuracy > 0.95
    # the same held-out digits as the bundled classifier's: neither judge was trained on them
    digits = load_digits()
    _, test = train_test_split_digits(digits)
    held = torch.from_numpy(judge.heldout_idx)
    assert torch.equal(digits.images[held], test.images)
    assert torch.equal(digits.labels[held], test.labels)
    assert not set(judge.train_idx.tolist()) & set(judge.heldout_idx.tolist())
    assert len(judge.heldout_idx) == len(test.labels) == 360


def test_real_digits_keep_accuracy_through_the_16x16_mapping():
    real = real_digit_scores()
    native, trip = real["svc"]["real_heldout"], real["svc"]["real_heldout_round_trip"]
    assert native["class_accuracy"] > 0.95
    assert trip["class_accuracy"] > 0.95
    assert trip["class_accuracy"] >= native["class_accuracy"] - 0.01
    # both judges score real digits digit-like far more often than not
    assert real["bundled"]["real_heldout"]["digit_like"] > 0.95
    assert trip["digit_like"] > 0.8


def test_mapping_scale_and_noise():
    # a flat image stays flat at its grey level; [-1, 1] maps onto the 0..16 grey levels
    flat = torch.full((2, 1, 16, 16), 0.5)
    flat[1] = -1.0
    x = to_svc_scale(flat)
    assert x.shape == (2, 64)
    assert np.allclose(x[0], 12.0) and np.allclose(x[1], 0.0)
    # pure noise is neither a digit to the SVC nor mapped outside its grey levels
    noise = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    feats = to_svc_scale(noise)
    assert feats.min() >= 0.0 and feats.max() <= 16.0
    assert svc_scores(feats)["digit_like"] < 0.2


def _result() -> dict:
    scores = {"digit_like": 0.5, "mean_top_prob": 0.75, "digit_like_vs_real": 0.55}
    real = {"n": 360, "digit_like": 0.9, "mean_top_prob": 0.93, "class_accuracy": 0.98}
    return {
        "format": FORMAT,
        "settings": {"num_images": 4, "steps": 2, "sampler": "ddim", "guidance": 3.0,
                     "seed": 0, "digit_like_threshold": 0.8, "sampling": "test"},
        "judges": {
            "bundled": {"what": "cnn", "real_heldout": real},
            "svc": {"what": "svc",
                    "training": {"split": {"train": 1437, "test_fraction": 0.2,
                                           "random_state": 0},
                                 "heldout_accuracy": 0.986},
                    "real_heldout": real, "real_heldout_round_trip": real},
        },
        "samples": {"m": {"guided": {"bundled": {**scores, "class_accuracy": 1.0},
                                     "svc": {**scores, "class_accuracy": 0.9}},
                          "unconditional": {"bundled": scores, "svc": scores}}},
        "wall_s": 1.0,
    }


def test_writer_and_reader_round_trip(tmp_path):
    result = _result()
    js, md = write_judges(result, tmp_path / "sub" / "judges.json")
    assert md == tmp_path / "sub" / "judges.md"
    assert read_judges(js) == result
    table = md.read_text()
    assert "| m | guided | 0.500 | 0.550 | 1.000 | 0.500 | 0.550 | 0.900 |" in table
    assert "| m | unconditional | 0.500 | 0.550 | – | 0.500 | 0.550 | – |" in table
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(GaqError, match="gaq-judges"):
        read_judges(other)


def _check_fields(result: dict, models: tuple[str, ...]) -> None:
    assert result["format"] == FORMAT
    svc = result["judges"]["svc"]
    assert svc["training"]["heldout_accuracy"] > 0.95
    assert svc["training"]["split"]["train"] + svc["training"]["split"]["heldout"] == 1797
    for judge in ("bundled", "svc"):
        assert {"digit_like", "class_accuracy"} <= set(result["judges"][judge]["real_heldout"])
    assert set(result["samples"]) == set(models)
    for model, modes in result["samples"].items():
        expected = {"unconditional"} if model == "digits" else {
            "guided", "conditional", "unconditional"}
        assert set(modes) == expected
        for mode, by in modes.items():
            for judge in ("bundled", "svc"):
                s = by[judge]
                assert 0.0 <= s["digit_like"] <= 1.0 and "digit_like_vs_real" in s
                assert ("class_accuracy" in s) == (mode != "unconditional")


def test_tiny_run_writes_every_field(tmp_path):
    from gaq.cli import main

    out = tmp_path / "judges.json"
    assert main(["judge", "--num", "10", "--steps", "2", "--out", str(out)]) == 0
    result = read_judges(out)
    _check_fields(result, ("digits", "digits-ldm", "digits-dit"))
    assert result["settings"]["num_images"] == 10
    assert "| digits-dit | guided |" in out.with_suffix(".md").read_text()


def test_unknown_model_is_refused(tmp_path):
    from gaq.cli import main

    assert main(["judge", "--models", "nope", "--out", str(tmp_path / "j.json")]) == 2
    assert not (tmp_path / "j.json").exists()


def test_committed_run_matches_the_bundled_quality_figures():
    """The committed run samples exactly as the quality figures do: the bundled classifier's
    scores in it are the ones in ``<model>_quality.json``."""
    result = read_judges(RESULTS / "judges.json")
    _check_fields(result, ("digits", "digits-ldm", "digits-dit"))
    assert result["settings"]["num_images"] == 500 and result["settings"]["steps"] == 50
    for name in ("digits-ldm", "digits-dit"):
        quality = json.loads((RESULTS / f"{name}_quality.json").read_text())
        for mode, by in result["samples"][name].items():
            assert by["bundled"]["digit_like"] == quality[f"{mode}_confident_share"]
            if mode != "unconditional":
                assert by["bundled"]["class_accuracy"] == quality[f"{mode}_class_accuracy"]
