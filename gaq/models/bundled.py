"""The bundled models: a ~1M-parameter DDPM on 16x16 digits and its digit classifier (trained
by :mod:`gaq.models.train`), and two class-conditional latent models on the same digits, a
miniature Stable Diffusion (``digits-ldm``: VAE + cross-attention UNet + class embedder) and a
miniature DiT (``digits-dit``, same VAE), trained by :mod:`gaq.models.train_latent`. All are
shipped as package data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "digits"
BUNDLED_MODELS = {
    "digits": WEIGHTS_DIR / "digits-ddpm",
    "digits-ldm": WEIGHTS_DIR / "digits-ldm",
    "digits-dit": WEIGHTS_DIR / "digits-dit",
}
CLASSIFIER_DIR = WEIGHTS_DIR / "digits-classifier"


@dataclass(frozen=True)
class Scoring:
    """How a model's samples are scored: the feature space of its image metrics
    ("classifier": the bundled digit classifier's, "inception"), its reference images
    ("digits": the bundled set; None: the benchmark's ``eval.reference`` folder) and
    whether the bundled digit classifier reads its samples (``class_acc`` for the
    class-conditional ones, digit-likeness in ``gaq sample``).
    It belongs to the model, not to the metrics: the metrics code knows no model by name."""

    feature_space: str = "inception"
    reference: str | None = None
    judges_classes: bool = False


# every bundled model is trained on the digits: scored in the digit classifier's space
_DIGITS = Scoring(feature_space="classifier", reference="digits", judges_classes=True)
SCORING: dict[str, Scoring] = {name: _DIGITS for name in BUNDLED_MODELS}


def scoring_for(model_id: str) -> Scoring:
    """The model's scoring entry; any model the suite does not ship is scored in Inception
    space against the benchmark's reference folder."""
    return SCORING.get(model_id, Scoring())

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

# --- the latent family (digits-ldm, digits-dit) ---------------------------------------------
# 16x16x1 images <-> 8x8x4 latents: two encoder levels, so one 2x downsampling with SD's 4
# latent channels. Both spaces hold 256 values: unlike SD's VAE (48x fewer values) this one
# does not compress; it gives the denoisers SD's latent *structure* at a size these tests afford.
VAE_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
}
# classes as prompts: a label becomes ``tokens`` context vectors of size ``dim``
CLASS_EMBEDDER_CONFIG: dict = {"num_classes": 10, "dim": 64, "tokens": 4}
# SD's UNet in miniature: cross-attention at the full latent resolution and in the mid block.
# Note diffusers' ``attention_head_dim`` here is the number of heads (a legacy misnomer).
LDM_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": CLASS_EMBEDDER_CONFIG["dim"],
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
# DiT in miniature: 2x2 patches of the 8x8 latent -> 16 tokens; epsilon only (no learned
# sigma); ``num_embeds_ada_norm`` = the number of classes, so row 10 is the null class.
DIT_CONFIG: dict = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "num_embeds_ada_norm": 10,
}
# Stable Diffusion's schedule (trained with a DDPMScheduler of the same betas, shipped as DDIM)
LATENT_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def load_classifier(device: str = "cpu"):
    """The bundled digit classifier in eval mode; raises if it has not been trained yet."""
    from gaq.models.classifier import DigitClassifier

    if not (CLASSIFIER_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled classifier missing at {CLASSIFIER_DIR}; train it with `gaq train-default`"
        )
    return DigitClassifier.load(CLASSIFIER_DIR, device)
