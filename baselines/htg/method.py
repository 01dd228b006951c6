"""HTG (Ding et al., 2025): timestep-aware shift-and-scale of DiT layer inputs, timesteps
grouped by adjacency-constrained hierarchical clustering, the shift/scale folded into the
neighbouring layers, and activation quantization parameters shared within each group.

Pipeline: record per-timestep channel ranges of the smoothed inputs on the FP model;
cluster the timesteps into contiguous groups by their channel-shift vectors; compute per
group the channel shifts and one channel scale per input; fold them into a copy of the
model (:mod:`baselines.htg.smooth`); quantize that copy (weights per channel, optionally
AdaRound block reconstruction); calibrate one activation range per group and store it as
a per-timestep table whose rows within a group are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from baselines.htg.grouping import cluster_adjacent
from baselines.htg.smooth import FoldPlan, apply_fold, collect_ranges, plan_fold, shift_features
from gaq.config import ConfigError, MethodConfig, QuantConfig
from gaq.methods.base import Method, QuantResult
from gaq.methods.stages import finish, reconstruct_weights, start, wrap
from gaq.models.adapters import adapter_for
from gaq.quantize import act_quantizers, calibrate_activations, fill_tables
from gaq.reconstruction import ReconConfig


@dataclass(frozen=True)
class HTGConfig(MethodConfig):
    VERSION: ClassVar[int] = 1
    # timestep groups sharing shifts and activation ranges (capped at the calibrated count)
    n_groups: int = 10
    # migration strength of the channel scale s = a^alpha / w^(1 - alpha)
    alpha: float = 0.5
    shift: bool = True
    scale: bool = True
    # AdaRound block reconstruction of the (smoothed) weights; False: per-channel rounding
    weight_recon: bool = True
    recon: ReconConfig = field(default_factory=ReconConfig)
    # forward batch of the range statistics and activation calibration
    batch_size: int = 32
    # timestep count of the per-group lookup (the scheduler's num_train_timesteps): any
    # sampler timestep in [0, T) finds the group of its nearest calibrated timestep
    num_train_timesteps: int = 1000

    def validate(self) -> None:
        super().validate()
        if self.n_groups < 1:
            raise ConfigError("n_groups", f"must be >= 1, got {self.n_groups}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must lie in [0, 1], got {self.alpha}")
        if self.batch_size < 1 or self.num_train_timesteps < 1:
            raise ConfigError("batch_size", "batch_size and num_train_timesteps must be >= 1")


class HTG(Method):
    name = "htg"
    label = "HTG"
    color = (0.62, 0.46, 0.0)  # dark gold: no palette tone, readable on white
    Config = HTGConfig
    archs = frozenset({"DiT"})
    presets = {
        "paper": HTGConfig(),
        # sized for the bundled digits-dit on one CPU thread
        "cpu": HTGConfig(n_groups=4, recon=ReconConfig(weight_iters=200)),
    }

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        """Static per-tensor activation calibration per group (the groups become table rows
        afterwards), so the per-timestep observer is off."""
        if quant.act.bits is None:
            return quant
        return replace(quant, act=replace(quant.act, per_timestep=False))

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        cfg = self.config
        run = start(self, model, adapter, calib, quant)
        plan = self.plan(model, calib)
        # everything after the fold works on the folded copy: its layers are quantized
        run.fpmodel = apply_fold(model, plan)
        run.adapter = adapter_for(run.fpmodel)
        wrap(run)
        if cfg.weight_recon and run.quant.weight.bits is not None:
            reconstruct_weights(run, cfg.recon)
        if run.quantizes_activations:
            calibrate_groups(run.qmodel, calib.train(), plan, cfg.batch_size)
        result = finish(run, htg_groups=len(plan.groups))
        result.state["htg"] = plan.to_dict()
        return result

    @classmethod
    def prepare_restore(cls, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """The fold re-applied to a fresh FP ``model`` (from the plan saved in the state):
        the folded biases and the FP weights of the folded layers are not among the
        tensors ``save_state`` keeps, and the saved quantized layers were built on them."""
        return apply_fold(model, FoldPlan.from_dict(state["htg"]))

    def plan(self, model: nn.Module, calib) -> FoldPlan:
        """The fold: per-timestep ranges on the FP model, groups, shifts and scales."""
        cfg = self.config
        train = calib.train()
        ranges = collect_ranges(model, train, cfg.batch_size)
        timesteps = train.timesteps()
        if not ranges:
            groups = [list(range(len(timesteps)))]
        else:
            feats = shift_features(ranges, timesteps)
            groups = cluster_adjacent(feats, min(cfg.n_groups, len(timesteps)))
        return plan_fold(model, ranges, groups, timesteps, cfg.alpha, cfg.num_train_timesteps,
                         shift=cfg.shift, scale=cfg.scale)


@torch.no_grad()
def calibrate_groups(qmodel: nn.Module, train, plan: FoldPlan, batch_size: int) -> None:
    """One static activation range per quantizer and timestep group (observed on that
    group's rows, full-precision activations upstream), written as per-timestep tables:
    every timestep ``0..T-1`` gets its group's row."""
    from gaq.calibration import forward_loop

    per_group: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for members in plan.groups:
        ts = torch.as_tensor([plan.timesteps[i] for i in members], dtype=torch.long,
                             device=train.t.device)
        rows = train.subset(torch.isin(train.t, ts))
        calibrate_activations(qmodel, forward_loop(rows, batch_size))
        per_group.append({n: (q.scale.detach().clone(), q.zero_point.detach().clone())
                          for n, q in act_quantizers(qmodel)})
    for name, q in act_quantizers(qmodel):
        ts, scales, zps = [], [], []
        for g, members in enumerate(plan.groups):
            for i in members:
                ts.append(plan.timesteps[i])
                scales.append(per_group[g][name][0])
                zps.append(per_group[g][name][1])
        q.set_table(ts, torch.stack(scales), torch.stack(zps))
    # nearest calibrated timestep, as the group lookup of the folded biases resolves it
    fill_tables(qmodel, list(range(plan.num_timesteps)))
