"""GAQ's tuning study: which meta-learning settings lower the error GAQ exists to lower.

GAQ learns ω by lowering a one-step proxy (the meta objective L_VAL on validation rows).
What it is for is the reconstructed block's error on rows it never saw. This study
measures both, per setting, on real blocks of a bundled model:

1. a calibration set with three disjoint groups of trajectories: training rows (AdaRound
   and the meta step train on them), validation rows (X^V, as GAQ draws them) and test
   rows (neither touches them);
2. GAQ's pipeline up to each studied block (temporal unit, earlier blocks reconstructed
   with uniform weights, as ``gaq-uniform`` would), then, on copies of the block, for
   every AdaRound seed: AdaRound with uniform ω once, and for every setting ω learned by
   the meta step and AdaRound with it at the same seed;
3. per (setting, block, seed): the meta objective at uniform and at learned ω (the
   setting's own objective, mean over fixed minibatches), and the block's error on the
   test rows after AdaRound with learned and with uniform ω; and ω's spread.

``gaq tune-gaq`` runs it and writes ``study.json`` (every row), ``study.md`` (per setting:
mean relative change of the held-out error with a 95 % t interval over blocks × seeds,
of the meta objective, and ω's spread) and ``proxy_vs_heldout.png`` (does the proxy
predict the target?). The protocol and how the defaults were read from it are in
``gaq/METHOD.md`` ("Tuning study").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gaq.meta import (
    MetaConfig,
    MetaProblem,
    inner_parameters,
    learn_weights,
    rounding_view,
    timestep_groups,
    weight_spread,
)
from gaq.methods.gaq import _batches, heldout_error
from gaq.reconstruction import BlockData, block_layers, capture

__all__ = ["SETTINGS", "Setting", "StudyConfig", "chosen", "headline", "proxy_correlation",
           "render", "run_study", "seed_spread", "summarise", "write"]


@dataclass(frozen=True)
class Setting:
    """One point of the study: changes to the base :class:`MetaConfig`."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)


