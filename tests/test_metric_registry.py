"""The metric registry: benchmark files, the runner's dispatch, tables and plots all read
it, so a new metric of an existing kind is one file (a Metric and its function)."""

from __future__ import annotations

import pytest
import torch

from gaq.bench import labels
from gaq.bench.runner import Runner
from gaq.bench.spec import EvalSpec
from gaq.config import ConfigError
from gaq.eval import registry
from gaq.eval.registry import Metric, compute_grouped, get_metric, register_metric

CALLS: list[tuple[str, ...]] = []


def max_abs_error(images: torch.Tensor, fp_images: torch.Tensor) -> dict:
    """A paired metric as a plugin would write it: the largest per-image pixel error."""
    per_image = (images.float() - fp_images.float()).abs().flatten(1).amax(1)
    return {"max_err": float(per_image.mean()), "max_err_per_image": per_image.numpy()}


def two_numbers(gen, reference, space, keys, seed=0) -> dict:
    CALLS.append(tuple(keys))
    return {k: float(len(k)) for k in keys}


@pytest.fixture
def plugin_metrics(monkeypatch):
    """Registers two metrics in the global registry for one test, then removes them."""
    monkeypatch.setattr(registry, "METRICS", registry.MetricRegistry(registry.known_metrics()))
    CALLS.clear()
    register_metric(Metric("max_err", "paired", "Max. error", "lower", 3,
                           compute=f"{__name__}:max_abs_error"))
    for name in ("alpha", "beta"):
        register_metric(Metric(name, "image", name.title(), "higher",
                               compute=f"{__name__}:two_numbers"))


def test_unknown_metric_in_a_benchmark_file_suggests_the_close_name():
    with pytest.raises(ConfigError) as err:
        EvalSpec(metrics=("fdi", "psnr"))
    msg = str(err.value)
    assert "unknown metric 'fdi'" in msg and "did you mean 'fid'" in msg and "\n" not in msg


def test_a_cost_metric_cannot_be_requested():
    with pytest.raises(ConfigError, match="every cell measures"):
        EvalSpec(metrics=("fid", "calibration_seconds"))


def test_table_columns_and_directions_come_from_the_registry():
    assert labels.table_metrics() == ["fid", "sfid", "is", "precision", "recall", "kid",
                                      "psnr", "class_acc"]
    assert labels.arrow("fid") == "↓" and labels.arrow("psnr") == "↑"
    assert labels.arrow("kid_std") == "" and labels.metric_label("kid_std") == "kid_std"
    assert labels.metric_unit("kid") == "raw MMD²" and labels.decimals("eps_mse") == 4
    assert get_metric("eps_mse").kind == "curve"


def test_a_plugin_metric_is_requestable_labelled_and_computed(plugin_metrics):
    assert EvalSpec(metrics=("max_err", "psnr")).metrics == ("max_err", "psnr")
    assert labels.metric_label("max_err") == "Max. error" and labels.arrow("max_err") == "↓"
    assert labels.decimals("max_err") == 3
    images = torch.zeros(3, 1, 4, 4)
    fp = images.clone()
    fp[1, 0, 0, 0] = 0.5
    metrics: dict[str, float] = {}
    rows = Runner._paired(["max_err", "psnr"], images, fp, metrics)
    assert metrics["max_err"] == pytest.approx(0.5 / 3)
    assert "psnr" in metrics  # the built-in paired function ran too, once
    per = rows[rows["metric"] == "max_err"]["value"].tolist()
    assert per == pytest.approx([0.0, 0.5, 0.0])
    assert sorted(rows["metric"].unique()) == ["max_err", "psnr"]


def test_metrics_sharing_a_function_are_computed_in_one_call(plugin_metrics):
    out = compute_grouped(["alpha", "beta"], None, None, None, seed=0)
    assert out == {"alpha": 5.0, "beta": 4.0}
    assert CALLS == [("alpha", "beta")]


def test_a_taken_name_is_refused(plugin_metrics):
    with pytest.raises(Exception, match="already registered"):
        register_metric(Metric("fid", "image", "Other FID", "lower"))


def test_how_a_model_is_scored_belongs_to_its_entry(monkeypatch):
    from gaq.errors import GaqError
    from gaq.eval import features, metrics
    from gaq.models import bundled

    assert bundled.scoring_for("digits-dit").feature_space == "classifier"
    other = bundled.scoring_for("org/some-hub-model")
    assert other.feature_space == "inception" and other.reference is None
    with pytest.raises(GaqError, match="eval.reference"):
        metrics.reference_images("org/some-hub-model")
    # an entry, not a name test, decides: a model scored like the digits gets their space
    monkeypatch.setitem(bundled.SCORING, "my-digits-model", bundled.SCORING["digits"])
    assert isinstance(features.feature_space_for("my-digits-model", device="cpu"),
                      features.ClassifierFeatures)
    assert len(metrics.reference_images("my-digits-model")) == 1797


def test_the_noise_floor_scores_a_plugin_image_metric(plugin_metrics):
    """The reference's noise floor scores FP at more seeds through the same dispatch as a
    cell; it used to call the built-in image function, which named a plugin's metric
    unknown."""
    from types import SimpleNamespace

    from gaq.bench.reproduce import noise_floor

    ctx = SimpleNamespace(pipe=SimpleNamespace(denoiser=None), judges_classes=False,
                          reference=lambda: None, space=None)
    runner = SimpleNamespace(
        bench=SimpleNamespace(models=["m"], eval=SimpleNamespace(metrics=("alpha", "beta"))),
        model=lambda model_id: ctx,
        _sample=lambda ctx, denoiser, seed, hook: (torch.zeros(2, 1, 4, 4), None))
    floor = noise_floor(runner, [5, 6])
    assert sorted(floor["metric"]) == ["alpha", "beta"]
    assert floor["n"].tolist() == [2, 2] and floor["sd"].tolist() == [0.0, 0.0]
    assert CALLS == [("alpha", "beta")] * 2
