"""Data-parallel sampling under torchrun (gloo on the CPU): 1, 2 and 3 ranks give the
bit-identical union of images and the same metric values as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # torchrun runs of a benchmark at 1-3 ranks: every test here

MICRO = """
models = ["digits"]
bits = ["W8A8"]
methods = ["fp", "rtn", { name = "ptqd", config = { recon = { weight_iters = 0, act_iters = 0 } } }]

[benchmark]
name = "dist"

[sampler]
steps = 4

[calibration]
interval = 2
samples_per_step = 4

[eval]
num_images = 20
batch_size = 4
seeds = [0]
metrics = ["fid", "kid", "precision", "recall", "psnr", "eps_mse"]
heldout_trajectories = 2
"""

# what depends on the machine's speed, not on the images
TIMING = {"calibration_seconds", "images_per_second", "peak_memory_mb"}


def _run(root: Path, ranks: int) -> Path:
    bench = root / "dist.toml"
    bench.write_text(MICRO)
    out = root / f"results-{ranks}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / f'mlflow-{ranks}.db'}",
           "GAQ_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = ["-m", "gaq.cli", "bench", str(bench), "--results", str(out)]
    if ranks == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", *cli]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "dist"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {n: _run(root, n) for n in (1, 2, 3)}


def _metrics(folder: Path) -> pd.Series:
    df = pd.read_parquet(folder / "metrics.parquet")
    df = df[~df["metric"].isin(TIMING)]
    return df.set_index(["method", "bits", "metric"])["value"].sort_index()


@pytest.mark.parametrize("ranks", [2, 3])
def test_metrics_equal_the_single_process_run(runs, ranks):
    one, many = _metrics(runs[1]), _metrics(runs[ranks])
    assert list(one.index) == list(many.index)
    pd.testing.assert_series_equal(one, many, check_exact=True)


@pytest.mark.parametrize("ranks", [2, 3])
def test_images_and_curves_are_bit_identical(runs, ranks):
    grids = sorted(p.name for p in (runs[1] / "grids").glob("*.png"))
    assert grids and grids == sorted(p.name for p in (runs[ranks] / "grids").glob("*.png"))
    for name in grids:
        assert (runs[1] / "grids" / name).read_bytes() == \
            (runs[ranks] / "grids" / name).read_bytes()
    cols = ["method", "curve", "timestep", "value"]
    a = pd.read_parquet(runs[1] / "curves.parquet")[cols].sort_values(cols[:3])
    b = pd.read_parquet(runs[ranks] / "curves.parquet")[cols].sort_values(cols[:3])
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_rows_record_the_setup(runs):
    for ranks, folder in runs.items():
        setups = set(pd.read_parquet(folder / "metrics.parquet")["setup"])
        engine = "torchrun" if ranks > 1 else "local"
        assert setups == {f"cpu x{ranks} float32 {engine}"}
