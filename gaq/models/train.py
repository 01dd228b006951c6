"""Training of the bundled default model and classifier: reproducible from a seed."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gaq.data import load_digits, train_test_split_digits
from gaq.models.bundled import (
    BUNDLED_MODELS,
    CLASSIFIER_DIR,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
)


@dataclass(frozen=True)
class UNetTrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.9995
    seed: int = 0
    log_every: int = 100


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    outlier_weight: float = 0.5
    seed: int = 0


def _jsonl(path: Path | None, record: dict) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train_unet(
    out_dir: str | Path = BUNDLED_MODELS["digits"],
    cfg: UNetTrainConfig = UNetTrainConfig(),
    log_path: str | Path | None = None,
) -> Path:
    """Train the DDPM (epsilon objective, cosine schedule, EMA weights) and save a
    standard diffusers DDPMPipeline folder at ``out_dir``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_digits().images
    unet = UNet2DModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    log = Path(log_path) if log_path else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        n_params = sum(p.numel() for p in unet.parameters())
        _jsonl(log, {"event": "start", "params": n_params, **asdict(cfg)})

    perm = torch.randperm(len(data), generator=gen)
    cursor, running, t0 = 0, 0.0, time.time()
    unet.train()
    for step in tqdm(range(1, cfg.steps + 1), desc="train unet", mininterval=5):
        if cursor + cfg.batch_size > len(perm):
            perm, cursor = torch.randperm(len(data), generator=gen), 0
        x0 = data[perm[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        running += loss.item()
        if step % cfg.log_every == 0:
            _jsonl(log, {"step": step, "loss": running / cfg.log_every,
                         "lr": lr_sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)})
            running = 0.0

    ema.copy_to(unet.parameters())
    unet.eval()
    out = Path(out_dir)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    _jsonl(log, {"event": "done", "elapsed_s": round(time.time() - t0, 1)})
    return out


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 px and small affine jitter, so the classifier judges shape,
    not exact pixel placement (generated digits are not pixel-aligned to the data)."""
    n = len(x)
    angle = (torch.rand(n, generator=gen) - 0.5) * 2 * math.radians(10)
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 2 * (2 / 16)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with the background value (-1) by shifting to [0, 2] and back
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def _outliers(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Non-digits for outlier exposure: noise, smooth blobs, near-blank images and blends of
    two digits. Trained towards a uniform prediction, they make the classifier's confidence
    a meaningful digit-likeness score instead of a confident guess on anything."""
    n = len(x)
    kind = torch.randint(0, 4, (n,), generator=gen)
    noise = torch.randn(x.shape, generator=gen).clamp(-1, 1)
    blobs = F.interpolate(torch.rand(n, 1, 4, 4, generator=gen) * 2 - 1, size=x.shape[-2:],
                          mode="bilinear", align_corners=False)
    blank = -1 + 0.3 * torch.rand(x.shape, generator=gen)
    blend = 0.5 * (x + x[torch.randperm(n, generator=gen)])
    options = torch.stack([noise, blobs, blank, blend])
    return options[kind, torch.arange(n)]


def train_classifier(
    out_dir: str | Path = CLASSIFIER_DIR,
    cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
    log_path: str | Path | None = None,
) -> dict:
    """Train the digit classifier on the fixed train split; returns held-out metrics."""
    from gaq.models.classifier import DigitClassifier

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, test = train_test_split_digits(load_digits())
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train.labels) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
    )
    log = Path(log_path) if log_path else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train.labels), generator=gen)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = _augment(train.images[idx], gen)
            outliers = _outliers(x, gen)
            loss = F.cross_entropy(model(x), train.labels[idx])
            # cross-entropy to the uniform distribution: high entropy on non-digits
            loss = loss - cfg.outlier_weight * F.log_softmax(model(outliers), 1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        metrics = evaluate_classifier(model, test.images, test.labels)
        _jsonl(log, {"epoch": epoch + 1, "train_loss": total / len(train.labels), **metrics})
    model.eval()
    metrics = evaluate_classifier(model, test.images, test.labels)
    model.save(out_dir, metadata={"heldout_accuracy": metrics["accuracy"],
                                  "heldout_confident_share": metrics["confident_share"],
                                  "train": asdict(cfg)})
    return metrics


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        confidence: float = 0.8) -> dict:
    model.eval()
    prob = torch.softmax(model(images), dim=1)
    pmax, pred = prob.max(dim=1)
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "confident_share": (pmax >= confidence).float().mean().item(),
    }


def save_sample_grid(model_dir: str | Path, path: str | Path, n: int = 64, seed: int = 0,
                     steps: int = 50) -> torch.Tensor:
    """Sample ``n`` images with DDIM and write them as an 8-wide grid PNG."""
    from torchvision.utils import save_image

    from gaq.models.loading import load_model
    from gaq.sampling import SamplerConfig, sample

    images = sample(load_model(str(model_dir)), n, seed=seed, sampler=SamplerConfig(steps=steps))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = F.interpolate((images + 1) / 2, scale_factor=4, mode="nearest")
    save_image(big, str(path), nrow=8, padding=2, pad_value=1.0)
    return images
