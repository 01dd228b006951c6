"""The block-reconstruction engine shared by every BRECQ-lineage method.

Weights: AdaRound per block (soft rounding, annealed rounding regulariser after a
warm-up, hard rounding at the end). Activations: LSQ-style learning of the step sizes
per block. The input of block k is taken from the model whose earlier blocks are
already quantized; its target is the FP block output. Block inputs and targets are
captured batch by batch and streamed from a disk cache, never all held in RAM.

Every sample of the reconstruction loss carries a weight (uniform unless a method
gives ``sample_weights``): that is the hook the gradient-aligned method uses.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from gaq.config import MethodConfig, non_negative_int, positive_float, positive_int
from gaq.models.adapters import Block, ModelAdapter, denoise
from gaq.quant import QuantLayer, SplitQuantConv2d, annealed_beta, timestep_context
from gaq.quant.quantizer import FakeQuantizer
from gaq.tempdirs import make_temp_dir


@dataclass(frozen=True)
class ReconConfig(MethodConfig):
    """AdaRound + activation-step hyper-parameters (paper defaults; presets shrink them)."""

    VERSION: ClassVar[int] = 2

    weight_iters: int = 20000
    act_iters: int = 5000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-4
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    act_p: float = 2.4
    capture_batch: int = 64
    eval_samples: int = 256
    cache: Literal["disk", "memory"] = "disk"
    seed: int = 0
    # Minibatch rows: "all_rows" draws them from every cached row, as the authors' code does
    # (a random permutation of the cached set each iteration); "one_record" from one
    # captured batch (version 1 of this config; cheaper with the disk cache).
    minibatch: Literal["all_rows", "one_record"] = "all_rows"
    # The rounding regulariser of a split shortcut conv's two weight halves: "sum" (both
    # in full), "first" (only the first half, as Q-Diffusion's code does) or "channels"
    # (each half weighted by its share of the input channels, as TFMQ-DM's code does).
    split_reg: Literal["sum", "first", "channels"] = "sum"

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version == 1:  # version 1: one-record minibatches, both split halves in full
            return {"minibatch": "one_record", "split_reg": "sum", **data}
        return super().upgrade(data, version)

    def validate(self) -> None:
        for name in ("weight_iters", "act_iters", "seed"):
            non_negative_int(name, getattr(self, name))
        for name in ("batch_size", "capture_batch", "eval_samples"):
            positive_int(name, getattr(self, name))
        for name in ("weight_lr", "act_lr", "reg_weight", "beta_start", "beta_end", "act_p"):
            positive_float(name, getattr(self, name))
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must lie in [0, 1), got {self.warmup}")
        if self.minibatch not in ("all_rows", "one_record"):
            raise ValueError(f"minibatch must be 'all_rows' or 'one_record', got "
                             f"{self.minibatch!r}")
        if self.split_reg not in ("sum", "first", "channels"):
            raise ValueError(f"split_reg must be 'sum', 'first' or 'channels', got "
                             f"{self.split_reg!r}")


# A calibration batch as the engine sees it: (x, t, cond kwargs, row indices).
Batch = tuple[Tensor, Tensor, dict, Tensor]
BatchIter = Callable[[], Iterator[Batch]]
# Per-block sample weights: (block, its captured data) -> (N,) weights over calibration rows.
WeightFn = Callable[[Block, "BlockData"], Tensor]


class _Stop(Exception):
    """Raised by a capture hook: nothing after the block is needed."""


def _detach(obj):
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def select_rows(obj, idx: Tensor, n: int):
    """Select rows ``idx`` of every tensor whose leading dimension is the batch."""
    if torch.is_tensor(obj):
        return obj[idx] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(select_rows(o, idx, n) for o in obj)
    if isinstance(obj, dict):
        return {k: select_rows(v, idx, n) for k, v in obj.items()}
    return obj


def _concat(objs: list, sizes: list[int]):
    """Join records along the batch dimension (tensors whose leading size is their
    record's row count); anything else is taken from the first record."""
    first = objs[0]
    if torch.is_tensor(first):
        batched = all(torch.is_tensor(o) and o.dim() > 0 and o.shape[0] == n
                      for o, n in zip(objs, sizes, strict=True))
        return torch.cat(objs) if batched else first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([o[i] for o in objs], sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in objs], sizes) for k in first}
    return first


