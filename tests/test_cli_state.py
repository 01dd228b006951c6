"""A state written by `gaq quantize --out` used from the command line: `gaq sample --state`
samples the restored quantized model, `gaq evaluate --state` scores it against FP through
the benchmark runner's own cell steps, and a folder that is not a state of the model is
refused in one line before anything samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gaq.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 3
STEPS = 4  # the state's calibration sampler: 4 DDIM steps


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """The bundled digits DDPM quantized with RTN at W4A8 on a tiny calibration set (4
    steps, 4 trajectories: seconds), its calibration cache kept in the module's folder."""
    root = tmp_path_factory.mktemp("cli_state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GAQ_CACHE", str(root / "cache"))
        out = root / "state"
        assert main(["quantize", "--method", "rtn", "--bits", "W4A8", "--steps", str(STEPS),
                     "--interval", "2", "--samples-per-step", "4", "--out", str(out)]) == 0
        yield out


@pytest.fixture(autouse=True)
def _cache(state, monkeypatch):
    # held-out trajectories (eps_mse) are recorded into the module's cache, not the user's
    monkeypatch.setenv("GAQ_CACHE", str(state.parent / "cache"))


@pytest.fixture
def sampled(monkeypatch) -> list[torch.Tensor]:
    """The images each `gaq sample` call sampled, before they became a PNG."""
    import gaq.sampling

    calls: list[torch.Tensor] = []
    original = gaq.sampling.sample

    def recording(*args, **kwargs):
        images = original(*args, **kwargs)
        calls.append(images)
        return images

    monkeypatch.setattr(gaq.sampling, "sample", recording)
    return calls


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _restored(state: Path):
    """The independent path: the FP pipeline and the state restored on it in Python."""
    from gaq.cell import restore
    from gaq.models.loading import load_model

    pipe = load_model("digits")
    return pipe, restore(pipe.denoiser, state)


@pytest.mark.slow
def test_the_state_records_its_model_and_weights(state):
    from gaq.calibration import state_dict_digest
    from gaq.cell import WEIGHTS_DIGEST, read_state_meta
    from gaq.models.loading import load_model

    meta = read_state_meta(state)
    assert meta["model"] == "digits" and meta["method"] == "rtn"
    assert meta[WEIGHTS_DIGEST] == state_dict_digest(load_model("digits").denoiser)


@pytest.mark.slow
def test_sample_state_is_the_restored_model_and_not_fp(state, tmp_path, capsys, sampled):
    from torchvision.utils import save_image

    from gaq.sampling import SamplerConfig, sample

    grid = tmp_path / "q.png"
    # no --model, no sampler flags: the state's model and its calibration sampler
    assert main(["sample", "--state", str(state), "--num", "6", "--batch-size", "4",
                 "--seed", str(SEED), "--out", str(grid)]) == 0
    report = _last_json(capsys)
    assert report["model"] == "digits" and report["steps"] == STEPS
    assert (report["state"], report["method"], report["bits"]) == (str(state), "rtn", "W4A8")
    pipe, back = _restored(state)
    expected = sample(pipe, 6, seed=SEED, sampler=SamplerConfig(steps=STEPS), batch_size=4,
                      hook=back.sampler_hook, denoiser=back.model)
    assert torch.equal(sampled[-1], expected)
    # the grid is today's grid of those images
    again = tmp_path / "expected.png"
    save_image((expected + 1) / 2, str(again), nrow=int(6**0.5))
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(again)))

    fp_grid = tmp_path / "fp.png"
    assert main(["sample", "--num", "6", "--batch-size", "4", "--seed", str(SEED),
                 "--steps", str(STEPS), "--out", str(fp_grid)]) == 0
    assert "state" not in _last_json(capsys)
    fp = sampled[-1]
    assert torch.equal(fp, sample(pipe, 6, seed=SEED, sampler=SamplerConfig(steps=STEPS),
                                  batch_size=4))
    assert not torch.equal(fp, expected)
    # same noise: the quantized images stay close to FP's, image by image
    assert (fp - expected).abs().mean() < 0.2


