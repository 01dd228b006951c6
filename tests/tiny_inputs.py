"""Conditioning inputs and denoiser calls for the tiny models of ``conftest.py``, shared by
the method tests that build random calibration rows."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def cond_inputs(kind: str, model: nn.Module, rows: int, gen: torch.Generator) -> dict:
    """Random conditioning of ``rows`` samples: class labels (DiT), text embeddings
    (conditional UNet) or nothing (UNet)."""
    if kind == "dit":
        return {"class_labels": torch.randint(0, model.config.num_embeds_ada_norm, (rows,),
                                              generator=gen)}
    if kind == "cond_unet":
        return {"encoder_hidden_states": torch.randn(rows, 3, model.config.cross_attention_dim,
                                                     generator=gen)}
    return {}


@torch.no_grad()
def denoise(kind: str, model: nn.Module, x: Tensor, t: Tensor | int, cond: dict) -> Tensor:
    """The noise prediction, called the way each architecture's pipeline calls it."""
    if kind == "dit":
        return model(x, timestep=t, **cond).sample
    return model(x, t, **cond).sample
