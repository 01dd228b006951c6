"""Image metrics: torch-fidelity/clean-fid in gaq feature spaces, and paired metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from gaq.data import load_digits
from gaq.errors import GaqError
from gaq.eval.features import (
    FEATURES,
    INCEPTION_WEIGHTS_ENV,
    LOGITS,
    SPATIAL,
    ClassifierFeatures,
    InceptionFeatures,
)
from gaq.eval.metrics import image_metrics, paired_metrics, reference_features, reference_images
from gaq.sampling import to_uint8


@pytest.fixture(scope="module")
def space():
    return ClassifierFeatures(device="cpu")


@pytest.fixture(scope="module")
def digits_u8():
    return reference_images("digits")


@pytest.fixture(scope="module")
def ref(space):
    return reference_features("digits", space)


def _noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(
        0, 255).to(torch.uint8)


# An independent plug-in of the bundled classifier, built the way torch-fidelity documents
# custom extractors: uint8 images in, features out (no gaq adapter involved).
class _DirectDigits(FeatureExtractorBase):
    classifier = None

    @staticmethod
    def get_provided_features_list():
        return ("penultimate",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, x):
        return (type(self).classifier.features(x.float() / 127.5 - 1.0),)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_fid_kid_match_a_direct_torch_fidelity_call(space, digits_u8):
    gen, real = _noisy(digits_u8[:150], 12.0), digits_u8[150:]
    ours = image_metrics(gen, real, space, ("fid", "kid", "precision", "recall"), seed=3)
    if "test-direct-digits" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("test-direct-digits", _DirectDigits)
    _DirectDigits.classifier = space.model
    direct = torch_fidelity.calculate_metrics(
        input1=_Images(gen), input2=_Images(real), feature_extractor="test-direct-digits",
        fid=True, kid=True, prc=True, kid_subset_size=75, rng_seed=3,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )
    assert ours["kid_subset_size"] == 75  # min(1000, n // 2): subsets resample both sets
    assert ours["fid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours["kid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-6)
    assert ours["kid_std"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-6)
    assert ours["precision"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_PRECISION])
    assert ours["recall"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_RECALL])


def test_cleanfid_agrees_with_torch_fidelity(space, digits_u8, ref):
    gen = _noisy(digits_u8[:200], 20.0)
    from_images = image_metrics(gen, digits_u8, space, ("fid",))
    from_features = image_metrics(gen, ref, space, ("fid",))
    for r in (from_images, from_features):
        # measured: relative difference ~1e-14 (eigvals vs sqrtm on identical features)
        assert r["fid_cleanfid"] == pytest.approx(r["fid"], rel=1e-6)
    assert from_images["fid"] == pytest.approx(from_features["fid"], rel=1e-6)


def test_real_halves_are_far_closer_than_noise(space, digits_u8, ref):
    half = len(digits_u8) // 2
    real = image_metrics(digits_u8[:half], digits_u8[half:], space, ("fid",),
                         cleanfid_check=False)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (200, 1, 16, 16), generator=g, dtype=torch.uint8)
    fake = image_metrics(noise, ref, space, ("fid", "kid"), cleanfid_check=False)
    assert real["fid"] * 20 < fake["fid"]  # measured ~7.4 vs ~666
    assert fake["kid"] > 1.0


def test_precision_recall_bounded_and_recall_drops_on_collapse(space, digits_u8, ref):
    varied = image_metrics(digits_u8[:200], ref, space, ("precision", "recall", "is"))
    collapsed = image_metrics(digits_u8[:1].repeat(200, 1, 1, 1), ref, space,
                              ("precision", "recall", "is"))
    for r in (varied, collapsed):
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    assert varied["recall"] > 0.5 and collapsed["recall"] < 0.05
    # IS from the classifier's logits: ~8 over ten balanced digits, 1 for one digit
    assert varied["is"] > 5.0 and collapsed["is"] == pytest.approx(1.0, abs=1e-3)


def test_reference_is_the_uint8_bundled_set_and_cached(space, ref):
    assert ref[FEATURES].shape == (1797, 128) and ref[LOGITS].shape == (1797, 10)
    expected = space.features(to_uint8(load_digits().images))
    torch.testing.assert_close(ref[FEATURES], expected)
    assert reference_features("digits", space) is ref
    with pytest.raises(GaqError, match="no bundled reference"):
        reference_features("cifar10", space)


def test_bad_requests_are_clear(space, digits_u8, ref):
    with pytest.raises(GaqError, match="no layer"):
        image_metrics(digits_u8[:8], ref, space, ("sfid",))
    with pytest.raises(GaqError, match="unknown metric"):
        image_metrics(digits_u8[:8], ref, space, ("fidd",))
    with pytest.raises(TypeError, match="uint8"):
        space.features(digits_u8[:8].float())
    with pytest.raises(GaqError, match="1x16x16"):
        space.features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_psnr_capped_for_identical_and_falls_with_noise(digits_u8):
    x = digits_u8[:32]
    same = paired_metrics(x, x)
    assert same["mse"] == 0.0 and same["psnr"] == 100.0
    assert np.all(same["psnr_per_image"] == 100.0) and same["mse_per_image"].shape == (32,)
    psnrs = [paired_metrics(_noisy(x, s), x)["psnr"] for s in (2.0, 8.0, 32.0)]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    # float [-1, 1] inputs are compared on the same [0, 1] scale as uint8
    xf, yf = x.float() / 127.5 - 1, _noisy(x, 8.0).float() / 127.5 - 1
    assert paired_metrics(yf, xf)["psnr"] == pytest.approx(psnrs[1], rel=1e-6)


def test_inception_without_weights_fails_fast_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(GaqError) as err:
        InceptionFeatures(device="cpu")
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "weights_path" in msg
    with pytest.raises(GaqError, match="nowhere.pth"):
        InceptionFeatures(tmp_path / "nowhere.pth", device="cpu")


def _stand_in_inception(monkeypatch) -> dict[str, torch.Tensor]:
    """Random Inception weights (real ones cannot be downloaded here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        stand_in = fe.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    return stand_in


def test_inception_layers_with_stand_in_weights(tmp_path, monkeypatch):
    # random weights exercise loading and the layers
    stand_in = _stand_in_inception(monkeypatch)
    path = tmp_path / "inception.pth"
    torch.save(stand_in, path)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    space = InceptionFeatures(device="cpu")
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = space.extract(grey)
    assert out[FEATURES].shape == (2, 2048)
    assert out[LOGITS].shape == (2, 1008)
    assert out[SPATIAL].shape == (2, 7 * 17 * 17)
    # grey is repeated to RGB: same features as the explicit 3-channel image
    torch.testing.assert_close(space.features(grey.expand(-1, 3, -1, -1)), out[FEATURES])


class _Payload:
    """Unpickling this writes a marker file: the code a hostile weights file would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_inception_weights_never_unpickle_code(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    evil = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload(str(marker))}, evil)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(evil))
    with pytest.raises(GaqError) as err:
        InceptionFeatures(device="cpu")
    assert not marker.exists()  # the payload never ran
    msg = str(err.value)
    assert "\n" not in msg and str(evil) in msg and "safely" in msg
    # a plain list is not a state dict either
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(GaqError, match="no state dict"):
        InceptionFeatures(tmp_path / "list.pth", device="cpu")


def test_inception_weights_load_from_safetensors(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    stand_in = _stand_in_inception(monkeypatch)
    save_file({k: v.contiguous() for k, v in stand_in.items()}, tmp_path / "inception.safetensors")
    torch.save(stand_in, tmp_path / "inception.pth")
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    a = InceptionFeatures(tmp_path / "inception.safetensors", device="cpu").features(grey)
    b = InceptionFeatures(tmp_path / "inception.pth", device="cpu").features(grey)
    assert torch.equal(a, b)


def test_fid_and_kid_match_an_independent_numpy_scipy_computation(space, digits_u8):
    """FID as the Fréchet distance with scipy's matrix square root, KID as the unbiased
    MMD² with the cubic polynomial kernel k(x, y) = (x·y/d + 1)³, written here from their
    definitions on the same features, against torch-fidelity's values."""
    import numpy as np
    from scipy import linalg

    from gaq.eval.backends import torch_fidelity_metrics
    from gaq.eval.features import FEATURES

    gen = space.extract(_noisy(digits_u8[:120], 15.0))[FEATURES].double().numpy()
    real = space.extract(digits_u8[120:400])[FEATURES].double().numpy()
    mu1, mu2 = gen.mean(0), real.mean(0)
    s1, s2 = np.cov(gen, rowvar=False), np.cov(real, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    m = len(gen)
    kxx = kernel(gen, gen)
    # torch-fidelity averages MMD² over random subsets; with equal set sizes and subsets
    # of that size every subset holds every row, so its value is the full-set estimate
    real_m = real[:m]
    kyy_m, kxy_m = kernel(real_m, real_m), kernel(gen, real_m)
    mmd_m = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
             + (kyy_m.sum() - np.trace(kyy_m)) / (m * (m - 1)) - 2 * kxy_m.mean())
    ours = torch_fidelity_metrics(torch.from_numpy(gen).float(), torch.from_numpy(real).float(),
                                  FEATURES, seed=0, fid=True)
    assert ours[torch_fidelity.KEY_METRIC_FID] == pytest.approx(fid, rel=1e-4)
    same = torch_fidelity_metrics(torch.from_numpy(gen).float(),
                                  torch.from_numpy(real_m).float(), FEATURES, seed=0, kid=True,
                                  kid_subset_size=m, kid_subsets=3)
    assert same[torch_fidelity.KEY_METRIC_KID_MEAN] == pytest.approx(mmd_m, rel=1e-4, abs=1e-7)
    # float32 summation order only
    assert same[torch_fidelity.KEY_METRIC_KID_STD] < 1e-3 * abs(mmd_m)
