"""GAQ: the meta-gradient equals a finite-difference estimate, learned weights lower the
outer objective they are learned on, the ablations differ only where they should, the
method runs on tiny UNet / conditional UNet / DiT models and reports its diagnostics."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from tiny_inputs import cond_inputs, denoise
from torch import nn

from gaq.calibration import CalibrationSet
from gaq.config import QuantConfig
from gaq.errors import GaqError
from gaq.meta import (
    MetaConfig,
    MetaProblem,
    inner_parameters,
    learn_weights,
    objective_summary,
    rounding_view,
)
from gaq.methods.gaq import GAQ, GAQConfig, validation_rows
from gaq.models.adapters import adapter_for
from gaq.quantize import quantize_model
from gaq.reconstruction import ReconConfig, calib_batches, capture
from gaq.registry import get_method

TINY = ReconConfig(weight_iters=4, act_iters=2, batch_size=8, capture_batch=8, cache="memory")
META = MetaConfig(iters=3, batch_size=8, groups=2, diagnostic_rows=16)
W4A8 = QuantConfig.from_bits("W4A8")
TIMESTEPS = [999, 666, 333, 0]


pytestmark = pytest.mark.usefixtures("one_thread")


def calibration(kind: str, model: nn.Module, per_t: int = 4, held_per_t: int = 1):
    """Random rows on 4 timesteps, ``per_t`` training and ``held_per_t`` held-out each."""
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    rows = (per_t + held_per_t) * len(TIMESTEPS)
    x = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.tensor(TIMESTEPS).repeat_interleave(per_t + held_per_t)
    split = torch.tensor(([False] * per_t + [True] * held_per_t) * len(TIMESTEPS))
    cond = cond_inputs(kind, model, rows, gen)
    return CalibrationSet(x=x, t=t, eps_fp=denoise(kind, model, x, t, cond), cond=cond,
                          split=split)


def _block_problem(model, calib, name: str, cfg: MetaConfig, dtype=torch.float32):
    """The meta problem of one block of a W4 weight-only model, in ``dtype``."""
    fp = model.to(dtype)
    qmodel, _ = quantize_model(fp, adapter_for(fp), QuantConfig.from_bits("W4A32"))
    qmodel = qmodel.to(dtype)
    calib = dataclasses.replace(calib, x=calib.x.to(dtype))
    data = capture(qmodel, fp, name, calib_batches(calib, 64, "cpu"), "memory")
    val_rows = validation_rows(calib, 0.01)  # one row per timestep
    val = capture(qmodel, fp, name, lambda: iter([(val_rows.x, val_rows.t, {},
                                                   torch.arange(len(val_rows)))]), "memory")
    view = rounding_view(qmodel.get_submodule(name))
    theta = inner_parameters(view, cfg.inner_params)
    from gaq.meta import timestep_groups

    rec = val.record(0)
    problem = MetaProblem(view, theta, rec, timestep_groups(rec["t"], cfg.groups),
                          calib.train().t, cfg)
    return problem, data


def test_meta_gradient_matches_finite_differences(make_tiny_model):
    model = make_tiny_model("unet")
    calib = calibration("unet", model)
    cfg = MetaConfig(groups=2, inner_lr=0.05)
    problem, data = _block_problem(model, calib, "down_blocks.0.resnets.0", cfg,
                                   torch.float64)
    gen = torch.Generator().manual_seed(0)
    # V in float64 (AdaRound builds it in float32) and away from its initial value, so
    # no h(V) sits on a kink of its clamp
    problem.theta = {k: v.double() + 0.3 * torch.randn(v.shape, generator=gen,
                                                       dtype=torch.float64)
                     for k, v in problem.theta.items()}
    train = data.record(0)
    problem.set_inner_scale(train)
    s = 0.5 * torch.randn(problem.num_logits, generator=gen, dtype=torch.float64)

    grad, (gm, val_loss) = problem.meta_gradient(s, train)
    assert gm.abs() > 0 and val_loss > 0  # both terms of L_VAL are live

    def f(v):
        return float(problem.objective(v, train)[0])

    eps = 1e-5
    fd = torch.tensor([(f(s + eps * e) - f(s - eps * e)) / (2 * eps)
                       for e in torch.eye(len(s), dtype=torch.float64)])
    rel = float((grad - fd).norm() / fd.norm())
    assert rel <= 1e-3, rel
    assert fd.norm() > 0


def test_learned_weights_lower_the_outer_objective(make_tiny_model):
    model = make_tiny_model("unet")
    calib = calibration("unet", model, per_t=6)
    # one minibatch = every training row, so each meta-iteration sees the same objective
    cfg = MetaConfig(iters=10, lr=0.05, groups=2, batch_size=64)
    problem, data = _block_problem(model, calib, "up_blocks.0.resnets.0", cfg)
    result = learn_weights(problem, data)
    summary = objective_summary(problem, data, result.logits)
    assert summary["objective_learned"] < summary["objective_uniform"]
    assert result.weights.shape == (len(calib.train()),)
    assert result.weights.mean() == pytest.approx(1.0, rel=1e-5)
    assert result.weights.std() > 0


def test_timestep_granularity_gives_one_weight_per_timestep(make_tiny_model):
    model = make_tiny_model("unet")
    calib = calibration("unet", model)
    cfg = MetaConfig(iters=3, lr=0.5, groups=2, batch_size=64, granularity="timestep")
    problem, data = _block_problem(model, calib, "down_blocks.0.resnets.0", cfg)
    w = learn_weights(problem, data).weights
    t = calib.train().t
    for step in TIMESTEPS:
        assert w[t == step].unique().numel() == 1
    assert w.unique().numel() > 1


def test_validation_rows_need_held_out_rows(make_tiny_model):
    model = make_tiny_model("unet")
    calib = calibration("unet", model, held_per_t=0)
    with pytest.raises(GaqError, match="holdout_per_step >= 1"):
        GAQ(GAQConfig(recon=TINY, meta=META)).quantize(model, adapter_for(model), calib, W4A8)
    calib = calibration("unet", model, per_t=4, held_per_t=2)
    val = validation_rows(calib, 0.5)
    assert sorted(val.t.tolist()) == sorted(TIMESTEPS * 2)
    assert bool(val.split.all())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "cond_unet", "dit"])
def test_gaq_and_ablations_run_on_tiny_models(make_tiny_model, kind):
    model = make_tiny_model(kind)
    calib = calibration(kind, model)
    results = {}
    for name in ("gaq", "gaq-uniform", "gaq-mse", "gaq-timestep"):
        cls = get_method(name)
        cfg = dataclasses.replace(cls.presets["cpu"], recon=TINY,
                                  meta=dataclasses.replace(cls.presets["cpu"].meta, iters=3,
                                                           batch_size=8, groups=2,
                                                           diagnostic_rows=16))
        result = cls(cfg).quantize(model, adapter_for(model), calib, W4A8)
        cond = {k: v[:4] for k, v in calib.cond.items()}
        out = denoise(kind, result.model, calib.x[:4], calib.t[:4], cond)
        assert torch.isfinite(out).all()
        blocks = result.state["gaq"]["blocks"]
        assert blocks and all(len(b["cos_uniform"]) == len(b["timesteps"]) for b in blocks)
        assert {"gaq_blocks", "gaq_conflict", "gaq_weights"} <= set(result.diagnostics)
        assert result.stats["diagnostics_seconds"] > 0
        results[name] = result
    uniform = results["gaq-uniform"].state["gaq"]["blocks"]
    assert all(b["mean_cos_learned"] == b["mean_cos_uniform"] for b in uniform)
    assert all("history" not in b for b in uniform)
    learned = results["gaq"].state["gaq"]["blocks"]
    assert any(b["weight_mass"] != uniform[0]["weight_mass"] for b in learned)
    assert all(b["matching_uniform"] == 0 for b in results["gaq-mse"].state["gaq"]["blocks"])
    # whether the meta-step did anything, per block: ω's spread and the terms' weight
    for b in learned:
        assert b["weight_max_min_ratio"] >= 1.0
        assert 0.0 < b["weight_entropy_rel"] <= 1.0 + 1e-12
        assert 0.0 < b["weight_ess_rel"] <= 1.0 + 1e-12
        assert b["matching_to_val_ratio"] > 0 and b["matching_to_val_grad_ratio"] > 0
    for b in results["gaq-mse"].state["gaq"]["blocks"]:
        assert b["matching_to_val_ratio"] == 0 and b["matching_to_val_grad_ratio"] == 0


def test_weight_spread_against_hand_computed_values():
    import math

    from gaq.meta import weight_spread

    flat = weight_spread(torch.ones(4))
    assert flat == pytest.approx({"weight_max_min_ratio": 1.0, "weight_entropy_rel": 1.0,
                                  "weight_ess_rel": 1.0})
    # ω = (1/2, 1/6, 1/6, 1/6): H = ln 2 / 2 + ln 6 / 2, ESS = 1 / (1/4 + 3/36) = 3
    got = weight_spread(torch.tensor([3.0, 1.0, 1.0, 1.0]))
    assert got["weight_max_min_ratio"] == pytest.approx(3.0)
    assert got["weight_entropy_rel"] == pytest.approx((math.log(2) + math.log(6)) / 2
                                                      / math.log(4))
    assert got["weight_ess_rel"] == pytest.approx(3.0 / 4)


def test_the_paper_scale_multiplies_the_matching_ratio_by_n_times_the_batch(make_tiny_model):
    """The diagnostics see the scale: at s = 0 on the same minibatch, L_GM / L_V under the
    paper's scale is N·|B| times the minibatch scale's, and so is its gradient's norm."""
    from gaq.meta import learn_weights, objective_summary

    model = make_tiny_model("unet")
    calib = calibration("unet", model)
    out = {}
    for scale in ("minibatch", "paper"):
        cfg = MetaConfig(iters=1, batch_size=8, groups=2, matching_scale=scale)
        problem, data = _block_problem(model, calib, "down_blocks.0.resnets.0", cfg,
                                       torch.float64)
        meta = learn_weights(problem, data)
        out[scale] = objective_summary(problem, data, torch.zeros_like(meta.logits))
    n, b = len(calib.train()), 8
    for key in ("matching_to_val_ratio", "matching_to_val_grad_ratio"):
        assert out["paper"][key] == pytest.approx(n * b * out["minibatch"][key], rel=1e-9)


