"""Turning an FP denoiser into a fake-quantized one, the layer report, and the
quantization state that saves to safetensors and loads back bit-identically.

``plan`` decides (from the adapter's skip policy, any method rules, and the
:class:`~gaq.config.QuantConfig`) what happens to each layer; ``build`` applies a plan
to a copy of the model. A saved state stores the plan, so loading rebuilds exactly the
same structure before loading the tensors. Each quantized weight is saved as integer codes
packed at its bit-width with its grid (:mod:`gaq.quant.packing`), about ``bits/32`` of
its float32 size, and rebuilt from them bit for bit.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaq.config import QuantConfig, TensorQuantSpec
from gaq.errors import GaqError
from gaq.finite import first_non_finite
from gaq.models.adapters import QUANTIZABLE, ModelAdapter, SkipFilter
from gaq.quant import FakeQuantizer, QuantLayer, attach_timestep_context, quantize_layer

STATE_FORMAT = 2
W8A8 = 8


@dataclass(frozen=True)
class LayerDecision:
    name: str
    kind: str  # "Conv2d" | "Linear" | "attention"
    status: str  # "quantized" | "w8a8" | "fp"
    weight_bits: int | None
    act_bits: int | None
    split: int | None = None
    reason: str = ""


class LayerReport(list):
    """One :class:`LayerDecision` per conv/linear layer and attention module."""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self:
            out[d.status] = out.get(d.status, 0) + 1
        return out

    def to_rows(self) -> list[dict]:
        return [asdict(d) for d in self]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> LayerReport:
        return cls(LayerDecision(**r) for r in rows)

    def to_markdown(self, weight_sqnr: dict[str, float] | None = None) -> str:
        """The table; with ``weight_sqnr`` (:func:`weight_sqnr_db` of the quantized model)
        a column of each layer's weight SQNR and a line with its median and minimum."""
        head = "| layer | type | status | W | A |" + (" W SQNR (dB) |" if weight_sqnr else "")
        lines = [head + " reason |", "|---|---|---|---|---|" + ("---:|" if weight_sqnr else "")
                 + "---|"]
        for d in self:
            w = "-" if d.weight_bits is None else d.weight_bits
            a = "-" if d.act_bits is None else d.act_bits
            sqnr = ""
            if weight_sqnr:
                v = weight_sqnr.get(d.name)
                sqnr = f" {'-' if v is None else f'{v:.1f}'} |"
            lines.append(f"| {d.name} | {d.kind} | {d.status} | {w} | {a} |{sqnr} {d.reason} |")
        out = "\n".join(lines) + "\n"
        if weight_sqnr:
            low = min(weight_sqnr, key=weight_sqnr.__getitem__)
            median = statistics.median(weight_sqnr.values())
            out += (f"\nWeight SQNR, 10·log10(Σw² / Σ(w − Q(w))²) of each quantized weight "
                    f"against its FP weight: median {median:.1f} dB over {len(weight_sqnr)} "
                    f"layers, lowest {weight_sqnr[low]:.1f} dB ({low}).\n")
        return out


def plan(model: nn.Module, adapter: ModelAdapter, quant: QuantConfig,
         extra_skip: SkipFilter | None = None) -> LayerReport:
    """Decide each layer's fate: the model's skip policy and the run's first/last-layer
    rule first, then the method's rules (which may only add restrictions), else the
    configured bits."""
    adapter.check_supported(extra_skip)
    splits = adapter.shortcut_splits() if quant.split_shortcut else {}
    wb, ab = quant.weight.bits, quant.act.bits
    report = LayerReport()
    for name, mod in model.named_modules():
        attention = quant.attention and type(mod).__name__ == "Attention"
        if not isinstance(mod, QUANTIZABLE) and not attention:
            continue
        rule = adapter.skip(mod, name) or adapter.first_last_rule(name, quant.first_last)
        extra = extra_skip(mod, name) if extra_skip is not None else None
        # a method rule applies where the model has none, or where it is stricter
        # ("fp" over the model's "w8a8": TDQ keeps conv_in/conv_out FP)
        if extra is not None and (rule is None or (rule.precision == "w8a8"
                                                   and extra.precision == "fp")):
            rule = extra
        kind = "attention" if attention else type(mod).__name__
        if rule is not None and rule.precision == "fp":
            report.append(LayerDecision(name, kind, "fp", None, None, reason=rule.reason))
        elif rule is not None and rule.precision == "w8a8":
            a8 = None if ab is None else W8A8
            report.append(LayerDecision(name, kind, "w8a8", None if attention else W8A8, a8,
                                        reason=rule.reason))
        elif wb is None and ab is None:
            report.append(LayerDecision(name, kind, "fp", None, None, reason="config: W/A off"))
        else:
            report.append(LayerDecision(name, kind, "quantized", None if attention else wb, ab,
                                        split=splits.get(name)))
    return report


