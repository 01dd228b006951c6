"""Recording a calibration set: every trajectory runs the FP sampler once, and the planned
steps of every denoiser call (both halves of a guided batch) are kept, in canonical order
whatever the batching."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gaq.calibration.cache import _load, _save, _scheduler_json, calibration_key, default_cache_dir
from gaq.calibration.dataset import CalibrationSet
from gaq.calibration.spec import PLANS, PROTOCOLS, CalibrationSpec
from gaq.finite import require_finite_tensors
from gaq.sampling import batch_ranges, sample_batch, sampling_timesteps

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

__all__ = ["record_calibration", "record_rows"]


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
    (``kept``: the iterations a step selection chose)."""
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


def record_rows(pipe: Pipeline, spec: CalibrationSpec, plan: Tensor,
                progress: bool) -> dict[str, Any]:
    """Run every trajectory once, keeping the planned steps of every denoiser call (both
    halves of a guided batch); rows in canonical order. ``plan``: (trajectories,
    iterations) bool, which iterations each trajectory keeps (a step selection records
    its probe trajectories with it)."""
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
    if spec.protocol not in PLANS:  # a step selection, e.g. srm: meta["srm"], ["srm_steps"]
        selection = PROTOCOLS.get(spec.protocol)()
        kept, meta[spec.protocol] = selection.select(pipe, spec, len(timesteps), progress)
        meta[f"{spec.protocol}_steps"] = kept
    plan = _recording_plan(spec, timesteps, horizon, kept)
    rows = record_rows(pipe, spec, plan, progress)
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
