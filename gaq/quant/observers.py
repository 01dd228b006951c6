"""Range initialisation: observers that watch calibration tensors and yield ``(Δ, z)``.

Observers are plain objects, not modules: they are transient calibration
state, and keeping them out of ``state_dict`` keeps saved quantization states
small and independent of how they were calibrated.

Per-tensor observers produce scalar parameters; per-channel ones (``axis``
set) produce ``(C,)`` parameters, channel ``c`` covering ``x.select(axis, c)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gaq.quant.context import Timestep, normalize_timestep, timesteps_per_row
from gaq.quant.fake import fake_quantize, qparams_from_range, qrange, tensor_range

OBSERVERS = ("max", "mse", "ema")


class Observer:
    """Accumulates statistics over calibration batches; :meth:`compute` gives ``(Δ, z)``."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.batches = 0

    @property
    def seen(self) -> bool:
        return self.batches > 0

    def observe(self, x: Tensor) -> None:
        """Fold one batch into the statistics."""
        if self.axis is not None and x.ndim == 0:
            raise ValueError("a per-channel observer needs a tensor with a channel axis")
        self._observe(x.detach())
        self.batches += 1

    def _observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def compute(self, bits: int, symmetric: bool, unsigned: bool = False) -> tuple[Tensor, Tensor]:
        """Step size and zero point (float32, integer-valued) from what was observed."""
        if not self.seen:
            raise RuntimeError(f"{type(self).__name__} has observed no data")
        return self._compute(bits, symmetric, unsigned)

    def _compute(self, bits: int, symmetric: bool, unsigned: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Global min and max over every batch (``max`` initialisation)."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.min: Tensor | None = None
        self.max: Tensor | None = None

    def _observe(self, x: Tensor) -> None:
        lo, hi = tensor_range(x, self.axis)
        if self.min is None:
            self.min, self.max = lo.float(), hi.float()
        else:
            self.min = torch.minimum(self.min, lo.float())
            self.max = torch.maximum(self.max, hi.float())

    def _compute(self, bits: int, symmetric: bool, unsigned: bool) -> tuple[Tensor, Tensor]:
        return qparams_from_range(self.min, self.max, bits, symmetric, unsigned)


class EMAMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (first batch initialises)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.95) -> None:
        super().__init__(axis)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum

    def _observe(self, x: Tensor) -> None:
        lo, hi = tensor_range(x, self.axis)
        if self.min is None:
            self.min, self.max = lo.float(), hi.float()
        else:
            m = self.momentum
            self.min = m * self.min + (1 - m) * lo.float()
            self.max = m * self.max + (1 - m) * hi.float()