def observer_kwargs(spec: TensorQuantSpec) -> dict:
    """The range observer's own settings from ``spec``: the Lp norm and grid of the MSE
    search, the EMA momentum; min/max takes none."""
    if spec.range_init == "mse":
        return {"p": spec.mse_p, "grid": spec.mse_grid}
    if spec.range_init == "ema":
        return {"momentum": spec.ema_momentum}
    return {}


def _act_kwargs(spec: TensorQuantSpec) -> dict:
    return {"act_symmetric": spec.symmetric, "act_observer": spec.range_init,
            "act_per_timestep": spec.per_timestep, "act_observer_kwargs": observer_kwargs(spec)}


def build(model: nn.Module, report: LayerReport, quant: QuantConfig) -> nn.Module:
    """A fake-quantized copy of ``model`` following ``report``; the original is untouched.

    The copy's modules are its own, its parameters are the original's: every wrapper
    keeps its FP layer (``.fp``) as the reference, and no stage writes an FP weight (a
    method that rewrites the model, HTG's fold, does so on a copy of its own before
    building), so a second set of FP weights would only double the model in memory (1.1
    GB on the LDM-4 LSUN architecture). Buffers are copied."""
    from gaq.quant import QuantAttnProcessor

    # the memo maps each parameter to itself, so deepcopy shares it instead of copying
    shared: dict[int, Any] = {id(p): p for p in model.parameters()}
    qmodel = copy.deepcopy(model, shared).eval()
    for d in report:
        if d.status == "fp":
            continue
        module = qmodel.get_submodule(d.name)
        if d.kind == "attention":
            processor = QuantAttnProcessor.build(
                d.act_bits, quant.softmax_bits if d.status == "quantized" else W8A8,
                symmetric=quant.act.symmetric, observer=quant.act.range_init,
                per_timestep=quant.act.per_timestep, observer_kwargs=observer_kwargs(quant.act),
                softmax_symmetric=quant.softmax_symmetric,
                device=next(module.parameters()).device)
            module.set_processor(processor)
            continue
        layer = quantize_layer(
            module, d.weight_bits, d.act_bits, weight_symmetric=quant.weight.symmetric,
            weight_observer=quant.weight.range_init, split=d.split,
            weight_observer_kwargs=observer_kwargs(quant.weight),
            weight_axis=None if quant.weight.granularity == "per_tensor" else 0,
            **_act_kwargs(quant.act))
        parent_name, _, child = d.name.rpartition(".")
        # setattr also works for ModuleList/Sequential children ("0", "1", ...)
        setattr(qmodel.get_submodule(parent_name) if parent_name else qmodel, child, layer)
    attach_timestep_context(qmodel)
    return qmodel


def quantize_model(model: nn.Module, adapter: ModelAdapter, quant: QuantConfig,
                   extra_skip: SkipFilter | None = None) -> tuple[nn.Module, LayerReport]:
    """Plan and build in one call: the usual entry point for methods."""
    report = plan(model, adapter, quant, extra_skip)
    return build(model, report, quant), report


# -- walking a quantized model ---------------------------------------------------------

def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            yield name, mod


