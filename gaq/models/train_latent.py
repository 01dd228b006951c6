"""Training of the bundled latent models, reproducible from a seed: the Stable Diffusion
structure in miniature on the bundled 16x16 digits.

* :func:`train_autoencoder`: a diffusers ``AutoencoderKL`` (16x16x1 <-> 8x8x4), reconstruction
  MSE plus a small KL term, with SD's ``scaling_factor`` (1 / std of the latents) in its config;
* :func:`train_ldm`: a class-conditional cross-attention ``UNet2DConditionModel`` and its
  :class:`~gaq.models.conditioning.ClassEmbedder` (classes for prompts), trained jointly on
  the scaled latents -> ``digits-ldm``;
* :func:`train_dit`: a class-conditional ``DiTTransformer2DModel`` on the same latents
  -> ``digits-dit``;
* :func:`train_latent_default`: (re)trains a bundled family end to end, with logs and a
  guided sample grid.

Both denoisers learn epsilon under SD's scaled-linear betas, with EMA weights and label
dropout for classifier-free guidance, and are shipped as diffusers-style pipeline folders
(``model_index.json`` + one safetensors subfolder per component, scheduler as DDIM).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gaq.data import load_digits
from gaq.errors import GaqError
from gaq.models.bundled import (
    BUNDLED_MODELS,
    CLASS_EMBEDDER_CONFIG,
    DIT_CONFIG,
    LATENT_SCHEDULER_CONFIG,
    LDM_UNET_CONFIG,
    VAE_CONFIG,
)
from gaq.models.conditioning import ClassEmbedder
from gaq.models.train import _jsonl

FAMILIES = {"ldm": "digits-ldm", "dit": "digits-dit"}
NUM_CLASSES = CLASS_EMBEDDER_CONFIG["num_classes"]
NULL_CLASS = NUM_CLASSES  # the extra embedding row both denoisers keep for "no class"


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    # Weight of the KL term (per latent value) against the reconstruction MSE (per pixel);
    # as both spaces hold 256 values, the same as SD's ratio of sums. Small, as in SD: the
    # latents stay near-deterministic and sharp, and the scaling factor, not the KL term,
    # brings them to unit variance for the denoiser.
    kl_weight: float = 1e-5
    seed: int = 0
    log_every: int = 50


@dataclass(frozen=True)
class LatentDenoiserTrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.9995
    label_dropout: float = 0.1  # share of labels replaced by the null class (for CFG)
    seed: int = 0
    log_every: int = 100


# Both at 20 % label dropout. The UNet: at 10 % (the usual CFG figure) its unconditional
# samples were digit-like in 70 % of 500 (82.6 % at 20 %; the pixel model: 98 %), its guided
# ones all of the requested class. The DiT (unconditional share of 500, seed 0): 43 % after
# 4,000 steps at lr 5e-4 (42.6 % at 20 % dropout); at 10,000 steps 59 % (lr 5e-4) and 64 %
# (lr 1e-3) at 10 % dropout, 71 % at 20 %, 72 % at 30 %; conditional accuracy without
# guidance went from 87 % to 98 %. 10,000 steps take 17 min alone on 2 cores (0.1 s a step).
LDM_TRAIN = LatentDenoiserTrainConfig(steps=2200, label_dropout=0.2)
DIT_TRAIN = LatentDenoiserTrainConfig(steps=10000, lr=1e-3, label_dropout=0.2)


def _start_log(log_path: str | Path | None, record: dict) -> Path | None:
    log = Path(log_path) if log_path else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        _jsonl(log, {"event": "start", **record})
    return log


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of shuffled epochs without replacement, reshuffled when fewer than a batch remain
    (the same order :func:`gaq.models.train.train_unet` draws)."""
    perm, cursor = torch.randperm(n, generator=gen), 0
    while True:
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        yield perm[cursor : cursor + batch_size]
        cursor += batch_size


def _psnr(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the PSNR of the [0, 1] images)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _load(cls, folder: str | Path) -> torch.nn.Module:
    """A diffusers model from its safetensors folder, in eval mode. low_cpu_mem_usage=False:
    the accelerate-based loader is optional and only pays off for far larger models."""
    return cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).eval()


