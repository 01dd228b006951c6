"""The steps of one quantization, shared by ``gaq quantize`` and every benchmark cell, so the
two cannot diverge: record (or load) the calibration set → quantize with the method →
save the state. A benchmark cell then samples and scores the model it got (the runner);
``gaq quantize`` stops after saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gaq.calibration import CalibrationSpec
    from gaq.config import QuantConfig
    from gaq.methods.base import Method, QuantResult
    from gaq.models.pipeline import Pipeline

__all__ = ["quantize_pipeline", "save_quantized", "state_size_bound"]


def quantize_pipeline(pipe: Pipeline, method: Method, quant: QuantConfig,
                      spec: CalibrationSpec, *, model_id: str,
                      progress: bool = False) -> QuantResult:
    """Quantize ``pipe``'s denoiser with ``method`` at ``quant`` on the calibration set
    ``spec`` describes (recorded with the pipeline's own sampler on its device, or read
    from the disk cache)."""
    from gaq.calibration import record_calibration
    from gaq.models.adapters import adapter_for

    calib = record_calibration(pipe, spec, model_id=model_id, progress=progress)
    return method.quantize(pipe.denoiser, adapter_for(pipe.denoiser), calib, quant)


def save_quantized(result: QuantResult, folder: str | Path, pipe: Pipeline,
                   meta: dict[str, Any] | None = None) -> Path:
    """Write ``result`` to ``folder``: the state (``state.safetensors``, ``state.json``
    with the method's state and ``meta``), the layer report with the pipeline's other
    components (``layers.md``) and the method's diagnostics tables as CSV. Returns the
    folder; ``gaq.methods.base.restore`` reads it back."""
    import pandas as pd

    from gaq.quantize import save_state, weight_sqnr_db

    out = save_state(result.model, result.report, result.quant, folder,
                     meta={**result.state, **(meta or {})})
    for name, records in result.diagnostics.items():
        if records:
            pd.DataFrame(records).to_csv(out / f"{name}.csv", index=False)
    rows = "".join(f"| {name} | {what} |\n" for name, what in pipe.components.items())
    (out / "layers.md").write_text(
        result.report.to_markdown(weight_sqnr_db(result.model))
        + "\n## Pipeline components\n\n| component | precision |\n|---|---|\n" + rows)
    return Path(out)


# state.json's share of a state beyond the layers: a method's per-channel numbers (HTG's
# fold: a shift and a scale per input channel) and GAQ's meta-step history (one record per
# block and meta-iteration), at most this many bytes each as indented JSON
_JSON_FLOAT_BYTES = 24
_HISTORY_RECORD_BYTES = 160


def state_size_bound(pipe: Pipeline, method: Method, quant: QuantConfig) -> int:
    """Bytes at most of the state :func:`save_quantized` writes for ``pipe``'s denoiser
    quantized by ``method`` at ``quant`` (``state.safetensors`` and ``state.json``;
    :func:`gaq.quantize.state_bytes_bound`): the layers the method quantizes at their
    bit-widths, activation tables of every timestep the scheduler or the method knows,
    and the numbers the method keeps in ``state.json``."""
    from gaq.models.adapters import QUANTIZABLE, adapter_for
    from gaq.quantize import state_bytes_bound

    model = pipe.denoiser
    adapter = adapter_for(model)
    config = method.config
    rows = max(int(getattr(pipe.scheduler.config, "num_train_timesteps", 0) or 0),
               int(getattr(config, "num_train_timesteps", 0) or 0), 1000)
    layers = [m for m in model.modules() if isinstance(m, QUANTIZABLE)]
    channels = sum(m.weight.shape[1] for m in layers)
    meta_iters = int(getattr(getattr(config, "meta", None), "iters", 0) or 0)
    json_extra = (2 * channels * _JSON_FLOAT_BYTES
                  + meta_iters * len(layers) * _HISTORY_RECORD_BYTES)
    return state_bytes_bound(model, adapter, method.effective_quant(quant),
                             method.skip_filter(adapter), table_rows=rows,
                             json_bytes=json_extra)
