"""Bi-level learning of calibration-sample weights, the core of gradient-aligned
calibration (GAQ, Hoang et al., ICLR 2026); ``gaq/METHOD.md`` maps each equation here.

For one block with quantization parameters θ (AdaRound's V, optionally the weight step
sizes), training rows i with per-row loss L_i and validation rows in G timestep groups:

    ω = softmax(s/τ)                        weights over rows (or over timesteps)
    θ'(ω) = θ − η ∇_θ Σ_{i∈B} w_i L_i(θ)    one inner step; w = N·ω, so uniform w = 1
    G_g = ∂ L_g(θ'(ω)) / ∂w                 per validation group: a vector over B
    L_GM = −2/(G(G−1)) Σ_{g<h} ⟨G_g, G_h⟩
    L_VAL = L_GM + L(θ'(ω); X^V)

and s follows ∂L_VAL/∂s with Adam. Everything is written with ``torch.func``: the block is
called through ``functional_call`` with θ as an explicit input, the inner step is
``torch.func.grad``, the G per-group gradients come from one ``torch.func.vjp`` (one
forward, G backward passes), and the meta-gradient is ``torch.func.grad`` of the whole,
a third-order derivative of the block.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gaq.config import MethodConfig, non_negative_int, positive_float, positive_int
from gaq.quant import timestep_context
from gaq.quant.adaround import AdaRoundQuantizer
from gaq.reconstruction import BlockData, block_layers, block_output, sample_error

__all__ = ["MetaConfig", "MetaProblem", "MetaResult", "gradient_diagnostics",
           "learn_weights", "objective_summary", "rounding_view", "timestep_groups"]

Params = dict[str, Tensor]


@dataclass(frozen=True)
class MetaConfig(MethodConfig):
    """Hyper-parameters of the weight learning. The paper gives τ, G and the validation
    share; the others are documented choices (``gaq/METHOD.md``)."""

    VERSION: ClassVar[int] = 1

    iters: int = 20  # meta-iterations per block
    lr: float = 0.1  # Adam on the logits s
    # η of the inner SGD step, as the RMS size of the step on θ: the raw gradient is
    # divided by its RMS at uniform weights (a constant per block), so η is in units of
    # θ whatever the loss scale (see METHOD.md)
    inner_lr: float = 1e-2
    tau: float = 1.0
    groups: int = 5
    val_share: float = 0.05  # validation rows per timestep, relative to training rows
    batch_size: int = 32  # training rows per meta-iteration
    inner_params: Literal["rounding", "rounding+scale"] = "rounding"
    matching: bool = True  # the gradient-matching term L_GM (off: gaq-mse)
    matching_weight: float = 1.0
    granularity: Literal["sample", "timestep"] = "sample"
    diagnostic_rows: int = 128  # training rows for the conflict matrices (0: none)
    seed: int = 0
    # L_GM's scale. "paper": G_g = ∂L_MSE(θ'(ω); X^V_g)/∂ω over the N training rows, the
    # paper's definition, estimated on a minibatch B with the factor N·|B| derived in
    # METHOD.md. "minibatch": G_g taken w.r.t. the minibatch weights w = N·ω, which is
    # the paper's L_GM divided by N·|B| (N² at full batch): the scale every committed
    # GAQ result used, kept until the tuning study sets the defaults the paper's scale
    # needs (see METHOD.md, "The matching term's scale").
    matching_scale: Literal["paper", "minibatch"] = "minibatch"
    # How meta-iterations draw their minibatches. "random": each a random minibatch of one
    # captured batch (rows may repeat or never be seen); "epochs": the training rows in a
    # fresh random order each meta-epoch, cut into minibatches, so every row is seen once
    # per ceil(N/batch_size) iterations.
    coverage: Literal["random", "epochs"] = "random"
    # Instrumentation: per block, AdaRound copies of the block with learned and with
    # uniform ω and measure both on held-out rows (the error GAQ exists to lower); two
    # more AdaRounds per block, timed apart from the calibration.
    heldout_check: bool = False

    def _plain_fields(self, toml: bool) -> dict:
        out = super()._plain_fields(toml)
        # added after results were committed: at its default it is not written, so no
        # existing cell id changed
        for name, default in (("matching_scale", "minibatch"), ("coverage", "random"),
                              ("heldout_check", False)):
            if getattr(self, name) == default:
                out.pop(name, None)
        return out

    def validate(self) -> None:
        for name in ("iters", "diagnostic_rows", "seed"):
            non_negative_int(name, getattr(self, name))
        for name in ("groups", "batch_size"):
            positive_int(name, getattr(self, name))
        for name in ("lr", "inner_lr", "tau", "matching_weight"):
            positive_float(name, getattr(self, name))
        if not 0 < self.val_share <= 1:
            raise ValueError(f"val_share must lie in (0, 1], got {self.val_share}")
        if self.inner_params not in ("rounding", "rounding+scale"):
            raise ValueError("inner_params must be 'rounding' or 'rounding+scale', "
                             f"got {self.inner_params!r}")
        if self.matching_scale not in ("paper", "minibatch"):
            raise ValueError("matching_scale must be 'paper' or 'minibatch', got "
                             f"{self.matching_scale!r}")
        if self.coverage not in ("random", "epochs"):
            raise ValueError(f"coverage must be 'random' or 'epochs', got {self.coverage!r}")
        if self.granularity not in ("sample", "timestep"):
            raise ValueError(f"granularity must be 'sample' or 'timestep', got "
                             f"{self.granularity!r}")


def rounding_view(module: nn.Module) -> nn.Module:
    """A detached copy of ``module`` whose not-yet-frozen quantized layers use soft
    AdaRound (the state block reconstruction starts from), activations off. The meta
    step runs on the copy, so the block itself is left exactly as it was.

    The copy's parameters and buffers are new tensor objects on the block's storage (so a
    flag set on the view never reaches the block): the meta step only reads them, and a
    second copy of the block's weights was the largest thing the view held
    (``gaq perf --block-memory``). Only the rounding variables the view makes are its own.
    """
    memo: dict[int, Tensor] = {}
    for t in (*module.parameters(), *module.buffers()):
        memo[id(t)] = (nn.Parameter(t.detach(), requires_grad=False)
                       if isinstance(t, nn.Parameter) else t.detach())
    view = copy.deepcopy(module, memo).requires_grad_(False)
    for lay in block_layers(view):
        if lay.frozen_weight is None:
            for q in lay.use_adaround():
                q.set_soft(True)
                q.alpha.requires_grad_(False)
        lay.set_mode("weight")
    return view


def inner_parameters(view: nn.Module, which: str = "rounding") -> Params:
    """θ: the AdaRound variables V (and the weight step sizes for ``rounding+scale``), on
    the view's storage: nothing writes to either (the inner step makes new tensors), so a
    clone would only be one more weight-sized copy."""
    theta = {}
    for name, m in view.named_modules():
        if isinstance(m, AdaRoundQuantizer):
            theta[f"{name}.alpha"] = m.alpha.detach()
            if which == "rounding+scale":
                theta[f"{name}.scale"] = m.scale.detach()
    return theta


def call(view: nn.Module, theta: Params, rec: dict) -> Tensor:
    """The block's output on a captured record with θ substituted."""
    with timestep_context(rec["t"]):
        out = functional_call(view, theta, tuple(rec["args"]), dict(rec["kwargs"]))
    return block_output(out)


