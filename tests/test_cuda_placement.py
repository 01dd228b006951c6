"""Every method runs where its model runs: the CUDA placement checks, without a GPU.

Each cell goes through the pipeline users run (``gaq.cell``: record the calibration set,
quantize, save; then restore and sample) with :class:`strict_device.OwnTensorsOn`: every
tensor the project creates without naming a device lands on ``meta``, so any tensor that
would stay on the CPU beside a CUDA model breaks the cell here as it would on a GPU.
After quantizing and after restoring, every parameter and buffer must sit on the weights'
device. The grid is every registered method x the three bundled families x the three
samplers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from strict_device import OwnTensorsOn, misplaced

from gaq.calibration import CalibrationSpec
from gaq.cell import quantize_pipeline, restore, save_quantized
from gaq.config import QuantConfig
from gaq.models.adapters import adapter_for
from gaq.models.loading import load_model
from gaq.registry import get_method
from gaq.sampling import SamplerConfig, sample_batch

FAMILIES = ("digits", "digits-ldm", "digits-dit")
SAMPLERS = ("ddim", "plms", "dpm-solver++")


@pytest.fixture(scope="module")
def entries():
    from gaq.state_size import smallest_budget_entries

    return smallest_budget_entries()


@pytest.fixture(scope="module")
def calib_cache(tmp_path_factory):
    """One calibration disk cache for the grid: each (family, sampler) set is recorded
    once, under the strict rule, and read back by the other methods' cells."""
    return tmp_path_factory.mktemp("calib-cache")


@pytest.fixture(scope="module")
def pipes():
    return {f: load_model(f) for f in FAMILIES}


def _spec(family: str, sampler: str) -> CalibrationSpec:
    guidance = None if family == "digits" else 3.0
    return CalibrationSpec(steps=4, interval=2, samples_per_step=2, holdout_per_step=1,
                           sampler_name=sampler, guidance=guidance, act_every_step=True)


def test_the_strict_mode_sends_only_the_projects_tensors_to_meta():
    """The tool itself: a tensor the project creates without a device lands on meta and
    breaks the first operation that mixes it with real tensors; one created here (not
    the project's code) or with a device stays where it was asked to be."""
    from gaq.quant.quantizer import FakeQuantizer

    with OwnTensorsOn() as mode:
        mine = torch.ones(3)
        assert mine.device.type == "cpu" and mode.redirected == 0
        loose = FakeQuantizer(4)
        assert loose.scale.device.type == "meta" and mode.redirected > 0
        with pytest.raises(RuntimeError, match="device"):
            torch.ones(2, 3) * loose.scale
        placed = FakeQuantizer(4, device="cpu")
        assert not misplaced(torch.nn.Sequential(torch.nn.Linear(1, 1), placed))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "brecq", "qdiffusion", "tfmq", "tdq", "ptqd",
                                    "apqdm", "htg", "dynamic", "gaq", "gaq-uniform",
                                    "gaq-mse", "gaq-timestep"])
