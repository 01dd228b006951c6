"""Loading denoisers and their schedulers from the bundled default, a diffusers pipeline
folder, or a Hugging Face hub id already in the local cache.

Loading never downloads: an uncached hub id fails at once with a message saying how
to fetch it (``gaq fetch``), instead of the hub client's retry loop. Downloading is
its own explicit step, so a benchmark run is never slowed or changed by the network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gaq.errors import GaqError
from gaq.models.bundled import BUNDLED_MODELS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DENOISER_KEYS = ("unet", "transformer")


@dataclass
class LoadedModel:
    name: str
    path: Path
    denoiser: torch.nn.Module
    scheduler: object
    components: dict = field(default_factory=dict)  # e.g. vae, text encoder, for latent models


def resolve(source: str) -> Path:
    """The local folder holding ``source``: a bundled name, a folder, or a cached hub id."""
    if source in BUNDLED_MODELS:
        path = BUNDLED_MODELS[source]
        if not (path / "model_index.json").is_file():
            raise GaqError(f"bundled model {source!r} is missing at {path}; "
                           "train it with `gaq train-default` (or reinstall gaq)")
        return path
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GaqError(f"model path {source!r} is a file; pass a diffusers pipeline folder")
        return path
    if _HUB_ID.match(source):
        return _cached_snapshot(source)
    raise GaqError(
        f"model {source!r} is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}), "
        "an existing folder, nor a hub id of the form 'org/name'"
    )


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise GaqError(
            f"model {repo_id!r} is not in the local Hugging Face cache; fetch it once with "
            f"`gaq fetch {repo_id}` on a machine with network access (or pass a local "
            "pipeline folder)"
        ) from None


def fetch(repo_id: str) -> Path:
    """Download a hub pipeline into the local cache (the only place gaq touches the network)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id))


def load_model(source: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the denoiser (``unet`` or ``transformer``) and scheduler of a diffusers pipeline."""
    path = resolve(source)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise GaqError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    key = next((k for k in _DENOISER_KEYS if isinstance(index.get(k), list)), None)
    if key is None:
        raise GaqError(f"pipeline {source!r} has no 'unet' or 'transformer' component")
    if not isinstance(index.get("scheduler"), list):
        raise GaqError(f"pipeline {source!r} has no 'scheduler' component")
    denoiser = _component(index, key, path, dtype).to(device=device).eval()
    scheduler = _component(index, "scheduler", path, dtype)
    name = source if source in BUNDLED_MODELS else path.name
    return LoadedModel(name=name, path=path, denoiser=denoiser, scheduler=scheduler)


def _component(index: dict, key: str, path: Path, dtype: torch.dtype):
    import diffusers

    library, class_name = index[key]
    cls = getattr(diffusers, class_name, None)
    if library != "diffusers" or cls is None:
        raise GaqError(f"component {key!r} of {path} is {library}.{class_name}, "
                       "which this version of diffusers cannot load")
    if key == "scheduler":
        return cls.from_pretrained(path, subfolder=key)
    # low_cpu_mem_usage=False: the accelerate-based loader is optional and only saves
    # memory for models far larger than those loaded on CPU here.
    return cls.from_pretrained(path, subfolder=key, use_safetensors=True, torch_dtype=dtype,
                               low_cpu_mem_usage=False)
