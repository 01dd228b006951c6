"""Timestep-aware shift-and-scale of DiT layer inputs, and its exact folding.

Two inputs per ada_norm_zero ``BasicTransformerBlock`` are smoothed: the attention input
(shared by ``to_q/to_k/to_v``) and the feed-forward input (``ff.net.0.proj``). Both are
``LN(x) * (1 + scale(c)) + shift(c)`` with ``shift``/``scale`` rows of the block's adaLN
linear ``norm1.linear``, so ``x̃ = (h - z_g) / s`` folds into that linear: its ``shift`` and
``scale`` rows are divided by ``s`` (static), and ``-z_g / s`` becomes a per-group bias of
its ``shift`` rows. The consumers take ``W·diag(s)`` (static) and the per-group bias
``b + W z_g``. ``z_g`` depends on the timestep group, so both per-group biases are tables
(:class:`GroupShifted`) indexed by the current timestep; nothing else changes at inference.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaq.errors import GaqError
from gaq.quant import attach_timestep_context
from gaq.quant.context import current_timestep

# adaLN-Zero chunk order (diffusers AdaLayerNormZero): shift_msa, scale_msa, gate_msa,
# shift_mlp, scale_mlp, gate_mlp
SITE_CHUNKS = {"attn": (0, 1), "ff": (3, 4)}
SITE_CONSUMERS = {"attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "ff": ("ff.net.0.proj",)}


class GroupShifted(nn.Module):
    """``layer(x) + table[group(t)]``: a per-timestep-group bias for ``layer``'s output,
    ``t`` the timestep of the enclosing denoiser call (:mod:`gaq.quant.context`)."""

    def __init__(self, layer: nn.Module, table: Tensor, group_of: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("table", table.detach().clone())
        self.register_buffer("group_of", group_of.detach().clone().long())

    # diffusers code that inspects the projection (dtype, shapes) sees the wrapped one
    @property
    def weight(self) -> Tensor:
        return self.layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.layer.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        t = current_timestep()
        if t is None:
            raise GaqError("an HTG-folded layer needs the denoiser's timestep: call the model "
                           "with timestep=... (its root publishes it) or inside "
                           "gaq.quant.timestep_context")
        T = self.group_of.numel()
        if isinstance(t, int):
            if not 0 <= t < T:
                raise GaqError(f"timestep {t} outside the HTG lookup [0, {T})")
            return y + self.table[self.group_of[t]].to(y.dtype)
        t = t.to(self.group_of.device)
        if bool(((t < 0) | (t >= T)).any()):
            raise GaqError(f"timesteps {t.tolist()} outside the HTG lookup [0, {T})")
        shift = self.table[self.group_of[t]].to(y.dtype)  # (B, C)
        return y + shift.view(shift.shape[0], *([1] * (y.ndim - 2)), shift.shape[1])


def smoothable_blocks(model: nn.Module) -> list[str]:
    """Names of the ada_norm_zero transformer blocks whose inputs HTG smooths."""
    return [name for name, mod in model.named_modules()
            if type(mod).__name__ == "BasicTransformerBlock"
            and getattr(mod, "norm_type", None) == "ada_norm_zero"
            and isinstance(getattr(getattr(mod, "norm1", None), "linear", None), nn.Linear)]


@torch.no_grad()
def collect_ranges(model: nn.Module, calib, batch_size: int) -> dict[str, dict[int, Tensor]]:
    """Per site (``"<block>.attn"``, ``"<block>.ff"``) and calibrated timestep, the
    per-channel minimum and maximum of the site's input over every row and token:
    ``{site: {t: (2, C)}}``, from the FP ``model`` on ``calib`` (a CalibrationSet)."""
    from gaq.calibration import forward_loop

    ranges: dict[str, dict[int, Tensor]] = defaultdict(dict)
    current: dict[str, Tensor] = {}

    def record(site: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo, hi = x.amin(0), x.amax(0)
            if site in current:
                lo, hi = torch.minimum(current[site][0], lo), torch.maximum(current[site][1], hi)
            current[site] = torch.stack([lo, hi])
        return hook

    handles = []
    for block in smoothable_blocks(model):
        for site, consumers in SITE_CONSUMERS.items():
            mod = model.get_submodule(f"{block}.{consumers[0]}")
            handles.append(mod.register_forward_pre_hook(record(f"{block}.{site}")))
    try:
        for t, rows in calib.by_timestep().items():
            current.clear()
            forward_loop(rows, batch_size)(model)
            for site, r in current.items():
                ranges[site][t] = r
    finally:
        for h in handles:
            h.remove()
    return dict(ranges)


def shift_features(ranges: dict[str, dict[int, Tensor]], timesteps: list[int]) -> Tensor:
    """One row per timestep: every site's channel shifts ``(max + min) / 2``, each site
    divided by its mean half-range so that wide layers do not dominate the distances."""
    parts = []
    for site in sorted(ranges):
        r = torch.stack([ranges[site][t] for t in timesteps])  # (T, 2, C)
        shift = (r[:, 0] + r[:, 1]) / 2
        half = ((r[:, 1] - r[:, 0]) / 2).mean().clamp(min=1e-8)
        parts.append(shift / half)
    return torch.cat(parts, dim=1)


@dataclass
class FoldPlan:
    """Everything the fold needs: calibrated timesteps, their groups, the timestep count of
    the lookup, and per site the channel scale ``s`` (C,) and group shifts ``z`` (G, C)."""

    timesteps: list[int]
    groups: list[list[int]]  # indices into ``timesteps``
    num_timesteps: int
    scale: dict[str, Tensor]
    shift: dict[str, Tensor]

    def to_dict(self) -> dict:
        """JSON-able (exact: float32 values survive the float64 round trip)."""
        return {"timesteps": list(self.timesteps), "groups": [list(g) for g in self.groups],
                "num_timesteps": self.num_timesteps,
                "scale": {k: v.tolist() for k, v in self.scale.items()},
                "shift": {k: v.tolist() for k, v in self.shift.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> FoldPlan:
        def f32(v) -> Tensor:
            return torch.tensor(v, dtype=torch.float32, device="cpu")  # apply_fold moves it
        return cls(list(d["timesteps"]), [list(g) for g in d["groups"]], int(d["num_timesteps"]),
                   {k: f32(v) for k, v in d["scale"].items()},
                   {k: f32(v) for k, v in d["shift"].items()})


def _consumer_weights(model: nn.Module, site: str) -> Tensor:
    block, _, kind = site.rpartition(".")
    return torch.cat([model.get_submodule(f"{block}.{c}").weight.detach().float()
                      for c in SITE_CONSUMERS[kind]])


def plan_fold(model: nn.Module, ranges: dict[str, dict[int, Tensor]], groups: list[list[int]],
              timesteps: list[int], alpha: float, num_timesteps: int,
              shift: bool = True, scale: bool = True) -> FoldPlan:
    """Per site: ``z_g`` the centre of the group's pooled per-channel range (0 with
    ``shift=False``), and a SmoothQuant-style channel scale ``s = a^α / w^(1-α)`` shared by
    all groups (it is folded into static weights), with ``a`` the largest half-range left
    after shifting (over groups) and ``w`` the largest consumer weight magnitude in that
    input channel (``s = 1`` with ``scale=False``)."""
    scales, shifts = {}, {}
    for site in sorted(ranges):
        r = torch.stack([ranges[site][t] for t in timesteps])  # (T, 2, C)
        lo = torch.stack([r[g, 0].amin(0) for g in groups])  # (G, C)
        hi = torch.stack([r[g, 1].amax(0) for g in groups])
        z = (hi + lo) / 2 if shift else torch.zeros_like(lo)
        a = torch.maximum(hi - z, z - lo).amax(0)
        if scale:
            w = _consumer_weights(model, site).abs().amax(0)
            s = a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
            s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
        else:
            s = torch.ones_like(a)
        scales[site], shifts[site] = s.float(), z.float()
    return FoldPlan(list(timesteps), [list(g) for g in groups], num_timesteps, scales, shifts)


@torch.no_grad()
def apply_fold(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """A copy of the FP ``model`` with ``plan`` folded in: the same function of its inputs
    (to float rounding), its smoothed layer inputs shifted and scaled. The copy publishes
    its timestep argument (the group tables read it)."""
    from baselines.htg.grouping import group_lookup

    model = copy.deepcopy(model)
    device = next(model.parameters()).device  # the plan's tables become the model's buffers
    group_of = group_lookup(plan.timesteps, plan.groups, plan.num_timesteps, device)
    ada_tables: dict[str, Tensor] = {}
    for site in sorted(plan.scale):
        block, _, kind = site.rpartition(".")
        s, z = plan.scale[site].to(device), plan.shift[site].to(device)
        ada = model.get_submodule(f"{block}.norm1.linear")
        if ada.bias is None:
            raise GaqError(f"{block}.norm1.linear has no bias: cannot fold HTG shifts")
        d = s.numel()
        sh, sc = (slice(i * d, (i + 1) * d) for i in SITE_CHUNKS[kind])
        dt = ada.weight.dtype
        ada.weight[sh] = (ada.weight[sh].float() / s[:, None]).to(dt)
        ada.bias[sh] = (ada.bias[sh].float() / s).to(dt)
        ada.weight[sc] = (ada.weight[sc].float() / s[:, None]).to(dt)
        ada.bias[sc] = ((ada.bias[sc].float() + 1) / s - 1).to(dt)  # (1 + scale) / s
        table = ada_tables.setdefault(
            block, torch.zeros(len(plan.groups), ada.out_features, device=device))
        table[:, sh] = -z / s
        for name in SITE_CONSUMERS[kind]:
            lin = model.get_submodule(f"{block}.{name}")
            w = lin.weight.float()
            bias_table = z @ w.T  # W z_g, computed with the unscaled weight
            lin.weight.copy_((w * s[None, :]).to(lin.weight.dtype))
            _replace(model, f"{block}.{name}", GroupShifted(lin, bias_table, group_of))
    for block, table in ada_tables.items():
        ada = model.get_submodule(f"{block}.norm1.linear")
        _replace(model, f"{block}.norm1.linear", GroupShifted(ada, table, group_of))
    attach_timestep_context(model)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
