"""Training of the bundled latent models (digits-ldm, digits-dit): a few steps on tiny configs
learn, are reproducible from a seed and save folders that reload; the bundled folders hold
the expected components within the size budget."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gaq.models.bundled import (
    DIT_CONFIG,
    LATENT_SCHEDULER_CONFIG,
    LDM_UNET_CONFIG,
    VAE_CONFIG,
)
from gaq.models.conditioning import ClassEmbedder
from gaq.models.train_latent import (
    AutoencoderTrainConfig,
    LatentDenoiserTrainConfig,
    _disable_label_dropout,
    _pipeline,
    save_latent_grid,
    train_autoencoder,
    train_dit,
    train_ldm,
)
from gaq.sampling import SamplerConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VAE = {**VAE_CONFIG, "block_out_channels": (8, 16), "norm_num_groups": 4}
TINY_EMBEDDER = {"num_classes": 10, "dim": 8, "tokens": 2}
TINY_UNET = {**LDM_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8,
             "attention_head_dim": 2, "cross_attention_dim": 8}
TINY_DIT = {**DIT_CONFIG, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
DENOISER_CFG = LatentDenoiserTrainConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=1,
                                         log_every=1)


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _losses(path, key="loss"):
    return [r[key] for r in _log(path) if key in r and "step" in r]


def _learned(values):
    """The last five logged losses average below the first five: training reduced the loss
    (averaged, as each step sees another batch and other noise)."""
    return sum(values[-5:]) / 5 < sum(values[:5]) / 5


def _weights(folder):
    return {f.relative_to(folder).as_posix(): load_file(str(f))
            for f in sorted(folder.rglob("*.safetensors"))}


def _same(a, b):
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a.values(), b.values(), strict=True))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vae")
    cfg = AutoencoderTrainConfig(steps=25, batch_size=16, lr=3e-3, warmup_steps=1, log_every=1)
    path = train_autoencoder(root / "vae", cfg, root / "vae.jsonl", vae_config=TINY_VAE)
    return path, root / "vae.jsonl", cfg


def test_autoencoder_learns_and_sets_the_scaling_factor(tiny_vae):
    from diffusers import AutoencoderKL

    path, log, _ = tiny_vae
    assert _learned(_losses(log, "mse"))
    done = _log(log)[-1]
    assert done["event"] == "done" and done["psnr_db_mean_latent"] > 0
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
    assert vae.config.scaling_factor == pytest.approx(done["scaling_factor"])
    assert vae.config.scaling_factor != pytest.approx(0.18215)  # diffusers' SD default
    assert vae.config.latent_channels == 4


def test_autoencoder_is_reproducible_from_seed(tiny_vae, tmp_path):
    path, _, cfg = tiny_vae
    again = train_autoencoder(tmp_path / "vae", cfg, vae_config=TINY_VAE)
    assert _same(_weights(path), _weights(again))
    assert json.loads((again / "config.json").read_text())["scaling_factor"] == json.loads(
        (path / "config.json").read_text())["scaling_factor"]


@pytest.mark.slow
def test_ldm_learns_reloads_and_is_reproducible(tiny_vae, tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    vae, _, _ = tiny_vae
    kw = {"unet_config": TINY_UNET, "embedder_config": TINY_EMBEDDER}
    a = train_ldm(tmp_path / "a", vae, DENOISER_CFG, tmp_path / "a.jsonl", **kw)
    b = train_ldm(tmp_path / "b", vae, DENOISER_CFG, **kw)
    assert _learned(_losses(tmp_path / "a.jsonl"))
    assert _same(_weights(a), _weights(b))
    assert _same(_weights(vae), _weights(a / "vae"))  # a copy of the VAE

    index = json.loads((a / "model_index.json").read_text())
    assert index["_class_name"] == "GaqLatentPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["class_embedder"] == ["gaq", "ClassEmbedder"]
    assert index["gaq_conditioning"] == {"kind": "class", "num_classes": 10, "null_class": 10}
    sched = DDIMScheduler.from_pretrained(a, subfolder="scheduler")
    assert {k: sched.config[k] for k in LATENT_SCHEDULER_CONFIG} == LATENT_SCHEDULER_CONFIG

    unet = UNet2DConditionModel.from_pretrained(a, subfolder="unet", use_safetensors=True,
                                                low_cpu_mem_usage=False).eval()
    emb_a = ClassEmbedder.from_pretrained(a / "class_embedder")
    emb_b = ClassEmbedder.from_pretrained(b / "class_embedder")
    labels = torch.tensor([0, 3, 10])
    assert torch.equal(emb_a(labels), emb_b(labels)) and emb_a(labels).shape == (3, 2, 8)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = unet(z, t, encoder_hidden_states=emb_a(labels)).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    # the folder loads as the benchmarks load it and samples with guidance, reproducibly
    x1 = sample(_pipeline(a), 2, seed=0, sampler=SamplerConfig(steps=3, guidance=3.0))
    x2 = sample(_pipeline(b), 2, seed=0, sampler=SamplerConfig(steps=3, guidance=3.0))
    assert x1.shape == (2, 1, 16, 16) and torch.equal(x1, x2)


def test_dit_learns_reloads_and_is_reproducible(tiny_vae, tmp_path):
    from diffusers import DiTTransformer2DModel

    vae, _, _ = tiny_vae
    a = train_dit(tmp_path / "a", vae, DENOISER_CFG, tmp_path / "a.jsonl", dit_config=TINY_DIT)
    b = train_dit(tmp_path / "b", vae, DENOISER_CFG, dit_config=TINY_DIT)
    assert _learned(_losses(tmp_path / "a.jsonl"))
    assert _same(_weights(a), _weights(b))
    index = json.loads((a / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert "unet" not in index and "class_embedder" not in index
    dit = DiTTransformer2DModel.from_pretrained(a, subfolder="transformer", use_safetensors=True,
                                                low_cpu_mem_usage=False).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = dit(z, timestep=torch.tensor([5, 700]), class_labels=torch.tensor([2, 10])).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    guided = sample(_pipeline(a), 2, seed=0, sampler=SamplerConfig(steps=3, guidance=3.0))
    null = sample(_pipeline(a, (10,)), 2, seed=0, sampler=SamplerConfig(steps=3))
    assert guided.shape == (2, 1, 16, 16) and guided.abs().max() <= 1
    assert not torch.equal(guided, null)  # the null class is a different conditioning
    # the grids: guided samples, and the null-class ones the unconditional score judges
    from PIL import Image

    g = save_latent_grid(a, tmp_path / "g.png", rows=1, steps=3)
    u = save_latent_grid(a, tmp_path / "u.png", rows=1, steps=3, unconditional=True)
    # (equal up to float rounding: a batch of 10 against one of 2)
    assert torch.allclose(g[:2], guided, atol=1e-4) and torch.allclose(u[:2], null, atol=1e-4)
    assert not torch.allclose(u[:2], guided, atol=1e-2)
    assert Image.open(tmp_path / "u.png").size == Image.open(tmp_path / "g.png").size


def test_dit_label_dropout_is_left_to_the_training_loop():
    """diffusers drops labels per block in train mode; after _disable_label_dropout a train-mode
    forward is deterministic, and the null row (index 10) still exists."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(**TINY_DIT)
    tables = [m for m in dit.modules() if isinstance(m, LabelEmbedding)]
    assert tables and all(m.dropout_prob > 0 for m in tables)  # diffusers' default
    _disable_label_dropout(dit)
    assert all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 11 for m in tables)
    dit.train()
    z, t, y = torch.randn(64, 4, 8, 8), torch.full((64,), 300), torch.arange(64) % 10
    with torch.no_grad():
        assert torch.equal(dit(z, timestep=t, class_labels=y).sample,
                           dit(z, timestep=t, class_labels=y).sample)
