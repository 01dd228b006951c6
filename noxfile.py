"""nox sessions for gaq.

All sessions share ONE environment (the ML stack is ~6 GB), built on first use at
``.nox/gaq-env`` (override with ``GAQ_ENV``) and reused afterwards. It is refreshed
(``pip install -e .[test]``) only when ``pyproject.toml`` changes, and rebuilt from
scratch by ``nox -s rebuild-env``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
ENV = Path(os.environ.get("GAQ_ENV", ROOT / ".nox" / "gaq-env"))
STAMP = ENV / ".gaq-installed"

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]


def _bin(name: str) -> str:
    return str(ENV / ("Scripts" if os.name == "nt" else "bin") / name)


def _fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def _env(session: nox.Session) -> None:
    """Create the shared environment if needed, install gaq into it, and activate it."""
    if not Path(_bin("python")).exists():
        session.log(f"creating the shared environment at {ENV}")
        session.run(sys.executable, "-m", "venv", str(ENV), external=True)
        session.run(_bin("python"), "-m", "pip", "install", "-q", "--upgrade", "pip",
                    external=True)
    if not STAMP.exists() or STAMP.read_text() != _fingerprint():
        session.log("installing gaq and its dependencies into the shared environment")
        session.run(_bin("python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]",
                    external=True)
        STAMP.write_text(_fingerprint())
    session.env["VIRTUAL_ENV"] = str(ENV)
    session.env["PATH"] = os.pathsep.join([str(Path(_bin("python")).parent),
                                           os.environ.get("PATH", "")])
    # Loading never downloads; this also stops the hub client's offline retry loop. No usage
    # reports leave the machine (MLflow's and Ray's telemetry). A value the user set wins.
    for key, value in (("HF_HUB_OFFLINE", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("RAY_USAGE_STATS_ENABLED", "0")):
        if key not in os.environ:
            session.env[key] = value


@nox.session(name="rebuild-env", default=False)
def rebuild_env(session: nox.Session) -> None:
    """Delete and rebuild the shared environment from scratch."""
    if ENV.exists():
        session.log(f"removing {ENV}")
        shutil.rmtree(ENV)
    _env(session)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest); extra arguments go to pytest. The inner loop, without
    the slowest tests: nox -s tests -- -m "not slow"."""
    _env(session)
    # pytest exits 5 when it collects no test: that must fail, never pass silently.
    session.run(_bin("python"), "-m", "pytest", *(session.posargs or ["-q"]), external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    _env(session)
    session.run(_bin("ruff"), "check", "gaq", "baselines", "tests", "noxfile.py",
                external=True)


@nox.session(name="train-default", default=False)
def train_default(session: nox.Session) -> None:
    """Retrain a bundled model: the digits DDPM and classifier (default, about 45 min on 2
    cores), or `-- --family ldm` (about 20 min) / `-- --family dit` (about 20 min, needs
    the ldm family's VAE)."""
    _env(session)
    session.run(_bin("gaq"), "train-default", *session.posargs, external=True)


@nox.session(name="bench-w4a8", default=False)
def bench_w4a8(session: nox.Session) -> None:
    """The main job: every registered method at W4A8 on the three bundled models, computed
    into runs/w4a8 and compared with the committed reference in results/w4a8, ending with
    the verdict line (REPRODUCED, or NOT REPRODUCED and a failed session).

    Runs benchmarks/w4a8.toml; extra arguments go to `gaq bench`
    (e.g. `nox -s bench-w4a8 -- --methods rtn,gaq`).
    """
    _env(session)
    session.run(_bin("gaq"), "bench", "benchmarks/w4a8.toml", *session.posargs, external=True)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run any benchmark file: nox -s bench -- benchmarks/lowbit.toml [gaq bench options]."""
    _env(session)
    if not session.posargs:
        session.error("name a benchmark file: nox -s bench -- benchmarks/w8a8.toml")
    session.run(_bin("gaq"), "bench", *session.posargs, external=True)


@nox.session(default=False)
def reports(session: nox.Session) -> None:
    """Regenerate results/tables and results/plots from the Parquet results alone."""
    _env(session)
    session.run(_bin("gaq"), "tables", external=True)
    session.run(_bin("gaq"), "plots", external=True)


@nox.session(default=False)
def ui(session: nox.Session) -> None:
    """Browse the runs: MLflow UI on http://127.0.0.1:5000 over the repo's mlflow.db."""
    _env(session)
    session.chdir(ROOT)
    store = f"sqlite:///{ROOT / 'mlflow.db'}"
    args = list(session.posargs)
    port = args[args.index("--port") + 1] if "--port" in args[:-1] else "5000"
    # links straight to each benchmark's runs table (MLflow 3 starts in its GenAI view)
    session.run(_bin("python"), "-c", "import sys; from gaq.bench.tracking import ui_links; "
                "print('\n'.join(ui_links(sys.argv[1], sys.argv[2])) or 'no gaq runs yet')",
                f"http://127.0.0.1:{port}", store, external=True)
    session.run(_bin("mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                *args, external=True)


@nox.session(default=False)
def perf(session: nox.Session) -> None:
    """Speed and memory figures on the bundled model, written to results/perf
    (nox -s perf -- --only sampling re-measures one section and keeps the others)."""
    _env(session)
    session.run(_bin("gaq"), "perf", *session.posargs, external=True)


@nox.session(name="update-reference", default=False)
def update_reference(session: nox.Session) -> None:
    """Make a benchmark's run the committed reference (default: the main job):
    nox -s update-reference -- benchmarks/gaq.toml."""
    _env(session)
    args = session.posargs or ["benchmarks/w4a8.toml"]
    session.run(_bin("gaq"), "bench", *args, "--update-reference", external=True)


@nox.session(default=False)
def tolerance(session: nox.Session) -> None:
    """Measure a reference's numerical tolerance (default: the main job): its cells rerun
    under two threads, the local engine and ATEN_CPU_CAPABILITY=avx2, one run of the
    benchmark each, into runs/tolerance; writes results/<benchmark>/tolerance.json, which
    `gaq bench` judges reruns by: nox -s tolerance -- benchmarks/gaq.toml."""
    _env(session)
    args = session.posargs or ["benchmarks/w4a8.toml"]
    session.run(_bin("gaq"), "tolerance", *args, external=True)


@nox.session(default=False)
def readme(session: nox.Session) -> None:
    """Rewrite the README's generated sections from results/ (`-- --check`: only compare,
    failing when a section is not what its files give)."""
    _env(session)
    session.run(_bin("gaq"), "readme", *session.posargs, external=True)


@nox.session(name="fid-spread", default=False)
def fid_spread(session: nox.Session) -> None:
    """FID's spread across disjoint FP sample sets at 256, 1,024 and 4,096 images (what a
    difference between two rows must beat): results/protocol/fid_spread.md."""
    _env(session)
    session.run(_bin("gaq"), "fid-spread", *session.posargs, external=True)


@nox.session(name="gpu-check", default=False)
def gpu_check(session: nox.Session) -> None:
    """Every GPU measurement in one run, writing results/gpu/: fake-quant sampling overhead
    (batch 32/128/512), paper-scale calibration time and memory (RTN, BRECQ, TFMQ-DM, GAQ
    on the CIFAR-10 DDPM architecture) and gpu-smoke. Refuses in one line without CUDA;
    extra arguments go to `gaq gpu-check` (e.g. `-- --device cuda:1 --only overhead`)."""
    _env(session)
    session.run(_bin("gaq"), "gpu-check", *session.posargs, external=True)


@nox.session(name="gpu-smoke", default=False)
def gpu_smoke(session: nox.Session) -> None:
    """Every registered method on each bundled model family on CUDA; skips without a GPU.

    Runs benchmarks/gpu-smoke.toml into runs/gpu-smoke (git-ignored); extra arguments go
    to `gaq bench` (e.g. `-- --device cuda:1`).
    """
    _env(session)
    count = session.run(_bin("python"), "-c", "import torch; print(torch.cuda.device_count())",
                        silent=True, external=True)
    if int(str(count).strip().splitlines()[-1]) == 0:
        session.skip("gpu-smoke: torch sees no CUDA GPU on this machine; run it where one is")
    args = session.posargs or ["--device", "cuda"]
    session.run(_bin("gaq"), "bench", "benchmarks/gpu-smoke.toml", *args, external=True)
