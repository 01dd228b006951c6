"""Seeded DDIM sampling on diffusers schedulers.

Image ``i`` of a run draws its initial noise and every sampler noise from its
own generator seeded by ``(seed, i)``, so the same images come out whatever the
batch size or however batches are shared between workers. Batches are laid out
globally (batch ``b`` holds images ``[b*B, (b+1)*B)``), so a worker that takes
a subset of batches reproduces exactly the images of a single-process run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# (step_index, timestep, x_t, eps) -> replacement eps or None
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class SamplerConfig:
    """What determines a sampler's trajectory, besides the model and the seed."""

    steps: int = 50
    eta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler.steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"sampler.eta must lie in [0, 1], got {self.eta!r}")


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of run ``seed``; stable across platforms and versions."""
    digest = hashlib.blake2b(f"gaq:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def image_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    gens = []
    for i in indices:
        g = torch.Generator(device="cpu")
        g.manual_seed(image_seed(seed, int(i)))
        gens.append(g)
    return gens


def draw(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked (always drawn on CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def batch_ranges(num_images: int, batch_size: int) -> list[range]:
    """The global, fixed batch layout: the same for any number of workers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]


def ddim_scheduler(scheduler: SchedulerMixin, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the model's noise schedule, set to ``steps`` sampling steps."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    return ddim


def sampling_timesteps(scheduler: SchedulerMixin, steps: int) -> list[int]:
    return [int(t) for t in ddim_scheduler(scheduler, steps).timesteps]


@torch.no_grad()
def ddim_sample_batch(
    denoiser: torch.nn.Module,
    scheduler: SchedulerMixin,
    indices: Sequence[int],
    *,
    seed: int,
    sampler: SamplerConfig = SamplerConfig(),
    device: torch.device | str = "cpu",
    callback: StepCallback | None = None,
    denoiser_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Sample the images with global ``indices`` of run ``seed``; returns them in [-1, 1] on CPU.

    ``denoiser_kwargs`` (e.g. ``class_labels`` or ``encoder_hidden_states`` for these
    images, already on ``device``) are passed to every denoiser call.
    """
    cfg = denoiser.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ddim = ddim_scheduler(scheduler, sampler.steps)
    gens = image_generators(seed, indices)
    dtype = next(denoiser.parameters()).dtype
    x = draw(gens, shape).to(device=device, dtype=dtype)
    kwargs = dict(denoiser_kwargs or {})
    for step, t in enumerate(ddim.timesteps):
        t_int = int(t)
        eps = _noise_prediction(denoiser(x, t.to(device), **kwargs), x.shape[1])
        if callback is not None:
            replaced = callback(step, t_int, x, eps)
            if replaced is not None:
                eps = replaced
        noise = None
        if sampler.eta > 0:
            noise = draw(gens, shape).to(device=device, dtype=dtype)
        x = ddim.step(eps, t, x, eta=sampler.eta, variance_noise=noise).prev_sample
    return x.clamp(-1, 1).float().cpu()


def ddim_sample(
    denoiser: torch.nn.Module,
    scheduler: SchedulerMixin,
    num_images: int,
    *,
    seed: int,
    sampler: SamplerConfig = SamplerConfig(),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    batches: Iterable[int] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample ``num_images`` images (or only the global ``batches`` given) of run ``seed``."""
    layout = batch_ranges(num_images, batch_size)
    chosen = list(range(len(layout))) if batches is None else sorted(batches)
    it: Iterable[int] = chosen
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chosen, desc="sampling", unit="batch")
    out = [
        ddim_sample_batch(
            denoiser, scheduler, layout[b], seed=seed, sampler=sampler, device=device,
            callback=callback,
        )
        for b in it
    ]
    return torch.cat(out) if out else torch.empty(0)


def _noise_prediction(output: object, channels: int) -> torch.Tensor:
    # diffusers models return a dataclass with `.sample`; plain modules may return a tensor.
    out = output.sample if hasattr(output, "sample") else output  # type: ignore[union-attr]
    # learned-variance models (DiT) predict [eps, variance]: DDIM uses eps only
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images to uint8 [0, 255], the one quantisation step every metric sees."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
