"""Calibration data: denoiser inputs recorded along full-precision sampler trajectories.

A calibration set holds rows ``(x_t, t, cond)`` together with the FP denoiser output
``eps_fp`` at that input, recorded while the FP sampler of a
:class:`~gaq.models.pipeline.Pipeline` runs from pure noise: exactly the inputs the
sampler feeds the denoiser, so latents for latent models and, with classifier-free
guidance, both halves of every guided batch (the conditional and the unconditional
input, as Q-Diffusion calibrates Stable Diffusion). Every
kept step of a trajectory is recorded in the same pass through the sampler (re-sampling
from ``T`` for every kept ``t`` is what made TFMQ-DM's data generation take days).

Three protocols (see :class:`CalibrationSpec`):

* ``"interval"`` (Q-Diffusion): every ``interval``-th sampler step of
  ``samples_per_step`` trajectories.
* ``"gaussian"`` (PTQ4DM): one step per trajectory, its position drawn from a normal
  distribution over the trajectory.
* ``"srm"`` (APQ-DM): as many steps as ``"interval"`` keeps, chosen by structural risk
  minimisation on a few probe trajectories recorded at every step (:func:`srm_select`).

Sets are cached on disk under a content hash of everything that determines them (model
id, weights, scheduler config, spec with its sampler and guidance, conditioning source),
so every method of a benchmark calibrates on the identical, inspectable data (design
principle 6). Image ``i``'s noise and conditioning depend only on ``(seed, i)``
(:mod:`gaq.sampling`), so neither the recording batch size nor the device layout changes
what is recorded.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from gaq.config import Config, ConfigError, non_negative_int, positive_float, positive_int
from gaq.finite import first_non_finite, require_finite_tensors
from gaq.models.adapters import denoise
from gaq.sampling import SamplerConfig, batch_ranges, sample_batch, sampler_kind, sampling_timesteps

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

__all__ = [
    "CACHE_FORMAT",
    "CalibrationCacheWarning",
    "CalibrationSet",
    "CalibrationSpec",
    "calibration_key",
    "combine_guidance",
    "default_cache_dir",
    "forward_loop",
    "per_timestep_loop",
    "record_calibration",
    "srm_select",
    "state_dict_digest",
]

#: Bump when the file layout or the recording semantics change: old entries become misses.
CACHE_FORMAT = 3  # 3: recorded through a Pipeline (any sampler, both guidance halves)

Protocol = Literal["interval", "gaussian", "srm"]


class CalibrationCacheWarning(UserWarning):
    """A cache entry could not be read (and is recomputed) or written (and is not kept)."""


# --------------------------------------------------------------------------------------
# The spec.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationSpec(Config):
    """How a calibration set is recorded.

    Step conventions. The DDIM sampler runs ``steps`` iterations; iteration ``k``
    (0-based, in sampling order) denoises timestep ``timesteps[k]``, and the timesteps
    *decrease*: iteration 0 is the noisiest (``t`` near ``T``), iteration ``steps-1`` the
    cleanest (``t`` near 0). So iteration ``k`` is not timestep ``k``.

    ``"interval"`` keeps iterations ``0, interval, 2*interval, ...`` of
    ``samples_per_step`` trajectories: ``ceil(steps/interval)`` timesteps ×
    ``samples_per_step`` rows (Q-Diffusion CIFAR: 100 steps, interval 5 → 20 × 256).
    Iteration 0 is always kept, so its ``x_t`` is the initial noise.

    ``"gaussian"`` records one row per trajectory, for ``num_samples`` trajectories. Its
    position ``u ~ N(gauss_mean, gauss_std)`` is measured in *timestep* terms: 0 is the
    clean end (``t = 0``), 1 the noisy end (``t = T``, the scheduler's
    ``num_train_timesteps``). ``u`` is clipped to [0, 1] and the row is recorded at the
    sampling step whose timestep is nearest to ``u·T``. PTQ4DM's code defaults are
    μ = σ = 0.4; its released code compares the drawn position with the sampling-loop
    counter, which counts from the noisy end — to mimic that inverted reading, use
    ``gauss_mean = 1 - μ``.

    ``"srm"`` keeps the same number of iterations as ``"interval"`` would
    (``ceil(steps/interval)``) for ``samples_per_step`` trajectories, but chooses which:
    ``srm_probe`` probe trajectories (the first training ones) are recorded at every step,
    and the subset minimising ``R(S)/R(all) + srm_lambda · MMD²(S, all)`` is picked greedily
    (:func:`srm_select`): ``R`` is the error of an ``srm_bits``-bit min/max quantizer fitted
    on the kept steps' rows (the empirical risk), MMD² the squared maximum mean discrepancy
    between the kept steps' rows and every step's rows. Deterministic from ``seed``.

    ``holdout_per_step`` adds validation trajectories (GAQ's ``X^V``: equal count per
    timestep), recorded at every kept step (interval) or at every sampler step
    (gaussian, whose training rows are deliberately not balanced). Held-out rows come
    from their own trajectories, so no validation row shares a trajectory with a
    training row.

    ``act_every_step`` (interval and srm): the training trajectories are also recorded at
    every sampler step the protocol does not keep. Those rows serve one purpose: a
    per-timestep activation table gets a row calibrated on its own timestep's inputs at
    every step the sampler visits (TFMQ-DM's released code calibrates weights on every
    n-th step and activations on every step, from the same trajectories). They are held
    apart (:attr:`CalibrationSet.act_extra`, :meth:`CalibrationSet.activation_rows`), so
    the training and held-out rows are exactly those of the same spec without it. Free in
    sampling cost (the steps are computed anyway), ``steps / interval`` times the rows.

    ``sampler_name`` and ``guidance`` are the sampler's (see :class:`SamplerConfig`): with
    guidance every recorded step yields two rows per trajectory, the unconditional input
    first, then the conditional one, both with the trajectory's ``image`` index.

    ``batch_size`` only sets how many trajectories are sampled at once; it does not
    change the recorded data and is left out of :meth:`data_fingerprint`.
    """

    VERSION: ClassVar[int] = 1

    protocol: Protocol = "interval"
    steps: int = 100
    eta: float = 0.0
    sampler_name: str = "ddim"
    guidance: float | None = None
    interval: int = 5
    samples_per_step: int = 256
    num_samples: int = 1024
    gauss_mean: float = 0.4
    gauss_std: float = 0.4
    seed: int = 0
    batch_size: int = 64
    holdout_per_step: int = 0
    # "srm" only; left out of to_dict() at their defaults, so adding them changed no
    # existing fingerprint
    srm_lambda: float = 1.0
    srm_probe: int = 4
    srm_bits: int = 4
    # activation-only rows at every other sampler step (left out at its default too)
    act_every_step: bool = False

    def validate(self) -> None:
        positive_int("steps", self.steps)
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError("eta", f"must lie in [0, 1], got {self.eta!r}")
        try:
            sampler_kind(self.sampler_name)
            self.sampler  # noqa: B018 (validates eta and guidance against the sampler)
        except ValueError as e:
            raise ConfigError("sampler_name", str(e)) from None
        positive_int("interval", self.interval)
        positive_int("samples_per_step", self.samples_per_step)
        positive_int("num_samples", self.num_samples)
        if not (math.isfinite(self.gauss_mean) and 0.0 <= self.gauss_mean <= 1.0):
            raise ConfigError(
                "gauss_mean",
                f"must lie in [0, 1] (0 = clean end, 1 = noisy end), got {self.gauss_mean!r}",
            )
        positive_float("gauss_std", self.gauss_std)
        positive_int("batch_size", self.batch_size)
        non_negative_int("holdout_per_step", self.holdout_per_step)
        if not (math.isfinite(self.srm_lambda) and self.srm_lambda >= 0):
            raise ConfigError("srm_lambda", f"must be a finite number >= 0, got "
                              f"{self.srm_lambda!r}")
        positive_int("srm_probe", self.srm_probe)
        if not (isinstance(self.srm_bits, int) and 2 <= self.srm_bits <= 16):
            raise ConfigError("srm_bits", f"must be an integer in [2, 16], got {self.srm_bits!r}")
        if self.act_every_step and self.protocol == "gaussian":
            raise ConfigError("act_every_step", "needs the interval or srm protocol (the "
                              "gaussian protocol records one step per trajectory)")
        if self.protocol in ("interval", "srm") and self.interval > self.steps:
            raise ConfigError(
                "interval", f"must be at most steps ({self.steps}), got {self.interval}"
            )

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(steps=self.steps, eta=self.eta, guidance=self.guidance,
                             name=self.sampler_name)

    def _plain_fields(self, toml: bool) -> dict[str, Any]:
        out = super()._plain_fields(toml)
        for name, default in _OMIT_AT_DEFAULT.items():
            if getattr(self, name) == default:
                out.pop(name, None)
        return out

    @property
    def num_train_trajectories(self) -> int:
        return self.num_samples if self.protocol == "gaussian" else self.samples_per_step

    @property
    def num_trajectories(self) -> int:
        """Trajectories sampled: training ones first (indices ``0..``), then held-out ones."""
        return self.num_train_trajectories + self.holdout_per_step

    def kept_steps(self, iterations: int | None = None) -> list[int]:
        """Sampler iterations recorded by every trajectory of the interval protocol (and
        by the held-out trajectories of either protocol), out of ``iterations`` (default
        ``steps``; PLMS makes one iteration more than its steps)."""
        n = self.steps if iterations is None else iterations
        if self.protocol in ("interval", "srm"):
            # srm: only the count is known before recording (which steps it kept is in the
            # recorded set's meta["srm_steps"])
            return list(range(0, n, self.interval))
        return list(range(n))

    def data_fingerprint(self) -> str:
        """Fingerprint of the fields that determine the data.

        ``batch_size`` and the fields of the protocol not in use are reset to their
        defaults, so e.g. an interval spec with another ``num_samples`` hits the same cache.
        """
        srm = tuple(_SRM_DEFAULTS)
        unused = {
            "interval": ("num_samples", "gauss_mean", "gauss_std", *srm),
            "gaussian": ("interval", "samples_per_step", *srm),
            "srm": ("num_samples", "gauss_mean", "gauss_std"),
        }[self.protocol]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        canonical = dataclasses.replace(
            self, batch_size=defaults["batch_size"], **{k: defaults[k] for k in unused}
        )
        return canonical.fingerprint()


_SRM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CalibrationSpec)
                 if f.name.startswith("srm_")}
# fields added after sets were cached and results committed: at their defaults they are
# not written, so no existing fingerprint changed
_OMIT_AT_DEFAULT = {**_SRM_DEFAULTS, "act_every_step": False}


# --------------------------------------------------------------------------------------
# The set.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class CalibrationSet:
    """Recorded denoiser inputs: one row per (trajectory, kept step).

    ``x`` (N, C, H, W) float32 denoiser inputs; ``t`` (N,) int64 timesteps; ``eps_fp``
    (N, ...) the FP denoiser output at that input; ``cond`` extra denoiser keyword inputs,
    (N, ...) each (empty for unconditional models); ``split`` (N,) bool, True for
    held-out (validation) rows; ``image`` (N,) int64 index of the trajectory a row comes
    from (None when unknown); ``meta`` provenance (cache key, spec, model id);
    ``act_extra`` the activation-only rows of an ``act_every_step`` set (training
    trajectories at the steps the protocol does not keep), outside every row selection:
    only :meth:`activation_rows` returns them.

    Rows of a recorded set are ordered by sampler iteration (noisiest first), then by
    trajectory.
    """

    x: Tensor
    t: Tensor
    eps_fp: Tensor
    cond: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    split: Tensor | None = None
    image: Tensor | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    act_extra: CalibrationSet | None = None

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.split is None:
            self.split = torch.zeros(n, dtype=torch.bool, device=self.x.device)
        if self.t.ndim != 1 or self.t.dtype != torch.int64:
            got = f"{self.t.dtype} of shape {tuple(self.t.shape)}"
            raise ValueError(f"t must be a 1-D int64 tensor, got {got}")
        if self.split.ndim != 1 or self.split.dtype != torch.bool:
            raise ValueError(f"split must be a 1-D bool tensor, got {self.split.dtype}")
        rows = {"t": self.t, "eps_fp": self.eps_fp, "split": self.split}
        rows.update({f"cond[{k!r}]": v for k, v in self.cond.items()})
        if self.image is not None:
            rows["image"] = self.image
        for name, value in rows.items():
            if value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} rows but x has {n}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def guidance(self) -> float | None:
        """The classifier-free guidance scale the set was recorded with (None: none). A
        guided set holds, per trajectory and step, the unconditional row then the
        conditional one, next to each other in every per-timestep subset."""
        g = (self.meta.get("spec") or {}).get("guidance")
        return None if g is None else float(g)

    def _take(self, idx: Tensor) -> CalibrationSet:
        assert self.split is not None
        idx = idx.to(self.x.device)
        return CalibrationSet(
            x=self.x[idx],
            t=self.t[idx],
            eps_fp=self.eps_fp[idx],
            cond={k: v[idx] for k, v in self.cond.items()},
            split=self.split[idx],
            image=None if self.image is None else self.image[idx],
            meta=dict(self.meta),
        )

    def subset(self, mask: Tensor) -> CalibrationSet:
        """The rows selected by a (N,) bool mask or by a tensor of row indices."""
        if mask.dtype == torch.bool:
            if mask.shape != (len(self),):
                raise ValueError(f"mask must have shape ({len(self)},), got {tuple(mask.shape)}")
            mask = mask.nonzero().flatten()
        return self._take(mask.long())

    def train(self) -> CalibrationSet:
        assert self.split is not None
        return self.subset(~self.split)

    def holdout(self) -> CalibrationSet:
        assert self.split is not None
        return self.subset(self.split)

    def activation_rows(self) -> CalibrationSet:
        """The rows a per-timestep activation table is calibrated on: the training rows,
        plus the activation-only rows at every other sampler step when the set has them."""
        train = self.train()
        if self.act_extra is None:
            return train
        return _concat(train, self.act_extra)

    def timesteps(self) -> list[int]:
        """The distinct timesteps, ascending."""
        return [int(v) for v in torch.unique(self.t).tolist()]

    def by_timestep(self) -> dict[int, CalibrationSet]:
        """One subset per timestep, ascending in ``t``."""
        return {ts: self.subset(self.t == ts) for ts in self.timesteps()}

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield dicts ``{"x", "t", "cond": {...}, "eps_fp", "split", "index"}``.

        ``index`` holds the row numbers in this set; every row appears exactly once per
        pass. ``shuffle`` permutes rows with ``generator`` (a CPU generator).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        assert self.split is not None
        n = len(self)
        order = (torch.randperm(n, generator=generator) if shuffle
             else torch.arange(n, device="cpu"))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].to(self.x.device)
            yield {
                "x": self.x[idx],
                "t": self.t[idx],
                "cond": {k: v[idx] for k, v in self.cond.items()},
                "eps_fp": self.eps_fp[idx],
                "split": self.split[idx],
                "index": idx,
            }

    def to(self, device: torch.device | str) -> CalibrationSet:
        assert self.split is not None
        return CalibrationSet(
            x=self.x.to(device),
            t=self.t.to(device),
            eps_fp=self.eps_fp.to(device),
            cond={k: v.to(device) for k, v in self.cond.items()},
            split=self.split.to(device),
            image=None if self.image is None else self.image.to(device),
            meta=dict(self.meta),
            act_extra=None if self.act_extra is None else self.act_extra.to(device),
        )


def _concat(a: CalibrationSet, b: CalibrationSet) -> CalibrationSet:
    """The rows of ``a`` then those of ``b`` (same conditioning keys), ``a``'s meta."""
    assert a.split is not None and b.split is not None
    image = None if a.image is None or b.image is None else torch.cat([a.image, b.image])
    return CalibrationSet(
        x=torch.cat([a.x, b.x]), t=torch.cat([a.t, b.t]), eps_fp=torch.cat([a.eps_fp, b.eps_fp]),
        cond={k: torch.cat([v, b.cond[k]]) for k, v in a.cond.items()},
        split=torch.cat([a.split, b.split]), image=image, meta=dict(a.meta),
    )