@torch.no_grad()
def weight_sqnr_db(model: nn.Module) -> dict[str, float]:
    """Per layer of ``model`` whose weight is quantized: the SQNR in dB of the quantized
    (frozen, after any rounding a method learned) weight against the FP weight,
    10·log10(Σw² / Σ(w − Q(w))²), in float64; ``inf`` where they are equal. How much of
    each weight survives quantization, whatever the method did to get there."""
    out: dict[str, float] = {}
    for name, layer in quant_layers(model):
        w = layer.fp.weight.double()
        noise = (w - layer.quantized_weight().double()).pow(2).sum()
        out[name] = float("inf") if noise == 0 else float(10 * torch.log10(w.pow(2).sum()
                                                                              / noise))
    return out


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """Every activation quantizer: layer inputs and attention operands (not weights)."""
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer) and ".weight_quantizers." not in f".{name}.":
            yield name, mod


def set_mode(model: nn.Module, mode: str) -> None:
    """"fp", "weight" (weights only) or "full" for every quantized layer; attention operand
    quantizers follow: on only in "full"."""
    for _, layer in quant_layers(model):
        layer.set_mode(mode)
    for name, q in act_quantizers(model):
        if ".processor." in f".{name}.":
            q.enable() if mode == "full" and q.calibrated else q.disable()


@torch.no_grad()
def calibrate_activations(model: nn.Module, forward_loop: Callable[[nn.Module], None],
                          upstream: str = "fp") -> int:
    """Range-initialise every activation quantizer from one pass of calibration data
    (weights already quantized, as they will be at inference); returns how many.

    ``upstream="fp"``: every quantizer observes the whole pass with full-precision
    activations upstream of it. ``upstream="quantized"``: the initialisation of BRECQ's and
    Q-Diffusion's code, where a quantizer sets its range on the first batch it sees and
    quantizes that batch at once, so each later quantizer is initialised on inputs the
    earlier ones already quantized (pass one batch: later batches only run quantized)."""
    if upstream not in ("fp", "quantized"):
        raise ValueError(f"upstream must be 'fp' or 'quantized', got {upstream!r}")
    quantizers = [q for _, q in act_quantizers(model)]
    set_mode(model, "weight")
    for q in quantizers:
        q.reset_observer()
        q.observe(True)
    hooks = []
    if upstream == "quantized":
        def init_then_quantize(module: nn.Module, inputs: tuple, output: torch.Tensor):
            if not module.observing:
                return None
            module.finalize()  # observed this batch: set the range from it
            module.enable()
            return module(inputs[0])

        hooks = [q.register_forward_hook(init_then_quantize) for q in quantizers]
    try:
        forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    for q in quantizers:
        if q.observing:
            q.finalize()
    set_mode(model, "full")
    return len(quantizers)


def fill_tables(model: nn.Module, timesteps: list[int]) -> int:
    """Give every per-timestep activation table a row for each of ``timesteps`` (the
    sampler's), copied from its nearest calibrated timestep: a calibration that keeps
    every n-th sampler step still serves every step. Returns how many tables grew."""
    grown = 0
    for _, q in act_quantizers(model):
        if q.mode == "table":
            before = q.timesteps.numel()
            grown += q.fill_table(timesteps).timesteps.numel() > before
    return grown


def freeze(model: nn.Module) -> nn.Module:
    """Quantize weights once and keep them dequantized: sampling pays only for activations."""
    for _, layer in quant_layers(model):
        layer.freeze_weights()
    return model


# -- state -------------------------------------------------------------------------------

# format 2: frozen weights as integer codes packed at their bit-width, with their grid
# (Δ, z per channel); format 1 (every frozen weight in full precision) still loads
STATE_FORMATS = (1, STATE_FORMAT)


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a method calibrated, as a format-1 state holds it: activation quantizers,
    attention operand quantizers and the frozen (quantized) weights. FP weights come from
    the FP model."""
    out = _act_tensors(model)
    for key, value in model.state_dict().items():
        if key.endswith("frozen_weight"):
            out[key] = value.detach().contiguous().clone()
    return out


def _act_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantizer tensors of a state (per-timestep tables, TDQ's, HTG's...), without
    the weights."""
    out = {}
    for key, value in model.state_dict().items():
        if ".weight_quantizers." in f".{key}":
            continue  # weights are saved quantized, not as their quantizers
        if "quantizer" in key:
            out[key] = value.detach().contiguous().clone()
    return out