def test_without_l_gm_the_weights_do_not_depend_on_its_scale_or_weight(make_tiny_model):
    """gaq-mse and gaq-uniform keep L_GM's fields at their defaults so that their cells do
    not change with GAQ's objective: that is sound only if, with the term off, ω learned
    under any scale and weight is the same, bit for bit."""
    from gaq.meta import learn_weights
    from gaq.methods.gaq import GAQ, GAQMSE, GAQUniform

    model = make_tiny_model("unet")
    calib = calibration("unet", model)
    learned = []
    for scale, weight in (("minibatch", 1.0), ("paper", 10.0)):
        cfg = MetaConfig(iters=2, batch_size=8, groups=2, matching=False,
                         matching_scale=scale, matching_weight=weight)
        problem, data = _block_problem(model, calib, "down_blocks.0.resnets.0", cfg,
                                       torch.float64)
        learned.append(learn_weights(problem, data).weights)
    assert torch.equal(*learned) and not torch.equal(learned[0], torch.ones_like(learned[0]))
    # the ablations differ from GAQ's presets in their own switch and those two fields only
    for cls, switch in ((GAQMSE, {"matching": False}), (GAQUniform, {"weights": "uniform"})):
        for name, cfg in cls.presets.items():
            base = GAQ.presets[name]
            meta = {"matching_scale": cfg.meta.matching_scale,
                    "matching_weight": cfg.meta.matching_weight}
            meta |= {k: v for k, v in switch.items() if k == "matching"}
            top = {k: v for k, v in switch.items() if k != "matching"}
            assert cfg == dataclasses.replace(
                base, meta=dataclasses.replace(base.meta, **meta), **top)


