"""Adapters that let torch-fidelity and clean-fid compute metrics in a gaq feature space.

The formulas stay the libraries' own: torch-fidelity gets the features through its
registered-extractor API, clean-fid through its ``custom_feat_extractor`` hook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch_fidelity import FeatureExtractorBase, calculate_metrics, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from gaq.eval.features import FEATURES, LOGITS, SPATIAL, FeatureSpace

TF_EXTRACTOR = "gaq-precomputed"


class PrecomputedFeatures(FeatureExtractorBase):
    """A torch-fidelity extractor whose inputs are rows a FeatureSpace already computed.

    Each image set goes through the feature space once and its layers are shared by
    every metric; otherwise torch-fidelity would re-run the network once per layer
    (pool features, logits, spatial) and reference features could not be cached.
    """

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES, LOGITS, SPATIAL

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return LOGITS if metric == "isc" else FEATURES

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # every call below feeds the rows of exactly one layer
        if len(self.features_list) != 1:
            raise ValueError(f"{TF_EXTRACTOR} serves one layer per call, got {self.features_list}")
        return (rows.float(),)


if TF_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # module reloads must not re-register
    register_feature_extractor(TF_EXTRACTOR, PrecomputedFeatures)


class _Rows(torch.utils.data.Dataset):
    # torch-fidelity wants each item to be a tensor (TensorDataset yields tuples)
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows.float().contiguous()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def torch_fidelity_metrics(
    rows1: torch.Tensor,
    rows2: torch.Tensor | None,
    layer: str,
    *,
    seed: int,
    batch_size: int = 1024,
    **flags,
) -> dict[str, float]:
    """One ``torch_fidelity.calculate_metrics`` call on the rows of ``layer``.

    ``rows1`` is the generated set (torch-fidelity's input1: precision = share of
    generated samples on the real manifold), ``rows2`` the reference. ``flags`` are
    calculate_metrics options (``fid=True``, ``kid_subset_size=...``, ...).
    """
    return calculate_metrics(
        input1=_Rows(rows1),
        input2=_Rows(rows2) if rows2 is not None else None,
        feature_extractor=TF_EXTRACTOR,
        feature_layer_isc=layer, feature_layer_fid=layer,
        feature_layer_kid=layer, feature_layer_prc=layer,
        cuda=False,  # rows are already features: only the metric math runs here
        batch_size=batch_size,
        cache=False,  # no files under $TORCH_HOME; reference caching is gaq's, in memory
        save_cpu_ram=True,  # DataLoader without worker processes; chunked PRC distances
        rng_seed=seed,
        verbose=False,
        **flags,
    )


def cleanfid_fid(
    images_uint8: torch.Tensor,
    reference: torch.Tensor,
    space: FeatureSpace,
) -> float:
    """FID by clean-fid's folder pipeline and Fréchet distance, in ``space``.

    ``reference`` is uint8 images (sent through the same pipeline) or precomputed
    ``features`` rows. Images travel as lossless .npy files, which clean-fid loads
    without an RGB conversion; the resize is the identity (no 299x299 step: the
    feature space does any resizing itself, exactly as on the torch-fidelity path).
    """
    from cleanfid import fid as cfid

    def extractor(batch: torch.Tensor) -> torch.Tensor:
        # clean-fid hands over float (uint8 / 255 * 255): round back to the exact bytes
        return space.features(batch.round().clamp(0, 255).to(torch.uint8))

    def folder_features(images: torch.Tensor, folder: Path) -> np.ndarray:
        folder.mkdir()
        for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
            np.save(folder / f"{i:07d}.npy", img)
        return cfid.get_folder_features(
            str(folder), extractor, num_workers=0, batch_size=space.batch_size,
            device=space.device, mode="clean", custom_fn_resize=_identity, verbose=False,
        )

    from gaq.tempdirs import temp_dir

    with temp_dir("cleanfid") as tmp:
        feats1 = folder_features(images_uint8, tmp / "gen")
        if reference.dtype == torch.uint8:
            feats2 = folder_features(reference, tmp / "ref")
        else:
            feats2 = reference.float().numpy()
    try:
        return float(cfid.fid_from_feats(feats1, feats2))
    except ValueError:  # sqrtm left a large imaginary part: too few samples for the dimension
        return float("nan")


def _identity(x: np.ndarray) -> np.ndarray:
    return x