def _n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --- autoencoder -----------------------------------------------------------------------------


def train_autoencoder(
    out_dir: str | Path,
    cfg: AutoencoderTrainConfig = AutoencoderTrainConfig(),
    log_path: str | Path | None = None,
    vae_config: dict | None = None,
) -> Path:
    """Train the ``AutoencoderKL`` on all digits and save it (safetensors) at ``out_dir``,
    with ``scaling_factor`` = 1 / std of the *sampled* latents of the whole data set, as SD
    sets it: the denoisers are trained on sampled latents, so that is the spread they see."""
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_digits().images
    vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    log = _start_log(log_path, {"params": _n_params(vae), **asdict(cfg)})

    batches, t0 = _batches(len(data), cfg.batch_size, gen), time.time()
    run_rec, run_kl = 0.0, 0.0
    vae.train()
    for step in tqdm(range(1, cfg.steps + 1), desc="train vae", mininterval=5):
        x = data[next(batches)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent value
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        run_rec, run_kl = run_rec + rec.item(), run_kl + kl.item()
        if step % cfg.log_every == 0:
            mse = run_rec / cfg.log_every
            _jsonl(log, {"step": step, "mse": mse, "psnr_db": _psnr(mse),
                         "kl": run_kl / cfg.log_every, "lr": lr_sched.get_last_lr()[0],
                         "elapsed_s": round(time.time() - t0, 1)})
            run_rec, run_kl = 0.0, 0.0

    vae.eval()
    mean, std = encode_digits(vae)
    latents = mean + std * torch.randn(mean.shape, generator=gen)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        mse_mean = F.mse_loss(_decode(vae, mean), data).item()
        mse_sample = F.mse_loss(_decode(vae, latents), data).item()
    out = Path(out_dir)
    vae.save_pretrained(out, safe_serialization=True)
    _jsonl(log, {"event": "done", "elapsed_s": round(time.time() - t0, 1),
                 "scaling_factor": scaling, "psnr_db_mean_latent": _psnr(mse_mean),
                 "psnr_db_sampled_latent": _psnr(mse_sample),
                 "latent_channel_mean": (latents.mean((0, 2, 3)) * scaling).tolist(),
                 "latent_channel_std": (latents.std((0, 2, 3)) * scaling).tolist(),
                 "posterior_std_mean": std.mean().item()})
    return out


@torch.no_grad()
def encode_digits(vae, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of every digit, in data order: encoding once and
    sampling ``mean + std * noise`` per batch equals ``latent_dist.sample()`` per batch,
    without re-running the encoder at every training step."""
    data = load_digits().images
    means, stds = [], []
    for i in range(0, len(data), batch_size):
        dist = vae.encode(data[i : i + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _decode(vae, latents: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Unscaled latents -> images in [-1, 1]."""
    out = [vae.decode(latents[i : i + batch_size]).sample
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out).clamp(-1, 1)


# --- denoisers -------------------------------------------------------------------------------


def _train_denoiser(
    name: str,
    model: torch.nn.Module,
    eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    trained: list[torch.nn.Module],
    vae_dir: str | Path,
    cfg: LatentDenoiserTrainConfig,
    log: Path | None,
) -> float:
    """The loop both denoisers share: epsilon MSE on sampled, scaled latents under SD's
    betas, labels dropped to the null class with ``cfg.label_dropout``, AdamW with cosine
    warm-up, gradient clipping, and EMA weights copied into ``trained`` at the end.
    ``eps_fn(z_t, t, labels)`` runs ``model``. Returns the wall time in seconds."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    vae = _load(AutoencoderKL, vae_dir)
    scaling = float(vae.config.scaling_factor)
    mean, std = encode_digits(vae)
    labels_all = load_digits().labels
    scheduler = DDPMScheduler(**{k: v for k, v in LATENT_SCHEDULER_CONFIG.items()
                                 if k not in ("set_alpha_to_one", "steps_offset")})
    params = [p for m in trained for p in m.parameters()]
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)

    batches, running, t0 = _batches(len(mean), cfg.batch_size, gen), 0.0, time.time()
    for m in trained:
        m.train()
    for step in tqdm(range(1, cfg.steps + 1), desc=f"train {name}", mininterval=5):
        idx = next(batches)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        labels = labels_all[idx]
        drop = torch.rand(len(idx), generator=gen) < cfg.label_dropout
        labels = torch.where(drop, NULL_CLASS, labels)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        loss = F.mse_loss(eps_fn(scheduler.add_noise(z0, noise, t), t, labels), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.step(params)
        running += loss.item()
        if step % cfg.log_every == 0:
            _jsonl(log, {"step": step, "loss": running / cfg.log_every,
                         "lr": lr_sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)})
            running = 0.0
    ema.copy_to(params)
    for m in trained:
        m.eval()
    return time.time() - t0


def _write_index(out: Path, components: dict) -> None:
    """``model_index.json`` of a ``GaqLatentPipeline``: diffusers' layout, so each component
    loads with its own ``from_pretrained(out, subfolder=...)``; there is no diffusers pipeline
    class for it (the class-conditional latent pipeline is the suite's own)."""
    import diffusers

    index = {"_class_name": "GaqLatentPipeline", "_diffusers_version": diffusers.__version__,
             **components,
             "gaq_conditioning": {"kind": "class", "num_classes": NUM_CLASSES,
                                  "null_class": NULL_CLASS}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_common(out: Path, vae_dir: str | Path) -> None:
    """The parts both latent pipelines share: the VAE (a byte-identical copy) and the DDIM
    scheduler config."""
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    if Path(vae_dir).resolve() != (out / "vae").resolve():
        shutil.rmtree(out / "vae", ignore_errors=True)
        shutil.copytree(vae_dir, out / "vae")
    DDIMScheduler(**LATENT_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")


def train_ldm(
    out_dir: str | Path,
    vae_dir: str | Path,
    cfg: LatentDenoiserTrainConfig = LDM_TRAIN,
    log_path: str | Path | None = None,
    unet_config: dict | None = None,
    embedder_config: dict | None = None,
) -> Path:
    """Train the cross-attention UNet and its class embedder jointly on the latents of the
    VAE at ``vae_dir`` (the label -> tokens table is the "text encoder", learned end to end
    like a prompt encoder fine-tuned with the UNet), and save the ``digits-ldm``-style
    pipeline folder (vae, unet, class_embedder, scheduler) at ``out_dir``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    embedder = ClassEmbedder(**(embedder_config or CLASS_EMBEDDER_CONFIG))
    unet = UNet2DConditionModel(**(unet_config or LDM_UNET_CONFIG))
    if unet.config.cross_attention_dim != embedder.config["dim"]:
        raise GaqError("the UNet's cross_attention_dim must equal the class embedder's dim")
    log = _start_log(log_path, {"params_unet": _n_params(unet),
                                "params_class_embedder": _n_params(embedder), **asdict(cfg)})

    def eps(z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return unet(z_t, t, encoder_hidden_states=embedder(labels)).sample

    wall = _train_denoiser("unet", unet, eps, [unet, embedder], vae_dir, cfg, log)
    out = Path(out_dir)
    _save_common(out, vae_dir)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    embedder.save_pretrained(out / "class_embedder")
    _write_index(out, {"vae": ["diffusers", "AutoencoderKL"],
                       "unet": ["diffusers", "UNet2DConditionModel"],
                       "class_embedder": ["gaq", "ClassEmbedder"],
                       "scheduler": ["diffusers", "DDIMScheduler"]})
    _jsonl(log, {"event": "done", "elapsed_s": round(wall, 1)})
    return out


def _disable_label_dropout(transformer: torch.nn.Module) -> None:
    """diffusers' DiT gives *each* block (and the output layer) its own ``LabelEmbedding``
    with a hard-coded ``dropout_prob`` of 0.1, each dropping labels independently in train
    mode, so "all blocks see the null class" (what guidance asks at sampling) would almost
    never be trained. Label dropout is done once per image by the training loop instead; the
    null row (index ``num_embeds_ada_norm``) still exists, as the table was built with p > 0."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def train_dit(
    out_dir: str | Path,
    vae_dir: str | Path,
    cfg: LatentDenoiserTrainConfig = DIT_TRAIN,
    log_path: str | Path | None = None,
    dit_config: dict | None = None,
) -> Path:
    """Train the class-conditional DiT (adaLN-Zero, labels through its own label embedding)
    on the latents of the VAE at ``vae_dir`` and save the ``digits-dit``-style pipeline
    folder (vae, transformer, scheduler) at ``out_dir``."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(cfg.seed)
    transformer = DiTTransformer2DModel(**(dit_config or DIT_CONFIG))
    if transformer.config.num_embeds_ada_norm != NUM_CLASSES:
        raise GaqError(f"the DiT must embed {NUM_CLASSES} classes (num_embeds_ada_norm)")
    _disable_label_dropout(transformer)
    log = _start_log(log_path, {"params": _n_params(transformer), **asdict(cfg)})

    def eps(z_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return transformer(z_t, timestep=t, class_labels=labels).sample

    wall = _train_denoiser("dit", transformer, eps, [transformer], vae_dir, cfg, log)
    out = Path(out_dir)
    _save_common(out, vae_dir)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    _write_index(out, {"vae": ["diffusers", "AutoencoderKL"],
                       "transformer": ["diffusers", "DiTTransformer2DModel"],
                       "scheduler": ["diffusers", "DDIMScheduler"]})
    _jsonl(log, {"event": "done", "elapsed_s": round(wall, 1)})
    return out


# --- sampling and evaluation (through the suite's own pipeline and sampler) ----------------


def _pipeline(folder: str | Path, labels: tuple[int, ...] | None = None):
    """The pipeline folder loaded as the benchmarks load it; ``labels`` fixes the class
    cycle (``(NULL_CLASS,)``: unconditional samples from the null class alone)."""
    from dataclasses import replace

    from gaq.models.conditioning import ClassConditioning
    from gaq.models.loading import load_model

    pipe = load_model(str(folder))
    if labels is None:
        return pipe
    c = pipe.conditioning
    return replace(pipe, conditioning=ClassConditioning(c.num_classes, c.null_class,
                                                        c.embedder, labels))


def save_latent_grid(folder: str | Path, path: str | Path, rows: int = 6,
                     guidance: float | None = 3.0, steps: int = 50, seed: int = 0,
                     unconditional: bool = False) -> torch.Tensor:
    """A ``rows`` x 10 grid PNG of DDIM samples, upscaled x4 like
    :func:`gaq.models.train.save_sample_grid`: guided with column c = class c (image i has
    class i mod 10), or with ``unconditional`` the null class alone and no guidance (the
    samples the unconditional digit-likeness score judges)."""
    from torchvision.utils import save_image

    from gaq.sampling import SamplerConfig, sample

    pipe = _pipeline(folder, (NULL_CLASS,)) if unconditional else _pipeline(folder)
    images = sample(pipe, rows * NUM_CLASSES, seed=seed,
                    sampler=SamplerConfig(steps=steps,
                                          guidance=None if unconditional else guidance))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = F.interpolate((images + 1) / 2, scale_factor=4, mode="nearest")
    save_image(big, str(path), nrow=NUM_CLASSES, padding=2, pad_value=1.0)
    return images


QUALITY_MODES = ("guided", "conditional", "unconditional")


@torch.no_grad()
def quality_sample_sets(
    folder: str | Path, num_images: int = 500, guidance: float = 3.0, steps: int = 50,
    seed: int = 0, batch_size: int = 250,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """The DDIM sample sets a bundled model's quality figures judge, one at a time as
    ``(mode, images, requested)``, image i asking for class i mod 10: ``guided`` with
    classifier-free guidance ``guidance``, ``conditional`` with the conditional prediction
    alone, ``unconditional`` from the null class alone (``requested`` None). A model without
    class conditioning (the pixel ``digits``) has only its ``unconditional`` set, sampled as
    :func:`gaq.models.train.save_sample_grid` samples it. Shared by
    :func:`evaluate_family` and :mod:`gaq.eval.judges`, so every judge sees the same images."""
    from gaq.sampling import SamplerConfig, sample

    def draw(pipe, g: float | None) -> torch.Tensor:
        return sample(pipe, num_images, seed=seed,
                      sampler=SamplerConfig(steps=steps, guidance=g), batch_size=batch_size)

    pipe = _pipeline(folder)
    if not pipe.conditioning.supports_guidance:
        yield "unconditional", draw(pipe, None), None
        return
    requested = torch.arange(num_images) % NUM_CLASSES
    # each pipeline is loaded when its set is drawn: one model in memory at a time
    yield "guided", draw(pipe, guidance), requested
    yield "conditional", draw(pipe, None), requested
    yield "unconditional", draw(_pipeline(folder, (NULL_CLASS,)), None), None


@torch.no_grad()
def evaluate_family(folder: str | Path, num_images: int = 500, guidance: float = 3.0,
                    steps: int = 50, seed: int = 0) -> dict:
    """What a bundled latent model is shown to do, judged by the bundled classifier
    (:func:`gaq.eval.digits.digit_likeness`), on the sample sets of
    :func:`quality_sample_sets`. ``*_class_accuracy`` is the share classified as requested;
    ``*_confident_share`` the digit-likeness score (confidence >= 0.8) used for the bundled
    pixel model."""
    from gaq.eval.digits import digit_likeness
    from gaq.models.bundled import load_classifier

    classifier = load_classifier()
    out: dict = {"num_images": num_images, "steps": steps, "guidance": guidance, "seed": seed}
    for key, images, requested in quality_sample_sets(folder, num_images, guidance, steps,
                                                      seed):
        scores = digit_likeness(images, classifier=classifier, labels=requested)
        out.update({f"{key}_{k}": round(v, 4) for k, v in scores.items()})
    return out


# --- the bundled families --------------------------------------------------------------------


def train_latent_default(
    family: str,
    out_dir: str | Path | None = None,
    log_dir: str | Path = Path("results") / "bundled",
    seed: int = 0,
    steps: int | None = None,
    vae_dir: str | Path | None = None,
) -> Path:
    """(Re)train a bundled latent family end to end and write its logs and guided sample grid
    to ``log_dir``: ``"ldm"`` trains the VAE, then the UNet and class embedder
    (``digits-ldm``); ``"dit"`` trains the DiT on the ``digits-ldm`` VAE (or the one at
    ``vae_dir``; ``ldm`` ignores it), copied into its own folder, so retrain ``ldm`` first
    when the VAE changes. ``steps``
    overrides the denoiser's training steps (not the VAE's)."""
    from dataclasses import replace

    if family not in FAMILIES:
        raise GaqError(f"unknown latent family {family!r}; choose from {sorted(FAMILIES)}")
    name = FAMILIES[family]
    out = Path(out_dir) if out_dir is not None else BUNDLED_MODELS[name]
    log_dir = Path(log_dir)
    base = LDM_TRAIN if family == "ldm" else DIT_TRAIN
    cfg = replace(base, seed=seed, **({} if steps is None else {"steps": steps}))
    if family == "ldm":
        if out.exists():
            shutil.rmtree(out)
        vae = train_autoencoder(out / "vae", replace(AutoencoderTrainConfig(), seed=seed),
                                log_dir / f"{name}_vae_train.jsonl")
        train_ldm(out, vae, cfg, log_dir / f"{name}_unet_train.jsonl")
    else:
        vae = Path(vae_dir) if vae_dir is not None else BUNDLED_MODELS["digits-ldm"] / "vae"
        if not (vae / "config.json").is_file():
            raise GaqError(f"no VAE at {vae}: train the ldm family first "
                           "(`gaq train-default --family ldm`)")
        if out.exists():
            if vae.resolve().is_relative_to(out.resolve()):
                raise GaqError("the DiT's VAE source must not lie inside its output folder")
            shutil.rmtree(out)
        train_dit(out, vae, cfg, log_dir / f"{name}_train.jsonl")
    save_latent_grid(out, log_dir / f"{name}_samples_guided.png")
    save_latent_grid(out, log_dir / f"{name}_samples_unconditional.png", unconditional=True)
    quality = evaluate_family(out)
    (log_dir / f"{name}_quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    return out