def combine_guidance(out: Tensor, guidance: float | None) -> Tensor:
    """The guided prediction ``u + g·(c − u)`` of rows laid out as a guided set's are
    (``[u₀, c₀, u₁, c₁, …]``); unchanged without guidance. This is the prediction the
    sampler uses, which PTQD's statistics and the noise curves are measured on."""
    if guidance is None:
        return out
    if out.shape[0] % 2:
        raise ValueError(f"a guided set pairs its rows, got {out.shape[0]} rows")
    uncond, cond = out[0::2], out[1::2]
    return uncond + guidance * (cond - uncond)


def forward_loop(calib: CalibrationSet, batch_size: int) -> Callable[[nn.Module], None]:
    """A ModelOpt-style ``forward_loop(model)`` that runs every row through ``model`` once.

    Calls ``model`` through its adapter (:func:`gaq.models.adapters.denoise`) with ``t`` a
    per-sample (B,) tensor, on the device and
    floating dtype of the model's first parameter, under ``torch.no_grad`` (observers
    need activations, not gradients).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(calib)
    return _rows_loop(calib, [torch.arange(s, min(s + batch_size, n), device=calib.x.device)
                              for s in range(0, n, batch_size)])


def _rows_loop(calib: CalibrationSet, plan: list[Tensor]) -> Callable[[nn.Module], None]:
    """A forward loop running the rows of ``calib`` batch by batch as ``plan`` lists them
    (row indices per batch), on the device and floating dtype of the model's first
    parameter, without gradients."""

    def loop(model: nn.Module) -> None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else calib.x.device
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else calib.x.dtype

        def move(v: Tensor) -> Tensor:
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)

        with torch.no_grad():
            for idx in plan:
                idx = idx.to(calib.x.device)
                cond = {k: move(v[idx]) for k, v in calib.cond.items()}
                denoise(model, move(calib.x[idx]), calib.t[idx].to(device), cond)

    return loop


# --------------------------------------------------------------------------------------
# Recording.
# --------------------------------------------------------------------------------------


def _position_seed(seed: int, index: int) -> int:
    # Own stream per trajectory, distinct from its noise stream (gaq.sampling.image_seed),
    # so positions do not depend on batching and are not correlated with the noise.
    digest = hashlib.blake2b(f"gaq:calib-position:{seed}:{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def _gaussian_step(spec: CalibrationSpec, index: int, timesteps: Tensor, horizon: int) -> int:
    """Sampler iteration recorded by trajectory ``index`` (gaussian protocol)."""
    g = torch.Generator().manual_seed(_position_seed(spec.seed, index))
    u = float(torch.randn((), generator=g, dtype=torch.float64))
    u = min(max(spec.gauss_mean + spec.gauss_std * u, 0.0), 1.0)
    # Nearest in timestep terms, then converted to the iteration that denoises it;
    # argmin takes the first (noisier) step on exact ties.
    return int(torch.argmin((timesteps.double() - u * horizon).abs()))


def _recording_plan(spec: CalibrationSpec, timesteps: list[int], horizon: int,
                    kept: list[int] | None = None) -> Tensor:
    """(num_trajectories, iterations) bool: which iterations each trajectory records
    (``kept``: the iterations an srm selection chose)."""
    plan = torch.zeros(spec.num_trajectories, len(timesteps), dtype=torch.bool, device="cpu")
    n_train = spec.num_train_trajectories
    plan[:, spec.kept_steps(len(timesteps)) if kept is None else kept] = True
    if spec.protocol == "gaussian":  # training trajectories: one drawn step each
        plan[:n_train] = False
        ts = torch.tensor(timesteps, device="cpu")
        for i in range(n_train):
            plan[i, _gaussian_step(spec, i, ts, horizon)] = True
    elif spec.act_every_step:  # training trajectories: every step (the rest activation-only)
        plan[:n_train] = True
    return plan


def _record(pipe: Pipeline, spec: CalibrationSpec, plan: Tensor,
            progress: bool) -> dict[str, Any]:
    """Run every trajectory once, keeping the planned steps of every denoiser call (both
    halves of a guided batch); rows in canonical order."""
    xs: list[Tensor] = []
    eps: list[Tensor] = []
    ts: list[Tensor] = []
    images: list[Tensor] = []
    steps: list[Tensor] = []
    conds: dict[str, list[Tensor]] = {}
    ranges = batch_ranges(plan.shape[0], spec.batch_size)
    if progress:
        from tqdm.auto import tqdm

        ranges = tqdm(ranges, desc="calibration", unit="batch")
    for r in ranges:
        idx = torch.arange(r.start, r.stop, device="cpu")
        keep = plan[idx]

        def on_call(step: int, t: int, x: Tensor, out: Tensor, inputs: Mapping[str, Tensor],
                    keep: Tensor = keep, idx: Tensor = idx) -> None:
            rows = keep[:, step].nonzero().flatten()
            if rows.numel() == 0:
                return
            # a guided call holds [unconditional; conditional]: keep both halves
            rows = torch.cat([rows + h * len(idx) for h in range(x.shape[0] // len(idx))])
            sel = rows.to(x.device)
            xs.append(x[sel].float().cpu())
            eps.append(out[sel].float().cpu())
            ts.append(torch.full((rows.numel(),), t, dtype=torch.int64, device="cpu"))
            images.append(idx[rows % len(idx)])
            steps.append(torch.full((rows.numel(),), step, dtype=torch.int64, device="cpu"))
            for k, v in inputs.items():
                v = v[sel].detach().cpu()
                conds.setdefault(k, []).append(v.float() if v.is_floating_point() else v)

        sample_batch(pipe, list(r), seed=spec.seed, sampler=spec.sampler, record=on_call,
                     decode=False)
    image = torch.cat(images)
    # Canonical order (iteration, then trajectory, unconditional half first) whatever the
    # batching was; the stable sort keeps the halves in recording order.
    order = torch.argsort(torch.cat(steps) * plan.shape[0] + image, stable=True)
    image = image[order]
    return {
        "step": torch.cat(steps)[order],
        "x": torch.cat(xs)[order],
        "t": torch.cat(ts)[order],
        "eps_fp": torch.cat(eps)[order],
        "cond": {k: torch.cat(v)[order] for k, v in conds.items()},
        "image": image,
        "split": image >= spec.num_train_trajectories,
    }


def record_calibration(
    pipe: Pipeline,
    spec: CalibrationSpec,
    *,
    model_id: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    progress: bool = False,
) -> CalibrationSet:
    """Record (or load from the disk cache) the calibration set ``spec`` describes, with
    the FP sampler of ``pipe`` on the pipeline's device.

    ``model_id`` (default: the pipeline's name) files the set in the cache key;
    ``cache_dir`` defaults to :func:`default_cache_dir`; ``cache=False`` neither reads nor
    writes it.
    """
    if not isinstance(spec, CalibrationSpec):
        raise TypeError(f"spec must be a CalibrationSpec, got {type(spec).__name__}")
    model_id = model_id or pipe.name
    key = calibration_key(pipe, spec, model_id=model_id)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    meta: dict[str, Any] = {"key": key, "model_id": model_id, "spec": spec.to_dict(),
                            "conditioning": pipe.conditioning.identity()}
    if cache:
        hit = _load(folder, key)
        if hit is not None:
            return hit

    timesteps = sampling_timesteps(pipe.scheduler, spec.sampler)
    # every timestep the sampler visits, not only the recorded ones: per-timestep
    # parameters must cover them all (gaq.quantize.fill_tables)
    meta["sampler_timesteps"] = [int(v) for v in timesteps]
    horizon = int(pipe.scheduler.config.num_train_timesteps)
    kept = None
    if spec.protocol == "srm":
        kept, meta["srm"] = _srm_steps(pipe, spec, len(timesteps), progress)
        meta["srm_steps"] = kept
    plan = _recording_plan(spec, timesteps, horizon, kept)
    rows = _record(pipe, spec, plan, progress)
    require_finite_tensors({"x_t": rows["x"], "the FP noise prediction": rows["eps_fp"]},
                           f"calibration recorded from {model_id!r}",
                           "the FP model diverges on its own trajectories: check its weights, "
                           "scheduler and dtype (float16 overflow)")
    # training rows at a step the protocol does not keep are activation-only (a gaussian
    # set keeps every step, so it has none)
    step = rows.pop("step")
    kept_steps = torch.tensor(spec.kept_steps(len(timesteps)) if kept is None else kept,
                              device=step.device)
    act_only = ~rows["split"] & ~torch.isin(step, kept_steps)
    calib = CalibrationSet(**rows, meta=meta)
    if act_only.any():
        extra = calib.subset(act_only)
        calib = calib.subset(~act_only)
        calib.act_extra = extra
    if cache:
        _save(folder, key, calib, _scheduler_json(pipe.scheduler), str(pipe.device))
    return calib


def per_timestep_loop(calib: CalibrationSet, *, init_rows: int = 16, batch_size: int = 16,
                      seed: int = 0) -> Callable[[nn.Module], None]:
    """A forward loop that calibrates one timestep at a time, as TFMQ-DM's released code
    calibrates its per-timestep activation parameters: for each timestep (ascending), a
    batch of ``init_rows`` of its rows drawn at random (the range initialisation), then all
    its rows in a random order in batches of ``batch_size`` (the running statistics: an EMA
    observer updates on each). ``init_rows=0`` skips the initialisation batch, for
    observers that pool everything they see (min/max, MSE), which would otherwise count
    those rows twice. Deterministic from ``seed``; each table row sees only its own
    timestep's inputs, whatever the batch layout of the set."""
    gen = torch.Generator().manual_seed(seed)
    plan: list[Tensor] = []
    for ts in calib.timesteps():
        idx = (calib.t == ts).nonzero().flatten().cpu()
        init = idx[torch.randperm(len(idx), generator=gen)[: min(init_rows, len(idx))]]
        order = idx[torch.randperm(len(idx), generator=gen)]
        if len(init):
            plan.append(init)
        plan.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))

    return _rows_loop(calib, plan)


