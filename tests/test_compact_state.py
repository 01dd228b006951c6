"""Compact quantization states: weights saved as integer codes packed at their bit-width
with their grid, rebuilt bit-identically, for every method on the three bundled models;
the packing itself against a plain re-implementation; format-1 states still load; an
unknown or broken state is one line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from gaq.calibration import CalibrationSpec
from gaq.cell import quantize_pipeline, restore, save_quantized, state_size_bound
from gaq.config import QuantConfig
from gaq.errors import GaqError
from gaq.models.adapters import adapter_for
from gaq.models.loading import load_model
from gaq.quant.packing import pack_codes, packed_bytes, same_bits, unpack_codes
from gaq.quantize import (
    _state_tensors,
    load_state,
    quant_layers,
    save_state,
    state_weight_storage,
)
from gaq.registry import get_method, list_methods
from gaq.sampling import SamplerConfig, sample_batch

FAMILIES = ("digits", "digits-ldm", "digits-dit")



@pytest.fixture(scope="module")
def entries():
    from gaq.state_size import smallest_budget_entries

    return smallest_budget_entries()


@pytest.fixture(scope="module")
def pipes():
    return {f: load_model(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def calib_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("calib-cache")


def _spec(family: str) -> CalibrationSpec:
    guidance = None if family == "digits" else 3.0
    return CalibrationSpec(steps=4, interval=2, samples_per_step=2, holdout_per_step=1,
                           guidance=guidance, act_every_step=True)


def _sample(pipe, result, guidance):
    run = SamplerConfig(steps=4, guidance=guidance)
    return sample_batch(pipe, [0, 1], seed=0, sampler=run, hook=result.sampler_hook,
                        denoiser=result.model)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(list_methods()))
def test_every_method_restores_bit_identically_from_the_compact_state(
        method, family, entries, pipes, calib_cache, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("GAQ_CACHE", str(calib_cache))
    pipe = pipes[family]
    cls = get_method(method)
    why = cls.unsupported(adapter_for(pipe.denoiser).arch)
    if why:
        pytest.skip(why)
    spec = _spec(family)
    quant = QuantConfig.from_bits("W4A8")
    fp = copy.deepcopy(pipe.denoiser)
    instance = cls(entries[method].config())
    result = quantize_pipeline(pipe, instance, quant, spec, model_id=family)
    weights = {n: lay.frozen_weight.clone() for n, lay in quant_layers(result.model)}
    before = _sample(pipe, result, spec.guidance)
    save_quantized(result, tmp_path / "state", pipe)

    back = restore(fp, tmp_path / "state")
    restored = dict(quant_layers(back.model))
    assert set(restored) == set(weights)
    for name, w in weights.items():
        assert same_bits(restored[name].frozen_weight, w), name
    assert same_bits(_sample(pipe, back, spec.guidance), before)

    storage = state_weight_storage(tmp_path / "state")
    assert set(storage) == set(weights)
    full = {n: e["reason"] for n, e in storage.items() if e["stored"] == "full"}
    assert not full, full  # every method's weights lie on their grid
    # the weights take bits/32 of their float32 size in codes, plus a scale and zero
    # point per channel; the activation tables come on top
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "state" / "state.safetensors"))
    expected = sum(packed_bytes(p["shape"][0] * math.prod(p["shape"][1:]), p["bits"])
                   for e in storage.values() for p in e["parts"])
    codes = sum(t.numel() for k, t in tensors.items() if k.endswith(".codes"))
    assert codes == expected
    weight_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                       if ".packed_weight." in k)
    fp_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    assert weight_bytes < fp_bytes * (quant.weight.bits + 2) / 32
    size = (tmp_path / "state" / "state.safetensors").stat().st_size
    # and preflight's estimate never falls short of it
    bound = state_size_bound(pipe, instance, quant)
    json_size = (tmp_path / "state" / "state.json").stat().st_size
    assert bound >= size + json_size, (bound, size, json_size)


def _simple_pack(codes: list[int], bits: int) -> bytes:
    """The bit stream bit by bit: code i's bit j is stream bit i·bits + j, LSB first."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for j in range(bits):
            pos = i * bits + j
            out[pos // 8] |= ((c >> j) & 1) << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_matches_a_plain_bit_stream(bits):
    gen = torch.Generator().manual_seed(bits)
    for count in (1, 7, 8, 9, 1000, 4099):
        codes = torch.randint(0, 2**bits, (count,), generator=gen, device="cpu")
        codes[0], codes[-1] = 0, 2**bits - 1  # both ends of the grid
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(count, bits)
        assert bytes(packed.numpy()) == _simple_pack(codes.tolist(), bits)
        assert torch.equal(unpack_codes(packed, bits, count), codes.to(torch.int32))
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([2**bits], device="cpu"), bits)


def test_packing_spans_chunks(monkeypatch):
    """A layer larger than one packing chunk: chunks start on byte boundaries."""
    import gaq.quant.packing as packing

    monkeypatch.setattr(packing, "_CHUNK", 16)
    codes = torch.arange(100, device="cpu") % 8
    packed = pack_codes(codes, 3)
    assert bytes(packed.numpy()) == _simple_pack(codes.tolist(), 3)
    assert torch.equal(unpack_codes(packed, 3, 100), codes.to(torch.int32))


@pytest.fixture(scope="module")
def rtn_digits(pipes):
    """RTN on digits (weights with −0.0 where fake_quantize rounds a negative weight to
    zero)."""
    from gaq.calibration import record_calibration
    from gaq.methods.rtn import RTN

    torch.set_num_threads(1)
    pipe = pipes["digits"]
    calib = record_calibration(pipe, _spec("digits"), cache=False)
    result = RTN(RTN.Config()).quantize(pipe.denoiser, adapter_for(pipe.denoiser), calib,
                                        QuantConfig.from_bits("W4A8"))
    return pipe, result