def test_fill_table_copies_the_nearest_calibrated_row():
    from gaq.quant import FakeQuantizer

    q = FakeQuantizer(8).set_table([10, 50], torch.tensor([1.0, 5.0]), torch.tensor([3.0, 7.0]))
    q.fill_table([0, 10, 20, 30, 40, 60])
    table = dict(zip(q.timesteps.tolist(), q.scale.tolist(), strict=True))
    assert table == {0: 1.0, 10: 1.0, 20: 1.0, 30: 5.0, 40: 5.0, 50: 5.0, 60: 5.0}
    assert dict(zip(q.timesteps.tolist(), q.zero_point.tolist(), strict=True))[20] == 3.0


def test_shuffled_batches_keep_row_indices(make_tiny_model):
    model = make_tiny_model("unet")
    calib = calibration("unet", model)
    train = calib.train()
    seen = []
    for x, t, _, idx in calib_batches(calib, 5, "cpu")():
        assert torch.equal(x, train.x[idx]) and torch.equal(t, train.t[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(train))) and seen != sorted(seen)
    first = next(calib_batches(calib, 8, "cpu")())[1]
    assert first.unique().numel() > 2  # a batch mixes timesteps


def test_diagnostics_become_tables_and_figures(tmp_path):
    from gaq.bench import results
    from gaq.bench.plots import write_plots
    from gaq.bench.tables import write_tables
    from gaq.methods.gaq import _tables

    ts = [0, 500, 999]
    blocks = [{"block": f"b{i}", "kind": "resnet", "params": 10, "meta_seconds": 0.5,
               "timesteps": ts, "mass_timesteps": ts,
               "cos_uniform": [[1, 0.2, -0.1], [0.2, 1, 0.3], [-0.1, 0.3, 1]],
               "cos_learned": [[1, 0.4, 0.1], [0.4, 1, 0.5], [0.1, 0.5, 1]],
               "mean_cos_uniform": 0.133, "mean_cos_learned": 0.333,
               "group_mean_cos_uniform": 0.1, "group_mean_cos_learned": 0.3,
               "weight_mass": [0.2, 0.3, 0.5], "alignment": [0.1, 0.4, 0.8 - 0.1 * i],
               "history": [{"iter": 0, "matching": -1.0, "val_loss": 2.0}],
               "weight_max_min_ratio": 2.0, "weight_entropy_rel": 0.99, "weight_ess_rel": 0.9,
               "objective_uniform": 2.0, "objective_learned": 2.0 - 0.1 * i,
               "heldout_uniform": 1.0, "heldout_learned": 1.0 + 0.01 * i,
               "heldout_change": 0.01 * i, "heldout_rows": "test"}
              for i in range(3)]
    folder = tmp_path / "bench"
    for name, records in _tables(blocks).items():
        frame = pd.DataFrame(records)
        for k, v in reversed(list({"cell_id": "c", "method": "gaq", "bits": "W4A8",
                                   "seed": 0}.items())):
            frame.insert(0, k, v)
        results.append(folder / f"{name}.parquet", frame)
    # rendered from what GAQ's report declares (GAQ.report), with no metrics rows needed
    written = write_plots(tmp_path, "bench", tmp_path / "out")
    names = {p.name for p in written}
    assert {"bench_conflict_gaq_W4A8.png", "bench_weights_by_t_W4A8.png",
            "bench_alignment_gaq_W4A8.pdf", "bench_proxy_vs_heldout_gaq_W4A8.png"} <= names
    md = [p for p in write_tables(tmp_path, "bench", tmp_path / "tables")
          if p.name.endswith("_gaq_diagnostics.md")]
    text = md[0].read_text()
    assert "| GAQ | W4A8 | 0.1000 | 0.3000 |" in text
    assert "| b2 | 0.1000 | 0.3000 | +0.2000 |" in text
    # the held-out change per block: median 0.01 over 0, 0.01, 0.02
    assert "held-out block error, learned vs uniform ω (rel.)" in text
    assert "0.01 [0, 0.02]" in text


