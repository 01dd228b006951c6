"""The current sampling timestep, visible to every quantizer inside a denoiser call.

Per-timestep and timestep-conditioned quantizers sit deep inside a network
whose layers never see ``t``. Rather than threading it through diffusers'
forward signatures (or a global), the denoiser root publishes it in a
:class:`contextvars.ContextVar` for the duration of its forward; quantizers
read it with :func:`current_timestep`. A ContextVar is safe under threads and
nesting, and resets even when the forward raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

import torch
from torch import Tensor, nn

Timestep = int | Tensor

_TIMESTEP: ContextVar[Timestep | None] = ContextVar("gaq_timestep", default=None)


def normalize_timestep(t: Any) -> Timestep:
    """An ``int`` for one timestep shared by the batch, or a 1-D int64 tensor of per-sample ones.

    Tensors with a single element collapse to ``int`` (diffusers broadcasts a
    ``(1,)`` timestep over the batch). Float timesteps must be integral,
    because per-timestep parameter tables are keyed by integer timesteps.
    """
    if isinstance(t, bool):
        raise TypeError("a timestep cannot be a bool")
    if isinstance(t, int):
        return t
    if isinstance(t, float):
        if not t.is_integer():
            raise ValueError(f"timesteps must be integral, got {t}")
        return int(t)
    if not isinstance(t, Tensor):
        try:
            return int(t.__index__())  # numpy integers
        except AttributeError:
            kind = type(t).__name__
            raise TypeError(f"timestep must be an int or a tensor, got {kind}") from None
    t = t.detach()
    if t.ndim > 1:
        raise ValueError(f"timestep tensor must be 0-D or 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.equal(t, torch.round(t)):
            raise ValueError(f"timesteps must be integral, got {t.tolist()}")
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep tensor has unsupported dtype {t.dtype}")
    if t.numel() == 1:
        return int(t.reshape(()).item())
    if t.numel() == 0:
        raise ValueError("timestep tensor is empty")
    if bool((t == t[0]).all()):
        # one timestep for the whole batch (the sampler's case): the scalar lookup gives
        # the same parameters as a per-sample gather, without the gather
        return int(t[0])
    return t.to(torch.long)


@contextmanager
def timestep_context(t: Timestep) -> Iterator[Timestep]:
    """Make ``t`` the current timestep inside the ``with`` block; yields the normalized value."""
    value = normalize_timestep(t)
    token = _TIMESTEP.set(value)
    try:
        yield value
    finally:
        _TIMESTEP.reset(token)


def current_timestep() -> Timestep | None:
    """The timestep of the enclosing :func:`timestep_context`, or ``None`` outside any."""
    return _TIMESTEP.get()


class TimestepContextHandle:
    """Removes the hooks installed by :func:`attach_timestep_context`; also a context manager."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> TimestepContextHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _timestep_position(model: nn.Module, arg_name: str) -> int | None:
    """Positional index of ``arg_name`` in ``model.forward`` (diffusers models differ: UNets
    take ``(sample, timestep, ...)``, DiT ``(hidden_states, encoder_hidden_states, timestep)``)."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if arg_name in positional:
        return positional.index(arg_name)
    if not any(p.name == arg_name for p in params):
        raise ValueError(f"{type(model).__name__}.forward has no parameter named {arg_name!r}")
    return None


class _TimestepHooks:
    """The forward pre/post hooks of :func:`attach_timestep_context`: a class rather than
    closures so that a quantized model can be pickled (handed between processes) with
    its hooks; the stack of context tokens is per process and starts empty."""

    def __init__(self, arg_name: str, position: int | None) -> None:
        self.arg_name, self.position = arg_name, position
        self.tokens: list[Token | None] = []

    def __getstate__(self) -> dict:
        return {"arg_name": self.arg_name, "position": self.position}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["arg_name"], state["position"])

    def enter(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.arg_name in kwargs:
            t = kwargs[self.arg_name]
        elif self.position is not None and self.position < len(args):
            t = args[self.position]
        else:
            t = None
        # Push first: if normalizing raises, the always-called post hook pops this None.
        self.tokens.append(None)
        if t is not None:
            self.tokens[-1] = _TIMESTEP.set(normalize_timestep(t))

    def leave(self, _module: nn.Module, _args: tuple, _kwargs: dict, _output: Any) -> None:
        if self.tokens:
            token = self.tokens.pop()
            if token is not None:
                _TIMESTEP.reset(token)


def attach_timestep_context(model: nn.Module, arg_name: str = "timestep") -> TimestepContextHandle:
    """Publish the timestep argument of ``model``'s forward as the current timestep.

    Hooks ``model`` so that ``model(sample, timestep, ...)`` (positional or
    keyword) runs inside ``timestep_context(timestep)``. A call whose timestep
    is ``None`` leaves the enclosing context untouched. Re-entrant calls nest. A model
    that already publishes ``arg_name`` is left as it is (the handle then removes nothing).
    """
    # Once per model: a copy of an already hooked model (deepcopy keeps hooks) hooked again
    # would run two pre hooks and two post hooks in the same order, resetting the context
    # tokens first-in-first-out, which leaves the timestep set after the call returns.
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, _TimestepHooks) and owner.arg_name == arg_name:
            return TimestepContextHandle([])
    hooks = _TimestepHooks(arg_name, _timestep_position(model, arg_name))
    pre = model.register_forward_pre_hook(hooks.enter, with_kwargs=True)
    # always_call: reset the context even if the forward raises.
    post = model.register_forward_hook(hooks.leave, with_kwargs=True, always_call=True)
    return TimestepContextHandle([pre, post])


def timesteps_per_row(t: Tensor, rows: int) -> Tensor:
    """Expand per-sample timesteps ``(B,)`` to the ``rows`` leading entries of a tensor.

    Inside attention, diffusers folds heads into the batch (``head_to_batch_dim``:
    row ``b·k + h`` belongs to sample ``b``), so a tensor with ``k·B`` rows takes
    each sample's timestep ``k`` times in a row. Classifier-free guidance, which
    concatenates the batch with itself, passes a ``(2B,)`` timestep and needs no
    special case.
    """
    batch = t.shape[0]
    if rows % batch:
        raise ValueError(
            f"cannot match {batch} per-sample timesteps to a tensor with {rows} rows "
            "(rows must be a multiple of the batch size)"
        )
    repeats = rows // batch
    return t if repeats == 1 else t.repeat_interleave(repeats)
