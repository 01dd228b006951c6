"""APQ-DM (Wang et al., CVPR 2024): group-wise activation quantizers across timesteps.

Weights: AdaRound block reconstruction (the shared engine). Activations: the sampling
timesteps are split into ``groups`` groups; every group owns one ``(Δ, z)`` per activation
quantizer. Which timestep belongs to which group is searched differentiably, block by
block: each timestep holds importance logits over the groups, the quantized activation is
the softmax-weighted mix of the groups' quantized outputs, and logits and group step sizes
are learned together on the block reconstruction loss plus an entropy penalty that pushes
every timestep towards one group. Each timestep then takes its most important group.

The result is stored in the per-timestep activation tables (one row per sampling
timestep, rows of one group identical), so sampling, saving and loading need nothing new.
Calibration timesteps can be chosen by the ``"srm"`` calibration protocol
(:mod:`baselines.apqdm.srm`, registered in :data:`gaq.calibration.PROTOCOLS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from gaq.config import ConfigError, MethodConfig, QuantConfig, positive_float, positive_int
from gaq.methods.base import Method, QuantResult
from gaq.methods.stages import (
    Run,
    finish,
    init_activations,
    reconstruct_weights,
    start,
    timestep_tables,
    wrap,
)
from gaq.quant.context import current_timestep, timesteps_per_row
from gaq.quant.fake import channel_view, fake_quantize, qparams_from_range
from gaq.quant.quantizer import FakeQuantizer
from gaq.quantize import act_quantizers, set_mode
from gaq.reconstruction import (
    BlockData,
    ReconConfig,
    block_act_quantizers,
    block_error,
    block_forward,
    fit_adam,
    walk_blocks,
    weighted_error,
)


@dataclass(frozen=True)
class APQDMConfig(MethodConfig):
    """``recon`` drives the AdaRound weight phase; its ``act_iters``, ``act_lr``, ``act_p``
    and ``batch_size`` drive the group search (so a benchmark's recon overrides size both).
    ``entropy_weight`` is relative to the reconstruction loss (the penalty is
    ``entropy_weight · loss · H/log K``), so it needs no retuning across models."""

    VERSION: ClassVar[int] = 1
    recon: ReconConfig = field(default_factory=ReconConfig)
    groups: int = 8
    entropy_weight: float = 0.1
    logit_lr: float = 0.05
    # initial logit of a timestep's own contiguous group (others 0): a non-uniform start,
    # else every timestep would see the same mix and the groups would never separate
    init_logit: float = 2.0
    first_last: Literal["w8a8", "fp", "quantized"] = "w8a8"

    def validate(self) -> None:
        super().validate()
        positive_int("groups", self.groups)
        positive_float("logit_lr", self.logit_lr)
        if not (math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            raise ConfigError("entropy_weight", f"must be >= 0, got {self.entropy_weight!r}")
        if not math.isfinite(self.init_logit):
            raise ConfigError("init_logit", f"must be finite, got {self.init_logit!r}")


# --------------------------------------------------------------------------------------
# Group-wise quantizers.
# --------------------------------------------------------------------------------------


def _union_params(q: FakeQuantizer, rows: Tensor) -> tuple[Tensor, Tensor]:
    """One ``(Δ, z)`` covering the ranges of the table rows ``rows`` (as if the group had
    been calibrated on all of their data with a min/max observer)."""
    scale, zp = q.scale.detach()[rows], q.zero_point.detach()[rows]
    if q.symmetric or q.unsigned:  # zero point fixed at 0: the widest step covers all
        return scale.max(0).values, torch.zeros_like(zp[0])
    lo = ((q.qmin - zp) * scale).min(0).values
    hi = ((q.qmax - zp) * scale).max(0).values
    return qparams_from_range(lo, hi, q.bits, symmetric=False)


class GroupSearch(nn.Module):
    """The search state of one table quantizer: K group ``(Δ, z)`` and (T, K) importance
    logits over its T table timesteps. While attached, the quantizer is disabled (identity)
    and a forward hook replaces its output with the softmax-weighted group mix."""

    def __init__(self, q: FakeQuantizer, groups: int, init_logit: float) -> None:
        super().__init__()
        self.q = [q]  # a list: not a submodule of the search state
        t = q.timesteps.numel()
        k = min(groups, t)
        # table rows are sorted by timestep
        chunks = torch.arange(t, device=q.scale.device).tensor_split(k)
        params = [_union_params(q, rows) for rows in chunks]
        self.scale = nn.Parameter(torch.stack([p[0] for p in params]))
        self.register_buffer("zero_point", torch.stack([p[1] for p in params]))
        logits = torch.zeros(t, k, device=q.scale.device)
        for g, rows in enumerate(chunks):
            logits[rows.to(logits.device), g] = init_logit
        self.logits = nn.Parameter(logits)
        self._handle = None

    def attach(self) -> None:
        q = self.q[0]
        q.disable()
        self._handle = q.register_forward_hook(lambda _m, args, _out: self.mix(args[0]))

    def detach_(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.q[0].enable()

    def weights(self) -> Tensor:
        return self.logits.softmax(-1)

    def entropy(self) -> Tensor:
        """Mean entropy of the timesteps' group weights, divided by log K (in [0, 1])."""
        w = self.weights()
        k = w.shape[1]
        if k == 1:
            return w.new_zeros(())
        return -(w * w.clamp_min(1e-12).log()).sum(-1).mean() / math.log(k)

    def mix(self, x: Tensor) -> Tensor:
        q = self.q[0]
        t = current_timestep()
        if t is None:
            raise RuntimeError("the group search needs the timestep context")
        ts = torch.as_tensor(t, device=q.timesteps.device).reshape(-1)
        rows = q._rows(ts)  # the table rows of the batch's timesteps
        w = self.weights()[rows]  # (B or 1, K)
        if w.shape[0] > 1:
            w = w[timesteps_per_row(torch.arange(w.shape[0], device=w.device), x.shape[0])]
        w = w.reshape(w.shape[0], w.shape[1], *([1] * (x.ndim - 1)))
        out = 0
        for g in range(self.scale.shape[0]):
            s = channel_view(self.scale[g], x.ndim, q.axis)
            z = channel_view(self.zero_point[g], x.ndim, q.axis)
            out = out + w[:, g] * fake_quantize(x, s, z, q.qmin, q.qmax)
        return out

    @torch.no_grad()
    def harden(self) -> Tensor:
        """Give every table row its most important group's ``(Δ, z)``; returns the
        assignment (T,)."""
        q = self.q[0]
        assign = self.logits.argmax(-1)
        q.set_table(q.timesteps.clone(), self.scale.detach()[assign].clamp_min(1e-8),
                    self.zero_point[assign])
        return assign


def _tables(quantizers: list[FakeQuantizer]) -> list[FakeQuantizer]:
    return [q for q in quantizers if q.mode == "table" and q.timesteps.numel() > 1]


def search_block(block: nn.Module, data: BlockData, cfg: APQDMConfig) -> dict[str, float]:
    """Differentiable group search for the table quantizers of ``block``: Adam on the
    group step sizes (``recon.act_lr``, cosine decay) and on the importance logits
    (``logit_lr``), loss = block Lp error · (1 + ``entropy_weight`` · mean normalised
    entropy); then hard assignment. Returns the block error before (one row per
    timestep), with the soft mix, and after hardening."""
    rc = cfg.recon
    quantizers = _tables(block_act_quantizers(block))
    if not quantizers:
        return {}
    before = block_error(block, data, rc.eval_samples)
    searches = [GroupSearch(q, cfg.groups, cfg.init_logit) for q in quantizers]
    for s in searches:
        s.attach()
    try:
        gen = torch.Generator().manual_seed(rc.seed + 2)

        def loss() -> Tensor:
            rec = data.sample(rc.batch_size, gen, rc.minibatch)
            rec_loss = weighted_error(block_forward(block, rec), rec["target"], None,
                                      p=rc.act_p)
            ent = torch.stack([s.entropy() for s in searches]).mean()
            # relative penalty: the entropy term keeps its weight whatever the block's
            # error scale is
            return rec_loss + cfg.entropy_weight * rec_loss.detach() * ent

        def positive() -> None:
            for s in searches:
                s.scale.clamp_(min=1e-8)

        fit_adam([{"params": [s.scale for s in searches], "lr": rc.act_lr},
                  {"params": [s.logits for s in searches], "lr": cfg.logit_lr}],
                 loss, rc.act_iters, after_step=positive)
        soft = block_error(block, data, rc.eval_samples)
        with torch.no_grad():
            entropy = float(torch.stack([s.entropy() for s in searches]).mean())
    finally:
        for s in searches:
            s.detach_()
    used = [int(s.harden().unique().numel()) for s in searches]
    return {"act_before": before, "act_soft": soft,
            "act_after": block_error(block, data, rc.eval_samples),
            "entropy": entropy, "groups_used": sum(used) / len(used)}


def search_groups(run: Run, cfg: APQDMConfig) -> None:
    """APQ-DM's stage: the group search block by block in forward order (inputs from the
    model whose earlier blocks are already grouped, targets from the FP model), then every
    table quantizer no block covered gets its contiguous initial grouping."""
    searched: set[int] = set()

    def fit(module: nn.Module, data: BlockData, _weights: Tensor | None) -> dict[str, float]:
        searched.update(id(q) for q in _tables(block_act_quantizers(module)))
        return search_block(module, data, cfg)

    run.blocks += walk_blocks(run.qmodel, run.fpmodel, run.adapter,
                              run.batches(cfg.recon.capture_batch), fit, mode="full",
                              cache=cfg.recon.cache,
                              select=lambda module: bool(_tables(block_act_quantizers(module))))
    for q in _tables([q for _, q in act_quantizers(run.qmodel)]):
        if id(q) not in searched:
            GroupSearch(q, cfg.groups, cfg.init_logit).harden()


# --------------------------------------------------------------------------------------
# The method.
# --------------------------------------------------------------------------------------


class APQDM(Method):
    name = "apqdm"
    label = "APQ-DM"
    color = (0.0, 0.45, 0.45)  # dark teal: no palette tone, readable on white
    Config = APQDMConfig
    presets = {
        # AdaRound as BRECQ/Q-Diffusion (20k weight iterations); 8 groups as the authors'
        # code's group_num; 5000 search iterations (the engine's act_iters)
        "paper": APQDMConfig(),
        # sized for the bundled digits model on one CPU thread (NOTES.md)
        "cpu": APQDMConfig(recon=ReconConfig(weight_iters=200, act_iters=30), groups=4),
    }

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        """Per-timestep activation tables (one row per timestep; a group's rows equal)."""
        quant = replace(quant, first_last=self.config.first_last)
        if quant.act.bits is None:
            return quant
        return replace(quant, act=replace(quant.act, per_timestep=True))

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        cfg = self.config
        run = start(self, model, adapter, calib, quant)
        wrap(run)
        if run.quant.weight.bits is not None:
            reconstruct_weights(run, cfg.recon, progress=False)
        init_activations(run, cfg.recon.capture_batch)
        if run.quantizes_activations:
            search_groups(run, cfg)
            timestep_tables(run)  # uncalibrated sampler steps: the nearest timestep's group
        set_mode(run.qmodel, "full")
        return finish(run)
