"""A loaded diffusion model as the sampler sees it: denoiser, scheduler, an optional
autoencoder and a conditioning source.

Everything that runs a model (sampling, calibration recording, held-out trajectories,
noise curves, PTQD's statistics, perf) goes through a :class:`Pipeline`, so every method
sees exactly the denoiser inputs the sampler produces: latents for latent models, both
halves of a classifier-free-guided batch, the text or class context of each image.

Only the denoiser is ever quantized: the autoencoder and the text encoder stay in full
precision (the layer report says so), as in every method of the suite's papers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaq.models.conditioning import Conditioning, NoConditioning

__all__ = ["Pipeline"]


@dataclass
class Pipeline:
    """Denoiser + scheduler + autoencoder (``VQModel``/``AutoencoderKL``, or None for pixel
    models) + conditioning source. ``name`` is the model id results are filed under."""

    denoiser: nn.Module
    scheduler: Any
    autoencoder: nn.Module | None = None
    conditioning: Conditioning = field(default_factory=NoConditioning)
    name: str = ""
    path: Path | None = None

    # -- facts -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device everything runs on: the denoiser's (every tensor follows it)."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the denoiser's input: latents for latent models, pixels otherwise."""
        cfg = self.denoiser.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.in_channels), int(h), int(w)

    @property
    def latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def components(self) -> dict[str, str]:
        """Component -> class name and precision, for the layer report and provenance."""
        out = {"denoiser": f"{type(self.denoiser).__name__} (quantized by the method)"}
        if self.autoencoder is not None:
            out["autoencoder"] = f"{type(self.autoencoder).__name__} (full precision)"
        out.update(self.conditioning.components())
        return out

    # -- use ---------------------------------------------------------------------------
    def with_denoiser(self, denoiser: nn.Module) -> Pipeline:
        """The same pipeline around another denoiser (e.g. a quantized copy)."""
        return replace(self, denoiser=denoiser)

    def to(self, device: torch.device | str) -> Pipeline:
        self.denoiser.to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        self.conditioning.to(device)
        return self

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space samples to images in [-1, 1] (float32, on the CPU): through the
        autoencoder for latent models, as the diffusers pipelines do (``z / scaling_factor``
        (+ ``shift_factor``), then ``decode``)."""
        if self.autoencoder is None:
            return latents.clamp(-1, 1).float().cpu()
        cfg = self.autoencoder.config
        z = latents / float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            z = z + float(shift)
        ae_dtype = next(self.autoencoder.parameters()).dtype
        out = self.autoencoder.decode(z.to(ae_dtype))
        images = out.sample if hasattr(out, "sample") else out
        return images.clamp(-1, 1).float().cpu()
