"""The cost of the papers' protocols, measured on models of the real size and projected.

``gaq perf --paper-scale`` builds a randomly initialised model with the real architecture
and size, measures a few small runs of every phase on this machine, and projects them to
the full protocol (its calibration rows, 20,000 AdaRound iterations, its images). Random
weights cost the same time and memory as trained ones. The architectures
(:data:`ARCHITECTURES`): the 35.7 M CIFAR-10 DDPM UNet; the 274 M LDM-4 LSUN-Bedroom UNet
and its VQ-f4 autoencoder; the 401 M LDM-4 ImageNet (cin256-v2) UNet with its class
embedding and the same VQ-f4; DiT-XL/2 (675 M) with the KL-f8 autoencoder; Stable Diffusion
v1.4's 860 M UNet with the KL-f8 autoencoder and the 123 M CLIP text encoder.

How each phase is projected:

- **Sampling**: one denoiser call at batch ``B`` is timed (median of repeats, after a
  warm-up); the protocol needs ``images × steps`` image-steps (twice that with guidance),
  plus one autoencoder decode per image for latent models. Sampling is sharded over GPUs
  by torchrun, so ``g`` GPUs divide it by ``g``.
- **Calibration recording**: ``trajectories × steps`` image-steps of the FP sampler.
- **Each method's calibration** is timed in a fresh process at two calibration-set sizes
  ``n`` and two iteration budgets ``k`` (``weight_iters = k``, ``act_iters = k / 4``, the
  papers' 20k : 5k) and fitted as ``a + c·n + b·k``: block capture grows with the rows,
  AdaRound and activation-step learning with the iterations. A fourth run at (larger n,
  larger k) checks the fit; its error is reported. Calibration runs on one rank, so it
  does not shrink with more GPUs.
- **Peak memory** of each of those processes (RSS on the CPU, ``max_memory_allocated``
  on a GPU): the same block-streaming engine at every ``n`` shows whether memory stays
  bounded as the calibration set grows.

Inception features for FID are not included (one small network per image, far below
the denoiser's cost at these step counts).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

from gaq.models.convert_ldm import PRESETS as LDM_PRESETS
from gaq.models.convert_ldm import uncond_unet_config

__all__ = ["ARCHITECTURES", "Architecture", "HashedTokenIds", "Protocol", "build_pipeline",
           "paper_scale", "write_report"]


@dataclass(frozen=True)
class Protocol:
    """The full protocol a paper runs on this architecture."""

    paper: str
    steps: int
    images: int
    calibration_rows: int  # trajectories x kept steps (both guidance halves count as rows)
    trajectories: int
    weight_iters: int = 20_000
    act_iters: int = 5_000
    guidance: bool = False
    # the setting of gaq/bench/published.toml whose reported costs (GPU hours of each
    # method's calibration) the projections are set beside; None: no paper reports one
    published_key: str | None = None


@dataclass(frozen=True)
class Architecture:
    """A paper's model, buildable with random weights: the denoiser (``unet``: its config,
    ``denoiser``: its diffusers class), the autoencoder (``vq``: its config,
    ``autoencoder``: its class), the conditioning source and the scheduler.

    ``conditioning``: ``None`` (unconditional); ``{"kind": "class", "num_classes": n}``
    (DiT: class labels, null class ``n``); ``{"kind": "class-embedder", "num_classes": n,
    "dim": d}`` (LDM: a learned class embedding fed to cross-attention); ``{"kind":
    "text", "encoder": CLIPTextConfig kwargs}`` (Stable Diffusion: the CLIP text encoder
    built from its config; prompts become token ids by :class:`HashedTokenIds`, not CLIP's
    BPE tokenizer, which cannot be downloaded here: the encoder's cost is the same)."""

    description: str
    unet: dict[str, Any]
    protocol: Protocol
    vq: dict[str, Any] | None = None
    scaling_factor: float = 1.0
    denoiser: str = "UNet2DModel"
    autoencoder: str = "VQModel"
    conditioning: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000})


