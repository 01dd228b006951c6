"""The stages every method composes (after llmc): a method's ``quantize`` is its recipe,
the stages it calls in order with its own settings.

    run = start(method, model, adapter, calib, quant)   # the method's config applied
    wrap(run)                                           # fake-quant layers, skip rules
    temporal(run, recon)                                # TFMQ-DM: the timestep MLP
    reconstruct_weights(run, recon)                     # AdaRound, block by block
    init_activations(run, batch_size)                   # activation ranges
    learn_activation_steps(run, recon)                  # LSQ-style, block by block
    timestep_tables(run)                                # per-timestep rows filled in
    return finish(run)                                  # freeze, check, pack

Each stage reads what the earlier ones left on the :class:`Run` and adds to it; a stage
that does not apply (activation stages at weight-only bits) does nothing, so recipes
need no bit-width branches. Methods with a stage of their own (GAQ's sample weighting,
TDQ's step-size MLPs, PTQD's noise statistics) write it as a function of the same
:class:`Run`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from gaq.config import QuantConfig
from gaq.errors import DivergedError, GaqError
from gaq.finite import require_finite_module
from gaq.methods.base import Method, QuantResult
from gaq.quantize import LayerReport, calibrate_activations, fill_tables, freeze, quantize_model
from gaq.reconstruction import (
    BatchIter,
    BlockResult,
    ReconConfig,
    WeightFn,
    calib_batches,
    reconstruct,
)

if TYPE_CHECKING:
    import torch

    from gaq.models.adapters import Block, ModelAdapter

__all__ = [
    "Run",
    "finish",
    "init_activations",
    "learn_activation_steps",
    "reconstruct_weights",
    "start",
    "temporal",
    "timestep_tables",
    "wrap",
]


#: TFMQ-DM's code initialises each timestep's activation range on 16 random rows of that
#: timestep and then runs its running statistics in batches of 16 (``quant/calibration.py``)
TFMQ_ACT_ROWS = 16


@dataclass
class Run:
    """One quantization in progress: the inputs, and what each stage adds."""

    method: Method
    fpmodel: nn.Module
    adapter: ModelAdapter
    calib: Any  # a CalibrationSet, or a forward loop for methods that only observe
    quant: QuantConfig  # the config the model is quantized with (the method's applied)
    qmodel: nn.Module | None = None
    report: LayerReport | None = None
    blocks: list[BlockResult] = field(default_factory=list)
    temporal: dict[str, float] = field(default_factory=dict)
    temporal_data: Any = None
    started: float = field(default_factory=time.perf_counter)
    _batches: dict[int, BatchIter] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.fpmodel.parameters()).device

    @property
    def quantizes_activations(self) -> bool:
        return self.quant.act.bits is not None

    def batches(self, size: int) -> BatchIter:
        """The training rows as reconstruction batches of ``size`` on the model's device
        (one fixed shuffled order, shared by every stage that asks for this size)."""
        if size not in self._batches:
            self._batches[size] = calib_batches(self.calib, size, self.device)
        return self._batches[size]

    def forward_loop(self, batch_size: int):
        """``calib`` as a ModelOpt-style loop: a callable is used as is; a calibration set
        runs its training rows (held-out rows stay unseen)."""
        if callable(self.calib):
            return self.calib
        from gaq.calibration import forward_loop

        return forward_loop(self.calib.train(), batch_size)


def start(method: Method, model: nn.Module, adapter: ModelAdapter, calib: Any,
          quant: QuantConfig, *, needs_set: bool = True) -> Run:
    """A run of ``method`` with its own quantization choices applied to ``quant``;
    ``needs_set``: the method reconstructs blocks, so a bare forward loop is refused."""
    from gaq.memwatch import bound_heap

    # a method's passes allocate and free a layer's worth at a time: without this the
    # process keeps every freed transient resident (gaq.memwatch.bound_heap says why)
    bound_heap()
    if needs_set and (callable(calib) or not hasattr(calib, "train")):
        raise GaqError(f"method {method.name!r} reconstructs blocks and needs a calibration "
                       "set (gaq.calibration.record_calibration), not a forward_loop")
    return Run(method, model, adapter, calib, method.effective_quant(quant))


def wrap(run: Run) -> None:
    """Replace the layers by fake-quantized ones, under the model's and the method's skip
    rules; weights are rounded to nearest until a later stage learns the rounding."""
    run.qmodel, run.report = quantize_model(run.fpmodel, run.adapter, run.quant,
                                            run.method.skip_filter(run.adapter))


def temporal(run: Run, cfg: ReconConfig, weights: Tensor | None = None) -> None:
    """TFMQ-DM's temporal reconstruction: AdaRound the timestep-only layers jointly on the
    temporal features, then freeze them (``weights``: per training row, None = uniform)."""
    from gaq.temporal import reconstruct_temporal, temporal_data

    run.temporal_data = temporal_data(run.calib)
    run.temporal |= reconstruct_temporal(run.qmodel, run.fpmodel, run.adapter,
                                         run.temporal_data, cfg, weights)


def temporal_act_steps(run: Run, cfg: ReconConfig, weights: Tensor | None = None) -> None:
    """LSQ-style steps of the temporal layers' activation quantizers, after
    :func:`init_activations` (nothing at weight-only bits)."""
    from gaq.temporal import learn_temporal_act_steps

    if run.quantizes_activations:
        data = run.temporal_data if run.temporal_data is not None else run.calib
        run.temporal |= learn_temporal_act_steps(run.qmodel, run.fpmodel, run.adapter, data,
                                                 cfg, weights)


def reconstruct_weights(run: Run, cfg: ReconConfig, *, blocks: list[Block] | None = None,
                        weight_fn: WeightFn | None = None, progress: bool = True) -> None:
    """AdaRound block by block, activations off (``weight_fn``: per-sample loss weights)."""
    run.blocks += reconstruct(run.qmodel, run.fpmodel, run.adapter,
                              run.batches(cfg.capture_batch), cfg, phase="weights",
                              blocks=blocks, weight_fn=weight_fn, progress=progress)


def init_activations(run: Run, batch_size: int, *, rows: int | None = None,
                     seed: int = 0) -> None:
    """Activation ranges from calibration data (nothing at weight-only bits). ``rows``
    None: every training row with full-precision activations upstream (the suite's);
    N: one batch of N random training rows, each quantizer initialised on inputs the
    earlier ones already quantize (BRECQ's and Q-Diffusion's code).

    Per-timestep tables are calibrated one timestep at a time on that timestep's rows,
    the activation-only rows of an ``act_every_step`` set included, as TFMQ-DM's code does
    (:func:`gaq.calibration.per_timestep_loop`: 16 random rows, then every row in batches
    of 16; observers other than EMA pool what they see, so they get every row once, without
    the initialisation batch); ``batch_size`` and ``rows`` then do not apply."""
    if not run.quantizes_activations:
        return
    if run.quant.act.per_timestep and not callable(run.calib):
        from gaq.calibration import per_timestep_loop

        init_rows = TFMQ_ACT_ROWS if run.quant.act.range_init == "ema" else 0
        loop = per_timestep_loop(run.calib.activation_rows(), init_rows=init_rows,
                                 batch_size=TFMQ_ACT_ROWS, seed=seed)
        calibrate_activations(run.qmodel, loop)
    elif rows is None:
        calibrate_activations(run.qmodel, run.forward_loop(batch_size))
    else:
        calibrate_activations(run.qmodel, _random_rows_loop(run.calib, rows, seed),
                              upstream="quantized")


def _random_rows_loop(calib: Any, rows: int, seed: int):
    """One batch of ``rows`` training rows drawn at random without replacement."""
    import torch

    from gaq.calibration import forward_loop

    train = calib.train()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=gen)[: min(rows, len(train))]
    return forward_loop(train.subset(idx), len(idx))


def learn_activation_steps(run: Run, cfg: ReconConfig, *, blocks: list[Block] | None = None,
                           weight_fn: WeightFn | None = None, progress: bool = True) -> None:
    """LSQ-style activation steps block by block, everything quantized (nothing at
    weight-only bits)."""
    if run.quantizes_activations:
        run.blocks += reconstruct(run.qmodel, run.fpmodel, run.adapter,
                                  run.batches(cfg.capture_batch), cfg, phase="activations",
                                  blocks=blocks, weight_fn=weight_fn, progress=progress)


def timestep_tables(run: Run) -> None:
    """Sampler timesteps between the calibrated ones (interval calibration keeps every
    n-th step) take the nearest calibrated timestep's activation row."""
    sampler_ts = run.calib.meta.get("sampler_timesteps")
    if run.quantizes_activations and sampler_ts:
        fill_tables(run.qmodel, sampler_ts)


def finish(run: Run, *, sampler_hook: Any = None, seconds: float | None = None,
           **extra: Any) -> QuantResult:
    """Freeze weights (sampling then pays only for activation fake-quant), check that the
    calibration did not diverge, and pack the result: the state records the config the
    model was quantized with, and the per-block metrics when blocks were reconstructed.
    ``extra`` numbers become stats; ``seconds`` overrides the time since :func:`start`."""
    method = run.method
    freeze(run.qmodel)
    require_finite_module(run.qmodel, f"{method.name} calibration",
                          "it diverged: lower its learning rates (weight_lr, act_lr) or check "
                          "the calibration set", error=DivergedError)
    if seconds is None:
        seconds = time.perf_counter() - run.started
    state: dict[str, Any] = {"method": method.name, "config": method.config.to_dict(),
                             "quant": run.quant.to_dict(), "blocks": block_records(run)}
    stats = {"calibration_seconds": seconds}
    stats.update({k: v for k, v in extra.items() if isinstance(v, (int, float))})
    return QuantResult(model=run.qmodel, state=state, report=run.report, stats=stats,
                       sampler_hook=sampler_hook)


def block_records(run: Run) -> list[dict]:
    """The per-block metrics, JSON-able (saved with the state)."""
    return [vars(r) for r in run.blocks]
