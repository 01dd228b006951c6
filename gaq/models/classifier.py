"""The bundled digit classifier: a small CNN whose penultimate features serve as the
feature space for FID/KID/precision/recall on the bundled model (Inception means
little on 16x16 digits and cannot be downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """16x16x1 in [-1, 1] -> 10 logits; ``features`` gives the 128-d penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(2 * w * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, folder: str | Path, metadata: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(
            json.dumps({**self.config, **(metadata or {})}, indent=2) + "\n"
        )

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device) -> DigitClassifier:
        """The saved classifier, built and loaded directly on ``device``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        with torch.device(device):
            model = cls(width=cfg["width"], feature_dim=cfg["feature_dim"])
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
        return model.eval()