def _packed_keys(name: str, index: int) -> tuple[str, str, str]:
    base = f"{name}.packed_weight.{index}"
    return f"{base}.codes", f"{base}.scale", f"{base}.zero_point"


def _weight_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Each quantized layer's frozen weight in compact form: per weight part, its integer
    codes packed at the grid's bit-width, with Δ and z; and the state.json entry saying
    how to rebuild it. A weight that does not rebuild bit for bit from codes on its
    quantizer's grid is kept in full precision, with the reason in its entry."""
    from gaq.quant.packing import encode_weight, pack_codes

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, layer in quant_layers(model):
        frozen = layer.frozen_weight
        parts, reason = encode_weight(layer)
        if not parts:
            tensors[f"{name}.frozen_weight"] = frozen.detach().contiguous().clone()
            entries[name] = {"stored": "full", "reason": reason}
            continue
        rows = []
        for i, (codes, grid, sign) in enumerate(parts):
            k_codes, k_scale, k_zero = _packed_keys(name, i)
            tensors[k_codes] = pack_codes(codes, grid.bits)
            tensors[k_scale] = grid.scale.detach().contiguous().clone()
            tensors[k_zero] = grid.zero_point.detach().contiguous().clone()
            rows.append({"bits": grid.bits, "qmin": grid.qmin, "qmax": grid.qmax,
                         "zero_sign": sign, "shape": list(codes.shape)})
        entries[name] = {"stored": "packed", "dtype": str(frozen.dtype).removeprefix("torch."),
                         "parts": rows}
    return tensors, entries


def save_state(model: nn.Module, report: LayerReport, quant: QuantConfig, folder: str | Path,
               meta: dict | None = None) -> Path:
    """Write ``state.safetensors`` and ``state.json`` (plan, config, how each weight is
    stored, metadata) to ``folder``."""
    from safetensors.torch import save_file

    for name, layer in quant_layers(model):
        if layer.frozen_weight is None:
            raise GaqError(f"layer {name!r} has no frozen weight: call gaq.quantize.freeze() "
                           "before saving a quantization state")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, entries = _weight_tensors(model)
    save_file({**_act_tensors(model), **weights}, str(folder / "state.safetensors"))
    doc = {"format": STATE_FORMAT, "quant": quant.to_dict(), "layers": report.to_rows(),
           "weights": entries, "meta": meta or {}}
    (folder / "state.json").write_text(json.dumps(doc, indent=1) + "\n")
    return folder


def state_weight_storage(folder: str | Path) -> dict[str, dict]:
    """How a saved state stores each quantized layer's weight (``state.json``'s
    ``weights``: packed codes, or full precision with the reason); empty for format 1."""
    doc = json.loads((Path(folder) / "state.json").read_text())
    return doc.get("weights", {})


_REDO = "re-run `gaq quantize` to write it again"


def read_state(folder: str | Path) -> dict:
    """``state.json`` of a saved state, checked without any model: the folder holds both
    files, the JSON parses, its format is one this version reads and it has every key.
    What ``gaq sample --state`` and ``gaq evaluate`` read (the model the state was made
    for) before loading anything; :func:`load_state` starts with it."""
    folder = Path(folder)
    redo = _REDO
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise GaqError(f"quantization state {folder} {what}; pass the folder `gaq quantize "
                       "--out` wrote (it holds state.json and state.safetensors)")
    for name in ("state.json", "state.safetensors"):
        if not (folder / name).is_file():
            raise GaqError(f"quantization state {folder} has no {name}; {redo}")
    try:
        doc = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GaqError(f"{folder / 'state.json'} is not valid JSON ({err}); {redo}") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found not in STATE_FORMATS or isinstance(found, bool):
        shown = repr(found) if isinstance(doc, dict) else type(doc).__name__
        raise GaqError(f"{folder}: quantization state format {shown} is not one this "
                       f"version of gaq reads ({', '.join(map(str, STATE_FORMATS))}); "
                       "re-run the quantization with this version of gaq")
    absent = [k for k in ("quant", "layers", "meta") + (("weights",) if found >= 2 else ())
              if k not in doc]
    if absent:
        raise GaqError(f"{folder / 'state.json'} lacks {', '.join(absent)}; {redo}")
    return doc