def timestep_groups(t: Tensor, groups: int) -> Tensor:
    """Group id (0..G−1) of each row: the distinct timesteps, ascending, cut into G
    contiguous runs of (nearly) equal length."""
    uniq = torch.unique(t)
    g = min(groups, len(uniq))
    run = torch.arange(len(uniq), device=uniq.device) * g // len(uniq)
    return run[torch.searchsorted(uniq, t)]


@dataclass
class MetaProblem:
    """One block's meta-learning problem: the soft view, θ, validation rows and groups.

    ``row_t`` holds the timestep of every training row (N,); with
    ``granularity="timestep"`` there is one logit per distinct timestep.
    """

    view: nn.Module
    theta: Params
    val: dict
    val_groups: Tensor
    row_t: Tensor
    cfg: MetaConfig
    inner_scale: float = 1.0  # RMS of ∇_θ of the uniform training loss (set_inner_scale)
    timesteps: Tensor = field(init=False)
    row_slot: Tensor = field(init=False)
    rows_per_t: Tensor = field(init=False)

    def __post_init__(self) -> None:
        # everything on the device of the captured rows (the block's)
        self.row_t = self.row_t.to(self.val["target"].device)
        self.val_groups = self.val_groups.to(self.row_t.device)
        self.timesteps, self.row_slot = torch.unique(self.row_t, return_inverse=True)
        self.rows_per_t = torch.bincount(self.row_slot, minlength=len(self.timesteps))
        self.n_groups = int(self.val_groups.max()) + 1
        onehot = torch.nn.functional.one_hot(self.val_groups, self.n_groups).T
        dtype = self.val["target"].dtype
        self.group_mean = onehot.to(dtype) / onehot.sum(1, keepdim=True).to(dtype)

    def train_loss(self, theta: Params, wb: Tensor, train: dict) -> Tensor:
        """Σ_{i∈B} w_i L_i(θ) / |B| on a training minibatch."""
        return (wb * sample_error(call(self.view, theta, train), train["target"])).mean()

    def set_inner_scale(self, train: dict) -> None:
        """Fix the inner step's normaliser: the RMS of the uniform-weight gradient."""
        ones = torch.ones(len(train["index"]), dtype=self.val["target"].dtype,
                          device=self.row_t.device)
        g = _flat(torch.func.grad(self.train_loss)(self.theta, ones, train))
        self.inner_scale = float(g.pow(2).mean().sqrt()) or 1.0

    @property
    def num_logits(self) -> int:
        return len(self.row_t) if self.cfg.granularity == "sample" else len(self.timesteps)

    def weights(self, s: Tensor) -> Tensor:
        """ω over the N training rows (sums to one)."""
        p = torch.softmax(s / self.cfg.tau, 0)
        if self.cfg.granularity == "sample":
            return p
        return (p / self.rows_per_t.to(p.dtype))[self.row_slot]

    def objective(self, s: Tensor, train: dict) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """L_VAL(s) on one training minibatch; aux = (L_GM, validation loss)."""
        cfg, theta = self.cfg, self.theta
        w = self.weights(s)
        wb = w[train["index"]] * len(w)

        eta = cfg.inner_lr / self.inner_scale

        def val_losses(wb: Tensor) -> tuple[Tensor, Tensor]:
            g = torch.func.grad(self.train_loss)(theta, wb, train)
            stepped = {k: theta[k] - eta * g[k] for k in theta}
            err = sample_error(call(self.view, stepped, self.val), self.val["target"])
            return self.group_mean @ err, err.mean()

        if not cfg.matching:
            _, val_loss = val_losses(wb)
            return val_loss, (torch.zeros_like(val_loss), val_loss)
        _, vjp_fn, val_loss = torch.func.vjp(val_losses, wb, has_aux=True)
        eye = torch.eye(self.n_groups, dtype=wb.dtype, device=wb.device)
        grads = torch.stack([vjp_fn(e)[0] for e in eye])  # G_g = ∂L_g/∂w, (G, B)
        gram = grads @ grads.T
        pairs = self.n_groups * (self.n_groups - 1) / 2
        gm = -gram.triu(1).sum() / max(pairs, 1)
        if cfg.matching_scale == "paper":
            # the rows of `grads` are ∂L_g/∂w_i = (1/N)·∂L_g/∂ω_i of the minibatch step,
            # which is |B|/N times the full-batch step's: the paper's Σ_{i≤N} G_g,i·G_h,i
            # is N·|B| times this minibatch's sum (exactly N² at full batch; METHOD.md)
            gm = gm * (len(w) * len(train["index"]))
        return cfg.matching_weight * gm + val_loss, (gm, val_loss)

    def meta_gradient(self, s: Tensor, train: dict) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return torch.func.grad(self.objective, has_aux=True)(s, train)