# --------------------------------------------------------------------------------------
# Structural risk minimisation (the "srm" protocol).
# --------------------------------------------------------------------------------------


def _srm_features(x: Tensor, eps: Tensor) -> Tensor:
    """(N, d) features of recorded rows: denoiser input and FP output, average-pooled to at
    most 8×8 so that the selection costs the same on any resolution."""

    def pool(v: Tensor) -> Tensor:
        if v.ndim == 4 and v.shape[-1] > 8:
            v = torch.nn.functional.adaptive_avg_pool2d(v, 8)
        return v.flatten(1)

    return torch.cat([pool(x.float()), pool(eps.float())], dim=1).double()


def _quant_error(f: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """Per-step mean squared error of ``f`` (steps, rows, d) under an asymmetric ``bits``-bit
    quantizer with range ``[lo, hi]``."""
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    q = ((f - lo) / scale).round().clamp(0, levels) * scale + lo
    return (q - f).pow(2).flatten(1).mean(1)


def srm_select(features: Tensor, keep: int, bits: int = 4,
               lam: float = 1.0) -> tuple[list[int], dict[str, float]]:
    """Greedily pick ``keep`` of the steps of ``features`` (steps, rows, d) minimising the
    structural risk ``R(S)/R(all) + lam · MMD²(S, all)``.

    ``R(S)``: mean squared error, on the rows of ``S``, of a ``bits``-bit quantizer whose
    range is the min/max of those rows (the empirical risk of calibrating on ``S``).
    ``MMD²``: biased estimate with a Gaussian kernel (median-heuristic bandwidth) between
    the rows of ``S`` and the rows of every step (how far the calibration distribution is
    from the one met at sampling). Ties go to the earlier (noisier) step, so the result
    is a pure function of ``features``. Returns the steps ascending and the final terms."""
    steps, m = features.shape[:2]
    if not 1 <= keep <= steps:
        raise ValueError(f"keep must lie in [1, {steps}], got {keep}")
    flat = features.reshape(steps * m, -1)
    d2 = torch.cdist(flat, flat).pow(2)
    bandwidth = d2[d2 > 0].median() if bool((d2 > 0).any()) else d2.new_ones(())
    kern = torch.exp(-d2 / bandwidth)
    # block sums: every MMD² of a union of steps is read off these
    k_steps = kern.reshape(steps, m, steps, m).sum((1, 3))
    k_all = k_steps.sum(1)
    k_total = k_all.sum()
    mins = features.amin((1, 2))
    maxs = features.amax((1, 2))
    r_all = float(_quant_error(features, mins.min(), maxs.max(), bits).mean())

    def terms(sel: list[int]) -> tuple[float, float]:
        idx = torch.tensor(sel, device="cpu")
        n = len(sel) * m
        mmd = (k_steps[idx][:, idx].sum() / n**2 - 2 * k_all[idx].sum() / (n * steps * m)
               + k_total / (steps * m) ** 2)
        risk = _quant_error(features[idx], mins[idx].min(), maxs[idx].max(), bits).mean()
        return float(risk) / max(r_all, 1e-30), max(float(mmd), 0.0)

    chosen: list[int] = []
    best = (0.0, 0.0)
    for _ in range(keep):
        best_obj = math.inf
        pick = -1
        for c in range(steps):
            if c in chosen:
                continue
            r, mmd = terms(chosen + [c])
            obj = r + lam * mmd
            if obj < best_obj:
                best_obj, pick, best = obj, c, (r, mmd)
        chosen.append(pick)
    return sorted(chosen), {"risk": best[0], "mmd2": best[1], "lambda": lam}


def _srm_steps(pipe: Pipeline, spec: CalibrationSpec, iterations: int,
               progress: bool) -> tuple[list[int], dict[str, float]]:
    """Record ``srm_probe`` trajectories (the first training ones) at every sampler step and
    select the steps the srm protocol keeps."""
    probe = dataclasses.replace(spec, protocol="interval", interval=1,
                                samples_per_step=spec.srm_probe, holdout_per_step=0)
    plan = torch.ones(spec.srm_probe, iterations, dtype=torch.bool, device="cpu")
    rows = _record(pipe, probe, plan, progress)
    feats = _srm_features(rows["x"], rows["eps_fp"])
    # rows are in canonical order, the same number per step (both guidance halves)
    feats = feats.reshape(iterations, -1, feats.shape[1])
    keep = len(spec.kept_steps(iterations))
    return srm_select(feats, keep, spec.srm_bits, spec.srm_lambda)


# --------------------------------------------------------------------------------------
# Identity and disk cache.
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$GAQ_CACHE/calibration``, or ``~/.cache/gaq/calibration``."""
    root = os.environ.get("GAQ_CACHE") or "~/.cache/gaq"
    return Path(root).expanduser() / "calibration"


def _update_with_tensors(h: Any, tensors: Mapping[str, Any]) -> None:
    for name in sorted(tensors):
        value = tensors[name]
        h.update(name.encode() + b"\0")
        if isinstance(value, Tensor):
            v = value.detach().cpu().contiguous()
            h.update(f"{v.dtype}:{tuple(v.shape)}\0".encode())
            # Viewing as bytes works for every dtype, bfloat16 included (numpy lacks it).
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # e.g. a module's _extra_state
            h.update(repr(value).encode() + b"\0")


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over a module's state_dict: names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    _update_with_tensors(h, module.state_dict())
    return h.hexdigest()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and tensors (e.g. trained_betas)
        return value.tolist()
    return str(value)


def _scheduler_json(scheduler: Any) -> str:
    # Private keys ("_class_name", "_diffusers_version", "_use_default_values") say how the
    # config was written, not what schedule it describes.
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return json.dumps(cfg, sort_keys=True, default=_json_default)


def calibration_key(pipe: Pipeline, spec: CalibrationSpec, *, model_id: str) -> str:
    """Content hash naming a calibration set: model id, denoiser weights, schedule, spec,
    the conditioning source (its description and the weights of its encoders), and where it
    is computed: on the CPU the recorded floats depend on the intra-op thread count, so a
    set recorded at two threads never stands in for one a one-thread run would record."""
    cond = pipe.conditioning
    device = next(pipe.denoiser.parameters()).device.type
    compute = f"cpu x{torch.get_num_threads()}" if device == "cpu" else device
    encoders = [m for m in (getattr(cond, "embedder", None), getattr(cond, "text_encoder", None))
                if m is not None]
    identity = {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        "weights": state_dict_digest(pipe.denoiser),
        "scheduler": _scheduler_json(pipe.scheduler),
        "spec": spec.data_fingerprint(),
        "conditioning": cond.identity(),
        "conditioning_weights": [state_dict_digest(m) for m in encoders],
        "compute": compute,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(folder: Path, key: str, calib: CalibrationSet, sched: str, device: str) -> None:
    from safetensors.torch import save_file

    tensors = _set_tensors(calib)
    if calib.act_extra is not None:
        tensors.update({f"act.{k}": v for k, v in _set_tensors(calib.act_extra).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        **calib.meta,
        "format": CACHE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "rows": len(calib),
        "act_rows": 0 if calib.act_extra is None else len(calib.act_extra),
        "holdout_rows": int(calib.split.sum()) if calib.split is not None else 0,
        "timesteps": calib.timesteps(),
        "scheduler": json.loads(sched),
        "recorded_on": device,
        "torch": torch.__version__,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Tensors first, metadata last: the .json is the commit marker of an entry.
        _atomic_write(
            folder / f"{key}.safetensors",
            lambda p: save_file(tensors, p, metadata={"key": key, "format": str(CACHE_FORMAT)}),
        )
        _atomic_write(
            folder / f"{key}.json",
            lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)),
        )
        calib.meta["cache_path"] = str(folder / f"{key}.safetensors")
    except OSError as e:
        warnings.warn(
            f"could not write calibration cache entry {key} to {folder}: {e}",
            CalibrationCacheWarning,
            stacklevel=3,
        )


def _set_tensors(calib: CalibrationSet) -> dict[str, Tensor]:
    assert calib.split is not None
    return {
        "x": calib.x, "t": calib.t, "eps_fp": calib.eps_fp, "split": calib.split,
        **({} if calib.image is None else {"image": calib.image}),
        **{f"cond.{k}": v for k, v in calib.cond.items()},
    }


def _tensors_to_set(tensors: Mapping[str, Tensor], prefix: str,
                    meta: dict[str, Any]) -> CalibrationSet:
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not prefix:  # the main rows: not the activation-only ones
        own = {k: v for k, v in own.items() if not k.startswith("act.")}
    cond = {k[len("cond."):]: v for k, v in own.items() if k.startswith("cond.")}
    return CalibrationSet(x=own["x"], t=own["t"], eps_fp=own["eps_fp"], cond=cond,
                          split=own["split"], image=own.get("image"), meta=meta)


def _load(folder: Path, key: str) -> CalibrationSet | None:
    """The cached set, or None on a miss; an unreadable entry warns and counts as a miss."""
    data_path, meta_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    if not data_path.exists() and not meta_path.exists():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            raise ValueError("metadata does not match this cache key and format")
        tensors = load_file(data_path)
        calib = _tensors_to_set(tensors, "", {k: meta[k] for k in (
            "key", "model_id", "spec", "sampler_timesteps", "conditioning", "srm_steps", "srm")
            if k in meta})
        if "act.x" in tensors:
            calib.act_extra = _tensors_to_set(tensors, "act.", {})
        if len(calib) != meta.get("rows"):
            raise ValueError(f"{len(calib)} rows on disk, metadata says {meta.get('rows')}")
        act_rows = 0 if calib.act_extra is None else len(calib.act_extra)
        if act_rows != meta.get("act_rows", 0):
            raise ValueError(f"{act_rows} activation-only rows on disk, metadata says "
                             f"{meta.get('act_rows')}")
        bad = first_non_finite(tensors.items())
        if bad is not None:
            raise ValueError(f"tensor {bad} holds NaN or infinite values")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        warnings.warn(
            f"ignoring unreadable calibration cache entry {data_path} ({e}); recomputing",
            CalibrationCacheWarning,
            stacklevel=3,
        )
        return None
    calib.meta["cache_path"] = str(data_path)
    return calib
