"""Distribution metrics (FID, KID, precision/recall, IS, sFID) and paired metrics (MSE, PSNR).

Protocol choices this module fixes (record them with every result):

- images are uint8 before any feature extraction, reference included;
- the digits reference is the full bundled set (1,797 images), uint8-quantised;
- FID/KID/precision/recall/IS/sFID come from torch-fidelity (precision/recall with
  k = 3 neighbours, generated = input1); ``fid_cleanfid`` repeats FID with clean-fid;
- KID is the unbiased MMD² with the cubic polynomial kernel, raw (not ×10³; on the
  digits it is in the classifier's 128-d feature space, so not comparable with papers'
  Inception KID), averaged over 100 subsets of size min(1000, n_generated // 2,
  n_reference // 2), reported as ``kid_subset_size``. Half the smaller set, not all of
  it: with subsets as large as the generated set every subset would hold every generated
  image and ``kid_std`` would only measure reference resampling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch_fidelity import (
    KEY_METRIC_FID,
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
)

from gaq.errors import GaqError
from gaq.eval.backends import cleanfid_fid, torch_fidelity_metrics
from gaq.eval.features import FEATURES, LOGITS, SPATIAL, FeatureSpace

METRICS = ("fid", "kid", "precision", "recall", "is", "sfid")
DEFAULT_METRICS = ("fid", "kid", "precision", "recall", "is")
KID_MAX_SUBSET = 1000
PSNR_CAP_DB = 100.0
_MIN_IMAGES = 4  # precision/recall's 3-nearest-neighbour radius needs 4 points

Reference = torch.Tensor | Mapping[str, torch.Tensor]

_REFERENCE_CACHE: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def reference_features(model_id: str, space: FeatureSpace,
                       folder: str | Path | None = None) -> dict[str, torch.Tensor]:
    """All layers of ``space`` on the reference set of ``model_id``, cached per process.

    For the bundled models the reference is the whole bundled digits set, passed through
    ``gaq.sampling.to_uint8`` so it is quantised exactly like generated images; for
    other models it is the folder of images the benchmark names (e.g. the training set).
    """
    key = (model_id, space.cache_key, str(folder))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = space.extract(reference_images(model_id, folder))
    return _REFERENCE_CACHE[key]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def reference_images(model_id: str, folder: str | Path | None = None) -> torch.Tensor:
    """The reference images of ``model_id`` as uint8 ``(N, C, H, W)``: ``folder``'s, else
    the set the model's scoring entry names (:func:`gaq.models.bundled.scoring_for`)."""
    from gaq.models.bundled import scoring_for

    if folder is not None:
        return _folder_images(Path(folder))
    if scoring_for(model_id).reference != "digits":
        raise GaqError(
            f"no bundled reference set for model {model_id!r}; name a folder of reference "
            "images (e.g. its training set as PNGs) with eval.reference in the benchmark file"
        )
    from gaq.data import load_digits
    from gaq.sampling import to_uint8

    return to_uint8(load_digits().images)


