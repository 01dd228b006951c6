"""Paired noise-prediction error: a quantized denoiser against the FP one on the same
(held-out) FP trajectory states, per timestep."""

from __future__ import annotations

import torch


@torch.no_grad()
def eps_error_by_timestep(model: torch.nn.Module, heldout, batch_size: int = 128,
                          device: str | torch.device = "cpu") -> dict[int, float]:
    """Mean squared error of ``model``'s noise prediction against the recorded FP one
    (``heldout.eps_fp``), for every timestep of a :class:`~gaq.calibration.CalibrationSet`."""
    from gaq.sampling import _noise_prediction

    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for b in heldout.batches(batch_size):
        cond = {k: v.to(device) for k, v in b["cond"].items()}
        x = b["x"].to(device)
        eps = _noise_prediction(model(x, b["t"].to(device), **cond), x.shape[1])
        se = (eps.float().cpu() - b["eps_fp"]).pow(2).flatten(1).mean(1)
        for t, e in zip(b["t"].tolist(), se.tolist(), strict=True):
            sums[t] = sums.get(t, 0.0) + e
            counts[t] = counts.get(t, 0) + 1
    return {t: sums[t] / counts[t] for t in sorted(sums)}


def mean_eps_error(model: torch.nn.Module, heldout, batch_size: int = 128,
                   device: str | torch.device = "cpu") -> float:
    curve = eps_error_by_timestep(model, heldout, batch_size, device)
    return sum(curve.values()) / len(curve)
