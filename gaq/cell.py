"""The steps of one quantization, shared by ``gaq quantize`` and every benchmark cell, so the
two cannot diverge: record (or load) the calibration set → quantize with the method →
save the state. A benchmark cell then samples and scores the model it got (the runner);
``gaq quantize`` stops after saving.

The way back from a saved state goes through here too: :func:`load_quantized` restores it
on the model it was made for (``gaq sample --state``), and :func:`evaluate_state` samples
and scores it with the runner's own cell steps (``gaq evaluate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaq.errors import GaqError

if TYPE_CHECKING:
    import torch

    from gaq.bench.spec import EvalSpec, SamplerSpec
    from gaq.calibration import CalibrationSpec
    from gaq.config import QuantConfig
    from gaq.methods.base import Method, QuantResult
    from gaq.models.pipeline import Pipeline

__all__ = ["evaluate_state", "load_quantized", "quantize_pipeline", "read_state_meta",
           "restore", "save_quantized", "state_model", "state_size_bound"]

#: the key of ``state.json``'s meta holding the FP denoiser's weights digest
#: (:func:`gaq.identity.state_dict_digest`): it tells a state's own model from another
#: that has the same layer names (a retrained checkpoint, another pipeline folder)
WEIGHTS_DIGEST = "weights_digest"


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
    folder; :func:`restore` reads it back."""
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


def restore(model: torch.nn.Module, folder: str | Path) -> QuantResult:
    """A saved quantization (``gaq.quantize.save_state``) rebuilt on a fresh FP ``model``,
    with everything the method needs at sampling time: the FP model rewritten as the
    method rewrote it (:meth:`Method.prepare_restore`), the quantized layers (finished by
    :meth:`Method.finish_restore`) and, for methods that correct the sampler (PTQD), their
    sampler hook."""
    import json

    from gaq.methods.base import QuantResult
    from gaq.quantize import load_state
    from gaq.registry import get_method

    try:  # unreadable states get load_state's one-line errors below
        saved = json.loads((Path(folder) / "state.json").read_text()).get("meta", {})
    except (OSError, ValueError, AttributeError):
        saved = {}
    method = get_method(saved["method"]) if "method" in saved else None
    if method is not None:
        model = method.prepare_restore(model, saved)
    qmodel, report, meta = load_state(model, folder)
    if method is not None:
        qmodel = method.finish_restore(qmodel, meta)
    hook = None if method is None else method.restore_hook(meta)
    return QuantResult(model=qmodel, state=meta, sampler_hook=hook, report=report)


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


# -- the way back: a saved state ----------------------------------------------------------

def read_state_meta(folder: str | Path) -> dict[str, Any]:
    """The meta of the state in ``folder`` (what ``gaq quantize`` recorded: the method's
    state, the model, its weights digest, the calibration spec, the stats), read before
    any model is loaded; a folder that is no readable state is one :class:`GaqError`."""
    from gaq.quantize import read_state

    meta = read_state(folder)["meta"]
    if not isinstance(meta, dict):
        raise GaqError(f"{Path(folder) / 'state.json'}: meta is not a table; re-run "
                       "`gaq quantize` to write it again")
    return meta


def state_model(folder: str | Path, meta: dict[str, Any], model: str | None) -> str:
    """The model to restore the state in ``folder`` on: ``model`` when given, else the one
    the state was made for. A ``model`` other than the recorded one is refused here only
    when the state has no weights digest to settle it (the same weights may be named two
    ways: a bundled name and its folder); :func:`load_quantized` compares digests."""
    made_for = meta.get("model")
    if model is None:
        if not isinstance(made_for, str):
            raise GaqError(f"quantization state {folder} does not record the model it was "
                           "made for (a benchmark cell's state); name it with --model")
        return made_for
    if isinstance(made_for, str) and model != made_for and WEIGHTS_DIGEST not in meta:
        raise GaqError(f"quantization state {folder} was made for model {made_for!r}, not "
                       f"{model!r}; leave --model out to use {made_for!r}")
    return model


