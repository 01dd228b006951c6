"""PixArt-α/Σ: diffusers ``PixArtTransformer2DModel``, a text-conditional DiT.

What differs from the class-conditional DiT (:class:`gaq.models.adapters.DiTAdapter`):

* the call: the second positional argument is ``encoder_hidden_states``, so the timestep
  goes by name, and the 1024-px models (``use_additional_conditions``) also take the
  image's resolution and aspect ratio (``added_cond_kwargs``);
* the timestep path: one shared ``adaln_single`` (timestep MLP, then one linear to the six
  modulation vectors of every block, each block adding its own learned table), and the
  output layer modulated by the timestep embedding itself, not by a linear of it;
* the text path: a two-layer caption projection of the text encoder's output, quantized
  like any other layer; the cross-attention keys and values of the text are ``cross_kv``.
"""

from __future__ import annotations

import torch
from torch import nn

from gaq.models.adapters import ModelAdapter, _batch_timesteps

#: PixArt's VAE downsamples by 8: the pixel size its 1024-px models are told is the
#: latent's times 8 (PixArtAlphaPipeline passes the requested height and width)
VAE_SCALE = 8


def _added_cond(model: nn.Module, x: torch.Tensor) -> dict:
    """``added_cond_kwargs`` as PixArtAlphaPipeline builds them for an image of ``x``'s
    size: resolution (B, 2) and aspect ratio (B, 1) for the 1024-px models, else None."""
    if not getattr(model, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    b, h, w = x.shape[0], x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
    res = torch.tensor([[h, w]], dtype=x.dtype, device=x.device).expand(b, 2)
    ratio = torch.tensor([[h / w]], dtype=x.dtype, device=x.device).expand(b, 1)
    return {"resolution": res, "aspect_ratio": ratio}


class PixArtAdapter(ModelAdapter):
    """diffusers ``PixArtTransformer2DModel`` (diffusers 0.42)."""

    arch = "PixArt"
    block_types = {"BasicTransformerBlock": "transformer"}

    @staticmethod
    def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> object:
        return model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                     added_cond_kwargs=_added_cond(model, x),
                     encoder_attention_mask=cond.get("encoder_attention_mask"))

    def role(self, name: str) -> str | None:
        if name == "pos_embed.proj":
            return "input"
        if name == "proj_out":
            return "output"
        if name == "adaln_single.emb.timestep_embedder.linear_1":
            return "time_embed_in"
        if name.startswith("adaln_single.emb."):
            return "time_embed"
        if name == "adaln_single.linear":
            return "time_proj"  # the blocks' shared adaLN modulation of the timestep
        if name.endswith((".attn2.to_k", ".attn2.to_v")):
            return "cross_kv"
        return None

    def temporal_forward(self, model: nn.Module, t: torch.Tensor,
                         cond: dict) -> dict[str, torch.Tensor]:
        # AdaLayerNormSingle.forward: the embedding (what the output layer's modulation
        # adds to its table) and linear(silu(embedding)) (what every block's adds to its own)
        t = _batch_timesteps(t)
        dtype = next(model.parameters()).dtype
        size = model.config.sample_size
        probe = torch.zeros(len(t), 1, size, size, dtype=dtype, device=t.device)
        ada = model.adaln_single
        emb = ada.emb(t, **_added_cond(model, probe), batch_size=len(t), hidden_dtype=dtype)
        return {"adaln_single.emb": emb, "adaln_single.linear": ada.linear(ada.silu(emb))}

    def example_inputs(self, batch: int = 2) -> tuple[tuple, dict]:
        cfg, dev = self.model.config, self.device
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=dev)
        t = torch.full((batch,), 10, dtype=torch.long, device=dev)
        text = torch.randn(batch, 4, cfg.caption_channels, device=dev)
        return (x,), {"timestep": t, "encoder_hidden_states": text,
                      "added_cond_kwargs": _added_cond(self.model, x)}
