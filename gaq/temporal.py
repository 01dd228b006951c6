"""Temporal-information reconstruction (TFMQ-DM, Huang et al. CVPR 2024), shared by the
TFMQ-DM baseline and GAQ.

The temporal layers (time-embedding MLP and every resnet's time projection; adaLN
linears for DiT) see only the timestep (and class label), never the image. So instead of
replaying them inside their blocks, they are AdaRounded *jointly* on the temporal
features themselves, ``Σ_i ‖ĝ_i(ĥ(t)) − g_i(h(t))‖²`` over the calibration timesteps,
with the quantized embedding feeding the quantized projections, then hard-rounded and
frozen. The block reconstruction that follows (``gaq.reconstruction.reconstruct``, which
skips the "temporal" unit) then sees the frozen quantized features.

The features depend on ``(t, class label)`` only, so the calibration rows are collapsed
to their distinct ``(t, cond)`` pairs; each pair's multiplicity becomes its weight, so the
loss is exactly the loss over the calibration rows, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaq.models.adapters import ModelAdapter
from gaq.quant import QuantLayer, timestep_context
from gaq.reconstruction import ReconConfig, adaround, fit_act_steps, weighted_error

__all__ = ["TEMPORAL_COND_KEYS", "TemporalData", "learn_temporal_act_steps",
           "reconstruct_temporal", "temporal_data", "temporal_error"]

# Denoiser inputs the temporal features depend on besides t (text embeddings do not).
TEMPORAL_COND_KEYS = ("class_labels", "timestep_cond")


@dataclass
class TemporalData:
    """Distinct ``(t, cond)`` pairs of a calibration set.

    ``t`` (U,), ``cond`` tensors with U rows, ``counts`` (U,) how many calibration rows
    share each pair, ``inverse`` (N,) the pair of each calibration row (so per-row
    weights, e.g. GAQ's, can be summed onto pairs).
    """

    t: Tensor
    cond: dict[str, Tensor]
    counts: Tensor
    inverse: Tensor

    def __len__(self) -> int:
        return len(self.t)

    def rows(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.t[idx], {k: v[idx] for k, v in self.cond.items()}

    def pair_weights(self, row_weights: Tensor | None) -> Tensor:
        """Per-pair weights: the sum of the rows' weights (uniform rows: the counts)."""
        if row_weights is None:
            return self.counts.float()
        w = torch.zeros(len(self), dtype=torch.float32, device=row_weights.device)
        return w.index_add_(0, self.inverse.to(row_weights.device), row_weights.float())


def temporal_data(calib) -> TemporalData:
    """Distinct ``(t, cond)`` pairs of the *training* rows of a calibration set (row
    order of ``calib.train()``, the order the block engine's sample weights use)."""
    train = calib.train()
    keys = [k for k in TEMPORAL_COND_KEYS if k in train.cond]
    n = len(train)
    # one float64 key row per calibration row; float64 holds timesteps and labels exactly
    cols = [train.t.reshape(n, 1).double()]
    cols += [train.cond[k].reshape(n, -1).double() for k in keys]
    key = torch.cat(cols, 1)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(counts),), n, dtype=torch.long, device=counts.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=counts.device), reduce="amin")
    return TemporalData(t=train.t[first], cond={k: train.cond[k][first] for k in keys},
                        counts=counts, inverse=inverse)


def temporal_error(out: dict[str, Tensor], target: dict[str, Tensor],
                   weights: Tensor | None) -> Tensor:
    """``Σ_i ‖ĝ_i − g_i‖²`` over the temporal features (channel-summed, sample-weighted)."""
    return sum(weighted_error(out[k], target[k], weights) for k in target)


def _features(adapter: ModelAdapter, model: nn.Module, data: TemporalData,
              idx: Tensor) -> dict[str, Tensor]:
    t, cond = data.rows(idx)
    device = next(model.parameters()).device
    t, cond = t.to(device), {k: v.to(device) for k, v in cond.items()}
    # a per-timestep quantizer in the path (full mode) needs the timestep published
    with timestep_context(t):
        return adapter.temporal_forward(model, t, cond)


