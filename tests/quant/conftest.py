"""Shared helpers for the quantization-primitive tests: tiny models and accuracy measures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def _sqnr_db(reference: Tensor, approx: Tensor) -> float:
    reference, approx = reference.detach(), approx.detach()
    noise = (reference - approx).double().pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise))


@pytest.fixture
def sqnr() -> Callable[[Tensor, Tensor], float]:
    """Signal-to-quantization-noise ratio in dB."""
    return _sqnr_db


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel.from_config(TINY_UNET).eval()
