"""A method installed as a throw-away package (a dist-info with a ``gaq.methods`` entry
point on the path) runs in a benchmark next to a baseline; a broken plugin beside it is
skipped in one line; bumping the plugin's version re-runs its cells and only its cells."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BENCH = """
models = ["digits"]
bits = ["W8A8"]
methods = [{ name = "rtn" }, { name = "myrtn" }]

[benchmark]
name = "plug"

[sampler]
steps = 4

[calibration]
interval = 2
samples_per_step = 4

[eval]
num_images = 16
batch_size = 16
seeds = [0]
metrics = ["psnr"]
heldout_trajectories = 2
"""


def _install(site: Path, version: str) -> None:
    pkg = site / "gaqplug"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(f'''
        """A user's method: round-to-nearest under another name (version {version})."""
        from gaq.methods.rtn import RTN


        class MyRTN(RTN):
            name = "myrtn"
            label = "My RTN"  # how tables and plots name it
    '''))
    (site / "gaqbroken.py").write_text("raise RuntimeError('half-installed plugin')\n")
    for old in site.glob("gaqplug-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"gaqplug-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: gaqplug\nVersion: {version}\n")
    (info / "top_level.txt").write_text("gaqplug\ngaqbroken\n")
    (info / "entry_points.txt").write_text(
        "[gaq.methods]\nmyrtn = gaqplug:MyRTN\nbroken = gaqbroken:Thing\n")


def _gaq(args: list[str], site: Path, root: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                        "GAQ_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gaq.cli", *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_plugin_runs_beside_a_baseline_and_a_version_bump_reruns_it(tmp_path):
    site = tmp_path / "site"
    _install(site, "1.0")
    listed = _gaq(["methods"], site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "myrtn" in listed.stdout and "rtn" in listed.stdout
    assert "skipped: method 'broken'" in listed.stderr and "half-installed" in listed.stderr

    bench = tmp_path / "plug.toml"
    bench.write_text(BENCH)
    results = tmp_path / "results"
    first = _gaq(["bench", str(bench), "--results", str(results)], site, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]

    _install(site, "1.1")  # the user edits and reinstalls their method
    second = _gaq(["bench", str(bench), "--results", str(results)], site, tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    log = second.stdout + second.stderr
    skipped = [line for line in log.splitlines() if "done earlier, skipped" in line]
    assert any("rtn" in line and "myrtn" not in line for line in skipped)
    assert not any("myrtn" in line for line in skipped)  # its code changed: it re-ran
    # the tables name the plugin as it declares itself, beside the baseline
    table = (results / "tables" / "plug.md").read_text()
    assert "| My RTN |" in table and "| RTN |" in table
