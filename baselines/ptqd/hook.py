"""PTQD's sampler-side correction (He et al., NeurIPS 2023) and the statistics it needs.

Quantization noise is modelled per sampling step t as ``eps_q = (1+k_t)·eps_fp + δ_t``
with δ uncorrelated with eps_fp. The hook divides out the correlated part, removes the
bias of δ, and lowers the DDIM noise std so that the residual noise it cannot remove
stands in for part of the sampler's own noise (variance schedule calibration, VSC).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from gaq.errors import GaqError
from gaq.eval.eps import correlation_slope

SIGMA_ESTIMATORS = ("per_sample_std", "centred_rms")


@dataclass(frozen=True)
class StepStats:
    """Noise statistics of one timestep: correlation ``k``, per-channel bias ``mu`` and the
    std ``sigma`` of the uncorrelated noise (before dividing by 1+k)."""

    t: int
    k: float
    mu: tuple[float, ...]
    sigma: float
    rows: int = 0


@torch.no_grad()
def fit_stats(t: int, eps_q: Tensor, eps_fp: Tensor, bias_of: str = "raw",
              negative_k: bool = False, sigma_of: str = "per_sample_std") -> StepStats:
    """PTQD's per-step statistics from paired predictions (N, C, ...) at timestep ``t``.

    ``k``: least-squares slope (with intercept) of the error on eps_fp over all elements,
    kept only if positive (a negative slope would amplify eps, which PTQD never does);
    ``negative_k=True`` keeps a negative slope too (not PTQD's rule; floored at -0.5).
    ``mu``: per-channel mean of the raw error (``bias_of="raw"``, the authors' code) or of the
    residual δ = error − k·eps_fp (``"residual"``, what the noise model implies).
    ``sigma``, the std of the noise left after correction, two estimators:
    ``"per_sample_std"`` (the authors' ``analyze_error.py``): the unbiased std of δ over each
    sample's elements, averaged over the samples; ``"centred_rms"`` (this suite's earlier
    default): the RMS of δ around its per-channel mean over all samples. They differ by
    the spread of per-sample means and by the per-channel bias, which the former keeps.
    """
    if sigma_of not in SIGMA_ESTIMATORS:
        raise ValueError(f"sigma_of must be one of {SIGMA_ESTIMATORS}, got {sigma_of!r}")
    fp = eps_fp.double()
    err = eps_q.double() - fp
    k = correlation_slope(err, fp)
    k = max(k, -0.5) if negative_k else max(k, 0.0)
    resid = err - k * fp
    dims = [0] + list(range(2, err.ndim))
    mu = (err if bias_of == "raw" else resid).mean(dim=dims)
    if sigma_of == "per_sample_std":
        sigma = float(resid.flatten(1).std(dim=1).mean())
    else:
        centred = resid - resid.mean(dim=dims).view(1, -1, *[1] * (err.ndim - 2))
        sigma = float(centred.pow(2).mean().sqrt())
    return StepStats(int(t), k, tuple(float(v) for v in mu), sigma, int(err.shape[0]))


def sampler_key(steps: int, eta: float, guidance: float | None = None,
                scheduler: str = "DDIMScheduler") -> dict[str, Any]:
    """What PTQD's statistics depend on besides the model: they are refused for another."""
    return {"scheduler": scheduler, "steps": int(steps), "eta": float(eta),
            "guidance": None if guidance is None else float(guidance)}


class PTQDSamplerHook:
    """The :class:`gaq.sampling.SamplerHook` of PTQD.

    Statistics exist for the calibration timesteps; at any other timestep of the same
    sampler (an interval calibration keeps every n-th step) they are interpolated linearly
    in t, and held constant beyond the first/last calibrated timestep.
    """

    def __init__(self, stats: Iterable[StepStats], key: Mapping[str, Any], *,
                 correct: bool = True, vsc: bool = True) -> None:
        self.stats = sorted(stats, key=lambda s: s.t)
        if not self.stats:
            raise GaqError("PTQD needs statistics for at least one timestep")
        self.key = dict(key)
        self.correct = correct
        self.vsc = vsc
        self._ts = [s.t for s in self.stats]
        self._cache: dict[int, tuple[float, Tensor, float]] = {}
        self._placed: dict[tuple, Tensor] = {}

    # -- the SamplerHook protocol ---------------------------------------------------
    def bind(self, sampler: Any, scheduler: Any) -> None:
        """Refuse a sampler configuration the statistics were not measured for, and a model
        whose output is not a noise prediction (PTQD's model is ``eps_q = (1+k)·eps + δ``;
        its correction works in any sampler's update that consumes eps, and VSC only in
        DDIM's, the one update with fresh noise to shrink)."""
        prediction = scheduler.config.prediction_type
        if prediction != "epsilon":
            raise GaqError(f"PTQD corrects a noise (epsilon) prediction; this model predicts "
                           f"{prediction!r}, which its correction cannot express")
        got = sampler_key(sampler.steps, sampler.eta, getattr(sampler, "guidance", None),
                          type(scheduler).__name__)
        if got != self.key:
            raise GaqError(
                f"PTQD statistics were measured for sampler {self.key} but sampling uses "
                f"{got}: they depend on the scheduler, steps, eta and guidance; re-run the "
                "quantization with a calibration set recorded with this sampler")
        timesteps = {int(t) for t in scheduler.timesteps}
        if not set(self._ts) <= timesteps:
            raise GaqError(f"PTQD statistics are for timesteps {self._ts}, not all of which "
                           "this sampler visits: the noise schedule differs")

    def eps(self, step: int, t: int, x: Tensor, eps: Tensor) -> Tensor | None:
        if not self.correct:
            return None
        k, mu, _ = self.at(t)
        # made once per timestep on the prediction's device, not copied there every step
        key = (t, eps.device, eps.dtype)
        if key not in self._placed:
            self._placed[key] = mu.to(device=eps.device, dtype=eps.dtype)
        mu = self._placed[key].view(1, -1, *[1] * (eps.ndim - 2))
        return (eps - mu) / (1 + k)

    def sigma(self, step: int, t: int, sigma: float, c_t: float) -> float:
        """VSC: the fresh noise shrinks by the variance the residual quantization noise
        already adds through ``c_t·eps``; zero when that exceeds it (always when eta = 0)."""
        if not self.vsc:
            return sigma
        k, _, sigma_q = self.at(t)
        residual = sigma_q / (1 + k) if self.correct else sigma_q
        return max(sigma**2 - (c_t * residual) ** 2, 0.0) ** 0.5 if sigma > 0 else sigma

    # -- statistics -----------------------------------------------------------------
    def at(self, t: int) -> tuple[float, Tensor, float]:
        """(k, mu, sigma_q) at timestep ``t``, interpolated between calibrated timesteps
        (mu in float32 on the host; :meth:`eps` keeps one copy per device)."""
        if t not in self._cache:
            i = bisect.bisect_left(self._ts, t)
            if i < len(self._ts) and self._ts[i] == t or i == 0 or i == len(self._ts):
                s = self.stats[min(i, len(self._ts) - 1)]
                value = (s.k, torch.tensor(s.mu, device="cpu"), s.sigma)
            else:
                lo, hi = self.stats[i - 1], self.stats[i]
                w = (t - lo.t) / (hi.t - lo.t)
                value = ((1 - w) * lo.k + w * hi.k,
                         (1 - w) * torch.tensor(lo.mu, device="cpu")
                         + w * torch.tensor(hi.mu, device="cpu"),
                         (1 - w) * lo.sigma + w * hi.sigma)
            self._cache[t] = value
        return self._cache[t]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain lists and numbers."""
        return {"key": self.key, "correct": self.correct, "vsc": self.vsc,
                "stats": [{**asdict(s), "mu": list(s.mu)} for s in self.stats]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> PTQDSamplerHook:
        stats = [StepStats(**{**s, "mu": tuple(s["mu"])}) for s in doc["stats"]]
        return cls(stats, doc["key"], correct=doc["correct"], vsc=doc["vsc"])