def _write_format_1(result, folder):
    """A state as format 1 wrote it: every frozen weight in full precision."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(_state_tensors(result.model), str(folder / "state.safetensors"))
    doc = {"format": 1, "quant": result.quant.to_dict(), "layers": result.report.to_rows(),
           "meta": result.state}
    (folder / "state.json").write_text(json.dumps(doc, indent=1) + "\n")


@pytest.mark.slow
def test_a_format_1_state_still_loads(rtn_digits, tmp_path):
    pipe, result = rtn_digits
    _write_format_1(result, tmp_path / "old")
    back = restore(copy.deepcopy(pipe.denoiser), tmp_path / "old")
    for name, layer in quant_layers(back.model):
        assert same_bits(layer.frozen_weight, result.model.get_submodule(name).frozen_weight)
    assert same_bits(_sample(pipe, back, None), _sample(pipe, result, None))
    assert state_weight_storage(tmp_path / "old") == {}


def test_zeros_keep_their_sign(rtn_digits, tmp_path):
    """fake_quantize keeps −0.0 for a negative weight rounded to zero; the rebuilt weight
    has it in the same places."""
    pipe, result = rtn_digits
    negative_zeros = sum(int(((lay.frozen_weight == 0) & lay.frozen_weight.signbit()).sum())
                         for _, lay in quant_layers(result.model))
    assert negative_zeros > 0
    save_state(result.model, result.report, result.quant, tmp_path / "s", meta=result.state)
    back = restore(copy.deepcopy(pipe.denoiser), tmp_path / "s")
    for name, layer in quant_layers(back.model):
        assert same_bits(layer.frozen_weight, result.model.get_submodule(name).frozen_weight)


def test_an_off_grid_weight_is_kept_in_full_precision(rtn_digits, tmp_path):
    """A weight a method moved off its grid is stored as it is, with the reason."""
    pipe, result = rtn_digits
    model = copy.deepcopy(result.model)
    name, layer = next(iter(quant_layers(model)))
    layer.frozen_weight.view(-1)[0] += 1e-3
    save_state(model, result.report, result.quant, tmp_path / "s", meta=result.state)
    storage = state_weight_storage(tmp_path / "s")
    assert storage[name]["stored"] == "full" and "grid" in storage[name]["reason"]
    assert all(e["stored"] == "packed" for n, e in storage.items() if n != name)
    back, _, _ = load_state(copy.deepcopy(pipe.denoiser), tmp_path / "s")
    for n, lay in quant_layers(back):
        assert same_bits(lay.frozen_weight, model.get_submodule(n).frozen_weight), n


def _one_line(err: pytest.ExceptionInfo, folder) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg
    return msg


@pytest.mark.parametrize("fmt", [3, 0, "2", None, True])
def test_an_unknown_format_is_one_line(rtn_digits, tmp_path, fmt):
    pipe, result = rtn_digits
    folder = save_state(result.model, result.report, result.quant, tmp_path / "s")
    doc = json.loads((folder / "state.json").read_text())
    doc["format"] = fmt
    (folder / "state.json").write_text(json.dumps(doc))
    with pytest.raises(GaqError) as err:
        load_state(copy.deepcopy(pipe.denoiser), folder)
    assert "re-run the quantization" in _one_line(err, folder)


def _corrupt_entry(doc: dict) -> None:
    name = next(iter(doc["weights"]))
    doc["weights"][name] = {"stored": "packed", "parts": [{"bits": 4}]}


def _drop_weights(doc: dict) -> None:
    del doc["weights"]


def _wrong_shape(doc: dict) -> None:
    entry = next(iter(doc["weights"].values()))
    entry["parts"][0]["shape"] = [1, 2, 3]


def _unknown_storage(doc: dict) -> None:
    next(iter(doc["weights"].values()))["stored"] = "zip"


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_corrupt_entry, _drop_weights, _wrong_shape,
                                     _unknown_storage])
def test_a_broken_compact_state_is_one_line(rtn_digits, tmp_path, corrupt):
    pipe, result = rtn_digits
    folder = save_state(result.model, result.report, result.quant, tmp_path / "s")
    doc = json.loads((folder / "state.json").read_text())
    corrupt(doc)
    (folder / "state.json").write_text(json.dumps(doc))
    with pytest.raises(GaqError) as err:
        load_state(copy.deepcopy(pipe.denoiser), folder)
    _one_line(err, folder)


def test_truncated_codes_are_one_line(rtn_digits, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe, result = rtn_digits
    folder = save_state(result.model, result.report, result.quant, tmp_path / "s")
    tensors = load_file(str(folder / "state.safetensors"))
    key = next(k for k in tensors if k.endswith(".codes"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(folder / "state.safetensors"))
    with pytest.raises(GaqError) as err:
        load_state(copy.deepcopy(pipe.denoiser), folder)
    _one_line(err, folder)


def test_preflight_estimate_at_the_papers_sizes_is_about_bits_over_32():
    """At the papers' sizes the weight codes dominate a state: preflight's estimate of a
    W4A8 cell is near 4/32 of the denoiser's float32 bytes, not the whole of them."""
    from gaq.state_size import paper_bounds, render

    rows = paper_bounds("W4A8")
    assert {r["architecture"] for r in rows} >= {"ddpm-cifar10", "ldm4-lsun", "sd-v1-4"}
    for r in rows:
        assert r["bounds"] and max(r["bounds"].values()) < r["fp32_bytes"] / 4, r
    assert "## Preflight's state estimate" in render([], rows)
