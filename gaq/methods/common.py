"""Pieces every method's ``quantize`` shares: turning ``calib`` into a forward loop,
timing, and packing the result."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from gaq.config import QuantConfig
from gaq.errors import DivergedError, GaqError
from gaq.finite import require_finite_module
from gaq.methods.base import Method, QuantResult
from gaq.quantize import LayerReport, freeze


def as_forward_loop(calib, batch_size: int) -> Callable[[nn.Module], None]:
    """``calib`` as a ModelOpt-style loop: a callable is used as is; a calibration set runs
    its training rows (held-out rows stay unseen)."""
    if callable(calib):
        return calib
    from gaq.calibration import forward_loop

    return forward_loop(calib.train(), batch_size)


def require_calibration_set(method: Method, calib) -> None:
    if callable(calib) or not hasattr(calib, "train"):
        raise GaqError(f"method {method.name!r} reconstructs blocks and needs a calibration "
                       "set (gaq.calibration.record_calibration), not a forward_loop")


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def finish(method: Method, qmodel: nn.Module, report: LayerReport, quant: QuantConfig,
           seconds: float, **extra) -> QuantResult:
    """Freeze weights (sampling then pays only for activation fake-quant), check that the
    calibration did not diverge, and pack the result."""
    freeze(qmodel)
    require_finite_module(qmodel, f"{method.name} calibration",
                          "it diverged: lower its learning rates (weight_lr, act_lr) or check "
                          "the calibration set", error=DivergedError)
    state = {"method": method.name, "config": method.config.to_dict(), "quant": quant.to_dict()}
    stats = {"calibration_seconds": seconds}
    stats.update({k: v for k, v in extra.items() if isinstance(v, (int, float))})
    return QuantResult(model=qmodel, state=state, report=report, stats=stats,
                       sampler_hook=extra.get("sampler_hook"))
