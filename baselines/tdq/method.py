"""TDQ (So et al., NeurIPS 2023), PTQ variant: AdaRound block reconstruction for the
weights, then one small MLP per activation quantizer mapping the timestep to its step
size, fitted block by block with the reconstruction loss, then precomputed into a table.

No verified official code exists; the deliberate choices are listed in NOTES.md."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from gaq.config import MethodConfig, QuantConfig, non_negative_int, positive_float, positive_int
from gaq.errors import GaqError
from gaq.methods.base import Method, QuantResult
from gaq.methods.stages import (
    Run,
    finish,
    init_activations,
    reconstruct_weights,
    start,
    wrap,
)
from gaq.models.adapters import SkipRule
from gaq.quant.providers import TimestepScaleMLP
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

# Layers that see only the timestep (or sit at the image boundary): TDQ keeps them FP.
# The DiT names are the analogues (patch embedding, final projection, timestep embedder
# and adaLN modulation), since the paper only covers UNets.


@dataclass(frozen=True)
class TDQConfig(MethodConfig):
    """``recon`` drives the weight phase only (its ``act_*`` fields are unused: TDQ fits
    the step-size MLPs with the fields below instead of LSQ)."""

    VERSION: ClassVar[int] = 1
    recon: ReconConfig = field(default_factory=ReconConfig)
    mlp_hidden: int = 64
    embed_dim: int = 64
    iters: int = 5000
    lr: float = 1e-3
    batch_size: int = 32
    act_p: float = 2.4
    # Tables cover every integer timestep the scheduler can use, so any sampler schedule
    # (any number of steps) finds its rows.
    num_train_timesteps: int = 1000
    seed: int = 0

    def validate(self) -> None:
        for name in ("mlp_hidden", "batch_size", "num_train_timesteps"):
            positive_int(name, getattr(self, name))
        non_negative_int("iters", self.iters)
        non_negative_int("seed", self.seed)
        positive_float("lr", self.lr)
        positive_float("act_p", self.act_p)
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be even and >= 2, got {self.embed_dim}")


def attach_providers(qmodel: nn.Module, cfg: TDQConfig) -> int:
    """Condition every calibrated static activation quantizer on ``t``: the MLP starts at
    the static step size s0 (and the zero point stays the static one)."""
    n = 0
    # The hidden layers' initial weights come from the seed alone: drawn from the global
    # RNG they would depend on whatever ran before in the process (other benchmark cells),
    # and two runs of one cell would differ.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for _, q in act_quantizers(qmodel):
            if q.mode != "static":
                continue
            s0 = q.scale.detach().clamp_min(1e-8)  # an all-zero input could give Δ = 0
            mlp = TimestepScaleMLP(s0, cfg.embed_dim, cfg.mlp_hidden)  # on s0's device
            q.set_provider(mlp)
            n += 1
    return n


def _conditioned(block: nn.Module) -> list[FakeQuantizer]:
    return [q for q in block_act_quantizers(block) if q.mode == "conditioned"]


def fit_block(block: nn.Module, data: BlockData, cfg: TDQConfig,
              eval_samples: int) -> dict[str, float]:
    """Fit the step-size MLPs of the block's activation quantizers with the Lp block loss
    (Adam, cosine decay); the fake quantizer's straight-through rounding lets gradients
    reach the MLP through Δ(t). Keeps the initial MLPs if fitting made the block worse."""
    quantizers = _conditioned(block)
    if not quantizers or cfg.iters == 0:
        return {}
    providers = [q.provider for q in quantizers]
    initial = [copy.deepcopy(p.state_dict()) for p in providers]
    before = block_error(block, data, eval_samples)
    params = [p for prov in providers for p in prov.parameters()]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss() -> Tensor:
        rec = data.sample(cfg.batch_size, gen)
        return weighted_error(block_forward(block, rec), rec["target"], None, p=cfg.act_p)

    fit_adam([{"params": params, "lr": cfg.lr}], loss, cfg.iters)
    for p in params:
        p.requires_grad_(False)
    after = block_error(block, data, eval_samples)
    kept = after <= before
    if not kept:
        for prov, state in zip(providers, initial, strict=True):
            prov.load_state_dict(state)
    return {"act_before": before, "act_after": after, "fit_kept": float(kept)}


def fit_providers(run: Run, cfg: TDQConfig) -> None:
    """TDQ's own stage: walk the blocks in forward order (inputs from the model whose
    earlier blocks are already quantized, targets from the FP model) and fit each block's
    step-size MLPs."""
    run.blocks += walk_blocks(
        run.qmodel, run.fpmodel, run.adapter, run.batches(cfg.recon.capture_batch),
        lambda module, data, _weights: fit_block(module, data, cfg, cfg.recon.eval_samples),
        mode="full", cache=cfg.recon.cache, select=lambda module: bool(_conditioned(module)))


def freeze_providers(qmodel: nn.Module, timesteps: list[int]) -> int:
    """Precompute Δ(t) for ``timesteps`` into per-timestep tables: sampling then costs
    a table lookup, exactly as in conditioned mode (same per-row provider call)."""
    n = 0
    for _, q in act_quantizers(qmodel):
        if q.mode == "conditioned":
            q.freeze_to_table(timesteps)
            n += 1
    return n


class TDQ(Method):
    name = "tdq"
    label = "TDQ"
    Config = TDQConfig
    presets = {
        # AdaRound as BRECQ/Q-Diffusion (20k iterations); MLP as the authors' layout.
        "paper": TDQConfig(),
        # sized for the bundled 16x16 digits model on one CPU core: 83 s at W4A8 with the
        # bench-w4a8 calibration (10 timesteps x 32), one thread (NOTES.md)
        "cpu": TDQConfig(recon=ReconConfig(weight_iters=200, weight_lr=1e-2, capture_batch=40,
                                           cache="memory"),
                         iters=40, lr=1e-3, batch_size=32),
    }

    def skip(self, module: nn.Module, name: str, role: str | None) -> SkipRule | None:
        if role in ("input", "output"):
            return SkipRule("fp", "TDQ: input/output layer kept FP")
        if role in ("time_embed_in", "time_embed", "time_proj"):
            return SkipRule("fp", "TDQ: timestep embedding / time projection kept FP")
        return None

    def quantize(self, model: nn.Module, adapter, calib, quant: QuantConfig) -> QuantResult:
        run = start(self, model, adapter, calib, quant)
        cfg = self.config
        if quant.act.per_timestep:
            raise GaqError("TDQ conditions activation step sizes on t itself; use "
                           "act.per_timestep = false")
        seen = calib.timesteps()
        if seen and max(seen) >= cfg.num_train_timesteps:
            raise GaqError(f"calibration timesteps reach {max(seen)}, beyond "
                           f"num_train_timesteps = {cfg.num_train_timesteps}")
        wrap(run)
        if quant.weight.bits is not None:
            reconstruct_weights(run, cfg.recon, progress=False)
        init_activations(run, cfg.recon.capture_batch)
        conditioned = 0
        if run.quantizes_activations:
            conditioned = attach_providers(run.qmodel, cfg)
            fit_providers(run, cfg)
            freeze_providers(run.qmodel, list(range(cfg.num_train_timesteps)))
        set_mode(run.qmodel, "full")
        result = finish(run, conditioned_quantizers=conditioned)
        result.state["table_timesteps"] = cfg.num_train_timesteps
        return result
