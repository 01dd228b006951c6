"""Hierarchical (agglomerative) clustering of timesteps that only ever merges neighbours,
so every group is a contiguous run of the denoising schedule."""

from __future__ import annotations

import torch
from torch import Tensor


def cluster_adjacent(features: Tensor, n_groups: int) -> list[list[int]]:
    """Partition rows ``0..T-1`` of ``features`` (T, D), ordered by timestep, into
    ``n_groups`` contiguous groups.

    Starts from one group per row and repeatedly merges the two *neighbouring* groups whose
    centroids (mean feature) are closest in L2; ties go to the earliest pair, so the
    result depends on ``features`` alone. Returns the row indices of each group, in order.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (T, D), got shape {tuple(features.shape)}")
    rows = features.shape[0]
    if rows == 0:
        return []
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    feats = features.detach().to(torch.float64)
    groups = [[i] for i in range(rows)]
    sums = [feats[i].clone() for i in range(rows)]
    while len(groups) > n_groups:
        cents = torch.stack([s / len(g) for s, g in zip(sums, groups, strict=True)])
        gaps = (cents[1:] - cents[:-1]).norm(dim=1)
        i = int(torch.argmin(gaps))  # first minimum: deterministic tie-break
        groups[i] += groups.pop(i + 1)
        sums[i] = sums[i] + sums.pop(i + 1)
    return groups


def group_lookup(timesteps: list[int], groups: list[list[int]], num_timesteps: int,
                 device: torch.device | str) -> Tensor:
    """For every timestep ``0..num_timesteps-1``, the group of the nearest calibrated
    timestep (``timesteps[i]`` belongs to the group holding index ``i``; ties go to the
    larger timestep, as :meth:`FakeQuantizer.fill_table` resolves them), as an int64
    tensor on ``device`` (the model's: it becomes a buffer of it): sampler steps between
    calibrated ones use their neighbour's parameters."""
    ts = torch.as_tensor(timesteps, dtype=torch.long, device=device)
    if ts.numel() == 0 or bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError("timesteps must be non-empty and strictly ascending")
    if int(ts[-1]) >= num_timesteps or int(ts[0]) < 0:
        raise ValueError(f"calibrated timesteps must lie in [0, {num_timesteps})")
    of_row = torch.empty(ts.numel(), dtype=torch.long, device=device)
    for g, members in enumerate(groups):
        of_row[torch.as_tensor(members, dtype=torch.long, device=device)] = g
    every = torch.arange(num_timesteps, device=device)
    hi = torch.searchsorted(ts, every).clamp(max=ts.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    nearest = torch.where((every - ts[lo]).abs() < (ts[hi] - every).abs(), lo, hi)
    return of_row[nearest]
