"""The bundled data set: scikit-learn's digits, upsampled to 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
# The split is part of the bundled classifier's identity: changing it changes
# every reported held-out accuracy, so it is fixed here rather than configurable.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    images: torch.Tensor  # (N, 1, 16, 16) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64


def load_digits(size: int = IMAGE_SIZE) -> Digits:
    """All 1,797 digits as images in [-1, 1]; bilinear upsampling keeps strokes smooth."""
    from sklearn.datasets import load_digits as _sk_load_digits

    raw = _sk_load_digits()
    x = torch.from_numpy(raw.images).float().unsqueeze(1) / 16.0  # 17 grey levels -> [0, 1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    return Digits(images=x.contiguous(), labels=torch.from_numpy(raw.target).long())


def train_test_split_digits(digits: Digits) -> tuple[Digits, Digits]:
    """The fixed, stratified train/held-out split used by the bundled classifier."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(digits.labels)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=digits.labels.numpy(), random_state=SPLIT_SEED
    )
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train = Digits(digits.images[tr], digits.labels[tr])
    return train, Digits(digits.images[te], digits.labels[te])