def _folder_images(folder: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GaqError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return torch.stack([decode_image(str(f), mode=ImageReadMode.RGB) for f in files])


def image_metrics(
    images_uint8: torch.Tensor,
    reference: Reference,
    space: FeatureSpace,
    metrics: Iterable[str] = DEFAULT_METRICS,
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    seed: int = 0,
    cleanfid_check: bool = True,
) -> dict[str, float]:
    """Metrics of generated ``images_uint8`` against ``reference`` in ``space``.

    ``reference``: uint8 images, a float ``(N, D)`` tensor of ``features`` rows, or a
    dict of layers (as from :func:`reference_features`). Keys returned, as requested:
    ``fid``, ``fid_cleanfid`` (when ``cleanfid_check``), ``kid``, ``kid_std``,
    ``kid_subset_size``, ``precision``, ``recall``, ``is``, ``is_std``, ``sfid``, plus
    ``n_images`` and ``n_reference``. ``seed`` drives KID's subsets and IS's shuffle.
    """
    wanted = tuple(metrics)
    unknown = sorted(set(wanted) - set(METRICS))
    if unknown:
        raise GaqError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    binary = [m for m in ("fid", "kid", "precision", "recall") if m in wanted]
    layers = [layer for layer, needed in ((FEATURES, bool(binary)), (LOGITS, "is" in wanted),
                                          (SPATIAL, "sfid" in wanted)) if needed]
    gen = space.extract(images_uint8, layers)
    ref = _reference_layers(reference, space, [x for x in layers if x != LOGITS])

    n_gen = len(images_uint8)
    n_ref = len(next(iter(ref.values()))) if ref else 0
    if n_gen < _MIN_IMAGES or (ref and n_ref < _MIN_IMAGES):
        raise GaqError(f"image metrics need at least {_MIN_IMAGES} images per set, "
                       f"got {n_gen} generated and {n_ref} reference")
    out: dict[str, float] = {"n_images": float(n_gen), "n_reference": float(n_ref)}

    if binary:
        flags = {"fid": "fid" in wanted, "kid": "kid" in wanted,
                 "prc": "precision" in wanted or "recall" in wanted}
        subset = min(kid_subset_size or KID_MAX_SUBSET, max(n_gen // 2, 2), max(n_ref // 2, 2))
        r = torch_fidelity_metrics(gen[FEATURES], ref[FEATURES], FEATURES, seed=seed,
                                   kid_subset_size=subset, kid_subsets=kid_subsets, **flags)
        if flags["fid"]:
            out["fid"] = r[KEY_METRIC_FID]
            if cleanfid_check:
                ref_for_cleanfid = reference if _is_images(reference) else ref[FEATURES]
                out["fid_cleanfid"] = cleanfid_fid(images_uint8, ref_for_cleanfid, space)
        if flags["kid"]:
            out["kid"] = r[KEY_METRIC_KID_MEAN]
            out["kid_std"] = r[KEY_METRIC_KID_STD]
            out["kid_subset_size"] = float(subset)
        for m, key in (("precision", KEY_METRIC_PRECISION), ("recall", KEY_METRIC_RECALL)):
            if m in wanted:
                out[m] = r[key]
    if "is" in wanted:
        # torch-fidelity softmaxes the layer it is given: logits, never probabilities
        r = torch_fidelity_metrics(gen[LOGITS], None, LOGITS, seed=seed, isc=True,
                                   isc_splits=min(10, n_gen))
        out["is"] = r[KEY_METRIC_ISC_MEAN]
        out["is_std"] = r[KEY_METRIC_ISC_STD]
    if "sfid" in wanted:
        r = torch_fidelity_metrics(gen[SPATIAL], ref[SPATIAL], SPATIAL, seed=seed, fid=True)
        out["sfid"] = r[KEY_METRIC_FID]
    return out


def _is_images(reference: Reference) -> bool:
    return torch.is_tensor(reference) and reference.dtype == torch.uint8


def _reference_layers(
    reference: Reference, space: FeatureSpace, layers: list[str]
) -> dict[str, torch.Tensor]:
    if not layers:
        return {}
    if _is_images(reference):
        return space.extract(reference, layers)
    given = {FEATURES: reference} if torch.is_tensor(reference) else dict(reference)
    missing = [layer for layer in layers if layer not in given]
    if missing:
        raise GaqError(f"reference features lack layer(s) {missing}; pass reference images "
                       f"or features from reference_features()")
    return {layer: given[layer].float() for layer in layers}


def paired_metrics(images: torch.Tensor, fp_images: torch.Tensor) -> dict[str, object]:
    """Per-image MSE and PSNR of ``images`` against the full-precision ``fp_images``.

    Both are uint8 [0, 255] or both float [-1, 1]; they are compared on a [0, 1] scale
    (MSE there is 1/4 of the MSE in [-1, 1]) and PSNR uses peak 1:
    ``10 * log10(1 / MSE)``, capped at 100 dB so identical images give a finite number
    that still averages. ``psnr`` is the mean of per-image PSNRs (not PSNR of mean MSE).
    Returns ``mse``, ``psnr`` (floats) and ``mse_per_image``, ``psnr_per_image`` (numpy).
    """
    if images.shape != fp_images.shape:
        raise ValueError(f"shape mismatch: {tuple(images.shape)} vs {tuple(fp_images.shape)}")
    if (images.dtype == torch.uint8) != (fp_images.dtype == torch.uint8):
        raise ValueError("compare uint8 with uint8 or float with float, not a mix")
    a, b = _unit_scale(images), _unit_scale(fp_images)
    mse = (a - b).pow(2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10.0 * np.log10(1.0 / mse), PSNR_CAP_DB)
    return {"mse": float(mse.mean()), "psnr": float(psnr.mean()),
            "mse_per_image": mse, "psnr_per_image": psnr}


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    scaled = x.detach().cpu().double()
    return scaled / 255.0 if x.dtype == torch.uint8 else (scaled + 1.0) / 2.0
