"""Where a result came from: code version, library versions, hardware, seeds.

Every value is a string because the dict goes straight into MLflow tags (and Parquet
metadata); nothing here may raise, since a missing tool must not cost a finished run.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gaq

__all__ = ["DISTRIBUTIONS", "UNKNOWN", "provenance", "repo_root"]

UNKNOWN = "unknown"

#: Distributions whose versions change results (samplers, metric implementations, storage).
DISTRIBUTIONS: dict[str, str] = {
    "torch_version": "torch",
    "diffusers_version": "diffusers",
    "mlflow_version": "mlflow",
    "torch_fidelity_version": "torch-fidelity",
    "clean_fid_version": "clean-fid",
    "pandas_version": "pandas",
    "pyarrow_version": "pyarrow",
}


def _package_dir() -> Path:
    return Path(gaq.__file__).resolve().parent


def repo_root() -> Path:
    """The source checkout holding the gaq package (the folder with gaq's pyproject.toml).

    Checked by project name so an installed copy inside some other project's tree is not
    mistaken for a checkout; falls back to the working directory.
    """
    for folder in _package_dir().parents:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and _is_gaq_pyproject(pyproject):
            return folder
    return Path.cwd()


def _is_gaq_pyproject(path: Path) -> bool:
    from gaq.config import loads_toml

    try:
        return loads_toml(path.read_text(encoding="utf-8")).get("project", {}).get("name") == "gaq"
    except Exception:  # unreadable or invalid TOML: not ours to judge
        return False


def _git(*args: str) -> str | None:
    # --no-optional-locks: `git status` would otherwise refresh the index and could collide
    # with a commit happening at the same time in the same checkout.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(_package_dir()), *args],
            capture_output=True, text=True, timeout=10, env=env, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_state() -> tuple[str, str]:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return UNKNOWN, UNKNOWN
    # Untracked files (results, mlflow.db, caches) do not change the code that ran.
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = UNKNOWN if status is None else str(bool(status)).lower()
    return commit, dirty


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _hardware() -> dict[str, str]:
    try:
        import torch
    except Exception:  # torch missing or broken: record that rather than fail
        return {"device": "cpu", "gpu_model": "none", "gpu_count": "0", "cuda_version": "none",
                "torch_threads": UNKNOWN}
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    except Exception:  # a driver problem should not lose the run
        count, names = 0, []
    return {
        "device": "cuda" if count else "cpu",
        "gpu_model": ", ".join(names) if names else "none",
        "gpu_count": str(count),
        "cuda_version": torch.version.cuda or "none",
        # CPU float results depend on the intra-op thread count (reduction order)
        "torch_threads": str(torch.get_num_threads()),
    }


#: Top-level packages whose methods gaq's own version identifies.
_BUILTIN_PACKAGES = ("gaq", "baselines")


def method_code(cls: type) -> dict[str, str] | None:
    """What identifies a plugin method's code: its distribution and version (if installed
    from one) and a hash of its module's source. None for the methods gaq ships, which
    its version and their config versions identify. Part of a cell's identity, so editing
    and reinstalling a plugin re-runs its cells instead of reporting them done."""
    import hashlib
    import inspect

    top = cls.__module__.split(".")[0]
    if top in _BUILTIN_PACKAGES:
        return None
    out = {"module": cls.__module__}
    dists = metadata.packages_distributions().get(top, [])
    if dists:
        out["distribution"] = dists[0]
        out["version"] = _version(dists[0])
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
        out["source_sha256"] = hashlib.sha256(source.encode()).hexdigest()[:16]
    except (OSError, TypeError, KeyError):
        out["source_sha256"] = "unavailable"
    return out


def provenance(seeds: list[int] | None = None) -> dict[str, str]:
    """Provenance of a run as flat string key/values (MLflow tags).

    Keys: ``git_commit``, ``git_dirty`` ("true"/"false"/"unknown"), ``gaq_version``,
    ``<dist>_version`` for each of :data:`DISTRIBUTIONS`, ``python_version``, ``platform``,
    ``device`` ("cpu"/"cuda"), ``gpu_model``, ``gpu_count``, ``cuda_version``,
    ``torch_threads``,
    ``world_size``, ``hostname``
    and ``seeds`` (comma separated, empty when none given).
    """
    commit, dirty = _git_state()
    out = {"git_commit": commit, "git_dirty": dirty, "gaq_version": gaq.__version__}
    out.update({key: _version(dist) for key, dist in DISTRIBUTIONS.items()})
    out["python_version"] = platform.python_version()
    out["python_implementation"] = sys.implementation.name
    out["platform"] = platform.platform()
    out.update(_hardware())
    out["world_size"] = os.environ.get("WORLD_SIZE", "1")
    out["hostname"] = socket.gethostname()
    out["seeds"] = ",".join(str(int(s)) for s in seeds or [])
    return out