@pytest.mark.slow
def test_evaluate_scores_the_state_as_the_library_does(state, tmp_path, capsys):
    from gaq.eval.metrics import paired_metrics
    from gaq.sampling import SamplerConfig, sample

    out = tmp_path / "eval" / "summary.json"
    assert main(["evaluate", "--state", str(state), "--num-images", "16", "--batch-size", "8",
                 "--metrics", "psnr,eps_mse,fid", "--heldout-trajectories", "2",
                 "--seed", str(SEED), "--out", str(out)]) == 0
    summary = _last_json(capsys)
    assert json.loads(out.read_text()) == summary
    assert (summary["model"], summary["method"], summary["bits"]) == ("digits", "rtn", "W4A8")
    assert summary["sampler"]["steps"] == STEPS and summary["seed"] == SEED
    scores, fp_scores = summary["metrics"], summary["fp"]
    assert {"psnr", "eps_mse", "fid", "calibration_seconds", "model_size_mb"} <= set(scores)
    assert "psnr" not in fp_scores and fp_scores["eps_mse"] == 0.0 and "fid" in fp_scores
    assert scores["eps_mse"] > 0 and scores["model_size_mb"] < fp_scores["model_size_mb"]

    # independently: both image sets sampled here, PSNR by the metric function
    pipe, back = _restored(state)
    sampler = SamplerConfig(steps=STEPS)
    fp = sample(pipe, 16, seed=SEED, sampler=sampler, batch_size=8)
    quantized = sample(pipe, 16, seed=SEED, sampler=sampler, batch_size=8,
                       hook=back.sampler_hook, denoiser=back.model)
    assert scores["psnr"] == paired_metrics(quantized, fp)["psnr"]


def _no_sampling(monkeypatch) -> None:
    import gaq.sampling

    def fail(*args, **kwargs):
        raise AssertionError("sampled although the state was refused")

    monkeypatch.setattr(gaq.sampling, "sample_batch", fail)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gaq: error: "), err
    return err