@dataclass
class MetaResult:
    weights: Tensor  # (N,) over training rows, mean 1
    logits: Tensor  # the learned s
    history: list[dict[str, float]]
    seconds: float


def learn_weights(problem: MetaProblem, data: BlockData) -> MetaResult:
    """Meta-iterations of Adam on the logits s (initialised uniform), one training
    minibatch each; returns ω·N (uniform = 1) for every training row."""
    cfg = problem.cfg
    start = time.perf_counter()
    s = torch.zeros(problem.num_logits, dtype=problem.val["target"].dtype,
                    device=problem.row_t.device, requires_grad=True)
    opt = torch.optim.Adam([s], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for it, train in enumerate(_minibatches(data, cfg, gen)):
        if it == 0:
            problem.set_inner_scale(train)
        grad, (gm, val_loss) = problem.meta_gradient(s.detach(), train)
        s.grad = grad
        opt.step()
        history.append({"iter": it, "matching": float(gm), "val_loss": float(val_loss)})
    with torch.no_grad():
        w = problem.weights(s) * len(problem.row_t)
    return MetaResult(w.detach().float(), s.detach(), history, time.perf_counter() - start)


def _minibatches(data: BlockData, cfg: MetaConfig, gen: torch.Generator) -> Iterator[dict]:
    """``cfg.iters`` training minibatches in the order ``cfg.coverage`` describes."""
    if cfg.coverage == "random":
        for _ in range(cfg.iters):
            yield data.sample(cfg.batch_size, gen)
        return
    order = torch.empty(0, dtype=torch.long)
    for _ in range(cfg.iters):
        if len(order) == 0:  # a new meta-epoch: every row once, in a fresh order
            order = torch.randperm(len(data), generator=gen)
        # the last minibatch of an epoch may be short: rows are not drawn twice in one
        take, order = order[: cfg.batch_size], order[cfg.batch_size:]
        yield data.rows(take.sort().values) | {"n": len(take)}


def objective_summary(problem: MetaProblem, data: BlockData, logits: Tensor) -> dict:
    """Diagnostics: the outer objective and its terms at uniform and at the learned
    logits on the same minibatch (the first meta-iteration's), and the validation loss
    before any inner step."""
    gen = torch.Generator().manual_seed(problem.cfg.seed)
    first = data.sample(problem.cfg.batch_size, gen)
    summary = {}
    with torch.no_grad():
        summary["val_loss_before_step"] = float(sample_error(
            call(problem.view, problem.theta, problem.val), problem.val["target"]).mean())
    for label, s in (("uniform", torch.zeros_like(logits)), ("learned", logits)):
        total, (gm, val_loss) = problem.objective(s, first)
        summary[f"objective_{label}"] = float(total)
        summary[f"matching_{label}"] = float(gm)
        summary[f"val_loss_{label}"] = float(val_loss)
    # how much each term of L_VAL can move ω, at the start (s = 0): the values' ratio and
    # the ratio of the two terms' gradients w.r.t. s (what Adam's first steps follow)
    zero = torch.zeros_like(logits)
    weight = problem.cfg.matching_weight if problem.cfg.matching else 0.0
    g_match = torch.func.grad(lambda v: weight * problem.objective(v, first)[1][0])(zero)
    g_val = torch.func.grad(lambda v: problem.objective(v, first)[1][1])(zero)
    summary["matching_to_val_ratio"] = (abs(weight * summary["matching_uniform"])
                                        / max(summary["val_loss_uniform"], 1e-30))
    summary["matching_to_val_grad_ratio"] = float(g_match.norm() / g_val.norm().clamp_min(1e-30))
    return summary


def weight_spread(weights: Tensor) -> dict[str, float]:
    """How far the learned weights are from uniform: the largest over the smallest, the
    entropy of ω relative to uniform's (1 = uniform), and the effective sample size
    1 / Σω² relative to N (1 = uniform)."""
    w = weights.double().flatten()
    omega = w / w.sum()
    n = len(omega)
    entropy = float(-(omega * omega.clamp_min(1e-300).log()).sum())
    return {"weight_max_min_ratio": float(w.max() / w.min().clamp_min(1e-300)),
            "weight_entropy_rel": entropy / math.log(n) if n > 1 else 1.0,
            "weight_ess_rel": float(1.0 / omega.pow(2).sum()) / n}


def _flat(grads: Params) -> Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def _mean_offdiag(m: Tensor) -> float:
    n = len(m)
    return float((m.sum() - m.diagonal().sum()) / (n * (n - 1))) if n > 1 else float("nan")


@torch.no_grad()
def gradient_diagnostics(problem: MetaProblem, rows: dict, weights: Tensor) -> dict:
    """The paper's Figure 1 and 2 for one block, at θ (before reconstruction).

    ``rows`` are training rows (a record with ``index``), ``weights`` the learned (N,)
    weights. Per timestep t: u_t = ∇_θ Σ_{i∈t} w_i L_i under uniform and learned w; their
    cosine matrices; the same for the G timestep groups (sums of u_t over a group, which
    is where per-sample weights change directions: within one timestep a per-timestep
    weight only rescales u_t); the learned weight mass per timestep; and each timestep's
    alignment cos(u_t, ∇_θ L(θ; X^V)) with the validation gradient.

    Memory stays at a few θ-sized vectors whatever the number of timesteps T: with J the
    Jacobian of the rows' errors and c_t a row-coefficient vector, u_t = Jᵀc_t (one
    backward) and ⟨u_s, u_t⟩ = c_sᵀ(J u_t) (one forward-mode pass), so each u_t lives only
    while its Gram column is taken. Keeping all 2T vectors instead costs 2T weight-sized
    copies of the block: hundreds of copies at a paper protocol's timestep count.
    """
    theta, view = problem.theta, problem.view

    def errors(th: Params) -> Tensor:
        return sample_error(call(view, th, rows), rows["target"])

    with torch.enable_grad():
        err, vjp_fn = torch.func.vjp(errors, theta)
        val_err, val_vjp = torch.func.vjp(
            lambda th: sample_error(call(view, th, problem.val), problem.val["target"]), theta)
        val_grad = _flat(val_vjp(torch.full_like(val_err, 1 / len(val_err)))[0])
        del val_vjp
    t = rows["t"]
    ts = torch.unique(t)
    masks = torch.stack([(t == step).to(err.dtype) for step in ts]) / len(err)  # (T, N)
    coefs = {"uniform": masks, "learned": masks * weights[rows["index"]].to(err.dtype)}
    val_norm = val_grad.norm()
    group_of_t = timestep_groups(ts, problem.cfg.groups)
    to_groups = torch.nn.functional.one_hot(group_of_t).to(torch.float64)  # (T, groups)
    out: dict = {"timesteps": [int(v) for v in ts]}
    for label, c in coefs.items():
        gram = torch.empty(len(ts), len(ts), dtype=torch.float64, device=err.device)
        dots = torch.empty(len(ts), dtype=torch.float64, device=err.device)
        for k in range(len(ts)):
            with torch.enable_grad():
                u = vjp_fn(c[k])[0]
            ju = torch.func.jvp(errors, (theta,), (u,))[1]  # J u_t, over the rows
            gram[:, k] = (c @ ju).double()
            flat = _flat(u)
            gram[k, k] = flat.double().pow(2).sum()  # the diagonal exactly, from u_t itself
            if label == "uniform":
                dots[k] = (flat @ val_grad).double()
            del u, flat
        gram = (gram + gram.T) / 2  # the two products of a pair agree up to rounding
        cos = _gram_cosines(gram)
        out[f"cos_{label}"] = cos.tolist()
        out[f"mean_cos_{label}"] = _mean_offdiag(cos)
        out[f"group_mean_cos_{label}"] = _mean_offdiag(
            _gram_cosines(to_groups.T @ gram @ to_groups))
        if label == "uniform":
            norms = gram.diagonal().sqrt().clamp_min(1e-30)
            out["alignment"] = (dots / (norms * val_norm.double().clamp_min(1e-30))).tolist()
    mass = torch.zeros(len(problem.timesteps), dtype=torch.float64, device=weights.device)
    mass.index_add_(0, problem.row_slot, weights.double() / weights.double().sum())
    out["mass_timesteps"] = [int(v) for v in problem.timesteps]
    out["weight_mass"] = mass.tolist()
    return out


def _gram_cosines(gram: Tensor) -> Tensor:
    """Cosines from inner products: G_st / (|u_s| |u_t|)."""
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-30)
    return (gram / norms[:, None] / norms[None, :]).float()
