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
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# (step_index, timestep, x_t, eps) -> replacement eps or None
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@runtime_checkable
class SamplerHook(Protocol):
    """A method's correction inside the sampler (``QuantResult.sampler_hook``).

    ``eps(step, t, x, eps)`` returns the noise prediction to use (or None: unchanged).
    Optional methods, looked up with ``getattr`` so simple hooks need not define them:

    * ``bind(sampler, ddim)``: called once per batch before sampling, with the
      :class:`SamplerConfig` and the DDIM scheduler set to its steps (a hook whose
      statistics belong to one sampler configuration refuses another here);
    * ``sigma(step, t, sigma, c_t) -> sigma``: the std of the fresh noise of this DDIM
      step, given the scheduler's ``sigma`` and the coefficient ``c_t`` of eps in
      ``x_{t-1} = a_t·x_t + c_t·eps + sigma·z`` (PTQD's variance schedule calibration).

    A plain callable is accepted wherever a hook is, and used as a :data:`StepCallback`.
    """

    def eps(self, step: int, t: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor | None:
        ...


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
    hook: SamplerHook | StepCallback | None = None,
) -> torch.Tensor:
    """Sample the images with global ``indices`` of run ``seed``; returns them in [-1, 1] on CPU.

    ``denoiser_kwargs`` (e.g. ``class_labels`` or ``encoder_hidden_states`` for these
    images, already on ``device``) are passed to every denoiser call. ``callback`` sees
    (and may replace) the denoiser's eps first, then ``hook`` (a :class:`SamplerHook`).
    """
    cfg = denoiser.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ddim = ddim_scheduler(scheduler, sampler.steps)
    gens = image_generators(seed, indices)
    dtype = next(denoiser.parameters()).dtype
    x = draw(gens, shape).to(device=device, dtype=dtype)
    kwargs = dict(denoiser_kwargs or {})
    eps_hook, sigma_hook = _split_hook(hook)
    if hook is not None and hasattr(hook, "bind"):
        hook.bind(sampler, ddim)  # type: ignore[union-attr]
    for step, t in enumerate(ddim.timesteps):
        t_int = int(t)
        # a (B,) timestep: DiT's embedding refuses a 0-d one; UNets broadcast either
        eps = _noise_prediction(denoiser(x, t.to(device).expand(x.shape[0]), **kwargs),
                                x.shape[1])
        for fn in (callback, eps_hook):
            if fn is not None:
                replaced = fn(step, t_int, x, eps)
                if replaced is not None:
                    eps = replaced
        noise = None
        if sampler.eta > 0:
            noise = draw(gens, shape).to(device=device, dtype=dtype)
        sigma = None
        if sigma_hook is not None:
            default, c_t = ddim_sigma(ddim, t_int, sampler.eta)
            new = float(sigma_hook(step, t_int, default, c_t))
            # the explicit update only when the hook really changes sigma: otherwise the
            # trajectory stays bit-identical to diffusers' own step
            sigma = None if new == default else new
        if sigma is None:
            x = ddim.step(eps, t, x, eta=sampler.eta, variance_noise=noise).prev_sample
        else:
            x = ddim_update(ddim, eps, t_int, x, sigma, noise)
    return x.clamp(-1, 1).float().cpu()


def _split_hook(hook: Any) -> tuple[StepCallback | None, Callable | None]:
    """(eps function, sigma function or None) of a SamplerHook or plain callable."""
    if hook is None:
        return None, None
    if hasattr(hook, "eps"):
        return hook.eps, getattr(hook, "sigma", None)
    if callable(hook):
        return hook, None
    raise TypeError(f"a sampler hook needs an eps(step, t, x, eps) method, got {hook!r}")


def _alphas(ddim: DDIMScheduler, t: int) -> tuple[float, float]:
    # the previous timestep exactly as DDIMScheduler.step computes it
    prev = t - ddim.config.num_train_timesteps // ddim.num_inference_steps
    a_t = float(ddim.alphas_cumprod[t])
    a_prev = float(ddim.alphas_cumprod[prev]) if prev >= 0 else float(ddim.final_alpha_cumprod)
    return a_t, a_prev


def ddim_sigma(ddim: DDIMScheduler, t: int, eta: float) -> tuple[float, float]:
    """(sigma_t, c_t) of the DDIM step from ``t``: the std of its fresh noise (DDIM eq. 16,
    scaled by eta) and the coefficient of eps in ``x_{t-1} = a_t·x_t + c_t·eps + sigma_t·z``
    (ignoring clipping of the predicted x_0)."""
    a_t, a_prev = _alphas(ddim, t)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    c_t = max(1 - a_prev - sigma**2, 0.0) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5
    return sigma, c_t


def ddim_update(ddim: DDIMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor,
                sigma: float, noise: torch.Tensor | None) -> torch.Tensor:
    """``DDIMScheduler.step`` (epsilon prediction) with the noise std ``sigma`` given rather
    than derived from eta; ``sigma`` also sets the direction coefficient, as in DDIM."""
    cfg = ddim.config
    if cfg.prediction_type != "epsilon":
        raise ValueError(f"a sampler hook that changes sigma needs an epsilon-prediction "
                         f"model, not {cfg.prediction_type!r}")
    a_t, a_prev = _alphas(ddim, t)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if cfg.thresholding:
        x0 = ddim._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    out = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("sigma > 0 needs the variance noise")
        out = out + sigma * noise
    return out


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
    hook: SamplerHook | StepCallback | None = None,
) -> torch.Tensor:
    """Sample ``num_images`` images (or only the global ``batches`` given) of run ``seed``;
    ``hook`` is a method's :class:`SamplerHook` (``QuantResult.sampler_hook``)."""
    layout = batch_ranges(num_images, batch_size)
    chosen = list(range(len(layout))) if batches is None else sorted(batches)
    it: Iterable[int] = chosen
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chosen, desc="sampling", unit="batch")
    out = [
        ddim_sample_batch(
            denoiser, scheduler, layout[b], seed=seed, sampler=sampler, device=device,
            callback=callback, hook=hook,
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