def _edited(state: Path, folder: Path, **meta) -> Path:
    """A copy of the state whose state.json meta has ``meta`` set (None: removed)."""
    shutil.copytree(state, folder)
    doc = json.loads((folder / "state.json").read_text())
    for key, value in meta.items():
        if value is None:
            doc["meta"].pop(key)
        else:
            doc["meta"][key] = value
    (folder / "state.json").write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist; pass the folder `gaq quantize --out` wrote"),
    ("file", "is not a folder; pass the folder `gaq quantize --out` wrote"),
    ("empty", "has no state.json; re-run `gaq quantize`"),
])
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_folder_that_is_no_state_is_refused(tmp_path, capsys, monkeypatch, case, message,
                                              command):
    _no_sampling(monkeypatch)
    folder = tmp_path / "s"
    if case == "file":
        folder.write_text("not a state")
    elif case == "empty":
        folder.mkdir()
    out = tmp_path / "out.png"
    assert main([command, "--state", str(folder), "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"quantization state {folder}" in err and message in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_state_of_another_model_is_refused(state, tiny_pipeline_dir, tmp_path, capsys,
                                             monkeypatch, command):
    _no_sampling(monkeypatch)
    out = tmp_path / "out.png"
    small = ["--metrics", "psnr"] if command == "evaluate" else ["--num", "2"]
    assert main([command, "--state", str(state), "--model", str(tiny_pipeline_dir), *small,
                 "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"quantization state {state} was made for model 'digits', not " in err
    assert "leave --model out, or pass the model it was made for" in err
    assert not out.exists()


def test_a_state_of_other_weights_under_the_same_name_is_refused(state, tmp_path, capsys,
                                                                 monkeypatch):
    _no_sampling(monkeypatch)
    folder = _edited(state, tmp_path / "s", weights_digest="0" * 64)
    assert main(["sample", "--state", str(folder), "--num", "2",
                 "--out", str(tmp_path / "out.png")]) == 2
    err = _one_line(capsys)
    assert "was made for other weights of model 'digits' (digest 000000000000, now " in err
    assert "re-run `gaq quantize` on the model as it is now" in err


def test_a_state_without_digest_names_its_model(state, tiny_pipeline_dir, tmp_path, capsys,
                                                monkeypatch):
    _no_sampling(monkeypatch)
    old = _edited(state, tmp_path / "old", weights_digest=None)
    assert main(["sample", "--state", str(old), "--model", str(tiny_pipeline_dir),
                 "--num", "2", "--out", str(tmp_path / "out.png")]) == 2
    assert (f"quantization state {old} was made for model 'digits', not "
            f"'{tiny_pipeline_dir}'; leave --model out to use 'digits'") in _one_line(capsys)
    # a benchmark cell's state records no model: --model names it
    cell = _edited(state, tmp_path / "cell", weights_digest=None, model=None)
    assert main(["sample", "--state", str(cell), "--num", "2",
                 "--out", str(tmp_path / "out.png")]) == 2
    assert (f"quantization state {cell} does not record the model it was made for (a "
            "benchmark cell's state); name it with --model") in _one_line(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--metrics", "fdi"], "--metrics has unknown metric 'fdi'"),
    (["--num-images", "0"], "--num-images must be a positive integer"),
    (["--metrics", "class_acc"], "--metrics class_acc needs a bundled class-conditional "
                                 "model (digits-ldm, digits-dit), not 'digits'"),
])
def test_evaluate_flags_are_checked_before_sampling(state, tmp_path, capsys, monkeypatch,
                                                    flags, message):
    _no_sampling(monkeypatch)
    assert main(["evaluate", "--state", str(state), *flags]) == 2
    assert message in _one_line(capsys)


@pytest.mark.slow
def test_sample_state_applies_the_methods_sampler_correction(tiny_pipeline_dir, tmp_path,
                                                            capsys, sampled):
    """PTQD corrects the sampler, not the model: `sample --state` samples with the restored
    hook, on the sampler the state was calibrated with (which PTQD's hook insists on)."""
    from baselines.ptqd import PTQD, PTQDConfig
    from gaq.calibration import CalibrationSpec, state_dict_digest
    from gaq.cell import WEIGHTS_DIGEST, quantize_pipeline, restore, save_quantized
    from gaq.config import QuantConfig
    from gaq.models.loading import load_model
    from gaq.reconstruction import ReconConfig
    from gaq.sampling import SamplerConfig, sample

    pipe, model_id = load_model(str(tiny_pipeline_dir)), str(tiny_pipeline_dir)
    spec = CalibrationSpec(steps=STEPS, interval=2, samples_per_step=4, eta=1.0)
    tiny = ReconConfig(weight_iters=3, act_iters=2, batch_size=8, capture_batch=8,
                       cache="memory")
    result = quantize_pipeline(pipe, PTQD(PTQDConfig(recon=tiny)), QuantConfig.from_bits("W4A8"),
                               spec, model_id=model_id)
    folder = save_quantized(result, tmp_path / "ptqd", pipe, meta={
        "model": model_id, WEIGHTS_DIGEST: state_dict_digest(pipe.denoiser),
        "calibration": spec.to_dict()})
    assert main(["sample", "--state", str(folder), "--num", "3", "--seed", str(SEED),
                 "--out", str(tmp_path / "q.png")]) == 0
    assert _last_json(capsys)["method"] == "ptqd"
    back = restore(pipe.denoiser, folder)
    kw = {"seed": SEED, "sampler": SamplerConfig(steps=STEPS, eta=1.0), "denoiser": back.model}
    assert torch.equal(sampled[-1], sample(pipe, 3, hook=back.sampler_hook, **kw))
    assert not torch.equal(sampled[-1], sample(pipe, 3, **kw))  # without the correction
