"""GAQ's report (``GAQ.report``), rendered from the diagnostics tables its cells write
(``gaq_blocks``, ``gaq_conflict``, ``gaq_weights``): the gradient-conflict heat map (the
paper's Figure 1), learned weight against timestep and against gradient alignment
(Figure 2), and a table of mean pairwise gradient cosines under uniform and learned
weights, per block. The bench layer knows none of this: it renders what a method's
report declares (:class:`gaq.bench.reports.MethodReport`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gaq.bench import labels
from gaq.bench.plots import COLUMN_WIDTH, figure_title, method_color, new_figure, plot_style
from gaq.bench.reports import MethodReport

__all__ = ["GAQReport", "conflict_heatmap", "cosine_table", "proxy_vs_target",
           "weight_vs_alignment", "weights_by_timestep"]


def conflict_heatmap(conflict: pd.DataFrame, title: str = "") -> Figure:
    """Cosine similarity between per-timestep gradients of the block loss, under uniform
    and under learned weights (mean over the rows given: blocks and seeds)."""
    with plot_style():
        fig = new_figure(1.4 * COLUMN_WIDTH, 2.4)
        axes = fig.subplots(1, 2, sharey=True)
        image = None
        for ax, weights in zip(axes, ("uniform", "learned"), strict=True):
            part = conflict[conflict["weights"] == weights]
            m = part.pivot_table(index="t_i", columns="t_j", values="cosine", aggfunc="mean")
            m = m.sort_index(ascending=False).sort_index(axis=1, ascending=False)
            image = ax.imshow(m.values, vmin=-1, vmax=1, cmap="RdBu_r")
            ticks = range(0, len(m), max(1, len(m) // 5))
            ax.set_xticks(list(ticks), [str(m.columns[i]) for i in ticks], rotation=90)
            ax.set_yticks(list(ticks), [str(m.index[i]) for i in ticks])
            off = m.values[~np.eye(len(m), dtype=bool)].mean() if len(m) > 1 else np.nan
            ax.set_title(f"{weights} ω, mean cos {off:.3f}")
            ax.set_xlabel("timestep")
        axes[0].set_ylabel("timestep")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label="gradient cosine")
        if title:
            fig.suptitle(title)
    return fig


def weights_by_timestep(weights: pd.DataFrame, title: str = "") -> Figure:
    """Learned weight mass per timestep (×T, so uniform = 1), mean over blocks and seeds,
    one line per method."""
    with plot_style():
        fig = new_figure()
        ax = fig.add_subplot()
        if title:
            fig.suptitle(title)
        for method in labels.method_order(weights["method"]):
            part = weights[weights["method"] == method]
            per_t = part.groupby("timestep")["weight_mass"].mean()
            ax.plot(per_t.index, per_t.values * len(per_t), marker="o",
                    color=method_color(method), label=labels.method_label(method))
        ax.axhline(1.0, color="0.5", lw=0.6, ls="--")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("weight mass × T (uniform = 1)")
        ax.legend(frameon=False)
    return fig


def weight_vs_alignment(weights: pd.DataFrame, title: str = "") -> Figure:
    """Each (block, timestep) group's learned weight mass against the cosine of its
    training gradient with the validation gradient (the paper's Figure 2)."""
    with plot_style():
        fig = new_figure()
        ax = fig.add_subplot()
        if title:
            fig.suptitle(title)
        mean = weights.groupby(["block", "timestep"])[["weight_mass", "alignment"]].mean()
        n_t = weights["timestep"].nunique()
        points = ax.scatter(mean["alignment"], mean["weight_mass"] * n_t, s=5,
                            c=mean.index.get_level_values("timestep"), cmap="viridis")
        if len(mean) > 2:
            r = np.corrcoef(mean["alignment"], mean["weight_mass"])[0, 1]
            ax.set_title(f"Pearson r = {r:.2f} over {len(mean)} (block, t) groups")
        ax.axhline(1.0, color="0.5", lw=0.6, ls="--")
        ax.set_xlabel("cos(group gradient, validation gradient)")
        ax.set_ylabel("weight mass × T")
        fig.colorbar(points, ax=ax, label="timestep")
    return fig


def cosine_table(blocks: pd.DataFrame) -> str:
    """Markdown: mean pairwise cosine of the timestep-group gradients (and of the
    per-timestep gradients) under uniform vs learned weights, per method and bit-width
    (mean over blocks and seeds), then per block for each method and bit-width."""
    cols = ["group_mean_cos_uniform", "group_mean_cos_learned", "mean_cos_uniform",
            "mean_cos_learned", "meta_seconds"]
    cols = [c for c in cols if c in blocks]
    head = ("| method | bits | group cos, uniform | group cos, learned | per-t cos, uniform "
            "| per-t cos, learned | meta s/block |")
    lines = ["# GAQ gradient diagnostics", "",
             "Mean pairwise cosine similarity between the gradients (w.r.t. the AdaRound "
             "variables, at the start of each block's reconstruction) of the timestep groups "
             "(G = 5) and of the individual timesteps; higher = less conflict. Means over "
             "blocks and seeds.", "", head, "|---|---|---:|---:|---:|---:|---:|"]
    summary = blocks.groupby(["method", "bits"])[cols].mean()
    for (method, bits), row in summary.iterrows():
        lines.append(f"| {labels.method_label(method)} | {bits} | "
                     + " | ".join(f"{row[c]:.4f}" for c in cols[:4])
                     + f" | {row.get('meta_seconds', float('nan')):.2f} |")
    for (method, bits), part in blocks.groupby(["method", "bits"]):
        per_block = part.groupby("block", sort=False)[cols[:2]].mean()
        lines += ["", f"## {labels.method_label(method)} {bits}, per block", "",
                  "| block | group cos, uniform | group cos, learned | Δ |", "|---|---:|---:|---:|"]
        for block, row in per_block.iterrows():
            u, ln = row[cols[0]], row[cols[1]]
            lines.append(f"| {block} | {u:.4f} | {ln:.4f} | {ln - u:+.4f} |")
    return "\n".join(lines) + "\n" + effect_table(blocks)


#: per-block columns saying whether the meta-step did anything (recorded since the
#: matching term's scale became a choice; older results lack them)
EFFECT_COLUMNS = {
    "weight_max_min_ratio": "ω max/min", "weight_entropy_rel": "ω entropy / uniform",
    "weight_ess_rel": "ω ESS / N", "matching_to_val_ratio": "abs(L_GM) / L_V",
    "matching_to_val_grad_ratio": "‖∇_s L_GM‖ / ‖∇_s L_V‖",
    "objective_change": "meta objective, learned − uniform (rel.)",
    "heldout_change": "held-out block error, learned vs uniform ω (rel.)",
}


def objective_change(frame: pd.DataFrame) -> pd.Series:
    """The meta objective's relative change from uniform to learned ω."""
    return ((frame["objective_learned"] - frame["objective_uniform"])
            / frame["objective_uniform"].abs())


def rank_correlation(frame: pd.DataFrame) -> float:
    """Spearman's ρ between the meta objective's change and the held-out change (ranks:
    the objective's relative change is unbounded where the objective crosses zero)."""
    return float(frame["objective_change"].rank().corr(frame["heldout_change"].rank()))


def proxy_vs_target(frame: pd.DataFrame, by: str, title: str = "") -> Figure:
    """Change of the meta objective (the proxy ω is learned on) against change of the
    reconstructed block's held-out error (what GAQ exists to lower), learned vs uniform ω,
    one point per row of ``frame`` (columns ``objective_change``, ``heldout_change``),
    one marker per value of ``by``: does the proxy predict the target?"""
    with plot_style():
        fig = new_figure(1.3 * COLUMN_WIDTH, 2.6)
        ax = fig.add_subplot()
        markers = "osD^v<>p*"
        for i, (key, part) in enumerate(frame.groupby(by, sort=False)):
            ax.scatter(100 * part["objective_change"], 100 * part["heldout_change"], s=9,
                       marker=markers[i % len(markers)], label=str(key), alpha=0.8)
        if len(frame) > 2:
            ax.set_title(f"Spearman ρ = {rank_correlation(frame):.2f} over {len(frame)} "
                         "points")
        ax.axhline(0.0, color="0.5", lw=0.6, ls="--")
        ax.axvline(0.0, color="0.5", lw=0.6, ls="--")
        # the objective's relative change spans decades where L_GM makes the objective
        # cross zero: symmetric log beyond ±1 %, linear within
        if (100 * frame["objective_change"]).abs().max() > 50:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("meta objective, learned vs uniform ω (%)")
        ax.set_ylabel("held-out block error,\nlearned vs uniform ω (%)")
        ax.legend(frameon=False, fontsize=6)
        if title:
            fig.suptitle(title)
    return fig


def effect_table(blocks: pd.DataFrame) -> str:
    """Markdown: how far the learned ω moved from uniform and how much each term of the
    meta objective weighed, per method and bit-width (median over blocks and seeds, with
    the range); empty where the results predate these diagnostics."""
    frame = blocks.copy()
    if {"objective_learned", "objective_uniform"} <= set(frame):
        frame["objective_change"] = objective_change(frame)
    cols = [c for c in EFFECT_COLUMNS if c in frame and frame[c].notna().any()]
    if not any(c.startswith("weight_") for c in cols):
        return ""
    lines = ["", "## What the learned weights did", "",
             "Per block, at the start of its reconstruction: the spread of the learned ω "
             "(1 = uniform for entropy and effective sample size), the gradient-matching "
             "term against the validation loss at uniform ω (values, and the norms of their "
             "gradients w.r.t. the logits s: what the first meta-steps follow), and the meta "
             "objective's relative change on its first minibatch; with the held-out check "
             "(`heldout_check`), the block's error after AdaRound with learned ω relative to "
             "uniform ω at the same seed, on held-out rows (`heldout_rows`: `test`, rows "
             "nothing trains on, or `validation`, X^V, which ω was fitted on). Median "
             "[min, max] over blocks and seeds.", "",
             "| method | bits | " + " | ".join(EFFECT_COLUMNS[c] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for (method, bits), part in frame.groupby(["method", "bits"]):
        spread = [c for c in cols if c.startswith("weight_")]
        if part[spread].isna().all().all():  # uniform ω: nothing was learned
            continue
        cells = [f"{part[c].median():.3g} [{part[c].min():.3g}, {part[c].max():.3g}]"
                 for c in cols]
        lines.append(f"| {labels.method_label(method)} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class GAQReport(MethodReport):
    """GAQ's and its ablations' diagnostics (one report for all of them)."""

    tables = ("gaq_blocks", "gaq_conflict", "gaq_weights")

    def markdown(self, frames: dict[str, pd.DataFrame], benchmark: str) -> dict[str, str]:
        blocks = frames.get("gaq_blocks")
        if blocks is None or not len(blocks):
            return {}
        return {"gaq_diagnostics": cosine_table(blocks)}

    def figures(self, frames: dict[str, pd.DataFrame],
                benchmark: str) -> Iterator[tuple[str, Figure]]:
        # One set of figures per model: the models' blocks and timesteps differ, so a mean
        # over them shows no model. File names carry the model where there are several, as
        # the benchmark's other figures do.
        models = sorted({m for f in frames.values() if "model" in f for m in f["model"].dropna()})
        for model in models or [None]:
            yield from self._model_figures(
                {n: f[f["model"] == model] if model is not None and "model" in f else f
                 for n, f in frames.items()},
                figure_title(benchmark, model), f"{model}_" if len(models) > 1 else "")

    def _model_figures(self, frames: dict[str, pd.DataFrame], title: str,
                       prefix: str) -> Iterator[tuple[str, Figure]]:
        conflict, weights = frames.get("gaq_conflict"), frames.get("gaq_weights")
        if conflict is not None and len(conflict):
            for (method, bits), part in conflict.groupby(["method", "bits"]):
                yield (f"{prefix}conflict_{method}_{bits}",
                       conflict_heatmap(part, f"{title}, {labels.method_label(method)} {bits}, "
                                        "mean over blocks"))
        blocks = frames.get("gaq_blocks")
        if blocks is not None and {"heldout_change", "objective_uniform"} <= set(blocks):
            checked = blocks[blocks["heldout_change"].notna()].copy()
            checked["objective_change"] = objective_change(checked)
            for (method, bits), part in checked.groupby(["method", "bits"]):
                yield (f"{prefix}proxy_vs_heldout_{method}_{bits}", proxy_vs_target(
                    part, "block", f"{title}, {labels.method_label(method)} {bits}"))
        if weights is not None and len(weights):
            learned = weights[weights["method"] != "gaq-uniform"]  # its weights are all 1
            for bits, part in learned.groupby("bits"):
                yield f"{prefix}weights_by_t_{bits}", weights_by_timestep(part, f"{title}, {bits}")
                for method, mpart in part.groupby("method"):
                    yield (f"{prefix}alignment_{method}_{bits}", weight_vs_alignment(
                        mpart, f"{title}, {labels.method_label(method)} {bits}"))