def load_state(model: nn.Module, folder: str | Path) -> tuple[nn.Module, LayerReport, dict]:
    """Rebuild the quantized model on a fresh FP ``model`` and load a saved state into it
    (either format: packed weight codes, or format 1's full-precision frozen weights).

    Every way a folder can be wrong (missing, not a folder, truncated or malformed files,
    a state of another model or of an unknown format, non-finite values) is one
    :class:`GaqError` naming the folder and what to do, never a raw parser or safetensors
    exception."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    redo = _REDO
    doc = read_state(folder)
    found = doc["format"]
    quant = QuantConfig.from_dict(doc["quant"])
    report = LayerReport.from_rows(doc["layers"])
    names = {n for n, _ in model.named_modules()}
    foreign = [d.name for d in report if d.name not in names]
    if foreign:
        raise GaqError(f"{folder}: the state was saved for another model (no layer "
                       f"{foreign[0]!r} here); load it onto the model it was made for")
    qmodel = build(model, report, quant)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise GaqError(f"{folder / 'state.safetensors'} cannot be read ({err}); "
                       f"{redo}") from None
    if found == 1:
        for _, layer in quant_layers(qmodel):
            # allocate the buffer so load_state_dict can fill it
            layer.frozen_weight = torch.empty_like(layer.fp.weight)
        expected = set(_state_tensors(qmodel))
        packed: dict[str, dict] = {}
    else:
        expected, packed = _expected_v2(qmodel, doc["weights"], folder, redo)
    missing = expected - set(tensors)
    unexpected = set(tensors) - expected
    if missing or unexpected:
        raise GaqError(f"{folder}: state does not match the model "
                       f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise GaqError(f"{folder}: tensor {bad} holds NaN or infinite values; {redo} "
                       "(and check the model's weights are finite)")
    module_tensors = {k: v for k, v in tensors.items() if ".packed_weight." not in k}
    try:
        qmodel.load_state_dict(module_tensors, strict=False)
        for name, entry in packed.items():
            _unpack_layer(qmodel.get_submodule(name), name, entry, tensors)
    # size mismatches (a same-named other model), malformed packed entries
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise GaqError(f"{folder}: the state does not fit this model ({first}); load it onto "
                       "the model it was made for") from None
    return qmodel, report, doc["meta"]


def _expected_v2(qmodel: nn.Module, entries: object, folder: Path, redo: str
                 ) -> tuple[set[str], dict[str, dict]]:
    """The tensor names a format-2 state of ``qmodel`` holds, and the packed layers'
    entries; a ``weights`` table that does not describe ``qmodel``'s layers is one error."""
    if not isinstance(entries, dict):
        raise GaqError(f"{folder / 'state.json'}: weights is not a table; {redo}")
    expected = set(_act_tensors(qmodel))
    packed = {}
    for name, _ in quant_layers(qmodel):
        entry = entries.get(name)
        stored = entry.get("stored") if isinstance(entry, dict) else None
        if stored == "full":
            expected.add(f"{name}.frozen_weight")
        elif stored == "packed" and isinstance(entry.get("parts"), list):
            packed[name] = entry
            for i in range(len(entry["parts"])):
                expected.update(_packed_keys(name, i))
        else:
            raise GaqError(f"{folder / 'state.json'}: no valid weight entry for layer "
                           f"{name!r}; {redo}")
    return expected, packed


