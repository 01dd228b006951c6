"""GAQ's outer objective against the paper's equations, written out independently.

The paper (Hoang et al., ICLR 2026) defines, for softmax weights ω = softmax(s/τ) over the
N training rows of a block:

    θ'(ω) = θ − η Σ_i ω_i ∇_θ L_MSE(θ; x_i)                     (one inner SGD step)
    G_g   = ∂ L_MSE(θ'(ω); X^V_g) / ∂ω        ∈ R^N              (per validation group g)
    L_GM  = −(2 / (G(G−1))) Σ_{g<h} G_g · G_h
    L_VAL = L_GM + L_MSE(θ'(ω); X^V)

This file builds that objective with plain autograd (``create_graph``), θ'(ω) an explicit
function of ω, in float64, on a real block of a tiny UNet with a few training and
validation rows, and compares L_GM, the validation loss and ∂L_VAL/∂s with the suite's
``MetaProblem`` at full batch. Only the block's forward (θ substituted) is shared; the
objective, its gradients and the scaling are not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_gaq import _block_problem, calibration

from gaq.meta import MetaConfig, call

pytestmark = pytest.mark.usefixtures("one_thread")


def _per_row_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_MSE of each row: squared error summed over channels, averaged over positions
    (the reconstruction loss's scale in BRECQ and Q-Diffusion)."""
    return ((out - target) ** 2).sum(dim=1).flatten(1).mean(dim=1)


def _paper_objective(problem, s: torch.Tensor, train: dict, tau: float, eta: float,
                     weight: float):
    """(L_VAL, L_GM, L_V, ∂L_VAL/∂s) from the paper's equations, full batch."""
    s = s.clone().requires_grad_(True)
    omega = torch.softmax(s / tau, dim=0)
    names = list(problem.theta)
    theta = [problem.theta[k].clone().requires_grad_(True) for k in names]

    def forward(params, rec):
        return call(problem.view, dict(zip(names, params, strict=True)), rec)

    # ∇_θ L_MSE(θ; x_i), row by row, kept in the graph (second order)
    rows = _per_row_mse(forward(theta, train), train["target"])
    step = [torch.zeros_like(p) for p in theta]
    for i in range(len(rows)):
        g_i = torch.autograd.grad(rows[i], theta, create_graph=True, retain_graph=True)
        step = [acc + omega[i] * g for acc, g in zip(step, g_i, strict=True)]
    stepped = [p - eta * g for p, g in zip(theta, step, strict=True)]
    val_err = _per_row_mse(forward(stepped, problem.val), problem.val["target"])
    groups = problem.val_groups
    n_groups = int(groups.max()) + 1
    per_group = [val_err[groups == g].mean() for g in range(n_groups)]
    G = [torch.autograd.grad(lg, omega, create_graph=True, retain_graph=True)[0]
         for lg in per_group]
    pairs = [(g, h) for g in range(n_groups) for h in range(g + 1, n_groups)]
    l_gm = -(2.0 / (n_groups * (n_groups - 1))) * sum(G[g] @ G[h] for g, h in pairs)
    l_v = val_err.mean()
    l_val = weight * l_gm + l_v
    (grad_s,) = torch.autograd.grad(l_val, s)
    return l_val.detach(), l_gm.detach(), l_v.detach(), grad_s


@pytest.fixture
def block(make_tiny_model):
    model = make_tiny_model("unet")
    calib = calibration("unet", model, per_t=2, held_per_t=1)  # 8 training rows
    gen = torch.Generator().manual_seed(0)
    cfg = MetaConfig(groups=2, inner_lr=0.05, matching_scale="paper", batch_size=64,
                     matching_weight=0.7, tau=0.5)
    problem, data = _block_problem(model, calib, "down_blocks.0.resnets.0", cfg,
                                   torch.float64)
    # V in float64 and away from its initial value, so that no h(V) sits on its clamp
    problem.theta = {k: v.double() + 0.3 * torch.randn(v.shape, generator=gen,
                                                       dtype=torch.float64)
                     for k, v in problem.theta.items()}
    train = data.record(0)
    order = torch.argsort(train["index"])  # the rows in their index order: ω_i is row i's
    train = {k: (v[order] if torch.is_tensor(v) and len(v) == len(order) else v)
             for k, v in train.items()}
    train["args"] = tuple(a[order] if torch.is_tensor(a) else a for a in train["args"])
    train["kwargs"] = {k: (v[order] if torch.is_tensor(v) and len(v) == len(order) else v)
                       for k, v in train["kwargs"].items()}
    assert torch.equal(train["index"].cpu(), torch.arange(len(order)))
    problem.set_inner_scale(train)
    s = 0.5 * torch.randn(problem.num_logits, generator=gen, dtype=torch.float64)
    return problem, train, s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_paper_scale_matches_the_papers_equations(block):
    problem, train, s = block
    cfg = problem.cfg
    assert len(train["index"]) == problem.num_logits == 8  # full batch
    eta = cfg.inner_lr / problem.inner_scale  # the same η (a value, not the formula)
    l_val, l_gm, l_v, grad_s = _paper_objective(problem, s, train, cfg.tau, eta,
                                                cfg.matching_weight)
    assert l_gm.abs() > 0 and l_v > 0
    got, (gm, val_loss) = problem.objective(s, train)
    got_grad, _ = problem.meta_gradient(s, train)
    assert _rel(gm, l_gm) <= 1e-10
    assert _rel(val_loss, l_v) <= 1e-10
    assert _rel(got, l_val) <= 1e-10
    assert _rel(got_grad, grad_s) <= 1e-10


def test_the_minibatch_scale_is_the_papers_divided_by_n_squared(block):
    """What every committed GAQ result used: L_GM smaller than the paper's by N² at full
    batch, so the matching term all but vanishes beside the validation loss."""
    problem, train, s = block
    cfg = problem.cfg
    eta = cfg.inner_lr / problem.inner_scale
    _, l_gm, l_v, _ = _paper_objective(problem, s, train, cfg.tau, eta, cfg.matching_weight)
    problem.cfg = dataclasses.replace(cfg, matching_scale="minibatch")
    _, (gm, val_loss) = problem.objective(s, train)
    n = problem.num_logits
    assert _rel(gm * n * n, l_gm) <= 1e-10
    assert _rel(gm, l_gm) > 0.9  # the default is not the paper's objective
    assert _rel(val_loss, l_v) <= 1e-10  # the validation term is the paper's either way
