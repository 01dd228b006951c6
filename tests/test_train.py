"""Training of the bundled networks is reproducible from a seed."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gaq.models.train import (
    ClassifierTrainConfig,
    UNetTrainConfig,
    train_classifier,
    train_unet,
)


def _weights(folder):
    return load_file(str(next(folder.rglob("*.safetensors"))))


def test_unet_training_is_reproducible_from_seed(tmp_path):
    cfg = UNetTrainConfig(steps=3, batch_size=8, log_every=1, warmup_steps=1)
    a = _weights(train_unet(tmp_path / "a", cfg, tmp_path / "a.jsonl"))
    b = _weights(train_unet(tmp_path / "b", cfg, tmp_path / "b.jsonl"))
    c = _weights(train_unet(tmp_path / "c", UNetTrainConfig(**{**cfg.__dict__, "seed": 1})))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r] == [1, 2, 3]
    assert (tmp_path / "a" / "model_index.json").is_file()


@pytest.mark.slow
def test_classifier_training_is_reproducible_from_seed(tmp_path):
    cfg = ClassifierTrainConfig(epochs=1, batch_size=256)
    ma = train_classifier(tmp_path / "a", cfg)
    mb = train_classifier(tmp_path / "b", cfg)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ma == mb
