"""The bundled default: a ~1M-parameter DDPM on 16x16 digits and its digit classifier,
both trained by :mod:`gaq.models.train` and shipped as package data."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "digits"
BUNDLED_MODELS = {"digits": WEIGHTS_DIR / "digits-ddpm"}
CLASSIFIER_DIR = WEIGHTS_DIR / "digits-classifier"

UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def load_classifier(device: str = "cpu"):
    """The bundled digit classifier in eval mode; raises if it has not been trained yet."""
    from gaq.models.classifier import DigitClassifier

    if not (CLASSIFIER_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled classifier missing at {CLASSIFIER_DIR}; train it with `gaq train-default`"
        )
    return DigitClassifier.load(CLASSIFIER_DIR).to(device)
