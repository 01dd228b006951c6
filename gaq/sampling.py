"""Seeded sampling on diffusers schedulers: DDIM (eta), PLMS and DPM-Solver++(2M), with
classifier-free guidance, through a :class:`~gaq.models.pipeline.Pipeline`.

Image ``i`` of a run draws its initial noise and every sampler noise from its own
generator seeded by ``(seed, i)``, and its conditioning (class, prompt) depends on ``i``
alone, so the same images come out whatever the batch size or however batches are shared
between workers. Batches are laid out globally (batch ``b`` holds images
``[b*B, (b+1)*B)``), so a worker that takes a subset of batches reproduces exactly the
images of a single-process run.

The samplers are diffusers' own schedulers built from the model's noise schedule, so the
model's prediction type (epsilon, v or sample) is respected by their update. A scheduler
family the suite cannot express this way (flow matching) is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from gaq.errors import GaqError
from gaq.models.adapters import denoise
from gaq.registry import Registry, UnknownPluginError

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

# (step_index, timestep, x_t, eps) -> replacement eps or None
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
# (step_index, timestep, denoiser input x, denoiser output, denoiser keyword inputs):
# sees every denoiser call exactly as made (both halves of a guided batch)
DenoiserRecorder = Callable[[int, int, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]],
                            None]


@runtime_checkable
class SamplerHook(Protocol):
    """A method's correction inside the sampler (``QuantResult.sampler_hook``).

    ``eps(step, t, x, eps)`` returns the model output to use (or None: unchanged); with
    guidance it sees the guided output. Optional methods, looked up with ``getattr``:

    * ``bind(sampler, scheduler)``: called once per batch before sampling, with the
      :class:`SamplerConfig` and the scheduler set to its steps (a hook whose statistics
      belong to one sampler configuration, or that cannot express its correction in this
      scheduler's update, refuses here);
    * ``sigma(step, t, sigma, c_t) -> sigma``: the std of the fresh noise of a DDIM step,
      given the scheduler's ``sigma`` and the coefficient ``c_t`` of eps in
      ``x_{t-1} = a_t·x_t + c_t·eps + sigma·z`` (PTQD's variance schedule calibration);
      only DDIM has such a step, so only DDIM calls it.

    A plain callable is accepted wherever a hook is, and used as a :data:`StepCallback`.
    """

    def eps(self, step: int, t: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor | None:
        ...


@dataclass(frozen=True)
class SamplerKind:
    """A sampler of the registry: the diffusers scheduler class and its settings."""

    name: str
    scheduler: str  # diffusers class name
    options: tuple[tuple[str, Any], ...] = ()
    stochastic: bool = False  # takes eta
    description: str = ""


class UnknownSamplerError(UnknownPluginError, ValueError):
    """A sampler name nothing registered (a ValueError too: a bad config value)."""

    kind = "sampler"


class SamplerRegistry(Registry):
    """Name -> :class:`SamplerKind` (``gaq.samplers`` entry points, each naming a
    SamplerKind object under the sampler's own name)."""

    kind = "sampler"
    base = "gaq.sampling:SamplerKind"
    instances = True
    known_in_order = True
    unknown = UnknownSamplerError

    def __init__(self, builtins: Iterable[SamplerKind] = (),
                 entry_point_group: str | None = "gaq.samplers") -> None:
        super().__init__({s.name: s for s in builtins}, entry_point_group)


SAMPLERS = SamplerRegistry((
    SamplerKind("ddim", "DDIMScheduler", stochastic=True,
                description="DDIM (Song et al.), eta = 0 deterministic, 1 DDPM-like"),
    # PLMS is PNDM without its Runge-Kutta warm-up, as the LDM and SD pipelines use it
    SamplerKind("plms", "PNDMScheduler", (("skip_prk_steps", True),),
                description="PLMS (pseudo linear multi-step), the LDM/Stable Diffusion "
                "default"),
    SamplerKind("dpm-solver++", "DPMSolverMultistepScheduler",
                (("algorithm_type", "dpmsolver++"), ("solver_order", 2)),
                description="DPM-Solver++(2M), multistep, deterministic"),
))

# scheduler families whose update is not a function of a noise/v/x0 prediction
_UNSUPPORTED_SCHEDULERS = ("FlowMatch",)


def sampler_kind(name: str) -> SamplerKind:
    """The registered sampler ``name``; an unknown one (:class:`UnknownSamplerError`, a
    ValueError) names the known ones and the close ones."""
    return SAMPLERS.get(name)


@dataclass(frozen=True)
class SamplerConfig:
    """What determines a sampler's trajectory, besides the model, its conditioning and the
    seed: the sampler, its steps, eta (DDIM only) and the classifier-free guidance scale
    (None: the conditional prediction alone, no unconditional half)."""

    steps: int = 50
    eta: float = 0.0
    guidance: float | None = None
    name: str = "ddim"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler.steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"sampler.eta must lie in [0, 1], got {self.eta!r}")
        kind = sampler_kind(self.name)
        if self.eta and not kind.stochastic:
            raise ValueError(f"sampler.eta applies to DDIM only; {self.name!r} is deterministic "
                             "(set eta = 0)")
        if self.guidance is not None and not float(self.guidance) >= 1.0:
            raise ValueError(f"sampler.guidance must be at least 1 (or absent), "
                             f"got {self.guidance!r}")


def check_scheduler(scheduler: SchedulerMixin | str) -> None:
    """Refuse a model whose scheduler family the samplers cannot express; ``scheduler`` is
    a scheduler or a scheduler class name (a config file's ``_class_name``)."""
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    if any(name.startswith(p) for p in _UNSUPPORTED_SCHEDULERS):
        raise GaqError(f"the model's scheduler is {name} (flow matching, e.g. SD3/Flux), which "
                       f"gaq does not support yet: its samplers ({', '.join(SAMPLERS)}) need "
                       "an epsilon-, v- or sample-prediction diffusion model")


def check_steps(scheduler: SchedulerMixin, steps: int, what: str) -> None:
    """Refuse ``steps`` sampler steps on a model trained with fewer timesteps (a sampler
    step lands on a distinct training timestep). ``what`` names where the value came from
    (a flag, a benchmark key), for the message."""
    trained = int(getattr(scheduler.config, "num_train_timesteps", 0) or 0)
    if trained and steps > trained:
        raise GaqError(f"{what} is {steps}, more steps than the model's {trained} training "
                       f"timesteps; choose at most {trained}")


def make_scheduler(scheduler: SchedulerMixin, sampler: SamplerConfig) -> SchedulerMixin:
    """The chosen sampler's scheduler with the model's noise schedule and prediction type,
    set to ``sampler.steps`` steps (a fresh instance: multistep schedulers keep state)."""
    import diffusers

    check_scheduler(scheduler)
    check_steps(scheduler, sampler.steps, "sampler.steps")
    kind = sampler_kind(sampler.name)
    cls = getattr(diffusers, kind.scheduler)
    sched = cls.from_config(scheduler.config, **dict(kind.options))
    sched.set_timesteps(sampler.steps)
    return sched


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
    return make_scheduler(scheduler, SamplerConfig(steps=steps))  # type: ignore[return-value]


def sampling_timesteps(scheduler: SchedulerMixin, sampler: SamplerConfig | int) -> list[int]:
    """The timesteps ``sampler`` visits, in sampling order (an int: DDIM with that many
    steps). PLMS visits one timestep twice; every consumer keys tables by timestep."""
    if isinstance(sampler, int):
        sampler = SamplerConfig(steps=sampler)
    return [int(t) for t in make_scheduler(scheduler, sampler).timesteps]


def _cat_inputs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    if set(a) != set(b):
        raise ValueError(f"unconditional inputs {sorted(a)} differ from conditional {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in b}


def predict(pipe: Pipeline, denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            cond: Mapping[str, torch.Tensor], null: Mapping[str, torch.Tensor] | None,
            guidance: float | None, record: Callable | None = None) -> torch.Tensor:
    """One model prediction as the sampler uses it. With ``guidance``, the denoiser runs on
    the batch ``[unconditional; conditional]`` (as the diffusers pipelines do) and the
    result is ``u + guidance·(c − u)``; ``record(x_in, out, inputs)`` sees the call as made."""
    channels = pipe.latent_shape[0]
    if guidance is None:
        x_in, inputs = x, dict(cond)
    else:
        assert null is not None
        x_in, inputs = torch.cat([x, x]), _cat_inputs(null, cond)
    # a (B,) timestep: DiT's embedding refuses a 0-d one; UNets broadcast either
    out = _noise_prediction(denoise(denoiser, x_in, t.to(x.device).expand(x_in.shape[0]),
                                    inputs), channels)
    if record is not None:
        record(x_in, out, inputs)
    if guidance is None:
        return out
    uncond, conditional = out.chunk(2)
    return uncond + guidance * (conditional - uncond)


@torch.no_grad()
def sample_batch(
    pipe: Pipeline,
    indices: Sequence[int],
    *,
    seed: int,
    sampler: SamplerConfig = SamplerConfig(),
    hook: SamplerHook | StepCallback | None = None,
    record: DenoiserRecorder | None = None,
    denoiser: torch.nn.Module | None = None,
    decode: bool = True,
) -> torch.Tensor:
    """Sample the images with global ``indices`` of run ``seed``, on the pipeline's device.

    ``denoiser`` replaces the pipeline's (e.g. a quantized copy). ``record`` sees every
    denoiser call (calibration recording); ``hook`` (a :class:`SamplerHook`) may replace
    the model output the update uses. Returns decoded images in [-1, 1] on the CPU, or the
    final denoiser-space samples with ``decode=False``.
    """
    denoiser = pipe.denoiser if denoiser is None else denoiser
    ref = next(denoiser.parameters())
    device, dtype = ref.device, ref.dtype
    sched = make_scheduler(pipe.scheduler, sampler)
    is_ddim = isinstance(sched, DDIMScheduler)
    gens = image_generators(seed, indices)
    shape = pipe.latent_shape
    idx = torch.as_tensor(list(indices), dtype=torch.long, device="cpu")
    cond = pipe.conditioning.inputs(idx, device)
    guidance = None if sampler.guidance is None else float(sampler.guidance)
    null = pipe.conditioning.null_inputs(len(idx), device) if guidance is not None else None
    x = draw(gens, shape).to(device=device, dtype=dtype)
    if float(sched.init_noise_sigma) != 1.0:
        x = x * sched.init_noise_sigma
    eps_hook, sigma_hook = _split_hook(hook)
    if hook is not None and hasattr(hook, "bind"):
        hook.bind(sampler, sched)  # type: ignore[union-attr]
    for step, t in enumerate(sched.timesteps):
        t_int = int(t)
        x_in = sched.scale_model_input(x, t)
        rec = None if record is None else (
            lambda xi, out, inp, step=step, t_int=t_int: record(step, t_int, xi, out, inp))
        eps = predict(pipe, denoiser, x_in, t, cond, null, guidance, rec)
        if eps_hook is not None:
            replaced = eps_hook(step, t_int, x, eps)
            if replaced is not None:
                eps = replaced
        if not is_ddim:
            x = sched.step(eps, t, x).prev_sample
            continue
        noise = None
        if sampler.eta > 0:
            noise = draw(gens, shape).to(device=device, dtype=dtype)
        sigma = None
        if sigma_hook is not None:
            default, c_t = ddim_sigma(sched, t_int, sampler.eta)
            new = float(sigma_hook(step, t_int, default, c_t))
            # the explicit update only when the hook really changes sigma: otherwise the
            # trajectory stays bit-identical to diffusers' own step
            sigma = None if new == default else new
        if sigma is None:
            x = sched.step(eps, t, x, eta=sampler.eta, variance_noise=noise).prev_sample
        else:
            x = ddim_update(sched, eps, t_int, x, sigma, noise)
    return pipe.decode(x) if decode else x


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


def sample(
    pipe: Pipeline,
    num_images: int,
    *,
    seed: int,
    sampler: SamplerConfig = SamplerConfig(),
    batch_size: int = 64,
    batches: Iterable[int] | None = None,
    progress: bool = False,
    hook: SamplerHook | StepCallback | None = None,
    denoiser: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Sample ``num_images`` images (or only the global ``batches`` given) of run ``seed``
    as images in [-1, 1] on the CPU; ``denoiser`` replaces the pipeline's, ``hook`` is a
    method's :class:`SamplerHook` (``QuantResult.sampler_hook``)."""
    layout = batch_ranges(num_images, batch_size)
    chosen = list(range(len(layout))) if batches is None else sorted(batches)
    it: Iterable[int] = chosen
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chosen, desc="sampling", unit="batch")
    out = [sample_batch(pipe, layout[b], seed=seed, sampler=sampler, hook=hook,
                        denoiser=denoiser) for b in it]
    return torch.cat(out) if out else torch.empty(0, device="cpu")


def _noise_prediction(output: object, channels: int) -> torch.Tensor:
    # diffusers models return a dataclass with `.sample`; plain modules may return a tensor.
    out = output.sample if hasattr(output, "sample") else output  # type: ignore[union-attr]
    # learned-variance models (DiT) predict [eps, variance]: DDIM uses eps only
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images to uint8 [0, 255], the one quantisation step every metric sees."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
