"""Conditioning sources: what a pipeline feeds its denoiser besides ``(x_t, t)``.

A denoiser sees one of three kinds of conditioning:

* ``none``: unconditional models;
* ``class``: a class label per image, fed either as ``class_labels`` (DiT, class-embedding
  UNets) or, for cross-attention UNets, as ``encoder_hidden_states`` made by a learned
  :class:`ClassEmbedder` (the Stable Diffusion structure with classes for prompts);
* ``text``: prompts encoded by the pipeline's own text encoder into ``encoder_hidden_states``.

Each has a *null* input for classifier-free guidance: the null class (index
``num_classes``) or the empty prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ClassConditioning", "ClassEmbedder", "Conditioning", "NoConditioning",
           "TextConditioning"]


class ClassEmbedder(nn.Module):
    """A class label -> ``tokens`` learned vectors of size ``dim``: the cross-attention
    context of a class-conditional ``UNet2DConditionModel``. Row ``num_classes`` is the null
    class that classifier-free guidance uses for its unconditional half."""

    def __init__(self, num_classes: int = 10, dim: int = 64, tokens: int = 4) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "dim": dim, "tokens": tokens}
        self.embedding = nn.Embedding(num_classes + 1, tokens * dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def null_class(self) -> int:
        return self.config["num_classes"]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        out = self.embedding(labels.long())
        return out.view(labels.shape[0], self.config["tokens"], self.config["dim"])

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClassEmbedder:
        from safetensors.torch import load_file

        folder = Path(folder)
        # built and loaded on the host, as diffusers loads the other components; the
        # Pipeline moves them all to its device together
        with torch.device("cpu"):
            module = cls(**json.loads((folder / "config.json").read_text()))
        module.load_state_dict(load_file(str(folder / "model.safetensors")))
        return module.eval()


class Conditioning:
    """What a pipeline feeds its denoiser besides ``(x_t, t)``, per image.

    ``inputs(indices, device)`` gives the denoiser keyword inputs of the images with these
    global indices (image ``i``'s conditioning depends on ``i`` alone, like its noise, so
    any batching or sharding gives the same images); ``null_inputs(n, device)`` the
    unconditional inputs of classifier-free guidance.
    """

    kind: str = "none"

    @property
    def supports_guidance(self) -> bool:
        return False

    def inputs(self, indices: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {}

    def null_inputs(self, n: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        from gaq.errors import GaqError

        raise GaqError(f"a model with {self.kind!r} conditioning has no unconditional input: "
                       "classifier-free guidance ([sampler] guidance) needs a conditional "
                       "model with a null class or an empty prompt")

    def identity(self) -> dict:
        """JSON-able description: part of calibration and provenance records."""
        return {"kind": self.kind}

    def components(self) -> dict[str, str]:
        return {}

    def to(self, device: torch.device | str) -> Conditioning:
        return self


class NoConditioning(Conditioning):
    """Unconditional models."""


class ClassConditioning(Conditioning):
    """Class labels: image ``i`` gets ``labels[i % len(labels)]`` (default: ``i mod
    num_classes``, so every class is equally represented in any run of
    ``num_classes``·k images). Fed as ``class_labels`` (DiT, class-embedding UNets) or,
    with an ``embedder``, as cross-attention context ``encoder_hidden_states``."""

    kind = "class"

    def __init__(self, num_classes: int, null_class: int | None = None,
                 embedder: ClassEmbedder | None = None,
                 labels: tuple[int, ...] | None = None) -> None:
        self.num_classes = int(num_classes)
        self.null_class = null_class
        self.embedder = embedder
        self.labels = tuple(labels) if labels is not None else None

    @property
    def supports_guidance(self) -> bool:
        return self.null_class is not None

    def label_of(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long, device="cpu")
        if self.labels is None:
            return indices % self.num_classes
        labels = torch.tensor(self.labels, dtype=torch.long, device=indices.device)
        return labels[indices % len(self.labels)]

    def _feed(self, labels: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
        labels = labels.to(device)
        if self.embedder is None:
            return {"class_labels": labels}
        with torch.no_grad():
            return {"encoder_hidden_states": self.embedder(labels)}

    def inputs(self, indices: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
        return self._feed(self.label_of(indices), device)

    def null_inputs(self, n: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        if self.null_class is None:
            return super().null_inputs(n, device)
        return self._feed(torch.full((n,), self.null_class, dtype=torch.long, device=device),
                          device)

    def identity(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "null_class": self.null_class,
                "labels": list(self.labels) if self.labels is not None else "i mod num_classes",
                "input": "encoder_hidden_states" if self.embedder is not None else "class_labels"}

    def components(self) -> dict[str, str]:
        if self.embedder is None:
            return {}
        return {"class_embedder": "ClassEmbedder (full precision)"}

    def to(self, device: torch.device | str) -> ClassConditioning:
        if self.embedder is not None:
            self.embedder.to(device)
        return self


class TextConditioning(Conditioning):
    """Prompts encoded by the pipeline's own text encoder: image ``i`` gets
    ``prompts[i % len(prompts)]``; the unconditional input is the empty prompt, as in the
    Stable Diffusion pipelines."""

    kind = "text"

    def __init__(self, tokenizer: Any, text_encoder: nn.Module,
                 prompts: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.prompts = tuple(prompts)

    @property
    def supports_guidance(self) -> bool:
        return True

    def with_prompts(self, prompts: list[str] | tuple[str, ...]) -> TextConditioning:
        return TextConditioning(self.tokenizer, self.text_encoder, tuple(prompts))

    @property
    def masked(self) -> bool:
        """Whether the padding is masked: PixArt's pipelines give a T5 encoder, and the
        transformer, the prompt's attention mask; Stable Diffusion's CLIP gets none."""
        return type(self.text_encoder).__name__.startswith("T5")

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        enc_device = next(self.text_encoder.parameters()).device
        if not self.masked:
            out = self.text_encoder(tok.input_ids.to(enc_device))[0]
            return {"encoder_hidden_states": out.to(device)}
        mask = tok.attention_mask.to(enc_device)
        out = self.text_encoder(tok.input_ids.to(enc_device), attention_mask=mask)[0]
        return {"encoder_hidden_states": out.to(device),
                "encoder_attention_mask": mask.to(device)}

    def encode(self, prompts: list[str], device: torch.device | str) -> torch.Tensor:
        """The text encoder's output for ``prompts``, on ``device``."""
        return self._encode(prompts, device)["encoder_hidden_states"]

    def inputs(self, indices: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
        if not self.prompts:
            from gaq.errors import GaqError

            raise GaqError("this model is text-conditional: name a captions file (one prompt "
                           "per line) in the benchmark's [sampler] prompts, or --prompts")
        idx = torch.as_tensor(indices, dtype=torch.long, device="cpu").tolist()
        return self._encode([self.prompts[i % len(self.prompts)] for i in idx], device)

    def null_inputs(self, n: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._encode([""], device).items()}

    def identity(self) -> dict:
        import hashlib

        digest = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]
        return {"kind": self.kind, "prompts": len(self.prompts), "prompts_sha256": digest}

    def components(self) -> dict[str, str]:
        return {"text_encoder": f"{type(self.text_encoder).__name__} (full precision)"}

    def to(self, device: torch.device | str) -> TextConditioning:
        self.text_encoder.to(device)
        return self
