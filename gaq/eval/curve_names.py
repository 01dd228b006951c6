"""Names of the per-timestep curves the runner records, shared by the code that measures
them (:mod:`gaq.eval.eps`) and the tables and plots that read them back; torch-free, so
regenerating reports from Parquet does not import torch."""

UNCORRECTED = "_uncorrected"  # suffix of a curve measured before the method's sampler hook

#: A curve's axis label and one-line description (by its name without ``_by_timestep``
#: and without the suffix above).
CURVE_LABELS = {
    "eps_mse": ("ε-MSE", "quantized vs FP noise prediction, held-out trajectories"),
    "noise_k": ("k_t", "slope of the quantized on the FP noise prediction"),
}


def curve_label(name: str) -> tuple[str, str]:
    """Axis label and description of curve ``name`` (e.g. ``noise_k_uncorrected``)."""
    base = name.removesuffix("_by_timestep")
    before = base.endswith(UNCORRECTED)
    label, what = CURVE_LABELS.get(base.removesuffix(UNCORRECTED), (base, ""))
    return label, (f"{what}, before the sampler hook" if before else what)
