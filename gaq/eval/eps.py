"""Paired noise-prediction error: a quantized denoiser against the FP one on the same
(held-out) FP trajectory states, per timestep.

Besides the MSE, every timestep gets the least-squares slope ``k_t`` of the error
``eps_q − eps_fp`` on ``eps_fp`` (PTQD's noise model ``eps_q = (1+k_t)·eps_fp + δ_t``):
``k > 0`` means the quantized model inflates the noise prediction, ``k < 0`` that it
shrinks it. A method with a sampler hook (PTQD) is measured on the noise prediction its
sampler actually uses, after the hook, and also before it (``*_uncorrected``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gaq.eval.curve_names import UNCORRECTED

__all__ = ["correlation_slope", "eps_error_by_timestep", "mean_eps_error", "noise_curves",
           "noise_measurements"]


@dataclass
class _Moments:
    """Running float64 sums over the elements of one timestep's rows."""

    rows: int = 0
    n: int = 0
    se_rows: float = 0.0  # sum over rows of each row's mean squared error
    fp: float = 0.0
    err: float = 0.0
    fp2: float = 0.0
    fp_err: float = 0.0

    def add(self, err: Tensor, fp: Tensor) -> Tensor:
        """Adds the rows; returns each row's mean squared error (float64)."""
        err, fp = err.double(), fp.double()
        self.rows += err.shape[0]
        self.n += err.numel()
        row_mse = err.pow(2).flatten(1).mean(1)
        self.se_rows += float(row_mse.sum())
        self.fp += float(fp.sum())
        self.err += float(err.sum())
        self.fp2 += float(fp.pow(2).sum())
        self.fp_err += float((fp * err).sum())
        return row_mse

    @property
    def mse(self) -> float:
        return self.se_rows / self.rows

    @property
    def slope(self) -> float:
        m_fp, m_err = self.fp / self.n, self.err / self.n
        var = self.fp2 / self.n - m_fp**2
        return (self.fp_err / self.n - m_fp * m_err) / max(var, 1e-30)


def correlation_slope(err: Tensor, fp: Tensor) -> float:
    """Least-squares slope (with intercept) of ``err`` on ``fp`` over all elements."""
    m = _Moments()
    m.add(err, fp)
    return m.slope


@torch.no_grad()
def noise_curves(model: torch.nn.Module, heldout, batch_size: int = 128,
                 hook=None) -> dict[str, dict[int, float]]:
    """The per-timestep curves of :func:`noise_measurements` (see there)."""
    return noise_measurements(model, heldout, batch_size, hook)[0]


@torch.no_grad()
def noise_measurements(model: torch.nn.Module, heldout, batch_size: int = 128, hook=None
                       ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Per-timestep curves of ``model`` on the rows of a held-out
    :class:`~gaq.calibration.CalibrationSet`: ``eps_mse`` and ``noise_k`` (the slope k_t),
    measured after ``hook``'s eps correction when a hook is given, plus
    ``eps_mse_uncorrected`` and ``noise_k_uncorrected`` before it.

    The hook sees ``(step, t, x, eps)`` with ``step`` the position of ``t`` in the set's
    descending timesteps: the sampler's step index when the set holds every sampler step.
    Rows run on the model's device. With guidance the set holds both halves of every
    guided call; the curves compare the guided predictions ``u + g·(c − u)``.

    Also returns, per held-out trajectory, its error averaged over the timesteps
    (``eps_mse`` and, with a hook, ``eps_mse_uncorrected``): every trajectory visits every
    timestep of the set, so the mean of these equals the mean of the curve, and their
    spread is the sampling uncertainty of that mean (the trajectories are independent).
    """
    from gaq.calibration import combine_guidance
    from gaq.models.adapters import denoise
    from gaq.sampling import _noise_prediction, _split_hook

    eps_fn = _split_hook(hook)[0]
    device = next(model.parameters()).device
    guidance = heldout.guidance
    batch_size += batch_size % 2  # a guided set's halves stay in one batch
    by_t = heldout.by_timestep()
    order = {t: i for i, t in enumerate(sorted(by_t, reverse=True))}
    after: dict[int, _Moments] = {}
    before: dict[int, _Moments] = {}  # only for a hook: without one it equals ``after``
    # per trajectory: summed row errors over the timesteps, and how many timesteps
    traj: dict[str, dict[int, list[float]]] = {"eps_mse": {}}
    if eps_fn is not None:
        traj["eps_mse" + UNCORRECTED] = {}

    def per_trajectory(name: str, row_mse: Tensor, image: Tensor | None) -> None:
        if image is None:
            return
        for i, e in zip(image.tolist(), row_mse.tolist(), strict=True):
            acc = traj[name].setdefault(int(i), [0.0, 0])
            acc[0] += e
            acc[1] += 1

    for t, rows in by_t.items():
        after[t] = _Moments()
        if eps_fn is not None:
            before[t] = _Moments()
        for b in rows.batches(batch_size):
            cond = {k: v.to(device) for k, v in b["cond"].items()}
            x = b["x"].to(device)
            eps = _noise_prediction(denoise(model, x, b["t"].to(device), cond), x.shape[1])
            # with guidance: the guided prediction the sampler uses, not each half
            eps = combine_guidance(eps, guidance)
            fp = combine_guidance(b["eps_fp"], guidance)
            x = x[: len(eps)]
            # a guided pair is one trajectory: the image of its first (unconditional) row
            image = None if rows.image is None else rows.image[b["index"].cpu()]
            if image is not None and guidance is not None:
                image = image[0::2]
            if eps_fn is not None:
                row_mse = before[t].add(eps.float().cpu() - fp, fp)
                per_trajectory("eps_mse" + UNCORRECTED, row_mse, image)
                corrected = eps_fn(order[t], t, x, eps)
                if corrected is not None:
                    eps = corrected
            per_trajectory("eps_mse", after[t].add(eps.float().cpu() - fp, fp), image)
    out = {"eps_mse": {t: m.mse for t, m in after.items()},
           "noise_k": {t: m.slope for t, m in after.items()}}
    if eps_fn is not None:
        out["eps_mse" + UNCORRECTED] = {t: m.mse for t, m in before.items()}
        out["noise_k" + UNCORRECTED] = {t: m.slope for t, m in before.items()}
    by_traj = {name: {i: s / n for i, (s, n) in sorted(acc.items())}
               for name, acc in traj.items() if acc}
    return out, by_traj


def eps_error_by_timestep(model: torch.nn.Module, heldout, batch_size: int = 128,
                          hook=None) -> dict[int, float]:
    """Mean squared error of ``model``'s noise prediction (after ``hook``) against the
    recorded FP one (``heldout.eps_fp``), for every timestep of ``heldout``."""
    return noise_curves(model, heldout, batch_size, hook)["eps_mse"]


def mean_eps_error(model: torch.nn.Module, heldout, batch_size: int = 128,
                   hook=None) -> float:
    curve = eps_error_by_timestep(model, heldout, batch_size, hook)
    return sum(curve.values()) / len(curve)