class MSEObserver(Observer):
    """Search shrunken ranges for the one minimising ``mean |x − x̂|^p`` (``mse`` initialisation).

    Candidates are ``f·[min, max]`` for ``f = 1, 1 − 1/grid, …, 1/grid`` of the
    global range (symmetric: ``f·max|x|``), so the plain min/max range is always
    a candidate and the result never has a larger error than ``max`` on the
    searched data. The search respects ``symmetric``/``unsigned``.

    The error is measured on a uniform random subsample of everything observed
    (at most ``max_samples`` elements, bottom-k of random keys, so the sample is
    uniform over all batches and memory stays bounded: 8 bytes per kept element,
    per timestep when used per timestep). 65k samples pin the Lp error of each
    candidate far more precisely than the gaps between candidates;
    ``max_samples=None`` keeps everything, which suits weights (observed once).
    """

    def __init__(
        self,
        axis: int | None = None,
        p: float = 2.4,
        grid: int = 100,
        max_samples: int | None = 2**16,
        seed: int = 0,
    ) -> None:
        super().__init__(axis)
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive or None, got {max_samples}")
        self.p = p
        self.grid = grid
        self.max_samples = max_samples
        self.seed = seed
        self._range = MinMaxObserver(axis)
        self._sample: Tensor | None = None  # (C, n); C = 1 per tensor
        self._keys: Tensor | None = None
        self._generator: torch.Generator | None = None

    def _rows(self, x: Tensor) -> Tensor:
        if self.axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def _observe(self, x: Tensor) -> None:
        self._range.observe(x)
        rows = self._rows(x).float()
        if self._sample is None:
            self._sample = rows
        else:
            self._sample = torch.cat([self._sample, rows], dim=1)
        if self.max_samples is None:
            return
        if self._generator is None or self._generator.device != rows.device:
            self._generator = torch.Generator(device=rows.device)
            self._generator.manual_seed(self.seed)
        new_keys = torch.rand(rows.shape, generator=self._generator, device=rows.device)
        self._keys = new_keys if self._keys is None else torch.cat([self._keys, new_keys], dim=1)
        cap = max(1, math.ceil(self.max_samples / self._sample.shape[0]))
        if self._sample.shape[1] > cap:
            self._keys, idx = torch.topk(self._keys, cap, dim=1, largest=False)
            self._sample = torch.gather(self._sample, 1, idx)

    def _compute(self, bits: int, symmetric: bool, unsigned: bool) -> tuple[Tensor, Tensor]:
        qmin, qmax = qrange(bits, symmetric)
        lo, hi = self._range.min, self._range.max
        x = self._sample  # (C, n)
        channels = x.shape[0]
        # every candidate range at once: (G, C); candidate i shrinks the range by 1 - i/G
        # (computed in float64 and rounded once, as the Python scalar it replaces)
        f = 1.0 - torch.arange(self.grid, dtype=torch.float64, device=x.device) / self.grid
        f = f.float().reshape(-1, 1)
        scale, zp = qparams_from_range(lo.reshape(1, -1) * f, hi.reshape(1, -1) * f, bits,
                                       symmetric, unsigned)
        scale, zp = scale.expand(-1, channels), zp.expand(-1, channels)
        # candidates in chunks of at most ~4M elements, so per-channel weight searches
        # (max_samples=None: the whole tensor) stay small in memory
        chunk = max(1, (1 << 22) // max(1, x.numel()))
        errs = []
        for i in range(0, self.grid, chunk):
            s, z = scale[i:i + chunk, :, None], zp[i:i + chunk, :, None]
            err = (x - fake_quantize(x, s, z, qmin, qmax)).abs_().pow_(self.p)
            errs.append(err.mean(dim=2))
        err = torch.nan_to_num(torch.cat(errs), nan=math.inf)  # (G, C)
        # argmin takes the first minimum: on ties the widest range wins, and where every
        # error is infinite the full range (candidate 0)
        best = err.argmin(dim=0)
        cols = torch.arange(channels, device=x.device)
        return (scale[best, cols].reshape(lo.shape).contiguous(),
                zp[best, cols].reshape(lo.shape).contiguous())


def make_observer(name: str, axis: int | None = None, **kwargs: object) -> Observer:
    """Observer by name: ``max`` (min/max), ``mse`` (Lp shrink search), ``ema`` (EMA min/max)."""
    factories: dict[str, Callable[..., Observer]] = {
        "max": MinMaxObserver,
        "mse": MSEObserver,
        "ema": EMAMinMaxObserver,
    }
    if name not in factories:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    return factories[name](axis=axis, **kwargs)


class PerTimestepObserver:
    """One observer per sampling timestep (TFMQ-DM finite-set calibration).

    ``observe(x, t)`` routes each sample of ``x`` to the observer of its own
    timestep; ``t`` is an ``int`` (whole batch) or ``(B,)`` per-sample
    timesteps, with ``x`` holding ``k·B`` rows (see
    :func:`~gaq.quant.context.timesteps_per_row`).
    """

    def __init__(self, factory: Callable[[], Observer]) -> None:
        self.factory = factory
        self.observers: dict[int, Observer] = {}

    @property
    def seen(self) -> bool:
        return bool(self.observers)

    def _observer(self, t: int) -> Observer:
        if t not in self.observers:
            self.observers[t] = self.factory()
        return self.observers[t]

    def observe(self, x: Tensor, t: Timestep) -> None:
        t = normalize_timestep(t)
        if isinstance(t, int):
            self._observer(t).observe(x)
            return
        rows = timesteps_per_row(t.to(x.device), x.shape[0])
        for value in torch.unique(rows).tolist():
            self._observer(int(value)).observe(x[rows == value])

    def compute(
        self, bits: int, symmetric: bool, unsigned: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(timesteps (T,), scales (T, ...), zero points (T, ...))``, timesteps ascending."""
        if not self.observers:
            raise RuntimeError("PerTimestepObserver has observed no data")
        keys = sorted(self.observers)
        params = [self.observers[k].compute(bits, symmetric, unsigned) for k in keys]
        scales = torch.stack([s for s, _ in params])
        zero_points = torch.stack([z for _, z in params])
        return torch.tensor(keys, dtype=torch.long, device=scales.device), scales, zero_points