def block_output(out) -> Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _to(obj, device: torch.device | str):
    """Every tensor of a (nested) record on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class BlockData:
    """Captured (inputs, FP target, timesteps, row index) of one block, batch by batch,
    on disk (``torch.save`` from host memory; read back memory-mapped with
    ``weights_only=True``) or in RAM. Records are handed out on ``device``, the block's:
    the disk cache streams them to the accelerator one batch at a time, so device memory
    holds one batch, never the whole set."""

    def __init__(self, where: Literal["disk", "memory"] = "disk",
                 device: torch.device | str | None = None) -> None:
        # named by this process: a killed run's block caches are removed at the next start
        self._dir = make_temp_dir("block") if where == "disk" else None
        self._mem: list[dict] = []
        self._sizes: list[int] = []
        self.device = device

    def add(self, record: dict) -> None:
        self._sizes.append(len(record["index"]))
        if self._dir is None:
            self._mem.append(record)
        else:
            torch.save(_to(record, "cpu"), self._dir / f"{len(self._sizes) - 1:06d}.pt")

    def __len__(self) -> int:
        return sum(self._sizes)

    def record(self, i: int) -> dict:
        if self._dir is None:
            return self._mem[i]
        rec = torch.load(self._dir / f"{i:06d}.pt", weights_only=True, mmap=True)
        return rec if self.device is None else _to(rec, self.device)

    def records(self) -> Iterator[dict]:
        for i in range(len(self._sizes)):
            yield self.record(i)

    def index(self) -> Tensor:
        return torch.cat([r["index"] for r in self.records()])

    def head(self, limit: int) -> dict:
        """The first captured batches, at least ``limit`` rows if there are, as one record."""
        recs, sizes = [], []
        for rec, size in zip(self.records(), self._sizes, strict=False):
            recs.append(rec)
            sizes.append(size)
            if sum(sizes) >= limit:
                break
        return _concat(recs, sizes)

    def sample(self, size: int, gen: torch.Generator,
               over: Literal["all_rows", "one_record"] = "one_record") -> dict:
        """A random minibatch of ``size`` rows drawn without replacement from every captured
        row (``"all_rows"``) or from one random captured batch (``"one_record"``)."""
        if over == "one_record":
            i = int(torch.randint(len(self._sizes), (1,), generator=gen))
            n = self._sizes[i]
            idx = torch.randperm(n, generator=gen)[: min(size, n)]
            return select_rows(self.record(i), idx, n) | {"n": len(idx)}
        return self.rows(torch.randperm(len(self), generator=gen)[: min(size, len(self))])

    def rows(self, rows: Tensor) -> dict:
        """The captured rows at positions ``rows`` (0..len-1, in capture order) as one
        record, each stored batch read once."""
        starts = torch.tensor([0] + self._sizes, device="cpu").cumsum(0)
        which = torch.bucketize(rows, starts[1:], right=True)
        recs, sizes = [], []
        for i in which.unique().tolist():  # each record read once, in storage order
            local = rows[which == i] - starts[i]
            recs.append(select_rows(self.record(i), local, self._sizes[i]))
            sizes.append(len(local))
        return _concat(recs, sizes) | {"n": len(rows)}

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@torch.no_grad()
def capture(qmodel: nn.Module, fpmodel: nn.Module, name: str, batches: BatchIter,
            where: Literal["disk", "memory"] = "disk") -> BlockData:
    """Inputs of block ``name`` in ``qmodel`` (earlier blocks quantized) and its output in
    ``fpmodel``, for every calibration batch."""
    data = BlockData(where, next(qmodel.parameters()).device)
    qblock, fblock = qmodel.get_submodule(name), fpmodel.get_submodule(name)
    got: dict = {}

    def grab_in(module, args, kwargs):
        got["args"], got["kwargs"] = _detach(args), _detach(kwargs)
        raise _Stop

    def grab_out(module, args, kwargs, out):
        got["target"] = block_output(out).detach()
        raise _Stop

    hq = qblock.register_forward_pre_hook(grab_in, with_kwargs=True)
    hf = fblock.register_forward_hook(grab_out, with_kwargs=True)
    try:
        for x, t, cond, idx in batches():
            for model in (qmodel, fpmodel):
                try:
                    denoise(model, x, t, cond)
                except _Stop:
                    pass
            data.add({"args": got["args"], "kwargs": got["kwargs"], "target": got["target"],
                      "t": t, "index": idx})
    finally:
        hq.remove()
        hf.remove()
    return data


def sample_error(out: Tensor, target: Tensor, p: float = 2.0) -> Tensor:
    """Per-sample reconstruction error (N,): |out - target|^p summed over channels and
    averaged over the other dimensions, as in BRECQ/Q-Diffusion (the scale their learning
    rates and rounding-loss weight were set for)."""
    d = (out - target).abs().pow(p)
    return (d.sum(1) if d.dim() > 1 else d).reshape(len(d), -1).mean(1)


def weighted_error(out: Tensor, target: Tensor, weights: Tensor | None, p: float = 2.0) -> Tensor:
    """:func:`sample_error` averaged over samples with the sample weights (uniform: a plain
    mean)."""
    err = sample_error(out, target, p)
    if weights is None:
        return err.mean()
    return (err * weights).sum() / weights.sum().clamp_min(1e-12)


def block_forward(block: nn.Module, rec: dict) -> Tensor:
    with timestep_context(rec["t"]):
        return block_output(block(*rec["args"], **rec["kwargs"]))


@torch.no_grad()
def block_error(block: nn.Module, data: BlockData, limit: int) -> float:
    """Mean squared error of the block against its FP target over up to ``limit`` samples."""
    total, n = 0.0, 0
    for rec in data.records():
        err = (block_forward(block, rec) - rec["target"]).pow(2).flatten(1).mean(1)
        total += err.sum().item()
        n += len(err)
        if n >= limit:
            break
    return total / max(n, 1)


def block_layers(block: nn.Module) -> list[QuantLayer]:
    return [m for m in block.modules() if isinstance(m, QuantLayer)]


def block_act_quantizers(block: nn.Module) -> list[FakeQuantizer]:
    return [m for n, m in block.named_modules()
            if isinstance(m, FakeQuantizer) and ".weight_quantizers." not in f".{n}."
            and m.calibrated]


def _lookup(weights: Tensor | None, index: Tensor) -> Tensor | None:
    # the weights stay where they are (the model's device, beside the loss they scale); a
    # record read back from the disk cache brings its index on the CPU
    return None if weights is None else weights[index.to(weights.device)]


def split_reg_scales(layers: list[QuantLayer], rule: str) -> list[float]:
    """The rounding-regulariser weight of each AdaRound quantizer of ``layers`` (in
    ``use_adaround`` order): 1 everywhere, except the two halves of a split shortcut conv
    under ``rule`` (see :attr:`ReconConfig.split_reg`)."""
    scales: list[float] = []
    for lay in layers:
        n = len(lay.weight_quantizers)
        if isinstance(lay, SplitQuantConv2d) and rule != "sum":
            c_in = lay.fp.in_channels
            scales += [1.0, 0.0] if rule == "first" else [lay.split / c_in,
                                                          (c_in - lay.split) / c_in]
        else:
            scales += [1.0] * n
    return scales


def with_rounding_term(loss: Tensor, regularised: list[tuple[float, Any]],
                       reg_weight: float, beta: float | None) -> Tensor:
    """``loss`` plus AdaRound's rounding regulariser of each ``(scale, quantizer)`` at
    ``beta``, weighted by ``reg_weight``; ``loss`` alone during the warm-up (``beta`` None)."""
    if beta is None:
        return loss
    return loss + reg_weight * sum(s * q.rounding_regularizer(beta) for s, q in regularised)


def adaround(quantizers: list, loss_fn: Callable[[], Tensor], cfg: ReconConfig,
             progress: bool = False, desc: str = "  adaround",
             reg_scales: list[float] | None = None) -> None:
    """Optimise the AdaRound variables of ``quantizers`` on ``loss_fn()`` (a fresh minibatch
    loss per call) plus the rounding regulariser, annealed after the warm-up and weighted
    per quantizer by ``reg_scales`` (default 1); ends with hard rounding. Shared by block
    and temporal reconstruction."""
    scales = [1.0] * len(quantizers) if reg_scales is None else reg_scales
    if len(scales) != len(quantizers):
        raise ValueError(f"{len(scales)} regulariser weights for {len(quantizers)} quantizers")
    regularised = [(s, q) for s, q in zip(scales, quantizers, strict=True) if s != 0]
    opt = torch.optim.Adam([q.alpha for q in quantizers], lr=cfg.weight_lr)
    steps = range(cfg.weight_iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False, mininterval=2)
    for q in quantizers:  # soft, recomputing the soft weight's steps in backward
        q.set_soft(True, recompute=True)
    for step in steps:
        with torch.enable_grad():
            beta = annealed_beta(step + 1, cfg.weight_iters, cfg.warmup, cfg.beta_start,
                                 cfg.beta_end)
            loss = with_rounding_term(loss_fn(), regularised, cfg.reg_weight, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    for q in quantizers:
        q.set_soft(False)


def adaround_block(block: nn.Module, data: BlockData, cfg: ReconConfig,
                   weights: Tensor | None = None, progress: bool = False) -> dict[str, float]:
    """AdaRound the not-yet-frozen layers of ``block`` (activations off); returns the block
    output error with round-to-nearest and after AdaRound, both with hard rounding."""
    layers = [lay for lay in block_layers(block) if lay.frozen_weight is None]
    if not layers:
        return {}
    for lay in layers:
        lay.set_mode("weight")
    rtn = block_error(block, data, cfg.eval_samples)
    quantizers = [q for lay in layers for q in lay.use_adaround()]
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss() -> Tensor:
        rec = data.sample(cfg.batch_size, gen, cfg.minibatch)
        return weighted_error(block_forward(block, rec), rec["target"],
                              _lookup(weights, rec["index"]))

    adaround(quantizers, loss, cfg, progress, reg_scales=split_reg_scales(layers, cfg.split_reg))
    after = block_error(block, data, cfg.eval_samples)
    for lay in layers:
        lay.freeze_weights()
    for q in quantizers:  # the folded weights are kept; V and the grid floor are not needed
        q.release()
    return {"rtn_error": rtn, "adaround_error": after}


def fit_adam(param_groups: list[dict], loss_fn: Callable[[], Tensor], iters: int, *,
             after_step: Callable[[], None] | None = None, progress: bool = False,
             desc: str = "") -> None:
    """The loop every learned quantization parameter shares (activation steps, TDQ's
    step-size MLPs, APQ-DM's groups): Adam on ``param_groups`` (each with its ``lr``),
    cosine decay to 0 over ``iters`` steps of ``loss_fn()``; ``after_step`` runs after each
    step without gradients (e.g. to keep step sizes positive)."""
    opt = torch.optim.Adam(param_groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    steps = range(iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False, mininterval=2)
    for _ in steps:
        with torch.enable_grad():
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()


def fit_act_steps(quantizers: list[FakeQuantizer], loss_fn: Callable[[], Tensor],
                  cfg: ReconConfig, progress: bool = False, desc: str = "  act steps") -> None:
    """LSQ-style: make the step sizes of ``quantizers`` parameters, fit them on ``loss_fn()``
    with Adam and cosine decay, then make them buffers again. Shared by block and
    temporal reconstruction."""
    for q in quantizers:
        q.learn_scale(True)
    params = [q.scale for q in quantizers]

    def positive() -> None:  # a step size must stay positive
        for p in params:
            p.clamp_(min=1e-8)

    fit_adam([{"params": params, "lr": cfg.act_lr}], loss_fn, cfg.act_iters,
             after_step=positive, progress=progress, desc=desc)
    for q in quantizers:
        q.learn_scale(False)


def learn_act_steps(block: nn.Module, data: BlockData, cfg: ReconConfig,
                    weights: Tensor | None = None, progress: bool = False) -> dict[str, float]:
    """LSQ-style: make the block's activation step sizes parameters and fit them with the
    Lp block loss (Adam, cosine decay); returns the block error before and after."""
    quantizers = block_act_quantizers(block)
    if not quantizers or cfg.act_iters == 0:
        return {}
    before = block_error(block, data, cfg.eval_samples)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def loss() -> Tensor:
        rec = data.sample(cfg.batch_size, gen, cfg.minibatch)
        return weighted_error(block_forward(block, rec), rec["target"],
                              _lookup(weights, rec["index"]), p=cfg.act_p)

    fit_act_steps(quantizers, loss, cfg, progress)
    return {"act_before": before, "act_after": block_error(block, data, cfg.eval_samples)}


@dataclass
class BlockResult:
    block: str
    kind: str
    samples: int
    metrics: dict[str, float]


#: Fits one block on its captured data: ``(block module, data, sample weights or None)``
#: -> metrics. The block walk (:func:`walk_blocks`) calls it for every block it visits.
BlockFit = Callable[[nn.Module, "BlockData", "Tensor | None"], dict[str, float]]


def walk_blocks(
    qmodel: nn.Module,
    fpmodel: nn.Module,
    adapter: ModelAdapter,
    batches: BatchIter,
    fit: BlockFit,
    *,
    mode: Literal["weight", "full"],
    cache: Literal["disk", "memory"] = "disk",
    blocks: list[Block] | None = None,
    select: Callable[[nn.Module], bool] | None = None,
    weight_fn: WeightFn | None = None,
    progress: str | None = None,
) -> list[BlockResult]:
    """The one block loop of every reconstruction method: walk the blocks in forward order,
    capture each block's inputs from ``qmodel`` (its earlier blocks already quantized) and
    its targets from ``fpmodel``, and ``fit`` it. ``mode`` is the quantization mode the
    captures run in; ``select`` skips blocks it returns False for (default: blocks with
    any quantized layer or activation quantizer); ``weight_fn`` gives per-sample loss
    weights; ``progress`` is a progress-bar label (None: silent). Temporal blocks are
    reconstructed by :mod:`gaq.temporal`, never here."""
    from gaq.quantize import set_mode

    blocks = adapter.blocks() if blocks is None else blocks
    set_mode(qmodel, mode)
    results = []
    it = blocks
    if progress is not None:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc=progress, unit="block")
    for block in it:
        if block.kind == "temporal":
            continue  # reconstructed by gaq.temporal, not by block replay
        module = qmodel.get_submodule(block.name)
        wanted = select(module) if select is not None else bool(
            block_layers(module) or block_act_quantizers(module))
        if not wanted:
            continue
        data = capture(qmodel, fpmodel, block.name, batches, cache)
        try:
            weights = weight_fn(block, data) if weight_fn is not None else None
            metrics = fit(module, data, weights)
            results.append(BlockResult(block.name, block.kind, len(data), metrics))
        finally:
            data.close()
    return results


def reconstruct(
    qmodel: nn.Module,
    fpmodel: nn.Module,
    adapter: ModelAdapter,
    batches: BatchIter,
    cfg: ReconConfig,
    *,
    phase: Literal["weights", "activations"] = "weights",
    blocks: list[Block] | None = None,
    weight_fn: WeightFn | None = None,
    progress: bool = True,
) -> list[BlockResult]:
    """Reconstruct every block (``phase``: AdaRound of weights with activations off, or
    activation steps with everything quantized) through :func:`walk_blocks`."""

    def fit(module: nn.Module, data: BlockData, weights: Tensor | None) -> dict[str, float]:
        if phase == "activations":
            return learn_act_steps(module, data, cfg, weights, progress)
        metrics = adaround_block(module, data, cfg, weights, progress)
        for lay in block_layers(module):
            lay.set_mode("weight")
        return metrics

    return walk_blocks(qmodel, fpmodel, adapter, batches, fit,
                       mode="weight" if phase == "weights" else "full", cache=cfg.cache,
                       blocks=blocks, weight_fn=weight_fn,
                       progress=f"reconstruct {phase}" if progress else None)


def calib_batches(calib, batch_size: int, device: str | torch.device,
                  shuffle_seed: int | None = 0) -> BatchIter:
    """Adapt a :class:`~gaq.calibration.CalibrationSet` to the engine's batch iterator
    (training rows only; held-out rows are for validation), on ``device`` (the model's).

    Rows are shuffled once with ``shuffle_seed`` (the same order on every pass): the
    engine draws each minibatch from one captured batch, and a recorded set is ordered by
    timestep, so without it a minibatch would hold one or two timesteps, where the
    authors' code draws from the whole cached set. ``None`` keeps the recorded order.
    """
    train = calib.train()
    # the order indexes the calibration set, which lives on the host
    if shuffle_seed is None:
        order = torch.arange(len(train), device=train.x.device)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(shuffle_seed))

    def it() -> Iterator[Batch]:
        for idx in order.split(batch_size):
            b = train.subset(idx)
            cond = {k: v.to(device) for k, v in b.cond.items()}
            # the row index travels with the rows: per-row sample weights (GAQ) live on
            # the model's device and are looked up with it there
            yield b.x.to(device), b.t.to(device), cond, idx.to(device)

    return it