# The base is the paper's objective at the cpu preset's budget; each other setting changes
# one factor. The factors are the meta budget (learning rate, iterations, minibatch
# coverage), τ (the paper's ablation values), the matching term's weight and scale, and the
# inner step η. Each is moved only in the direction that lets ω move further: at the base ω
# already stays within a factor of about two of uniform, so smaller steps, fewer
# iterations or a larger τ than these could only bring it closer to uniform weights.
SETTINGS: tuple[Setting, ...] = (
    Setting("base"),
    Setting("minibatch scale", {"matching_scale": "minibatch"}),
    Setting("no L_GM", {"matching": False}),
    Setting("lr 0.3", {"lr": 0.3}),
    Setting("lr 1", {"lr": 1.0}),
    Setting("epochs 1", {"coverage": "epochs", "iters": 10}),
    Setting("epochs 3", {"coverage": "epochs", "iters": 30}),
    Setting("tau 0.2", {"tau": 0.2}),
    Setting("tau 0.5", {"tau": 0.5}),
    Setting("tau 2", {"tau": 2.0}),
    Setting("matching_weight 10", {"matching_weight": 10.0}),
    Setting("inner_lr 0.1", {"inner_lr": 0.1}),
)


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs on. ``blocks`` blocks are studied, spread evenly over the
    reconstruction order (first and last included)."""

    model: str = "digits"
    bits: str = "W4A8"
    steps: int = 20
    interval: int = 2
    train_trajectories: int = 32
    test_trajectories: int = 40
    blocks: int = 3
    seeds: tuple[int, ...] = (0, 1)
    weight_iters: int = 200  # AdaRound iterations per block (GAQ's cpu preset)
    eval_minibatches: int = 4  # fixed minibatches the meta objective is averaged over
    base: MetaConfig = field(default_factory=lambda: MetaConfig(
        iters=8, batch_size=32, matching_scale="paper", diagnostic_rows=0))


class _Done(Exception):
    """Raised after the last studied block: nothing after it is needed."""


def _meta_objective(problem: MetaProblem, data: BlockData, logits: Tensor, seed: int,
                    count: int) -> tuple[float, float]:
    """The setting's own meta objective at uniform and at learned ω, each the mean over
    the same ``count`` minibatches (drawn apart from the learning's)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = [data.sample(problem.cfg.batch_size, gen) for _ in range(count)]
    out = []
    for s in (torch.zeros_like(logits), logits):
        out.append(sum(float(problem.objective(s, b)[0]) for b in batches) / count)
    return out[0], out[1]


class _Study:
    """The weighting stage the block loop calls: studies the chosen blocks, returns
    uniform weights (None) so the pipeline goes on as ``gaq-uniform`` would."""

    def __init__(self, run, cfg: StudyConfig, settings: Sequence[Setting], studied: list[str],
                 val, test, log: Callable[[str], None]) -> None:
        self.run, self.cfg, self.settings, self.studied = run, cfg, settings, studied
        self.val, self.test, self.log = val, test, log
        self.row_t = run.calib.train().t
        self.rows: list[dict[str, Any]] = []

    def __call__(self, block, data: BlockData) -> None:
        if block.name not in self.studied:
            return None
        run, cfg = self.run, self.cfg
        module = run.qmodel.get_submodule(block.name)
        val = capture(run.qmodel, run.fpmodel, block.name, _batches(self.val.to(run.device)),
                      "memory")
        test = capture(run.qmodel, run.fpmodel, block.name, _batches(self.test.to(run.device)),
                       "memory")
        val_rec = val.record(0)
        recon = run.method.config.recon
        for seed in cfg.seeds:
            rc = replace(recon, seed=seed)
            uniform_err = heldout_error(module, data, rc, None, test)
            for setting in self.settings:
                start = time.perf_counter()
                mcfg = replace(cfg.base, **setting.changes, seed=seed)
                view = rounding_view(module)
                theta = inner_parameters(view, mcfg.inner_params)
                problem = MetaProblem(view, theta, val_rec,
                                      timestep_groups(val_rec["t"], mcfg.groups),
                                      self.row_t, mcfg)
                meta = learn_weights(problem, data)
                obj_uniform, obj_learned = _meta_objective(problem, data, meta.logits, seed,
                                                           cfg.eval_minibatches)
                err = heldout_error(module, data, rc, meta.weights.to(run.device), test)
                hist = meta.history
                self.rows.append({
                    "block": block.name, "kind": block.kind, "seed": seed,
                    "setting": setting.name, "changes": json.dumps(setting.changes),
                    "params": int(sum(v.numel() for v in theta.values())),
                    "objective_uniform": obj_uniform, "objective_learned": obj_learned,
                    "objective_change": _rel(obj_learned, obj_uniform),
                    "heldout_uniform": uniform_err, "heldout_learned": err,
                    "heldout_change": err / uniform_err - 1.0,
                    "matching_to_val_ratio": abs(mcfg.matching_weight * hist[0]["matching"])
                    / max(hist[0]["val_loss"], 1e-30) if mcfg.matching else 0.0,
                    "meta_seconds": meta.seconds, **weight_spread(meta.weights),
                    "seconds": time.perf_counter() - start})
                self.log(f"{block.name} seed {seed} {setting.name}: held-out "
                         f"{err / uniform_err - 1:+.2%}, objective "
                         f"{_rel(obj_learned, obj_uniform):+.2%}")
        val.close()
        test.close()
        if block.name == self.studied[-1]:
            raise _Done
        return None


def _rel(new: float, old: float) -> float:
    return (new - old) / max(abs(old), 1e-30)


def run_study(cfg: StudyConfig, settings: Sequence[Setting] = SETTINGS, *, device: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the study (see the module docstring) on ``device``; returns its record."""
    from gaq.calibration import CalibrationSpec, record_calibration
    from gaq.config import QuantConfig
    from gaq.methods.gaq import split_holdout
    from gaq.methods.stages import start, temporal, wrap
    from gaq.models.adapters import adapter_for
    from gaq.models.loading import load_model
    from gaq.reconstruction import ReconConfig, reconstruct
    from gaq.registry import get_method

    began = time.perf_counter()
    pipe = load_model(cfg.model, device=device)
    val_per_t = max(1, math.ceil(cfg.base.val_share * cfg.train_trajectories))
    spec = CalibrationSpec(steps=cfg.steps, interval=cfg.interval,
                           samples_per_step=cfg.train_trajectories,
                           holdout_per_step=val_per_t + cfg.test_trajectories)
    calib = record_calibration(pipe, spec, model_id=cfg.model)
    val, test = split_holdout(calib, cfg.base.val_share)
    method = get_method("gaq-uniform").from_preset("cpu")
    recon: ReconConfig = replace(method.config.recon, weight_iters=cfg.weight_iters,
                                 cache="memory")
    method = type(method)(replace(method.config, recon=recon))
    run = start(method, pipe.denoiser, adapter_for(pipe.denoiser), calib,
                QuantConfig.from_bits(cfg.bits))
    wrap(run)
    if method.config.temporal_recon:
        temporal(run, recon)
    blocks = run.adapter.blocks(split_temporal=method.config.temporal_recon)
    candidates = [b.name for b in blocks if b.kind != "temporal"
                  and block_layers(run.qmodel.get_submodule(b.name))]
    k = min(cfg.blocks, len(candidates))
    picks = sorted({round(i * (len(candidates) - 1) / max(k - 1, 1)) for i in range(k)})
    studied = [candidates[i] for i in picks]
    stage = _Study(run, cfg, settings, studied, val, test, log)
    try:
        reconstruct(run.qmodel, run.fpmodel, run.adapter, run.batches(recon.capture_batch),
                    recon, blocks=blocks, weight_fn=stage, progress=False)
    except _Done:
        pass
    return {"config": {**asdict(replace(cfg, base=None)), "base": cfg.base.to_dict()},
            "settings": [asdict(s) for s in settings], "blocks": studied,
            "rows_train": len(calib.train()), "rows_validation": len(val),
            "rows_test": len(test), "seconds": time.perf_counter() - began,
            "threads": torch.get_num_threads(), "rows": stage.rows}


def summarise(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting: mean relative change of the held-out block error (learned vs uniform
    ω at the same AdaRound seed) with a 95 % t interval over (block, seed) pairs, the
    mean relative change of the meta objective, ω's spread, and the time."""
    from gaq.bench.results import ci_half_width

    out = []
    rows = record["rows"]
    for name in dict.fromkeys(r["setting"] for r in rows):
        part = [r for r in rows if r["setting"] == name]
        d = [r["heldout_change"] for r in part]
        n = len(d)
        out.append({
            "setting": name, "n": n, "heldout_change": sum(d) / n, "ci95": ci_half_width(d),
            "better_blocks": sum(r["heldout_change"] < 0 for r in part),
            "objective_change": sum(r["objective_change"] for r in part) / n,
            "matching_to_val_ratio": sum(r["matching_to_val_ratio"] for r in part) / n,
            "weight_max_min_ratio": sum(r["weight_max_min_ratio"] for r in part) / n,
            "weight_ess_rel": sum(r["weight_ess_rel"] for r in part) / n,
            "meta_seconds": sum(r["meta_seconds"] for r in part) / n})
    return out


def chosen(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting with the lowest mean held-out change: the study's choice."""
    return min(summary, key=lambda s: s["heldout_change"])


def seed_spread(record: dict[str, Any]) -> float:
    """AdaRound's own seed-to-seed spread of the uniform-ω held-out error: the standard
    deviation over seeds relative to the mean, averaged over blocks (the noise a change
    must stand above)."""
    rows = [r for r in record["rows"] if r["setting"] == record["rows"][0]["setting"]]
    spreads = []
    for block in dict.fromkeys(r["block"] for r in rows):
        v = torch.tensor([r["heldout_uniform"] for r in rows if r["block"] == block],
                         dtype=torch.float64)
        if len(v) > 1:
            spreads.append(float(v.std() / v.mean()))
    return sum(spreads) / len(spreads) if spreads else float("nan")


def proxy_correlation(record: dict[str, Any]) -> float:
    """Spearman's ρ between the meta objective's change and the held-out change over every
    (setting, block, seed)."""
    import pandas as pd

    from gaq.methods.gaq_report import rank_correlation

    return rank_correlation(pd.DataFrame(record["rows"])) if len(record["rows"]) > 2 \
        else float("nan")


def headline(record: dict[str, Any]) -> str:
    """A few lines for the README: what was studied, the chosen setting and whether any
    setting's learned ω beat uniform beyond its interval."""
    cfg = record["config"]
    summary = summarise(record)
    best = chosen(summary)
    below = [s["setting"] for s in summary if s["heldout_change"] + s["ci95"] < 0]
    above = [s["setting"] for s in summary if s["heldout_change"] - s["ci95"] > 0]
    n_blocks, n_seeds = len(record["blocks"]), len(cfg["seeds"])
    return (
        f"GAQ's tuning study (`gaq tune-gaq`: `{cfg['model']}` {cfg['bits']}, {n_blocks} "
        f"blocks × {n_seeds} AdaRound seeds, {len(summary)} meta-learning settings, the "
        f"block's error measured on {record['rows_test']} rows of trajectories nothing "
        "trains on): the lowest mean change of the held-out block error, learned against "
        f"uniform ω, is {best['heldout_change']:+.2%} ± {best['ci95']:.2%} "
        f"(**{best['setting']}**); settings whose interval lies below zero: "
        f"{', '.join(below) if below else 'none'}; above zero (learned ω worse): "
        f"{', '.join(above) if above else 'none'}. AdaRound's own seed-to-seed spread is "
        f"{seed_spread(record):.2%}; the meta objective's change and the held-out change "
        f"correlate at Spearman ρ = {proxy_correlation(record):.2f}.\n")


def render(record: dict[str, Any]) -> str:
    """The study's Markdown table and what it can resolve."""
    cfg = record["config"]
    summary = summarise(record)
    best = chosen(summary)
    lines = [
        "# GAQ tuning study: meta objective against held-out block error",
        "",
        f"Model `{cfg['model']}` at {cfg['bits']}, blocks "
        f"{', '.join(f'`{b}`' for b in record['blocks'])}; "
        f"AdaRound seeds {', '.join(str(s) for s in cfg['seeds'])} "
        f"({cfg['weight_iters']} iterations per block). Rows: {record['rows_train']} training "
        f"({cfg['train_trajectories']} trajectories), {record['rows_validation']} validation "
        f"(X^V), {record['rows_test']} test ({cfg['test_trajectories']} other trajectories, "
        "used by nothing but this measurement). Base setting: "
        + ", ".join(f"{k} {v}" for k, v in record["config"]["base"].items()
                    if k in ("iters", "lr", "tau", "batch_size", "matching_weight",
                             "inner_lr", "matching_scale"))
        + "; every other row changes one factor.",
        "",
        "Held-out change: the block's error on the test rows after AdaRound with learned ω, "
        "relative to uniform ω at the same seed (negative: learned ω helps), mean over "
        f"blocks × seeds with a 95 % t interval (n = {summary[0]['n']}). Objective change: "
        "the setting's own meta objective at learned ω relative to uniform, on the same "
        "fixed minibatches. ESS: ω's effective sample size over N (1 = uniform).",
        "",
        "| setting | held-out change | ± 95 % | blocks × seeds better | objective change "
        "| L_GM / L_V | ω max/min | ESS | meta s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['setting']} | {s['heldout_change']:+.2%} | {s['ci95']:.2%} | "
            f"{s['better_blocks']}/{s['n']} | {s['objective_change']:+.2%} | "
            f"{s['matching_to_val_ratio']:.3g} | {s['weight_max_min_ratio']:.2f} | "
            f"{s['weight_ess_rel']:.3f} | {s['meta_seconds']:.1f} |")
    spread = seed_spread(record)
    lines += [
        "",
        f"AdaRound's own seed-to-seed spread of the held-out error (uniform ω): "
        f"{spread:.2%} of its value. Lowest mean held-out change: **{best['setting']}** "
        f"({best['heldout_change']:+.2%} ± {best['ci95']:.2%}); "
        + ("its interval excludes zero." if abs(best["heldout_change"]) > best["ci95"]
           else "its interval includes zero, so the study cannot tell it from uniform ω."),
        "",
        f"Whole study: {record['seconds'] / 60:.1f} min on {record['threads']} threads.",
        "",
    ]
    return "\n".join(lines)


def plot(record: dict[str, Any]):
    """Change in meta objective against change in held-out block error, one point per
    (setting, block, seed), one marker per block: does the proxy predict the target?"""
    import pandas as pd

    from gaq.methods.gaq_report import proxy_vs_target

    return proxy_vs_target(pd.DataFrame(record["rows"]), "block",
                           f"GAQ tuning study, {record['config']['model']} "
                           f"{record['config']['bits']}")


def write(record: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``study.json``, ``study.md`` and ``proxy_vs_heldout.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "study.json", out / "study.md", out / "proxy_vs_heldout.png"]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(render(record))
    plot(record).savefig(paths[2], dpi=200)
    return paths
