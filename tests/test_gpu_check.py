"""``gaq gpu-check``: without CUDA it checks everything else and refuses in one line,
writing nothing; its sections run end to end (here on the CPU, at toy sizes) and write
their reports."""

from __future__ import annotations

import json

import pytest

from gaq.cli import main
from gaq.errors import GaqError
from gaq.gpu_check import preflight, run

SMOKE = """
models = ["digits"]
bits = ["W8A8"]
methods = [{ name = "rtn" }]

[benchmark]
name = "gpu-smoke-toy"

[sampler]
steps = 2

[calibration]
interval = 1
samples_per_step = 4

[eval]
num_images = 8
batch_size = 8
seeds = [0]
metrics = ["psnr"]
heldout_trajectories = 0
"""


def test_without_cuda_every_other_check_runs_then_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu"
    assert main(["gpu-check", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "every other check" in err[0]
    assert not out.exists()  # nothing written, not even the folder


@pytest.mark.parametrize("args,needle", [
    (["--only", "smok"], "did you mean 'smoke'"),
    (["--device", "cpu"], "not a CUDA device"),
    (["--device", "tpu"], "not a device"),
])
def test_bad_flags_are_one_line(args, needle, tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path / "gpu"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_an_unwritable_or_file_output_is_refused_first(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(GaqError, match="is a file"):
        preflight("cpu", f, require_cuda=False)
    assert f.read_text() == "keep"


def test_a_missing_smoke_file_is_refused_before_measuring(tmp_path):
    with pytest.raises(GaqError, match="does not exist"):
        preflight("cpu", tmp_path / "gpu", ["smoke"], smoke_file=tmp_path / "nope.toml",
                  require_cuda=False)


@pytest.mark.slow
def test_sections_run_and_write_their_reports(tmp_path, monkeypatch):
    """The orchestration on the CPU at toy sizes: what a GPU run writes, and a failing
    section recorded without stopping the next one."""
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    smoke = tmp_path / "smoke.toml"
    smoke.write_text(SMOKE)
    out = tmp_path / "gpu"
    summary = run("cpu", out, ["overhead", "smoke"], smoke_file=smoke,
                  results=tmp_path / "runs", overhead_batches=(4,), overhead_images=4,
                  overhead_steps=2, repeats=1, require_cuda=False, log=lambda s: None)
    assert {k: v["status"] for k, v in summary["sections"].items()} == {
        "overhead": "ok", "smoke": "ok"}
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["sections"]["overhead"]["rows"][0]["batch_size"] == 4
    assert "| 4 |" in (out / "sampling_overhead.md").read_text()
    smoke_md = (out / "smoke.md").read_text()
    assert "2 cells completed, 0 failed" in smoke_md and "| digits | rtn |" in smoke_md

    # a section that fails is recorded; the run ends with one error naming it
    def boom(*a, **k):
        raise RuntimeError("CUDA error: out of memory\nsecond line")

    monkeypatch.setattr("gaq.perf.sampling_overhead", boom)
    with pytest.raises(GaqError, match="overhead failed"):
        run("cpu", out, ["overhead"], require_cuda=False, log=lambda s: None)
    entry = json.loads((out / "gpu_check.json").read_text())["sections"]["overhead"]
    assert entry["status"] == "failed" and entry["error"] == (
        "RuntimeError: CUDA error: out of memory")