def _unpack_layer(layer: QuantLayer, name: str, entry: dict,
                  tensors: dict[str, torch.Tensor]) -> None:
    """Set ``layer``'s frozen weight from its packed codes: the float32 (q − z)·Δ its
    quantizer computed, bit for bit."""
    from gaq.quant.packing import Grid, dequantize, unpack_codes

    parts = layer.weight_parts()
    rows = entry["parts"]
    if len(rows) != len(parts):
        raise ValueError(f"{name}: {len(rows)} weight parts saved, the layer has {len(parts)}")
    dtype = getattr(torch, str(entry.get("dtype", "")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name}: unknown weight dtype {entry.get('dtype')!r}")
    pieces = []
    for i, (row, fp_part) in enumerate(zip(rows, parts, strict=True)):
        if list(row["shape"]) != list(fp_part.shape):
            raise ValueError(f"{name}: weight part {i} saved with shape {row['shape']}, the "
                             f"layer's is {list(fp_part.shape)}")
        k_codes, k_scale, k_zero = _packed_keys(name, i)
        bits, qmin = int(row["bits"]), int(row["qmin"])
        codes = unpack_codes(tensors[k_codes], bits, fp_part.numel())
        grid = Grid(tensors[k_scale].float(), tensors[k_zero].float(), bits, qmin,
                    int(row["qmax"]))
        pieces.append(dequantize(codes + qmin, grid, str(row["zero_sign"]), fp_part, dtype))
    weight = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    layer.frozen_weight = weight.to(layer.fp.weight.dtype)


# the state size bound's allowances: safetensors' header entry of one tensor beyond its
# name (dtype, shape, offsets as JSON), the tensors of one activation quantizer (scale,
# zero point, timesteps, mode), the operand quantizers of an attention module (q, k, v,
# softmax) and state.json's lines for one layer (its plan row and weight entry)
_HEADER_BYTES = 128
_ACT_TENSORS = 4
_ATTN_QUANTIZERS = 4
_JSON_LAYER_BYTES = 1024
_JSON_BYTES = 64 * 2**10


def state_bytes_bound(model: nn.Module, adapter: ModelAdapter, quant: QuantConfig,
                      extra_skip: SkipFilter | None = None, table_rows: int = 1000,
                      json_bytes: int = 0) -> int:
    """Bytes a saved state of ``model`` quantized at ``quant`` takes at most
    (``state.safetensors`` and ``state.json``), from parameter counts and bit-widths: each
    quantized weight's codes at its bit-width with a scale and zero point per output
    channel, each activation quantizer as a table of ``table_rows`` timesteps, plus
    ``json_bytes`` of what a method keeps in ``state.json`` beyond the layers (HTG's
    fold, GAQ's meta-step history). Preflight's disk estimate. A weight a method moved
    off its grid would be stored in full precision; no registered method does that (the
    compact-state test checks every one)."""
    from gaq.quant.packing import packed_bytes

    # per-timestep statistics a sampler correction keeps (PTQD's) ride in state.json too
    total = _JSON_BYTES + json_bytes + 64 * table_rows
    act = table_rows * (4 + 4 + 8) + 1 + _ACT_TENSORS * _HEADER_BYTES
    for d in plan(model, adapter, quant, extra_skip):
        total += _JSON_LAYER_BYTES
        if d.status == "fp":
            continue
        name_bytes = len(d.name) + 64  # each tensor's key: the layer's name and a suffix
        if d.kind == "attention":
            total += _ATTN_QUANTIZERS * (act + _ACT_TENSORS * name_bytes)
            continue
        weight = model.get_submodule(d.name).weight
        parts = 1 if d.split is None else 2
        bits = 32 if d.weight_bits is None else d.weight_bits
        total += (packed_bytes(weight.numel(), bits) + parts
                  * (2 * 4 * weight.shape[0] + 8 + 3 * (_HEADER_BYTES + name_bytes)))
        if d.act_bits is not None:
            total += parts * (act + _ACT_TENSORS * name_bytes)
    return total