def load_quantized(folder: str | Path, pipe: Pipeline, model_id: str, meta: dict[str, Any],
                   *, digest: str | None = None) -> QuantResult:
    """The state in ``folder`` restored on ``pipe``'s denoiser (:func:`restore` works on a
    copy: the FP model stays usable), with the method's sampler hook, on the pipeline's
    device. A state whose recorded weights digest is not the denoiser's (``digest``, when
    the caller has it) is refused before anything is rebuilt."""
    from gaq.identity import state_dict_digest

    expected = meta.get(WEIGHTS_DIGEST)
    if expected is not None:
        got = digest if digest is not None else state_dict_digest(pipe.denoiser)
        if got != expected:
            made_for = meta.get("model")
            if made_for == model_id:  # same name, other weights: the model changed since
                raise GaqError(f"quantization state {folder} was made for other weights of "
                               f"model {model_id!r} (digest {expected[:12]}, now {got[:12]}); "
                               "re-run `gaq quantize` on the model as it is now")
            what = f"model {made_for!r}" if made_for else "another model"
            raise GaqError(f"quantization state {folder} was made for {what}, not "
                           f"{model_id!r} (weights digest {expected[:12]}, not {got[:12]}); "
                           "leave --model out, or pass the model it was made for")
    result = restore(pipe.denoiser, folder)
    result.model.to(pipe.device)
    return result


def evaluate_state(folder: str | Path, pipe: Pipeline, model_id: str, meta: dict[str, Any],
                   *, sampler: SamplerSpec, evaluation: EvalSpec, seed: int
                   ) -> dict[str, Any]:
    """Score the state in ``folder`` against the FP model ``pipe`` the way a benchmark
    does for one model and seed: the FP cell, then the quantized one, each sampled and
    scored by :meth:`gaq.bench.runner.Runner.measure` (the code every cell runs), so the
    numbers are those a benchmark with these settings would log, on the pipeline's
    device. No MLflow run, no Parquet row. Returns a JSON-able summary."""
    import time

    import torch

    from gaq.bench.runner import Cell, CellOutcome, Runner
    from gaq.bench.spec import FP, Benchmark, MethodEntry
    from gaq.calibration import CalibrationSpec
    from gaq.config import QuantConfig
    from gaq.quantize import read_state

    bits = QuantConfig.from_dict(read_state(folder)["quant"]).label
    method = MethodEntry(str(meta.get("method", "state")))
    # a one-model, one-seed benchmark held in memory: the runner reads its settings from it
    bench = Benchmark(name="evaluate", path=Path(folder) / "state.json", description="",
                      models=(model_id,), model_key="", sampler=sampler,
                      calibration=CalibrationSpec(), eval=evaluation, bits=(bits,),
                      methods=(MethodEntry(FP), method))
    runner = Runner(bench, device=str(pipe.device))
    runner.join_local()
    ctx = runner.model(model_id, pipe)
    restored = load_quantized(folder, pipe, model_id, meta, digest=ctx.digest)
    # FP first, as in a benchmark's grid: the quantized cell's paired metrics compare
    # against the FP images it sampled from the same noise
    fp = CellOutcome(Cell(model_id, MethodEntry(FP), "FP", seed), "", started=time.time(),
                     model=ctx.pipe.denoiser)
    quantized = CellOutcome(Cell(model_id, method, bits, seed), "", started=time.time(),
                            model=restored.model, hook=restored.sampler_hook,
                            report=restored.report)
    # the calibration's cost, as a cell records it before sampling
    stats = meta.get("stats") if isinstance(meta.get("stats"), dict) else {}
    quantized.metrics.update({k: float(v) for k, v in stats.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for out in (fp, quantized):
        if pipe.device.type == "cuda":  # each cell's own peak, as the runner measures it
            torch.cuda.reset_peak_memory_stats(pipe.device)
        runner.measure(out)
    return {"state": str(folder), "model": model_id, "method": method.name, "bits": bits,
            "seed": seed, "sampler": sampler.to_dict(), "eval": evaluation.to_dict(),
            "metrics": quantized.metrics, "fp": fp.metrics}