class HashedTokenIds:
    """A stand-in for CLIP's tokenizer: each word of a prompt becomes a fixed id (a hash
    into CLIP's 49,408-token vocabulary), framed by CLIP's start and end tokens and padded
    with the end token to 77 ids, as the real tokenizer pads. Deterministic, offline; the
    text encoder does the same work whatever the ids are."""

    model_max_length = 77
    vocab_size = 49_408
    bos, eos = 49_406, 49_407

    def _ids(self, prompt: str) -> list[int]:
        import hashlib

        words = [int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little")
                 % self.bos for w in prompt.lower().split()]
        ids = [self.bos, *words[: self.model_max_length - 2], self.eos]
        return ids + [self.eos] * (self.model_max_length - len(ids))

    def __call__(self, prompts: list[str], **_: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([self._ids(p) for p in prompts],
                                                      dtype=torch.long, device="cpu"))


# prompts for the text-conditional architecture's calibration and timing (any text: the
# cost does not depend on it)
PROMPTS = ("a photograph of an astronaut riding a horse", "a bowl of fruit on a wooden table",
           "a red bus driving down a city street", "a cat sleeping on a sofa")


# google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 model as diffusers converts it): 35.7 M
# parameters; attention at 16x16; the GAQ/Q-Diffusion CIFAR-10 protocol: DDIM 100 steps,
# every 5th step x 256 trajectories = 5,120 rows, 50,000 images.
_DDPM_CIFAR10 = Architecture(
    description="DDPM CIFAR-10 UNet (google/ddpm-cifar10-32 architecture), 32x32x3",
    unet={"sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
          "block_out_channels": (128, 256, 256, 256),
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
          "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
          "norm_eps": 1e-6, "attention_head_dim": None},
    protocol=Protocol("GAQ / Q-Diffusion CIFAR-10, DDIM 100", steps=100, images=50_000,
                      calibration_rows=5_120, trajectories=256),
)

# CompVis LDM-4 LSUN-Bedroom: UNet on 64x64x3 latents (model channels 224, multipliers
# 1-2-3-4, attention at 32, 16 and 8, 32 channels per head), VQ-f4 autoencoder with 8,192
# codes; DDIM 200 steps (eta 1), every 10th step x 256 trajectories.
_LDM4_LSUN = Architecture(
    description="LDM-4 LSUN-Bedroom UNet on 64x64x3 latents + VQ-f4 autoencoder (256x256)",
    # the UNet the converter builds from CompVis' config (274.1 M parameters)
    unet=uncond_unet_config(LDM_PRESETS["lsun-bedroom"]["unet_config"]["params"]),
    vq={"in_channels": 3, "out_channels": 3, "latent_channels": 3, "num_vq_embeddings": 8192,
        "block_out_channels": (128, 256, 512), "layers_per_block": 2, "sample_size": 256,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3},
    protocol=Protocol("GAQ / Q-Diffusion LSUN-Bedroom, DDIM 200", steps=200, images=50_000,
                      calibration_rows=5_120, trajectories=256,
                      published_key="lsun-bedroom-ldm4-ddim200"),
)

# CompVis LDM-4 ImageNet (cin256-v2): UNet with cross-attention to a learned 512-d class
# embedding (1,000 classes + the null class), on 64x64x3 latents of the same VQ-f4; the GAQ
# paper's ImageNet protocol: DDIM 20 steps, guidance 3.0, every step x 256 trajectories,
# both guidance halves recorded (10,240 rows), 50,000 images.
_LDM4_CIN = Architecture(
    description="LDM-4 ImageNet cin256-v2 UNet (cross-attention to a class embedding) on "
                "64x64x3 latents + VQ-f4 autoencoder (256x256)",
    unet={**create_unet_diffusers_config_from_ldm(
        {"model": {"params": LDM_PRESETS["cin256-v2"]}}, {}), "sample_size": 64},
    vq=_LDM4_LSUN.vq,
    denoiser="UNet2DConditionModel",
    conditioning={"kind": "class-embedder", "num_classes": 1000, "dim": 512},
    scheduler={"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
               "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear",
               "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
    protocol=Protocol("GAQ / TFMQ-DM LDM-4 ImageNet, DDIM 20, guidance 3.0", steps=20,
                      images=50_000, calibration_rows=10_240, trajectories=256,
                      guidance=True),
)

# The autoencoder of DiT and Stable Diffusion v1 (sd-vae-ft-ema / SD's own): KL-f8, 4
# latent channels.
_KL_F8 = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215}