def temporal_quant_layers(qmodel: nn.Module, adapter: ModelAdapter) -> list[QuantLayer]:
    """The adapter's temporal layers that are quantized and not yet frozen (skip rules may
    keep some FP; those are left alone)."""
    layers = [qmodel.get_submodule(n) for n in adapter.temporal_layers()]
    return [lay for lay in layers if isinstance(lay, QuantLayer) and lay.frozen_weight is None]


def _prepare(qmodel: nn.Module, data: TemporalData) -> TemporalData:
    device = next(qmodel.parameters()).device
    return TemporalData(data.t.to(device), {k: v.to(device) for k, v in data.cond.items()},
                        data.counts.to(device), data.inverse)


def learn_temporal_act_steps(qmodel: nn.Module, fpmodel: nn.Module, adapter: ModelAdapter,
                             source, cfg: ReconConfig, weights: Tensor | None = None
                             ) -> dict[str, float]:
    """The authors' second temporal phase: LSQ-style learning of the temporal layers'
    activation steps (every per-timestep row) on the same feature loss, weights frozen
    and every quantizer on (Adam ``act_lr``, cosine decay, ``act_p``)."""
    from gaq.quantize import set_mode

    data = _prepare(qmodel, source if isinstance(source, TemporalData)
                    else temporal_data(source))
    quantizers = [q for n in adapter.temporal_layers()
                  for lay in [qmodel.get_submodule(n)] if isinstance(lay, QuantLayer)
                  for q in lay.act_quantizers if q.calibrated]
    if not quantizers or cfg.act_iters == 0:
        return {}
    set_mode(qmodel, "full")
    every = torch.arange(len(data), device=data.t.device)
    with torch.no_grad():
        target = _features(adapter, fpmodel, data, every)
    counts = data.counts.float()
    pair_w = data.pair_weights(None if weights is None else weights.to(data.t.device))

    def error() -> float:
        with torch.no_grad():
            return float(temporal_error(_features(adapter, qmodel, data, every), target, counts))

    before = error()
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def loss() -> Tensor:
        idx = torch.randperm(len(data), generator=gen)[: cfg.batch_size].to(data.t.device)
        out = _features(adapter, qmodel, data, idx)
        return sum(weighted_error(out[k], target[k][idx], pair_w[idx], p=cfg.act_p)
                   for k in target)

    fit_act_steps(quantizers, loss, cfg)
    return {"act_before": before, "act_after": error()}


def reconstruct_temporal(qmodel: nn.Module, fpmodel: nn.Module, adapter: ModelAdapter,
                         source, cfg: ReconConfig, weights: Tensor | None = None,
                         progress: bool = False) -> dict[str, float]:
    """AdaRound the temporal layers of ``qmodel`` jointly on the temporal-feature loss,
    then hard-round and freeze them.

    ``source`` is a calibration set or a :class:`TemporalData`; ``weights`` optional
    per-row weights over the calibration *training* rows (as the block engine's), summed
    onto the distinct ``(t, cond)`` pairs. Returns the feature error (counts-weighted, so
    the mean over calibration rows) with round-to-nearest and after AdaRound, both hard.
    """
    from gaq.quantize import set_mode

    data = source if isinstance(source, TemporalData) else temporal_data(source)
    layers = temporal_quant_layers(qmodel, adapter)
    if not layers:
        return {}
    set_mode(qmodel, "weight")  # weights first, activations off (as the block engine)
    data = _prepare(qmodel, data)
    device = data.t.device
    every = torch.arange(len(data), device=device)
    with torch.no_grad():
        target = _features(adapter, fpmodel, data, every)
    counts = data.counts.float()
    pair_w = data.pair_weights(None if weights is None else weights.to(device))

    def error() -> float:
        with torch.no_grad():
            return float(temporal_error(_features(adapter, qmodel, data, every), target, counts))

    rtn = error()
    quantizers = [q for lay in layers for q in lay.use_adaround()]
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss() -> Tensor:
        idx = torch.randperm(len(data), generator=gen)[: cfg.batch_size].to(device)
        out = _features(adapter, qmodel, data, idx)
        return temporal_error(out, {k: v[idx] for k, v in target.items()}, pair_w[idx])

    adaround(quantizers, loss, cfg, progress, desc="  temporal adaround")
    after = error()
    for lay in layers:
        lay.freeze_weights()
    return {"rtn_error": rtn, "adaround_error": after, "layers": len(layers),
            "pairs": len(data)}
