"""The disk cache of calibration sets: an entry per content hash of everything that
determines a set (:func:`calibration_key`), tensors in safetensors and metadata in JSON (the
commit marker); an unreadable entry warns and counts as a miss."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gaq.calibration.dataset import CalibrationSet
from gaq.calibration.spec import CalibrationSpec
from gaq.finite import first_non_finite
from gaq.identity import state_dict_digest

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

__all__ = ["CACHE_FORMAT", "CalibrationCacheWarning", "calibration_key", "default_cache_dir"]

#: Bump when the file layout or the recording semantics change: old entries become misses.
CACHE_FORMAT = 3  # 3: recorded through a Pipeline (any sampler, both guidance halves)


class CalibrationCacheWarning(UserWarning):
    """A cache entry could not be read (and is recomputed) or written (and is not kept)."""


def default_cache_dir() -> Path:
    """``$GAQ_CACHE/calibration``, or ``~/.cache/gaq/calibration``."""
    root = os.environ.get("GAQ_CACHE") or "~/.cache/gaq"
    return Path(root).expanduser() / "calibration"



def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and tensors (e.g. trained_betas)
        return value.tolist()
    return str(value)


def _scheduler_json(scheduler: Any) -> str:
    # Private keys ("_class_name", "_diffusers_version", "_use_default_values") say how the
    # config was written, not what schedule it describes.
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return json.dumps(cfg, sort_keys=True, default=_json_default)


def calibration_key(pipe: Pipeline, spec: CalibrationSpec, *, model_id: str) -> str:
    """Content hash naming a calibration set: model id, denoiser weights, schedule, spec,
    the conditioning source (its description and the weights of its encoders), and where it
    is computed: on the CPU the recorded floats depend on the intra-op thread count, so a
    set recorded at two threads never stands in for one a one-thread run would record."""
    cond = pipe.conditioning
    device = next(pipe.denoiser.parameters()).device.type
    compute = f"cpu x{torch.get_num_threads()}" if device == "cpu" else device
    encoders = [m for m in (getattr(cond, "embedder", None), getattr(cond, "text_encoder", None))
                if m is not None]
    identity = {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        "weights": state_dict_digest(pipe.denoiser),
        "scheduler": _scheduler_json(pipe.scheduler),
        "spec": spec.data_fingerprint(),
        "conditioning": cond.identity(),
        "conditioning_weights": [state_dict_digest(m) for m in encoders],
        "compute": compute,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(folder: Path, key: str, calib: CalibrationSet, sched: str, device: str) -> None:
    from safetensors.torch import save_file

    tensors = _set_tensors(calib)
    if calib.act_extra is not None:
        tensors.update({f"act.{k}": v for k, v in _set_tensors(calib.act_extra).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        **calib.meta,
        "format": CACHE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "rows": len(calib),
        "act_rows": 0 if calib.act_extra is None else len(calib.act_extra),
        "holdout_rows": int(calib.split.sum()) if calib.split is not None else 0,
        "timesteps": calib.timesteps(),
        "scheduler": json.loads(sched),
        "recorded_on": device,
        "torch": torch.__version__,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Tensors first, metadata last: the .json is the commit marker of an entry.
        _atomic_write(
            folder / f"{key}.safetensors",
            lambda p: save_file(tensors, p, metadata={"key": key, "format": str(CACHE_FORMAT)}),
        )
        _atomic_write(
            folder / f"{key}.json",
            lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)),
        )
        calib.meta["cache_path"] = str(folder / f"{key}.safetensors")
    except OSError as e:
        warnings.warn(
            f"could not write calibration cache entry {key} to {folder}: {e}",
            CalibrationCacheWarning,
            stacklevel=3,
        )


def _set_tensors(calib: CalibrationSet) -> dict[str, Tensor]:
    assert calib.split is not None
    return {
        "x": calib.x, "t": calib.t, "eps_fp": calib.eps_fp, "split": calib.split,
        **({} if calib.image is None else {"image": calib.image}),
        **{f"cond.{k}": v for k, v in calib.cond.items()},
    }


def _tensors_to_set(tensors: Mapping[str, Tensor], prefix: str,
                    meta: dict[str, Any]) -> CalibrationSet:
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not prefix:  # the main rows: not the activation-only ones
        own = {k: v for k, v in own.items() if not k.startswith("act.")}
    cond = {k[len("cond."):]: v for k, v in own.items() if k.startswith("cond.")}
    return CalibrationSet(x=own["x"], t=own["t"], eps_fp=own["eps_fp"], cond=cond,
                          split=own["split"], image=own.get("image"), meta=meta)


def _load(folder: Path, key: str) -> CalibrationSet | None:
    """The cached set, or None on a miss; an unreadable entry warns and counts as a miss."""
    data_path, meta_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    if not data_path.exists() and not meta_path.exists():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            raise ValueError("metadata does not match this cache key and format")
        tensors = load_file(data_path)
        # a step selection's record (e.g. "srm", "srm_steps") too
        protocol = (meta.get("spec") or {}).get("protocol", "")
        calib = _tensors_to_set(tensors, "", {k: meta[k] for k in (
            "key", "model_id", "spec", "sampler_timesteps", "conditioning",
            f"{protocol}_steps", protocol) if k in meta})
        if "act.x" in tensors:
            calib.act_extra = _tensors_to_set(tensors, "act.", {})
        if len(calib) != meta.get("rows"):
            raise ValueError(f"{len(calib)} rows on disk, metadata says {meta.get('rows')}")
        act_rows = 0 if calib.act_extra is None else len(calib.act_extra)
        if act_rows != meta.get("act_rows", 0):
            raise ValueError(f"{act_rows} activation-only rows on disk, metadata says "
                             f"{meta.get('act_rows')}")
        bad = first_non_finite(tensors.items())
        if bad is not None:
            raise ValueError(f"tensor {bad} holds NaN or infinite values")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        warnings.warn(
            f"ignoring unreadable calibration cache entry {data_path} ({e}); recomputing",
            CalibrationCacheWarning,
            stacklevel=3,
        )
        return None
    calib.meta["cache_path"] = str(data_path)
    return calib