def test_diagnostics_figures_are_per_model_and_titled():
    """A benchmark of several models gets GAQ's figures per model (their blocks and
    timesteps differ: a mean over models shows none), each titled with the benchmark and
    its model, the files named by model as the benchmark's other figures are."""
    from gaq.methods.gaq_report import GAQReport

    rows = [{"model": model, "method": "gaq", "bits": "W4A8", "seed": 0, "block": "b0",
             "weights": weights, "t_i": ti, "t_j": tj, "cosine": 1.0 if ti == tj else 0.5}
            for model in ("digits", "digits-dit") for weights in ("uniform", "learned")
            for ti in (0, 500) for tj in (0, 500)]
    weights = [{"model": model, "method": "gaq", "bits": "W4A8", "seed": 0, "block": "b0",
                "timestep": t, "weight_mass": 0.5, "alignment": a}
               for model in ("digits", "digits-dit") for t, a in ((0, 0.1), (500, 0.6))]
    figures = dict(GAQReport().figures({"gaq_conflict": pd.DataFrame(rows),
                                        "gaq_weights": pd.DataFrame(weights)}, "w4a8"))
    assert set(figures) == {f"{m}_{kind}_gaq_W4A8" for m in ("digits", "digits-dit")
                            for kind in ("conflict", "alignment")} | {
        "digits_weights_by_t_W4A8", "digits-dit_weights_by_t_W4A8"}
    for name, fig in figures.items():
        model = "digits-dit" if name.startswith("digits-dit") else "digits"
        assert fig.get_suptitle().startswith(f"w4a8: {model}, "), (name, fig.get_suptitle())


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_gaq_runs_at_weight_only_bits(make_tiny_model, kind):
    """At W4A32 attention stays unquantized, so the meta-gradient differentiates through
    PyTorch's fused attention, which has no second derivative: the weighting stage must
    take the math kernel (this failed before it did)."""
    model = make_tiny_model(kind)
    calib = calibration(kind, model)
    cls = get_method("gaq")
    cfg = dataclasses.replace(cls.presets["cpu"], recon=TINY,
                              meta=dataclasses.replace(cls.presets["cpu"].meta, iters=2,
                                                       batch_size=8, groups=2,
                                                       diagnostic_rows=0))
    result = cls(cfg).quantize(model, adapter_for(model), calib, QuantConfig.from_bits("W4A32"))
    blocks = result.state["gaq"]["blocks"]
    attn = [b for b in blocks if b["kind"] in ("attention", "transformer")]
    assert attn and all(b.get("history") for b in attn)  # weights were learned there
    out = denoise(kind, result.model, calib.x[:4], calib.t[:4],
                  {k: v[:4] for k, v in calib.cond.items()})
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_heldout_check_measures_without_changing_the_result(make_tiny_model):
    """The held-out check AdaRounds copies of each block with learned and uniform ω and
    measures them on held-out rows nothing trains on; the quantized model is bit-identical
    to the one quantized without it. With no rows beyond X^V it says it measured on X^V."""
    model = make_tiny_model("unet")
    cls = get_method("gaq")
    base = dataclasses.replace(cls.presets["cpu"], recon=TINY,
                               meta=dataclasses.replace(cls.presets["cpu"].meta, iters=2,
                                                        batch_size=8, groups=2,
                                                        diagnostic_rows=0))
    checked_cfg = dataclasses.replace(base, meta=dataclasses.replace(base.meta,
                                                                     heldout_check=True))
    calib = calibration("unet", model, held_per_t=3)  # X^V takes one row per timestep
    plain = cls(base).quantize(model, adapter_for(model), calib, W4A8)
    checked = cls(checked_cfg).quantize(model, adapter_for(model), calib, W4A8)
    a, b = plain.model.state_dict(), checked.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    blocks = checked.state["gaq"]["blocks"]
    assert blocks and all(k not in blk for blk in plain.state["gaq"]["blocks"]
                          for k in ("heldout_learned", "heldout_rows"))
    for blk in blocks:
        assert blk["heldout_rows"] == "test"
        assert blk["heldout_uniform"] > 0 and blk["heldout_learned"] > 0
        assert blk["heldout_change"] == pytest.approx(
            blk["heldout_learned"] / blk["heldout_uniform"] - 1)
    summary = checked.diagnostics["gaq_blocks"]
    assert all("heldout_change" in row for row in summary)
    only_val = cls(checked_cfg).quantize(model, adapter_for(model),
                                         calibration("unet", model), W4A8)
    assert {blk["heldout_rows"] for blk in only_val.state["gaq"]["blocks"]} == {"validation"}