# facebook/DiT-XL-2-256: 28 blocks, 1152 wide (16 heads x 72), patch 2 on 32x32x4 latents,
# 1,000 classes + null. DiT's 675 M parameters are 750 M in diffusers' layout, which gives
# each block its own copy of the timestep and class embedders (as the hub weights have).
# The suite's dit-imagenet protocol: DDIM 50 steps, guidance 1.5, every 2nd step x 256
# trajectories with both halves (12,800 rows), 50,000 images.
_DIT_XL2 = Architecture(
    description="DiT-XL/2 (facebook/DiT-XL-2-256 architecture, diffusers layout) on 32x32x4 "
                "latents + KL-f8 autoencoder (256x256)",
    unet={"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
          "out_channels": 8, "num_layers": 28, "sample_size": 32, "patch_size": 2,
          "num_embeds_ada_norm": 1000},
    vq={**_KL_F8, "sample_size": 256},
    denoiser="DiTTransformer2DModel", autoencoder="AutoencoderKL",
    conditioning={"kind": "class", "num_classes": 1000},
    scheduler={"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
               "clip_sample": False},
    protocol=Protocol("DiT-XL/2 ImageNet 256, DDIM 50, guidance 1.5", steps=50,
                      images=50_000, calibration_rows=12_800, trajectories=256,
                      guidance=True),
)

# CompVis/stable-diffusion-v1-4: the 860 M UNet on 64x64x4 latents, KL-f8 autoencoder,
# CLIP ViT-L/14 text encoder (123 M); Q-Diffusion's and TFMQ-DM's text-to-image protocol:
# PLMS 50 steps, guidance 7.5, every 2nd step x 128 prompts with both halves (6,400 rows),
# 10,000 images.
_SD_V1_4 = Architecture(
    description="Stable Diffusion v1.4 UNet on 64x64x4 latents + KL-f8 autoencoder (512x512) "
                "+ CLIP ViT-L/14 text encoder",
    unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
          "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
          "attention_head_dim": 8,
          "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
    vq={**_KL_F8, "sample_size": 512},
    denoiser="UNet2DConditionModel", autoencoder="AutoencoderKL",
    conditioning={"kind": "text", "encoder": {
        "vocab_size": 49_408, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "projection_dim": 768}},
    scheduler={"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
               "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1},
    protocol=Protocol("Q-Diffusion / TFMQ-DM Stable Diffusion v1.4, PLMS 50, guidance 7.5",
                      steps=50, images=10_000, calibration_rows=6_400, trajectories=128,
                      guidance=True),
)

ARCHITECTURES: dict[str, Architecture] = {"ddpm-cifar10": _DDPM_CIFAR10,
                                          "ldm4-lsun": _LDM4_LSUN,
                                          "ldm4-cin256": _LDM4_CIN,
                                          "dit-xl2-256": _DIT_XL2,
                                          "sd-v1-4": _SD_V1_4}


def _conditioning(arch: Architecture):
    from gaq.models.conditioning import (
        ClassConditioning,
        ClassEmbedder,
        NoConditioning,
        TextConditioning,
    )

    c = arch.conditioning
    if c is None:
        return NoConditioning()
    if c["kind"] == "class":
        return ClassConditioning(c["num_classes"], c["num_classes"])
    if c["kind"] == "class-embedder":
        embedder = ClassEmbedder(c["num_classes"], c["dim"], tokens=1).eval()
        return ClassConditioning(c["num_classes"], c["num_classes"], embedder)
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(**c["encoder"]))
    return TextConditioning(HashedTokenIds(), encoder.eval(), PROMPTS)


def build_pipeline(name: str, device: str, seed: int = 0):
    """A :class:`~gaq.models.pipeline.Pipeline` around a randomly initialised model of
    architecture ``name`` (denoiser, autoencoder, conditioning source, scheduler), built
    directly on ``device``."""
    import diffusers

    from gaq.models.pipeline import Pipeline

    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    with torch.device(device):  # no host copy of a model that may fill most of the RAM
        denoiser = getattr(diffusers, arch.denoiser)(**arch.unet).eval()
        ae = (getattr(diffusers, arch.autoencoder)(**arch.vq).eval() if arch.vq is not None
              else None)
        conditioning = _conditioning(arch)
    sched_cfg = dict(arch.scheduler)
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name"))(**sched_cfg)
    return Pipeline(denoiser, scheduler, ae, conditioning, name=f"{name}-random").to(device)


