"""Loading pipelines (denoiser, scheduler, autoencoder, conditioning) from a bundled name,
a diffusers pipeline folder, or a Hugging Face hub id already in the local cache.

Loading never downloads: an uncached hub id fails at once with a message saying how
to fetch it (``gaq fetch``), instead of the hub client's retry loop. Downloading is
its own explicit step, so a benchmark run is never slowed or changed by the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gaq.errors import GaqError
from gaq.finite import require_finite_module
from gaq.models.adapters import adapter_for, check_architecture, is_dit
from gaq.models.bundled import BUNDLED_MODELS
from gaq.models.conditioning import Conditioning
from gaq.models.pipeline import Pipeline

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DENOISER_KEYS = ("unet", "transformer")
_AUTOENCODER_KEYS = ("vae", "vqvae")

def resolve(source: str) -> Path:
    """The local folder holding ``source``: a bundled name, a folder, or a cached hub id."""
    if source in BUNDLED_MODELS:
        path = BUNDLED_MODELS[source]
        if not (path / "model_index.json").is_file():
            family = {"digits-ldm": " --family ldm", "digits-dit": " --family dit"}
            raise GaqError(f"bundled model {source!r} is missing at {path}; train it with "
                           f"`gaq train-default{family.get(source, '')}` (or reinstall gaq)")
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
               dtype: torch.dtype = torch.float32,
               prompts: list[str] | tuple[str, ...] | None = None) -> Pipeline:
    """Load a diffusers pipeline folder as a :class:`Pipeline`: the denoiser (``unet`` or
    ``transformer``), the scheduler, the autoencoder (``vae``/``vqvae``) if any, and the
    conditioning source (none, class labels, or the pipeline's own text encoder, fed
    ``prompts``), all on ``device``. ``random:ARCH`` builds a paper's architecture with
    random weights instead (:data:`gaq.perf_paper.ARCHITECTURES`): what it costs to
    calibrate and sample, before any checkpoint is at hand."""
    from gaq.sampling import check_scheduler

    if source.startswith(RANDOM):
        return _random_pipeline(source, device, dtype, prompts)
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
    scheduler = _component(index, "scheduler", path, dtype)
    check_scheduler(scheduler)
    check_scheduler(_config_class(path / "scheduler" / "scheduler_config.json"))
    # the architecture is checked before its weights are read, and again on the loaded
    # model (its layers, its variant): sample, quantize and bench refuse alike, up front
    check_architecture(index[key][1])
    denoiser = _component(index, key, path, dtype).eval()
    adapter_for(denoiser)
    ae_key = next((k for k in _AUTOENCODER_KEYS if isinstance(index.get(k), list)), None)
    autoencoder = None if ae_key is None else _component(index, ae_key, path, dtype).eval()
    conditioning = _conditioning(index, path, denoiser, dtype, prompts)
    for part, module in ((key, denoiser), (ae_key, autoencoder),
                         ("text_encoder", getattr(conditioning, "text_encoder", None)),
                         ("class embedder", getattr(conditioning, "embedder", None))):
        if isinstance(module, torch.nn.Module):
            require_finite_module(module, f"pipeline {source!r}, component {part!r}",
                                  "the checkpoint is damaged: restore or re-train it")
    name = source if source in BUNDLED_MODELS else path.name
    return Pipeline(denoiser, scheduler, autoencoder, conditioning, name=name,
                    path=path).to(device)


RANDOM = "random:"


def _random_pipeline(source: str, device: str | torch.device, dtype: torch.dtype,
                     prompts) -> Pipeline:
    """A paper architecture with random weights from a fixed seed (the same weights, and
    so the same cell ids, on every run)."""
    from gaq.errors import did_you_mean
    from gaq.perf_paper import ARCHITECTURES, build_pipeline

    arch = source[len(RANDOM):]
    if arch not in ARCHITECTURES:
        hint = did_you_mean(arch, ARCHITECTURES)
        raise GaqError(f"model {source!r}: no paper architecture {arch!r}"
                       f"{' (' + hint + ')' if hint else ''}; known: "
                       + ", ".join(RANDOM + a for a in ARCHITECTURES))
    pipe = build_pipeline(arch, str(device), seed=0)
    if dtype != torch.float32:
        pipe.denoiser.to(dtype)
    if prompts and pipe.conditioning.kind == "text":
        pipe.conditioning = pipe.conditioning.with_prompts(prompts)
    pipe.name = source
    return pipe


def _conditioning(index: dict, path: Path, denoiser: torch.nn.Module, dtype: torch.dtype,
                  prompts) -> Conditioning:
    """The conditioning source the pipeline folder describes, or that the denoiser implies."""
    from gaq.models.conditioning import (
        ClassConditioning,
        ClassEmbedder,
        NoConditioning,
        TextConditioning,
    )

    declared = index.get("gaq_conditioning") or {}
    cfg = denoiser.config
    if isinstance(index.get("text_encoder"), list):
        if not isinstance(index.get("tokenizer"), list):
            raise GaqError(f"pipeline {path} has a text encoder but no 'tokenizer' component")
        tokenizer = _component(index, "tokenizer", path, dtype)
        encoder = _component(index, "text_encoder", path, dtype).eval()
        return TextConditioning(tokenizer, encoder, tuple(prompts or ()))
    if isinstance(index.get("class_embedder"), list):
        embedder = ClassEmbedder.from_pretrained(path / "class_embedder").to(dtype)
        return ClassConditioning(embedder.num_classes, embedder.null_class, embedder)
    num = declared.get("num_classes")
    if is_dit(denoiser):
        # DiT: diffusers' LabelEmbedding keeps row num_classes for the null class
        num = num or int(cfg.num_embeds_ada_norm)
        return ClassConditioning(num, declared.get("null_class", num))
    if getattr(cfg, "num_class_embeds", None):
        # a class-embedding UNet has a null class only if the folder declares one
        return ClassConditioning(int(num or cfg.num_class_embeds), declared.get("null_class"))
    if getattr(cfg, "cross_attention_dim", None) and type(denoiser).__name__ != "UNet2DModel":
        raise GaqError(f"pipeline {path} has a cross-attention denoiser but no text encoder "
                       "or class embedder to feed it")
    return NoConditioning()


def _component(index: dict, key: str, path: Path, dtype: torch.dtype):
    library, class_name = index[key]
    if library == "diffusers":
        import diffusers as lib
    elif library == "transformers":
        try:
            import transformers as lib
        except ImportError:
            raise GaqError(f"component {key!r} of {path} needs the 'transformers' package "
                           "(pip install transformers)") from None
    else:
        lib = None
    cls = getattr(lib, class_name, None) if lib is not None else None
    if cls is None:
        raise GaqError(f"component {key!r} of {path} is {library}.{class_name}, "
                       "which this installation cannot load")
    if key in ("scheduler", "tokenizer"):
        return cls.from_pretrained(path, subfolder=key)
    _require_safetensors(path, key)
    if library == "transformers":
        return cls.from_pretrained(path, subfolder=key, use_safetensors=True, dtype=dtype)
    # low_cpu_mem_usage=False: the accelerate-based loader is optional and only saves
    # memory for models far larger than those loaded on CPU here.
    return cls.from_pretrained(path, subfolder=key, use_safetensors=True, torch_dtype=dtype,
                               low_cpu_mem_usage=False)


def _config_class(config: Path) -> str:
    """The ``_class_name`` a component's config file records ("" if none): the class its
    settings were written for, which may differ from the one ``model_index.json`` names
    (diffusers then loads the settings into that class, silently dropping the rest)."""
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError):
        return ""
    name = doc.get("_class_name", "") if isinstance(doc, dict) else ""
    return name if isinstance(name, str) else ""


def _require_safetensors(path: Path, key: str) -> None:
    """Component ``key`` of the pipeline folder ``path`` has its weights as safetensors:
    the only format gaq loads, since a pickled checkpoint (``.bin``, ``.ckpt``) can run
    code when unpickled."""
    folder = path / key
    if not folder.is_dir():
        raise GaqError(f"pipeline {path}: component {key!r} has no folder {key}/; the "
                       "pipeline folder is incomplete")
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    what = (f"only pickled weights ({', '.join(pickled[:3])})" if pickled
            else "no weights file")
    raise GaqError(f"pipeline {path}: component {key!r} holds {what}; gaq loads safetensors "
                   "weights only (a pickle can run code): re-save the component with "
                   "save_pretrained(..., safe_serialization=True) where you trust it")
