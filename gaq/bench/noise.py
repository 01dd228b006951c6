"""The quantization-noise table of a benchmark, from ``curves.parquet`` alone: per method
and bit-width, the paired noise-prediction MSE on held-out FP trajectories and the
correlation k_t of the error with eps_fp (PTQD's noise model), summarised over the
sampler's steps. A method with a sampler correction (PTQD) gets a second row measured
before it, so what the correction removes is visible next to what it leaves."""

from __future__ import annotations

import pandas as pd

from gaq.bench import labels
from gaq.eval.curve_names import UNCORRECTED

__all__ = ["noise_table"]


def _row(label: str, bits: str, mse: pd.Series, k: pd.Series) -> str:
    lo, hi = k.idxmin(), k.idxmax()
    positive = int((k > 0).sum())
    return (f"| {label} | {bits} | {mse.mean():.5f} | {mse.iloc[0]:.4f} | {k.mean():+.4f} "
            f"| {k[lo]:+.4f} (t={lo}) "
            f"| {k[hi]:+.4f} (t={hi}) | {k.abs().max():.4f} | {positive}/{len(k)} |")


def noise_table(curves: pd.DataFrame, benchmark: str) -> str | None:
    """Markdown, or None when the curves hold no ``noise_k`` (results older than it). One
    table per model: models differ in schedule and step count, so their steps never pool."""
    if curves.empty:
        return None
    quant = curves[~curves["method"].map(labels.is_fp)]
    if not (quant["curve"] == "noise_k").any():
        return None
    if "model" not in quant:
        quant = quant.assign(model="")
    models = sorted(quant["model"].unique())
    lines = [f"# {benchmark}: quantization noise against FP, per sampler step", "",
             "On held-out FP trajectories (every sampler step). k_t is the least-squares slope "
             "of the noise-prediction error ε_q − ε_FP on ε_FP at step t (PTQD's "
             "ε_q = (1+k_t)·ε_FP + δ_t): k_t > 0 inflates ε, k_t < 0 shrinks it. Measured on "
             "the ε the sampler uses, after the method's correction; \"before correction\" "
             "rows are the same model without it (shown where the correction changes ε). "
             "ε-MSE is the mean over steps; the last step (smallest t, where x_t holds almost "
             "no noise) is shown apart because it can dominate that mean. Means over seeds."]
    for model in models:
        if len(models) > 1:
            lines += ["", f"## {model}"]
        lines += ["", *_model_rows(quant[quant["model"] == model])]
    return "\n".join(lines) + "\n"


def _model_rows(quant: pd.DataFrame) -> list[str]:
    # one value per (method, bits, curve, timestep): the mean over seeds
    mean = quant.groupby(["method", "bits", "curve", "timestep"])["value"].mean()
    measured = set(mean.index.droplevel("timestep"))
    lines = ["| method | bits | ε-MSE | ε-MSE, last step | mean k_t | min k_t | max k_t "
             "| max \\|k_t\\| | steps with k_t > 0 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    methods = labels.method_order(quant["method"])
    for bits in labels.bits_order(quant["bits"]):
        for method in methods:
            for suffix, note in (("", ""), (UNCORRECTED, " (before correction)")):
                key = (method, bits, "noise_k" + suffix)
                if key not in measured:
                    continue
                k = mean.loc[key]
                mse = mean.loc[(method, bits, "eps_mse" + suffix)]
                if suffix and mse.equals(mean.loc[(method, bits, "eps_mse")]):
                    continue  # the correction left eps as it was (e.g. switched off)
                lines.append(_row(labels.method_label(method) + note, bits, mse, k))
    return lines
