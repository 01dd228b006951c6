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


def tiny_pipeline(kind: str, model: nn.Module, scheduler, **kw):
    """A :class:`~gaq.models.pipeline.Pipeline` around a tiny model of ``conftest.py`` with
    its conditioning source: class labels for DiT (null class 10), a seeded
    :class:`~gaq.models.conditioning.ClassEmbedder` feeding cross-attention for the
    conditional UNet, nothing for the plain UNet."""
    from gaq.models.conditioning import ClassConditioning, ClassEmbedder, NoConditioning
    from gaq.models.pipeline import Pipeline

    if kind == "dit":
        cond = ClassConditioning(10, 10)
    elif kind == "cond_unet":
        torch.manual_seed(1)
        embedder = ClassEmbedder(10, model.config.cross_attention_dim, tokens=3).eval()
        cond = ClassConditioning(10, 10, embedder)
    else:
        cond = NoConditioning()
    return Pipeline(model, scheduler, conditioning=cond, name=f"tiny-{kind}", **kw)