def _direct_diagnostics(problem, rows, weights):
    """Figure 1/2's cosines the direct way, with torch.autograd on a parameter copy of θ:
    every per-timestep gradient u_t kept, stacked, normalised and multiplied."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in problem.theta.items()}
    from gaq.meta import call, timestep_groups
    from gaq.reconstruction import sample_error

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(theta.values()),
                                                                   retain_graph=True)])

    err = sample_error(call(problem.view, theta, rows), rows["target"])
    val = sample_error(call(problem.view, theta, problem.val), problem.val["target"]).mean()
    t = rows["t"]
    ts = torch.unique(t)
    w = {"uniform": torch.ones_like(err), "learned": weights[rows["index"]]}
    out = {}
    for label, wl in w.items():
        u = torch.stack([flat_grad((wl * (t == s) * err).sum()) for s in ts]).double()
        unit = u / u.norm(dim=1, keepdim=True)
        out[f"cos_{label}"] = unit @ unit.T
        g = timestep_groups(ts, problem.cfg.groups)
        sums = torch.stack([u[g == k].sum(0) for k in range(int(g.max()) + 1)])
        sums = sums / sums.norm(dim=1, keepdim=True)
        out[f"group_{label}"] = sums @ sums.T
        if label == "uniform":
            v = flat_grad(val).double()
            out["alignment"] = unit @ (v / v.norm())
    return out


def _offdiag_mean(m):
    n = len(m)
    return float((m.sum() - m.diagonal().sum()) / (n * (n - 1)))


def test_gradient_diagnostics_match_the_direct_per_timestep_gradients(make_tiny_model):
    from gaq.meta import gradient_diagnostics

    model = make_tiny_model("unet")
    calib = calibration("unet", model, per_t=3)
    cfg = MetaConfig(groups=2)
    problem, data = _block_problem(model, calib, "down_blocks.0.resnets.0", cfg)
    gen = torch.Generator().manual_seed(3)
    # V away from its initial point; learned weights far from uniform
    problem.theta = {k: v + 0.5 * torch.randn(v.shape, generator=gen)
                     for k, v in problem.theta.items()}
    weights = torch.rand(len(calib.train()), generator=gen) * 3 + 0.1
    rows = data.record(0)
    got = gradient_diagnostics(problem, rows, weights)
    ref = _direct_diagnostics(problem, rows, weights)
    assert len(got["timesteps"]) == len(TIMESTEPS)
    for label in ("uniform", "learned"):
        cos = torch.tensor(got[f"cos_{label}"], dtype=torch.float64)
        assert torch.allclose(cos, ref[f"cos_{label}"], atol=1e-4), label
        assert got[f"mean_cos_{label}"] == pytest.approx(_offdiag_mean(ref[f"cos_{label}"]),
                                                         abs=1e-4)
        assert got[f"group_mean_cos_{label}"] == pytest.approx(
            _offdiag_mean(ref[f"group_{label}"]), abs=1e-4)
    assert torch.allclose(torch.tensor(got["alignment"], dtype=torch.float64),
                          ref["alignment"], atol=1e-4)
    # the learned weights change the directions, so the two matrices differ
    assert not torch.allclose(torch.tensor(got["cos_uniform"]), torch.tensor(got["cos_learned"]),
                              atol=1e-3)


def test_rounding_view_shares_the_blocks_storage_and_leaves_it_untouched(make_tiny_model):
    model = make_tiny_model("unet")
    qmodel, _ = quantize_model(model, adapter_for(model), QuantConfig.from_bits("W4A32"))
    block = qmodel.get_submodule("down_blocks.0.resnets.0")
    before = {k: v.clone() for k, v in block.state_dict().items()}
    flags = {k: p.requires_grad for k, p in block.named_parameters()}
    view = rounding_view(block)
    pointers = {p.data_ptr() for p in (*block.parameters(), *block.buffers())}
    shared = [t for t in (*view.parameters(), *view.buffers()) if t.data_ptr() in pointers]
    assert shared  # the weights are not copied ...
    assert not any(t is b for t in shared for b in (*block.parameters(), *block.buffers()))
    assert not any(p.requires_grad for p in view.parameters())
    cfg = MetaConfig(groups=2)
    theta = inner_parameters(view, cfg.inner_params)
    assert theta and all(v.data_ptr() not in pointers for v in theta.values())  # V is the view's
    x = torch.randn(2, block.conv1.fp.in_channels, 8, 8)
    temb = torch.randn(2, block.time_emb_proj.fp.in_features)
    from torch.func import functional_call

    out = functional_call(view, {k: v + 0.1 for k, v in theta.items()}, (x, temb))
    out.sum()  # the view runs on the block's storage
    # ... and the block is exactly as it was: values and flags
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in block.named_parameters()}
