"""The calibration set: recorded rows ``(x_t, t, cond, eps_fp)``, their selections (training,
held-out, per timestep, activation-only), batching, and the forward loops that run them
through a model (ModelOpt-style ``forward_loop(model)``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gaq.models.adapters import denoise

__all__ = ["CalibrationSet", "combine_guidance", "forward_loop", "per_timestep_loop"]


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