def test_every_method_quantizes_samples_and_restores_on_the_models_device(
        method, family, sampler, entries, pipes, calib_cache, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("GAQ_CACHE", str(calib_cache))
    pipe = pipes[family]
    cls = get_method(method)
    why = cls.unsupported(adapter_for(pipe.denoiser).arch)
    if why:
        pytest.skip(why)
    spec = _spec(family, sampler)
    quant = QuantConfig.from_bits("W4A8")
    fp = copy.deepcopy(pipe.denoiser)
    with OwnTensorsOn():
        result = quantize_pipeline(pipe, cls(entries[method].config()), quant, spec,
                                   model_id=family)
        assert not misplaced(result.model)
        run = SamplerConfig(steps=4, name=sampler, guidance=spec.guidance)
        kw = {"seed": 0, "sampler": run}
        before = sample_batch(pipe, [0, 1], hook=result.sampler_hook, denoiser=result.model,
                              **kw)
        save_quantized(result, tmp_path / "state", pipe)
        back = restore(fp, tmp_path / "state")
        assert not misplaced(back.model)
        after = sample_batch(pipe, [0, 1], hook=back.sampler_hook, denoiser=back.model, **kw)
    assert torch.isfinite(before).all()
    assert torch.equal(before, after)


def test_registered_methods_are_all_in_the_grid():
    from gaq.registry import list_methods

    grid = test_every_method_quantizes_samples_and_restores_on_the_models_device
    marks = [m for m in grid.pytestmark if m.name == "parametrize" and m.args[0] == "method"]
    assert set(list_methods()) <= set(marks[0].args[1])


@pytest.fixture(scope="module")
def digits_calib(pipes, tmp_path_factory):
    from gaq.calibration import record_calibration

    spec = CalibrationSpec(steps=2, interval=1, samples_per_step=3)
    return record_calibration(pipes["digits"], spec, cache=False)


def test_reconstruction_batches_bring_their_row_index_to_the_models_device(digits_calib):
    """GAQ's learned per-row weights live on the model's device beside the loss they scale;
    the row index of each reconstruction batch must come along (a model on ``meta`` stands
    in for one on a GPU: an index left on the CPU shows up as a CPU tensor)."""
    from gaq.reconstruction import calib_batches

    batches = list(calib_batches(digits_calib, 4, torch.device("meta"))())
    assert batches
    for x, t, cond, idx in batches:
        assert {x.device.type, t.device.type, idx.device.type} == {"meta"}
        assert all(v.device.type == "meta" for v in cond.values())


def test_sample_weights_stay_on_their_device_when_looked_up():
    """A record read back from the disk cache brings a CPU index: the lookup must not move
    the weights off the model's device (it used to copy them to the index's)."""
    from gaq.reconstruction import _lookup

    weights = torch.ones(6, device="meta")
    picked = _lookup(weights, torch.tensor([0, 2, 5]))
    assert picked.device.type == "meta" and picked.shape == (3,)


def test_class_accuracy_runs_on_the_classifiers_device():
    """The digit classifier scores images where it lives (the GPU in a GPU run): images
    arriving from the CPU are moved to it, not the classifier to them."""
    from gaq.eval.digits import digit_likeness
    from gaq.models.bundled import load_classifier

    clf = load_classifier("cpu")
    images = torch.zeros(3, 1, 16, 16, dtype=torch.float64)  # another dtype, same device
    scores = digit_likeness(images, classifier=clf, labels=torch.tensor([0, 1, 2]))
    assert 0.0 <= scores["class_accuracy"] <= 1.0
    with pytest.raises((RuntimeError, NotImplementedError)):
        digit_likeness(images, classifier=clf.to("meta"))  # really runs on the classifier's


def test_ptqd_places_its_correction_once_per_device():
    """PTQD's per-step mean correction is copied to the prediction's device once per
    timestep, not at every sampler step."""
    from baselines.ptqd.hook import PTQDSamplerHook, StepStats

    stats = [StepStats(t=t, k=0.1, mu=(0.5 + t / 100,), sigma=0.2) for t in (10, 20)]
    hook = PTQDSamplerHook(stats, key={})
    eps = torch.ones(2, 1, 4, 4)
    first = hook.eps(0, 15, eps, eps)
    placed = dict(hook._placed)
    again = hook.eps(1, 15, eps, eps)
    assert torch.equal(first, again) and len(hook._placed) == 1
    assert all(hook._placed[k] is v for k, v in placed.items())  # reused, not re-copied
    # the interpolated correction itself: mu halfway between 0.6 and 0.7, k = 0.1
    assert torch.allclose(first, (eps - 0.65) / 1.1)


SCORED = """
models = ["digits", "digits-ldm", "digits-dit"]
bits = ["W4A8"]

[[methods]]
name = "rtn"

[[methods]]
name = "ptqd"
config = { recon = { weight_iters = 0, act_iters = 0, cache = "memory" } }

[benchmark]
name = "placement-scored"

[sampler]
steps = 4
guidance = 3.0

[calibration]
interval = 2
samples_per_step = 4

[eval]
num_images = 8
batch_size = 8
seeds = [0]
metrics = ["fid", "kid", "precision", "recall", "psnr", "eps_mse", "class_acc"]
heldout_trajectories = 2
"""


@pytest.mark.slow
def test_a_scored_benchmark_cell_runs_under_the_strict_rule(tmp_path, monkeypatch):
    """The runner's half of a cell (held-out trajectories, FP and quantized sampling, the
    feature space, every image and noise metric, class accuracy) under the same rule,
    on the three bundled families through the command line."""
    import pandas as pd

    from gaq.cli import main

    torch.set_num_threads(1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    bench = tmp_path / "scored.toml"
    bench.write_text(SCORED)
    with OwnTensorsOn():
        assert main(["bench", str(bench), "--results", str(tmp_path / "results"),
                     "--engine", "local"]) == 0
    df = pd.read_parquet(tmp_path / "results" / "placement-scored" / "metrics.parquet")
    assert df["cell_id"].nunique() == 9  # FP, RTN and PTQD on each family
    assert {"fid", "psnr", "eps_mse", "class_acc"} <= set(df["metric"])