def _seconds_per_call(pipe, denoiser, batch: int, repeats: int) -> float:
    """The median time of one denoiser call at ``batch`` with its conditioning (class
    labels, class embedding or encoded prompts); guidance doubles the calls, which the
    projection counts."""
    from gaq.models.adapters import denoise

    c, h, w = pipe.latent_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g).to(pipe.device)
    t = torch.full((batch,), 500, device=pipe.device)
    cond = pipe.conditioning.inputs(torch.arange(batch, device="cpu"), pipe.device)
    times = []
    with torch.no_grad():
        denoise(denoiser, x, t, cond)  # warm-up (allocator, kernels, lazy tables)
        for _ in range(repeats):
            _sync(pipe.device)
            start = time.perf_counter()
            denoise(denoiser, x, t, cond)
            _sync(pipe.device)
            times.append(time.perf_counter() - start)
    return median(times)


def _decode_seconds(pipe, batch: int, repeats: int) -> float:
    if pipe.autoencoder is None:
        return 0.0
    c, h, w = pipe.latent_shape
    z = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0)).to(pipe.device)
    times = []
    pipe.decode(z)
    for _ in range(repeats):
        _sync(pipe.device)
        start = time.perf_counter()
        pipe.decode(z)
        _sync(pipe.device)
        times.append(time.perf_counter() - start)
    return median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibration_spec(rows: int, arch: Architecture):
    """``rows`` training rows over 2 timesteps (10 steps of the architecture's sampler,
    every 5th kept), plus one held-out trajectory per step for GAQ's validation set; a
    guided protocol records both halves, so half the trajectories give the same rows."""
    from gaq.calibration import CalibrationSpec

    guided = arch.protocol.guidance
    per_step = max(1, rows // (4 if guided else 2))
    sampler = "plms" if arch.scheduler["_class_name"] == "PNDMScheduler" else "ddim"
    return CalibrationSpec(steps=10, interval=5, samples_per_step=per_step,
                           holdout_per_step=1, batch_size=per_step, sampler_name=sampler,
                           guidance=3.0 if guided else None)


def measure_method(arch: str, method: str, rows: int, iters: int, bits: str,
                   device: str) -> dict[str, float]:
    """One timed calibration of ``method`` (its ``paper`` preset with ``iters`` weight and
    ``iters/4`` activation iterations, block data streamed from disk) on ``rows`` rows;
    call in a fresh process so the peak memory is this run's."""
    import resource

    from gaq.calibration import record_calibration
    from gaq.config import QuantConfig
    from gaq.models.adapters import adapter_for
    from gaq.perf import streamed_config
    from gaq.registry import get_method

    pipe = build_pipeline(arch, device)
    calib = record_calibration(pipe, _calibration_spec(rows, ARCHITECTURES[arch]), cache=False)
    cls = get_method(method)
    cfg = streamed_config(cls.from_preset("paper").config, iters)
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(torch.device(device))
    start = time.perf_counter()
    cls(cfg).quantize(pipe.denoiser, adapter_for(pipe.denoiser), calib,
                      QuantConfig.from_bits(bits))
    _sync(torch.device(device))
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": seconds, "peak_memory_mb": peak, "rows": len(calib.train())}


def _measure_in_child(arch: str, method: str, rows: int, iters: int, bits: str,
                      device: str, threads: int) -> dict[str, float]:
    code = ("import json, torch\n"
            f"torch.set_num_threads({threads})\n"
            "from gaq.perf_paper import measure_method\n"
            f"print(json.dumps(measure_method({arch!r}, {method!r}, {rows}, {iters}, "
            f"{bits!r}, {device!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fit(points: dict[tuple[int, int], float], n: tuple[int, int], k: tuple[int, int]
         ) -> tuple[float, float, float]:
    """``(a, c, b)`` of ``seconds = a + c·rows + b·iters`` through the three runs at
    (n0, k0), (n0, k1), (n1, k0)."""
    base = points[(n[0], k[0])]
    b = (points[(n[0], k[1])] - base) / (k[1] - k[0])
    c = (points[(n[1], k[0])] - base) / (n[1] - n[0])
    return base - c * n[0] - b * k[0], c, b


def paper_scale(arch: str, methods: tuple[str, ...] = ("rtn", "qdiffusion", "tfmq", "gaq"),
                *, device: str, bits: str = "W4A8", batch: int = 8,
                repeats: int = 5, rows: tuple[int, int] = (16, 32), iters: tuple[int, int] = (2, 6),
                gpus: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Measure and project (see the module docstring); returns the report as a dict."""
    from gaq.config import QuantConfig
    from gaq.methods.rtn import RTN
    from gaq.models.adapters import adapter_for

    if rows[0] >= rows[1] or iters[0] >= iters[1]:
        raise ValueError("rows and iters must each be two increasing values")
    spec = ARCHITECTURES[arch]
    proto = spec.protocol
    threads = torch.get_num_threads()
    pipe = build_pipeline(arch, device)
    params = sum(p.numel() for p in pipe.denoiser.parameters())
    fp_call = _seconds_per_call(pipe, pipe.denoiser, batch, repeats)
    from gaq.calibration import record_calibration

    calib = record_calibration(pipe, _calibration_spec(rows[0], spec), cache=False)
    rtn = RTN(RTN.Config()).quantize(pipe.denoiser, adapter_for(pipe.denoiser), calib,
                                     QuantConfig.from_bits(bits)).model
    q_call = _seconds_per_call(pipe, rtn, batch, repeats)
    decode = _decode_seconds(pipe, batch, repeats)
    per_image_step = fp_call / batch
    halves = 2 if proto.guidance else 1
    sampling_fp = proto.images * (proto.steps * halves * per_image_step + decode / batch)
    sampling_q = proto.images * (proto.steps * halves * q_call / batch + decode / batch)
    recording = proto.trajectories * proto.steps * halves * per_image_step

    from gaq.registry import get_method

    method_rows = []
    for method in methods:
        points, peaks = {}, {}
        # a method without reconstruction (RTN) has no iterations: rows only, b = 0
        iterative = hasattr(get_method(method).from_preset("paper").config, "recon")
        ks = iters if iterative else (iters[0], iters[0])
        grid = [(rows[0], ks[0]), (rows[0], ks[1]), (rows[1], ks[0]), (rows[1], ks[1])]
        for n, k in dict.fromkeys(grid):
            out = _measure_in_child(arch, method, n, k, bits, device, threads)
            points[(n, k)], peaks[(n, k)] = out["seconds"], out["peak_memory_mb"]
        if iterative:
            a, c, b = _fit(points, rows, iters)
            check = a + c * rows[1] + b * iters[1]
            measured = points[(rows[1], iters[1])]
        else:  # the two sizes determine the line; there is no run left to check it with
            b = 0.0
            c = (points[(rows[1], ks[0])] - points[(rows[0], ks[0])]) / (rows[1] - rows[0])
            a = points[(rows[0], ks[0])] - c * rows[0]
            check = measured = math.nan
        full = a + c * proto.calibration_rows + b * proto.weight_iters
        method_rows.append({
            "method": method, "runs": {f"{n}x{k}": s for (n, k), s in points.items()},
            "peak_memory_mb": {f"{n}x{k}": m for (n, k), m in peaks.items()},
            "fixed_seconds": a, "seconds_per_row": c, "seconds_per_iteration": b,
            "fit_check_error": (check - measured) / measured if measured else math.nan,
            "iterative": iterative,
            "projected_hours": full / 3600,
        })
    return {
        "architecture": arch, "description": spec.description, "parameters": params,
        "protocol": vars(proto), "bits": bits, "device": _device_name(device),
        "threads": threads, "batch": batch, "repeats": repeats,
        "fp_seconds_per_call": fp_call, "quant_seconds_per_call": q_call,
        "fake_quant_ratio": q_call / fp_call, "decode_seconds_per_batch": decode,
        "projected_hours": {
            "recording": recording / 3600,
            "sampling_fp": {g: sampling_fp / g / 3600 for g in gpus},
            "sampling_quantized": {g: sampling_q / g / 3600 for g in gpus},
        },
        "methods": method_rows, "rows": list(rows), "iters": list(iters),
    }


def _device_name(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(d)}"
    import platform

    return f"cpu {platform.processor() or platform.machine()}"


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``paper_scale_<arch>.json`` and a Markdown table next to it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"paper_scale_{report['architecture']}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    p, h = report["protocol"], report["projected_hours"]
    gpus = list(h["sampling_fp"])
    unit = "GPU" if report["device"].startswith("cuda") else "device"
    lines = [
        f"# Paper-scale cost: {report['description']}",
        "",
        f"{report['parameters'] / 1e6:.1f} M denoiser parameters, randomly initialised; "
        f"measured on {report['device']} ({report['threads']} threads), batch "
        f"{report['batch']}, {report['bits']}. Protocol: {p['paper']}, {p['images']:,} "
        f"images, {p['calibration_rows']:,} calibration rows, {p['weight_iters']:,} AdaRound "
        f"iterations per block. Hours are projections from the measured unit costs "
        "(`gaq/perf_paper.py` says how).",
        "",
        f"- one denoiser call at batch {report['batch']}: FP "
        f"{report['fp_seconds_per_call']:.3f} s, fake-quantized (RTN) "
        f"{report['quant_seconds_per_call']:.3f} s ({report['fake_quant_ratio']:.2f}x)",
        f"- calibration recording ({p['trajectories']} trajectories x {p['steps']} steps): "
        f"{h['recording']:.2f} h",
        "",
        "| phase | " + " | ".join(f"{g} × {unit}" for g in gpus) + " |",
        "|---|" + "---:|" * len(gpus),
        "| sampling, FP | " + " | ".join(f"{h['sampling_fp'][g]:.1f} h" for g in gpus) + " |",
        "| sampling, fake-quantized | "
        + " | ".join(f"{h['sampling_quantized'][g]:.1f} h" for g in gpus) + " |",
    ]
    for m in report["methods"]:
        lines.append(f"| calibration, {m['method']} (one rank) | "
                     + " | ".join(f"{m['projected_hours']:.1f} h" for _ in gpus) + " |")
    lines += ["", "Calibration fits (seconds = fixed + per row x rows + per iteration x "
              "iterations) and the peak memory of each run, by rows x iterations:", "",
              "| method | fixed (s) | per row (s) | per iteration (s) | fit check | "
              "peak memory (MB) |", "|---|---:|---:|---:|---:|---|"]
    for m in report["methods"]:
        mem = ", ".join(f"{k}: {v:.0f}" for k, v in m["peak_memory_mb"].items())
        check = "–" if math.isnan(m["fit_check_error"]) else f"{m['fit_check_error']:+.0%}"
        per_iter = f"{m['seconds_per_iteration']:.3f}" if m["iterative"] else "– (none)"
        lines.append(f"| {m['method']} | {m['fixed_seconds']:.1f} | {m['seconds_per_row']:.3f} "
                     f"| {per_iter} | {check} | {mem} |")
    lines += _reported_costs(report)
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return [json_path, md]


def _reported_costs(report: dict[str, Any]) -> list[str]:
    """Markdown lines setting each method's projected calibration hours beside the cost a
    paper reports for the same protocol (``published.toml``'s ``calibration_gpu_hours``);
    nothing when the protocol has no published costs."""
    from gaq.bench.published import published_rows

    key = report["protocol"].get("published_key")
    if not key:
        return []
    rows = published_rows(key, report["bits"])
    rows = rows[rows["metric"] == "calibration_gpu_hours"]
    if rows.empty:
        return []
    reported = {r.method: r for r in rows.itertuples()}
    on_gpu = report["device"].startswith("cuda")
    # a GPU run still fits and projects the protocol; only its unit changes
    here = f"projected here, {'GPU' if on_gpu else 'CPU'} h"
    lines = ["", f"Calibration cost beside what the papers report for {report['bits']} "
             f"({', '.join(sorted({r.source for r in reported.values()}))}). "
             + ("" if on_gpu else "The papers' figures are GPU hours; no GPU run has "
                "replaced this machine's CPU projection yet, so the two columns are not the "
                "same unit: the ratio says how far a CPU is from the papers' setting, not "
                "whether the implementation is slower."), "",
             f"| method | {here} (one rank) | reported (GPU h) |", "|---|---:|---:|"]
    projected = {m["method"]: m["projected_hours"] for m in report["methods"]}
    for method in sorted(set(projected) | set(reported)):
        mine = f"{projected[method]:.1f}" if method in projected else "not run"
        theirs = "–"
        if method in reported:
            r = reported[method]
            # an approximate figure ("about 3.5 h") keeps its "about"
            theirs = ("~" if "approximate" in r.note else "") + f"{r.value:g}"
        lines.append(f"| {method} | {mine} | {theirs} |")
    return lines
