"""``FakeQuantizer``: one quantized tensor's bit-width, grid and step-size state.

Where ``(Δ, z)`` come from is the quantizer's *mode*:

``static``
    one ``(Δ, z)`` (scalar, or ``(C,)`` per channel along ``axis``);
``table``
    one row of ``(Δ, z)`` per known sampling timestep (TFMQ-DM), looked up
    with :func:`~gaq.quant.context.current_timestep`;
``conditioned``
    ``Δ = provider(t)`` from a module (TDQ), ``z`` fixed;
    :meth:`FakeQuantizer.freeze_to_table` turns it into a ``table`` for inference.

The mode is stored in ``state_dict`` (as the ``mode_code`` buffer), and
buffers are resized on load, so a freshly built quantizer with the same
``bits``/``symmetric``/``axis`` loads any saved state bit-identically; only
``conditioned`` needs its provider attached (same architecture) before loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gaq.quant.context import current_timestep, normalize_timestep
from gaq.quant.fake import apply_keeping_float32, channel_view, fake_quantize, qrange
from gaq.quant.observers import Observer, PerTimestepObserver, make_observer

MODES = ("uncalibrated", "static", "table", "conditioned")


class UnknownTimestepError(KeyError):
    """A per-timestep table was asked for a timestep it was not calibrated on."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


_UNCALIBRATED, _STATIC, _TABLE, _CONDITIONED = range(4)


