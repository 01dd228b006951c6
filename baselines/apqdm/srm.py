"""APQ-DM's calibration protocol ``"srm"``: which sampler steps the training trajectories
record, chosen by structural risk minimisation on a few probe trajectories recorded at
every step (:func:`srm_select`). Registered as a calibration protocol
(:data:`gaq.calibration.PROTOCOLS`); its options are ``srm_lambda``, ``srm_probe`` and
``srm_bits`` of :class:`~gaq.calibration.CalibrationSpec`."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gaq.calibration import CalibrationSpec, StepSelection, record_rows

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

__all__ = ["SRM", "srm_select"]


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


class SRM(StepSelection):
    """The ``"srm"`` protocol: :func:`srm_select` on ``srm_probe`` probe trajectories."""

    options = ("srm_lambda", "srm_probe", "srm_bits")

    def select(self, pipe: Pipeline, spec: CalibrationSpec, iterations: int,
               progress: bool) -> tuple[list[int], dict[str, float]]:
        """Record ``srm_probe`` trajectories (the first training ones) at every sampler
        step and select the steps the srm protocol keeps."""
        probe = dataclasses.replace(spec, protocol="interval", interval=1,
                                    samples_per_step=spec.srm_probe, holdout_per_step=0)
        plan = torch.ones(spec.srm_probe, iterations, dtype=torch.bool, device="cpu")
        rows = record_rows(pipe, probe, plan, progress)
        feats = _srm_features(rows["x"], rows["eps_fp"])
        # rows are in canonical order, the same number per step (both guidance halves)
        feats = feats.reshape(iterations, -1, feats.shape[1])
        keep = len(spec.kept_steps(iterations))
        return srm_select(feats, keep, spec.srm_bits, spec.srm_lambda)
