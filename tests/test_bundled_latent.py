"""The bundled latent models (digits-ldm, digits-dit): shipped inside the package within the
size budget, safetensors only, load offline as class-conditional latent pipelines with a
null class, and make the requested digits under guidance."""

import json
import socket

import pandas as pd
import pytest
import torch

from gaq.eval.digits import digit_likeness
from gaq.models.bundled import BUNDLED_MODELS, DIT_CONFIG, LDM_UNET_CONFIG, load_classifier
from gaq.models.loading import load_model
from gaq.sampling import SamplerConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE_LIMIT = 10 * 2**20  # bytes: what `du -sh` shows as 10M
DENOISERS = {"digits-ldm": "UNet2DConditionModel", "digits-dit": "DiTTransformer2DModel"}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_folder_is_small_safetensors_only_and_loads_offline(name, no_network):
    folder = BUNDLED_MODELS[name]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= SIZE_LIMIT
    assert not any(p.suffix in (".bin", ".pt", ".ckpt", ".pth") for p in files)
    assert any(p.suffix == ".safetensors" for p in files)

    pipe = load_model(name)
    assert type(pipe.denoiser).__name__ == DENOISERS[name]
    assert type(pipe.autoencoder).__name__ == "AutoencoderKL"
    assert pipe.latent_shape == (4, 8, 8)
    assert pipe.conditioning.kind == "class" and pipe.conditioning.supports_guidance
    assert pipe.conditioning.null_class == 10
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    # the shipped denoiser is the architecture the training code builds
    denoiser = "unet" if name == "digits-ldm" else "transformer"
    config = json.loads((folder / denoiser / "config.json").read_text())
    expected = LDM_UNET_CONFIG if denoiser == "unet" else DIT_CONFIG
    assert {k: config[k] for k in expected} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}


def test_latent_models_share_one_autoencoder():
    """digits-dit is trained on the digits-ldm latents: its VAE is a byte-identical copy."""
    ldm, dit = (BUNDLED_MODELS[n] / "vae" for n in ("digits-ldm", "digits-dit"))
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (ldm / name).read_bytes() == (dit / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_guided_samples_are_the_requested_digits(name):
    """20 guided samples (two per class) at guidance 3.0: the classifier reads the requested
    class in at least 17 (the full 500-sample figures are in results/bundled/)."""
    images = sample(load_model(name), 20, seed=0,
                    sampler=SamplerConfig(steps=20, guidance=3.0), batch_size=20)
    assert images.shape == (20, 1, 16, 16) and images.abs().max() <= 1
    scores = digit_likeness(images, classifier=load_classifier(),
                            labels=torch.arange(20) % 10)
    assert scores["class_accuracy"] >= 0.85


@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_recorded_quality_meets_the_bar(name):
    """The training run's own evaluation (500 samples, DDIM 50, guidance 3.0) is committed
    next to its logs, and the shipped weights met the guided bar (90 % of the requested
    class) in it."""
    from pathlib import Path

    quality = json.loads((Path(__file__).parents[1] / "results" / "bundled"
                          / f"{name}_quality.json").read_text())
    assert quality["num_images"] >= 500 and quality["guidance"] == 3.0
    assert quality["guided_class_accuracy"] >= 0.9
    # unconditional digit-likeness is reported in the README, not gated: the latent models'
    # null-class samples are digit-like in 71-83 % of the cases (the pixel model: 98 %)


CLASS_BENCH = """
models = {models}
bits = ["W8A8"]
methods = [{{ name = "fp" }}, {{ name = "rtn" }}]

[benchmark]
name = "cls"

[sampler]
steps = 6
guidance = 3.0

[calibration]
interval = 3
samples_per_step = 4

[eval]
num_images = 20
batch_size = 20
seeds = [0]
metrics = {metrics}
heldout_trajectories = 0
"""


@pytest.mark.slow
def test_class_accuracy_metric_matches_a_direct_computation(tmp_path, monkeypatch, capsys):
    """class_acc is computed for the bundled class-conditional model only, equals the
    classifier's reading of the same guided samples drawn directly, and a benchmark that
    asks for it with no model that has it fails before any work."""
    from gaq.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    bench = tmp_path / "b.toml"
    bench.write_text(CLASS_BENCH.format(models='["digits", "digits-ldm"]',
                                        metrics='["class_acc", "psnr"]'))
    assert main(["bench", str(bench), "--results", str(tmp_path / "results")]) == 0
    df = pd.read_parquet(tmp_path / "results" / "cls" / "metrics.parquet")
    acc = df[df["metric"] == "class_acc"]
    assert set(acc["model"]) == {"digits-ldm"} and set(acc["method"]) == {"fp", "rtn"}

    images = sample(load_model("digits-ldm"), 20, seed=0,
                    sampler=SamplerConfig(steps=6, guidance=3.0), batch_size=20)
    direct = digit_likeness(images, classifier=load_classifier(),
                            labels=torch.arange(20) % 10)["class_accuracy"]
    assert acc[acc["method"] == "fp"]["value"].item() == pytest.approx(direct, abs=1e-9)

    bench.write_text(CLASS_BENCH.format(models='["digits"]', metrics='["class_acc"]')
                     .replace("guidance = 3.0", ""))
    assert main(["bench", str(bench), "--results", str(tmp_path / "results2")]) != 0
    assert "class_acc" in capsys.readouterr().err
    assert not (tmp_path / "results2" / "cls" / "metrics.parquet").exists()