class FakeQuantizer(nn.Module):
    """Uniform affine fake quantizer with static, per-timestep or timestep-conditioned step sizes.

    Args:
        bits: bit-width of the integer grid.
        symmetric: grid ``[−2^(b−1), 2^(b−1)−1]`` with ``z = 0``; else ``[0, 2^b−1]``.
        axis: channel axis for per-channel parameters (weights: 0); ``None`` = per tensor.
        unsigned: asymmetric grid with ``z = 0`` fixed (softmax outputs).
        observer: range initialisation, ``max``, ``mse`` or ``ema``.
        observer_kwargs: passed to the observer (``p``, ``grid``, ``momentum``, ...).
        per_timestep: calibrate one ``(Δ, z)`` per sampling timestep (``table`` mode).
        device: where the state lives: the device of the tensor it quantizes (a quantizer
            on the CPU beside a CUDA layer fails at the first forward).

    Forward: identity when disabled or observing (observing records the input
    first); otherwise ``x̂`` with gradients to ``x`` (in range) and ``Δ``.
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        axis: int | None = None,
        *,
        unsigned: bool = False,
        observer: str = "max",
        observer_kwargs: dict[str, Any] | None = None,
        per_timestep: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if unsigned and symmetric:
            raise ValueError("unsigned and symmetric are mutually exclusive")
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.bits = bits
        self.symmetric = symmetric
        self.unsigned = unsigned
        self.axis = axis
        self.observer_name = observer
        self.observer_kwargs = dict(observer_kwargs or {})
        self.per_timestep = per_timestep
        make_observer(observer, axis, **self.observer_kwargs)  # fail early on a bad name
        self.register_buffer("scale", torch.ones((), device=device))
        self.register_buffer("zero_point", torch.zeros((), device=device))
        self.register_buffer("timesteps", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("mode_code", torch.tensor(_UNCALIBRATED, dtype=torch.uint8,
                                                       device=device))
        self.provider: nn.Module | None = None
        self.enabled = True
        self.observing = False
        self._observer: Observer | PerTimestepObserver | None = None
        self._row_index: dict[int, int] | None = None
        self._mode: str | None = None  # mirror of mode_code: reading a buffer would sync a GPU

    # ----------------------------------------------------------------- state
    @property
    def mode(self) -> str:
        """``uncalibrated``, ``static``, ``table`` or ``conditioned``."""
        if self._mode is None:
            self._mode = MODES[int(self.mode_code)]
        return self._mode

    @property
    def calibrated(self) -> bool:
        return self.mode != "uncalibrated"

    @property
    def learning_scale(self) -> bool:
        return "scale" in self._parameters

    def _set_tensor(self, name: str, value: Tensor) -> None:
        """Replace a buffer or the learnable ``scale`` (keeping it learnable)."""
        if name in self._parameters:
            self._parameters[name] = nn.Parameter(value, requires_grad=True)
        else:
            self._buffers[name] = value

    def _set_mode(self, code: int) -> None:
        self.mode_code.fill_(code)
        self._mode = MODES[code]
        self._row_index = None

    def _device(self) -> torch.device:
        return self.mode_code.device

    def set_static(self, scale: Tensor, zero_point: Tensor | None = None) -> FakeQuantizer:
        """Static mode with the given ``Δ`` (scalar or ``(C,)``) and zero point (default 0)."""
        scale = torch.as_tensor(scale, dtype=torch.float32, device=self._device()).detach()
        zero_point = self._checked_zero_point(zero_point, scale)
        self._drop_provider()
        self._set_tensor("scale", scale.clone())
        self._set_tensor("zero_point", zero_point)
        self._set_tensor("timesteps", torch.zeros(0, dtype=torch.long, device=self._device()))
        self._set_mode(_STATIC)
        return self

    def set_table(
        self, timesteps: Tensor | list[int], scale: Tensor, zero_point: Tensor | None = None
    ) -> FakeQuantizer:
        """Table mode: row ``i`` of ``scale``/``zero_point`` serves timestep ``timesteps[i]``."""
        dev = self._device()
        ts = torch.as_tensor(timesteps, dtype=torch.long, device=dev).reshape(-1)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=dev).detach()
        if scale.ndim == 0 or scale.shape[0] != ts.numel():
            raise ValueError(
                f"a table needs one row per timestep: {ts.numel()} timesteps, "
                f"scale of shape {tuple(scale.shape)}"
            )
        if ts.unique().numel() != ts.numel():
            raise ValueError("table timesteps must be distinct")
        zero_point = self._checked_zero_point(zero_point, scale)
        order = torch.argsort(ts)  # sorted, so per-sample lookup can use searchsorted
        self._drop_provider()
        self._set_tensor("scale", scale[order].clone())
        self._set_tensor("zero_point", zero_point[order].clone())
        self._set_tensor("timesteps", ts[order].clone())
        self._set_mode(_TABLE)
        return self

    def fill_table(self, timesteps: Tensor | list[int]) -> FakeQuantizer:
        """Add rows for ``timesteps`` the table lacks, each a copy of the row of the
        nearest timestep it has (ties: the larger). Existing rows are unchanged."""
        if self.mode != "table":
            raise RuntimeError(f"fill_table needs a table quantizer; it is {self.mode}")
        have = self.timesteps
        want = torch.as_tensor(timesteps, dtype=torch.long, device=have.device).reshape(-1)
        new = want[~torch.isin(want, have)].unique()
        if not new.numel():
            return self
        hi = torch.searchsorted(have, new).clamp(max=have.numel() - 1)
        lo = (hi - 1).clamp(min=0)
        nearest = torch.where((new - have[lo]).abs() < (have[hi] - new).abs(), lo, hi)
        return self.set_table(torch.cat([have, new]),
                              torch.cat([self.scale.detach(), self.scale.detach()[nearest]]),
                              torch.cat([self.zero_point, self.zero_point[nearest]]))

    def _checked_zero_point(self, zero_point: Tensor | None, scale: Tensor) -> Tensor:
        if zero_point is None:
            return torch.zeros_like(scale)
        zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=scale.device)
        zero_point = zero_point.detach().expand_as(scale).clone()
        if (self.symmetric or self.unsigned) and bool((zero_point != 0).any()):
            raise ValueError("symmetric and unsigned quantizers have zero point 0")
        if not torch.equal(zero_point, torch.round(zero_point)):
            raise ValueError("zero points must be integers")
        return zero_point

    def set_provider(self, provider: nn.Module) -> FakeQuantizer:
        """Conditioned mode: ``Δ = provider(t)``; ``provider`` maps ``(B,)`` timesteps to ``(B,)``
        (per tensor) or ``(B, C)`` (per channel) positive step sizes.

        The zero point stays fixed: the current static one, or 0 for symmetric
        and unsigned quantizers.
        """
        if self.learning_scale:
            raise ValueError("call learn_scale(False) before conditioning the step size")
        mode = self.mode
        if mode == "table" or (mode == "uncalibrated" and not (self.symmetric or self.unsigned)):
            raise ValueError(
                "an asymmetric conditioned quantizer takes its fixed zero point from static "
                f"calibration; it is {mode}"
            )
        if mode == "uncalibrated":
            self._set_tensor("zero_point", torch.zeros((), device=self._device()))
        self.provider = provider
        self._set_tensor("timesteps", torch.zeros(0, dtype=torch.long, device=self._device()))
        self._set_mode(_CONDITIONED)
        return self

    def _drop_provider(self) -> nn.Module | None:
        provider, self.provider = self.provider, None
        return provider

    @torch.no_grad()
    def freeze_to_table(self, timesteps: Tensor | list[int]) -> nn.Module:
        """Precompute ``Δ = provider(t)`` for the sampler's ``timesteps`` and switch to table mode.

        The rows come from one batched provider call; sampling outputs are bit-identical
        before and after only for a provider whose rows do not depend on the batch size
        (:class:`~gaq.quant.providers.TimestepScaleMLP` is built that way). Returns the
        detached provider.
        """
        if self.mode != "conditioned":
            raise RuntimeError(f"freeze_to_table needs conditioned mode; quantizer is {self.mode}")
        ts = torch.as_tensor(timesteps, dtype=torch.long, device="cpu").reshape(-1).tolist()
        rows = self._provided_scale(torch.tensor(ts, dtype=torch.long, device=self._device()))
        zero_point = self.zero_point.expand_as(rows).clone()
        provider = self.provider
        self.set_table(ts, rows, zero_point)
        return provider

    def learn_scale(self, enabled: bool = True) -> FakeQuantizer:
        """Make ``Δ`` (in table mode: every row) an ``nn.Parameter`` (LSQ), or a buffer again."""
        if enabled == self.learning_scale:
            return self
        if enabled and self.mode in ("uncalibrated", "conditioned"):
            raise ValueError(
                f"cannot learn the step size of a {self.mode} quantizer "
                "(calibrate it first; a conditioned one learns its provider)"
            )
        value = self.scale.detach().clone()
        if enabled:
            del self._buffers["scale"]
            self.scale = nn.Parameter(value)
        else:
            del self._parameters["scale"]
            self.register_buffer("scale", value)
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        return apply_keeping_float32(self, super()._apply, fn, recurse, ("scale", "zero_point"))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Shapes depend on the mode and on calibration (C, number of timesteps):
        # adopt the incoming shapes so a fresh quantizer can load any state.
        for name in ("scale", "zero_point", "timesteps"):
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                if current.shape != state_dict[key].shape:
                    shape = state_dict[key].shape
                    empty = torch.empty(shape, dtype=current.dtype, device=current.device)
                    self._set_tensor(name, empty)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "mode_code"
        if key in state_dict and int(state_dict[key]) == _CONDITIONED and self.provider is None:
            error_msgs.append(
                f"{prefix or 'quantizer'}: state is timestep-conditioned; attach a provider of "
                "the same architecture with set_provider() before loading"
            )
        self._row_index = None
        self._mode = None

    # ----------------------------------------------------------- calibration
    def _new_observer(self) -> Observer | PerTimestepObserver:
        def factory() -> Observer:
            return make_observer(self.observer_name, self.axis, **self.observer_kwargs)

        return PerTimestepObserver(factory) if self.per_timestep else factory()

    def observe(self, enabled: bool = True) -> FakeQuantizer:
        """While observing, forward records its input for calibration and returns it unchanged."""
        self.observing = enabled
        return self

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Fold ``x`` into the range statistics (per-timestep ones read the current timestep)."""
        if self._observer is None:
            self._observer = self._new_observer()
        if isinstance(self._observer, PerTimestepObserver):
            t = current_timestep()
            if t is None:
                raise RuntimeError(
                    "per-timestep calibration outside a timestep context; wrap the call in "
                    "timestep_context(t) or attach_timestep_context(model)"
                )
            self._observer.observe(x, t)
        else:
            self._observer.observe(x)

    def finalize(self) -> FakeQuantizer:
        """Turn the statistics into ``(Δ, z)`` (static or table mode) and stop observing."""
        if self._observer is None or not self._observer.seen:
            raise RuntimeError("finalize() before any calibration data was observed")
        if isinstance(self._observer, PerTimestepObserver):
            ts, scale, zp = self._observer.compute(self.bits, self.symmetric, self.unsigned)
            learning = self.learning_scale
            self.learn_scale(False)
            self.set_table(ts, scale, zp)
        else:
            scale, zp = self._observer.compute(self.bits, self.symmetric, self.unsigned)
            learning = self.learning_scale
            self.learn_scale(False)
            self.set_static(scale, zp)
        self.learn_scale(learning)
        self._observer = None
        self.observing = False
        return self

    def reset_observer(self) -> None:
        """Forget statistics gathered so far."""
        self._observer = None

    def enable(self) -> FakeQuantizer:
        self.enabled = True
        return self

    def disable(self) -> FakeQuantizer:
        """Identity from now on (full-precision baselines)."""
        self.enabled = False
        return self

    # --------------------------------------------------------------- lookup
    def _row(self, t: int) -> int:
        if self._row_index is None:
            self._row_index = {v: i for i, v in enumerate(self.timesteps.tolist())}
        try:
            return self._row_index[t]
        except KeyError:
            raise UnknownTimestepError(self._unknown(t)) from None

    def _unknown(self, t: object) -> str:
        known = self.timesteps.tolist()
        shown = known if len(known) <= 20 else known[:10] + ["..."] + known[-10:]
        return (
            f"FakeQuantizer has no parameters for timestep {t}; "
            f"its table covers {len(known)} timesteps: {shown}"
        )

    def _rows(self, t: Tensor) -> Tensor:
        idx = torch.searchsorted(self.timesteps, t).clamp_(max=self.timesteps.numel() - 1)
        found = self.timesteps[idx] == t
        if not bool(found.all()):
            raise UnknownTimestepError(self._unknown(sorted(set(t[~found].tolist()))))
        return idx

    def _provided_scale(self, t: Tensor) -> Tensor:
        scale = self.provider(t.to(self._device()))
        if self.axis is None and scale.ndim == 2 and scale.shape[1] == 1:
            scale = scale[:, 0]
        expected_ndim = 1 if self.axis is None else 2
        if scale.ndim != expected_ndim or scale.shape[0] != t.shape[0]:
            raise ValueError(
                f"provider returned shape {tuple(scale.shape)} for {t.shape[0]} timesteps; "
                f"expected (B,{'' if self.axis is None else ' C'})"
            )
        return scale

    def qparams(self, t: Any = None) -> tuple[Tensor, Tensor]:
        """``(Δ, z)`` for timestep ``t`` (default: the current one): ``()``/``(C,)`` for an int
        timestep or a static quantizer, ``(B,)``/``(B, C)`` for per-sample timesteps."""
        if t is None:
            t = current_timestep()
        mode = self.mode
        if mode == "uncalibrated":
            raise RuntimeError(
                "FakeQuantizer is not calibrated: observe()+calibrate()+finalize(), or set_static()"
            )
        if mode == "static":
            return self.scale, self.zero_point
        if t is None:
            raise RuntimeError(
                f"a {mode} quantizer needs the sampling timestep; call it inside "
                "timestep_context(t) or attach_timestep_context(denoiser)"
            )
        t = normalize_timestep(t)
        if mode == "table":
            if isinstance(t, int):
                i = self._row(t)
                return self.scale[i], self.zero_point[i]
            idx = self._rows(t.to(self._device()))
            return self.scale[idx], self.zero_point[idx]
        per_sample = not isinstance(t, int)
        ts = t if per_sample else torch.tensor([t], device=self._device())
        scale = self._provided_scale(ts)
        return (scale if per_sample else scale[0]), self.zero_point

    # -------------------------------------------------------------- forward
    def _broadcast(self, p: Tensor, x: Tensor, per_row: bool) -> Tensor:
        if not per_row:
            return channel_view(p, x.ndim, self.axis)
        rows = p.shape[0]
        if x.shape[0] % rows:
            raise ValueError(
                f"{rows} per-sample timesteps cannot broadcast over a tensor with {x.shape[0]} "
                "rows (rows must be a multiple of the batch size)"
            )
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        if self.axis is not None:
            axis = self.axis % x.ndim
            if axis == 0:
                raise ValueError(
                    "per-sample timesteps cannot index a quantizer whose channel axis is 0"
                )
            shape[axis] = p.shape[-1]
        repeats = x.shape[0] // rows
        if repeats > 1:  # k·B rows (heads folded into the batch): sample b owns rows b·k..b·k+k−1
            p = p.repeat_interleave(repeats, dim=0)
        return p.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.calibrate(x)
            return x
        if not self.enabled:
            return x
        t = current_timestep()
        scale, zero_point = self.qparams(t)
        # Per-sample timesteps give one row of Δ (and, from a table, of z) per sample.
        per_sample = self.mode != "static" and isinstance(t, Tensor)
        scale_rows = per_sample
        zp_rows = per_sample and self.mode == "table"
        return fake_quantize(
            x,
            self._broadcast(scale, x, scale_rows),
            self._broadcast(zero_point, x, zp_rows),
            self.qmin,
            self.qmax,
        )

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else ("unsigned" if self.unsigned else "asymmetric")
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        flags = "" if self.enabled else ", disabled"
        return f"bits={self.bits}, {grid}, {gran}, mode={self.mode}{flags}"
