"""The bundled default: loads offline from the installed package and makes digits."""

import json
import socket

import pytest
import torch

from gaq.data import load_digits, train_test_split_digits
from gaq.eval.digits import digit_likeness
from gaq.models.bundled import BUNDLED_MODELS, CLASSIFIER_DIR, load_classifier
from gaq.models.loading import load_model
from gaq.sampling import SamplerConfig, sample


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_data_is_16x16_in_unit_range():
    d = load_digits()
    assert d.images.shape == (1797, 1, 16, 16)
    assert d.images.min() >= -1 and d.images.max() <= 1
    train, test = train_test_split_digits(d)
    assert len(train.labels) + len(test.labels) == 1797
    assert set(test.labels.tolist()) == set(range(10))


def test_bundled_model_loads_offline(no_network):
    model = load_model("digits")
    assert type(model.denoiser).__name__ == "UNet2DModel"
    n = sum(p.numel() for p in model.denoiser.parameters())
    assert 0.5e6 < n < 2e6
    assert model.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert model.scheduler.config.num_train_timesteps == 1000
    files = {p.name for p in BUNDLED_MODELS["digits"].rglob("*")}
    assert "diffusion_pytorch_model.safetensors" in files and not any(
        f.endswith((".bin", ".pt", ".ckpt")) for f in files)


def test_classifier_heldout_accuracy(classifier):
    _, test = train_test_split_digits(load_digits())
    with torch.no_grad():
        acc = (classifier(test.images).argmax(1) == test.labels).float().mean().item()
    assert acc >= 0.97
    recorded = json.loads((CLASSIFIER_DIR / "config.json").read_text())["heldout_accuracy"]
    assert acc == pytest.approx(recorded, abs=1e-6)


def test_real_digits_are_digit_like_and_noise_is_not(classifier):
    assert digit_likeness(load_digits().images, classifier=classifier)["confident_share"] >= 0.9
    noise = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert digit_likeness(noise, classifier=classifier)["confident_share"] <= 0.1


@pytest.mark.slow
def test_sampled_digits_are_digit_like(no_network, classifier):
    model = load_model("digits")
    images = sample(model, 16, seed=0,
                         sampler=SamplerConfig(steps=50), batch_size=16)
    assert images.shape == (16, 1, 16, 16)
    assert digit_likeness(images, classifier=classifier)["confident_share"] >= 0.8
