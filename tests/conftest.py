from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
