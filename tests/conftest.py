from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    # the slowest tests (chosen from measured durations, not guessed): benchmarks, every
    # method on every model, training, Ray, torchrun. The inner loop leaves them out,
    # nox -s tests -- -m "not slow"; CI runs everything.
    config.addinivalue_line("markers", "slow: one of the slowest tests; the inner loop "
                            "is -m 'not slow'")

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 8,
}


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


@pytest.fixture
def tiny_pipeline_dir(tmp_path, tiny_unet):
    """A randomly initialised DDPM pipeline saved as a standard diffusers folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    path = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet, scheduler=sched).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def tiny_class_unet():
    """The tiny UNet with a 3-class label embedding (a class-conditional denoiser)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET, num_class_embeds=3).eval()


# Tiny random models of the other supported architectures (gaq.models.adapters.ADAPTERS).
TINY_COND_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 12,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}

TINY_DIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}

_TINY_MODELS = {
    "unet": ("UNet2DModel", TINY_UNET),
    "cond_unet": ("UNet2DConditionModel", TINY_COND_UNET),
    "dit": ("DiTTransformer2DModel", TINY_DIT),
}


@pytest.fixture(scope="session")
def make_tiny_model():
    """``make(kind, seed=0)``: a fresh tiny random model ("unet", "cond_unet" or "dit") in
    eval mode; the same seed gives the same weights (session scope, so module-scoped
    fixtures can build models too)."""
    import diffusers

    def make(kind: str, seed: int = 0):
        class_name, config = _TINY_MODELS[kind]
        torch.manual_seed(seed)
        return getattr(diffusers, class_name)(**config).eval()

    return make


@pytest.fixture
def tiny_cond_unet(make_tiny_model):
    """A tiny text-conditioned UNet2DConditionModel (encoder_hidden_states: (B, L, 12))."""
    return make_tiny_model("cond_unet")


@pytest.fixture
def tiny_dit(make_tiny_model):
    """A tiny class-conditional DiTTransformer2DModel (10 classes, patch size 2)."""
    return make_tiny_model("dit")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``):
    its models are tiny, and on a shared machine more threads only oversubscribe the
    cores; restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
