"""Feature spaces for image metrics: uint8 images in, named feature layers out.

Every metric sees images as uint8 (``gaq.sampling.to_uint8``), the same quantisation
for generated and reference sets, because that step alone moves FID by more than the
gaps between PTQ methods (clean-fid's documentation measures the effect of resizing and
quantisation choices).

Layers a space may provide:

- ``features``: the vectors FID, KID and precision/recall are computed on;
- ``logits``: unnormalised class scores, for the Inception Score;
- ``spatial``: flattened spatial features, for sFID (Inception only).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

import torch

from gaq.errors import GaqError

FEATURES = "features"
LOGITS = "logits"
SPATIAL = "spatial"

# torch-fidelity's converted TF-2015 Inception; its file name carries the hash prefix
# torch.hub checks, so a copy dropped into the hub cache is found exactly as a download would be.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_URL.rsplit("/", 1)[-1]
INCEPTION_WEIGHTS_ENV = "GAQ_INCEPTION_WEIGHTS"
# sFID (Nash et al. 2021, as in guided-diffusion's evaluator): the first 7 channels of TF
# Inception's `mixed_6/conv` (17x17), i.e. torch-fidelity's Mixed_6d.branch1x1 after ReLU.
SFID_CHANNELS = 7


class FeatureSpace(ABC):
    """Maps uint8 images ``(N, C, H, W)`` in [0, 255] to float feature layers, in batches."""

    name: str
    layers: tuple[str, ...]

    def __init__(self, *, device: str | torch.device, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def cache_key(self) -> str:
        """Identifies the extractor and its weights, for caching reference features."""
        return self.name

    @torch.no_grad()
    def extract(
        self, images_uint8: torch.Tensor, layers: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The requested layers (all by default) as float32 CPU tensors ``(N, D_layer)``."""
        wanted = tuple(layers) if layers is not None else self.layers
        missing = [layer for layer in wanted if layer not in self.layers]
        if missing:
            raise GaqError(
                f"feature space {self.name!r} has no layer(s) {missing}; it provides {self.layers}"
            )
        _check_images(images_uint8)
        parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in wanted}
        for chunk in images_uint8.split(self.batch_size):
            got = self._batch(chunk.to(self.device))
            for layer in wanted:
                parts[layer].append(got[layer].float().cpu())
        return {layer: torch.cat(p) for layer, p in parts.items()}

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """The ``features`` layer: ``(N, D)`` float32 on CPU."""
        return self.extract(images_uint8, (FEATURES,))[FEATURES]

    @abstractmethod
    def _batch(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        """All layers for one batch already on ``self.device``."""


def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise TypeError("feature spaces take uint8 images; convert with gaq.sampling.to_uint8")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")


class ClassifierFeatures(FeatureSpace):
    """The bundled digit classifier: 128-d penultimate features and its 10 logits.

    Inception means little on 16x16 grey digits (and cannot be downloaded here); a
    classifier trained on the same digits gives a feature space that separates them.
    """

    name = "digits-classifier"
    layers = (FEATURES, LOGITS)

    def __init__(
        self,
        classifier: torch.nn.Module | None = None,
        *,
        device: str | torch.device,
        batch_size: int = 512,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        from gaq.models.bundled import load_classifier

        self._custom = classifier is not None
        model = classifier if classifier is not None else load_classifier()
        self.model = model.to(self.device).eval()

    @property
    def cache_key(self) -> str:
        return f"{self.name}@{id(self.model)}" if self._custom else self.name

    def _batch(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(images_uint8.shape[1:]) != (1, 16, 16):
            raise GaqError(
                f"the digit-classifier feature space takes 1x16x16 images, got "
                f"{tuple(images_uint8.shape[1:])}; use InceptionFeatures for other models"
            )
        # exact inverse of gaq.sampling.to_uint8: u = round((x + 1) * 127.5)
        x = images_uint8.float() / 127.5 - 1.0
        feats = self.model.features(x)
        return {FEATURES: feats, LOGITS: self.model.head(feats)}


def inception_weight_candidates(weights_path: str | os.PathLike | None = None) -> list[Path]:
    """Where Inception weights are looked for, in order: the explicit path, then
    ``$GAQ_INCEPTION_WEIGHTS``, then torch.hub's cache (where torch-fidelity downloads)."""
    if weights_path is not None:
        return [Path(weights_path).expanduser()]
    out = []
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        out.append(Path(env).expanduser())
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    return out


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The first existing candidate; a one-line GaqError naming them all otherwise.

    Never downloads: evaluation must be reproducible offline, and a silent download
    would also hide which weights a result was computed with.
    """
    candidates = inception_weight_candidates(weights_path)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise GaqError(
        f"Inception weights not found (looked in: {looked}); copy torch-fidelity's "
        f"{INCEPTION_WEIGHTS_FILE} (from {INCEPTION_URL}) there, set ${INCEPTION_WEIGHTS_ENV}, "
        f"or pass weights_path="
    )


def load_inception_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inception weights as a state dict, without running pickled code: a ``.safetensors``
    file, or a PyTorch file read with ``torch.load(weights_only=True)`` (torch-fidelity's
    ``.pth`` is a plain state dict and loads so). Anything else is one clear GaqError."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure gets the same one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise GaqError(
            f"Inception weights {path} cannot be loaded safely ({first}); use torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE} (a plain state dict) or a .safetensors copy of it"
        ) from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise GaqError(f"Inception weights {path} hold no state dict of tensors; use "
                       f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} or a .safetensors copy")
    return state


class InceptionFeatures(FeatureSpace):
    """torch-fidelity's ``inception-v3-compat`` (TF-2015 Inception, bit-compatible resize):
    ``features`` = 2048-d pool3, ``logits`` = the 1008 ``logits_unbiased`` torch-fidelity
    uses for IS, ``spatial`` = 7x17x17 = 2023-d ``mixed_6/conv`` features for sFID,
    flattened in TF's (H, W, C) order so statistics match guided-diffusion's reference batches.
    Grey images are repeated to 3 channels; every input is resized to 299x299 inside.
    """

    name = "inception-v3-compat"
    layers = (FEATURES, LOGITS, SPATIAL)

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device,
        batch_size: int = 64,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        # find and load the weights before building the network: a missing or unsafe file
        # fails fast
        self.weights_path = find_inception_weights(weights_path)
        state = load_inception_state(self.weights_path)
        import torch_fidelity.feature_extractor_inceptionv3 as fe

        # torch-fidelity would unpickle the file itself (torch.load, weights_only=False),
        # which runs any code a pickle carries: it gets the state loaded above through its
        # URL loader instead, so it neither unpickles nor downloads anything.
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
            self.model = fe.FeatureExtractorInceptionV3(
                self.name, ["2048", "logits_unbiased"], verbose=False,
            ).to(self.device)
        self._spatial: torch.Tensor | None = None
        # torch-fidelity exposes no spatial layer, so a hook reads mixed_6/conv on the way
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    @property
    def cache_key(self) -> str:
        return f"{self.name}@{self.weights_path.resolve()}"

    def _grab_spatial(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        s = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = s.reshape(len(s), -1).float().clone()

    def _batch(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        c = images_uint8.shape[1]
        if c == 1:
            images_uint8 = images_uint8.expand(-1, 3, -1, -1)
        elif c != 3:
            raise GaqError(f"Inception features need 1 or 3 channels, got {c}")
        self._spatial = None
        pool, logits = self.model(images_uint8.contiguous())
        assert self._spatial is not None
        spatial, self._spatial = self._spatial, None
        return {FEATURES: pool, LOGITS: logits, SPATIAL: spatial}


def feature_space_for(
    model_id: str,
    *,
    device: str | torch.device,
    weights_path: str | os.PathLike | None = None,
) -> FeatureSpace:
    """The default space, the model's scoring entry's (:func:`gaq.models.bundled.scoring_for`):
    the digit classifier for the bundled models, Inception else."""
    from gaq.models.bundled import scoring_for

    if scoring_for(model_id).feature_space == "classifier":
        return ClassifierFeatures(device=device)
    return InceptionFeatures(weights_path, device=device)
