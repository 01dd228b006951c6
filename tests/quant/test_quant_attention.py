"""The quantized attention processor against diffusers' own processors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from safetensors.torch import load_file, save_file

from gaq.quant.attention import QuantAttnProcessor, set_quant_attention
from gaq.quant.context import timestep_context


def _self_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4).eval()


def _spatial_attention() -> Attention:
    # The configuration diffusers' AttnDownBlock2D uses inside UNet2DModel.
    torch.manual_seed(0)
    return Attention(
        8,
        heads=2,
        dim_head=4,
        norm_num_groups=4,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()


def _cross_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()


CASES = {
    "self": (_self_attention, lambda: (torch.randn(2, 5, 8),), {}),
    "spatial": (_spatial_attention, lambda: (torch.randn(2, 8, 3, 3),), {}),
    "cross": (_cross_attention, lambda: (torch.randn(2, 5, 8),), {"ctx": (2, 7, 6)}),
}


def _run(attn: Attention, case: str) -> torch.Tensor:
    torch.manual_seed(1)
    _, make_input, extra = CASES[case]
    (x,) = make_input()
    kwargs = {}
    if "ctx" in extra:
        kwargs["encoder_hidden_states"] = torch.randn(*extra["ctx"])
    with torch.no_grad():
        return attn(x, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_disabled_matches_default_processors(case: str) -> None:
    attn = CASES[case][0]()
    default = _run(attn, case)  # diffusers' default (SDPA) processor
    attn.set_processor(AttnProcessor())
    reference = _run(attn, case)

    attn.set_processor(QuantAttnProcessor())  # no quantizers at all
    assert torch.equal(_run(attn, case), reference)
    processor = QuantAttnProcessor.build(bits=8, softmax_bits=8)
    for _, q in processor.quantizers():
        q.disable()
    attn.set_processor(processor)
    out = _run(attn, case)
    assert torch.equal(out, reference)
    assert torch.allclose(out, default, atol=1e-6)


def _calibrated(attn: Attention, case: str, **build) -> QuantAttnProcessor:
    processor = QuantAttnProcessor.build(**build)
    attn.set_processor(processor)
    for _, q in processor.quantizers():
        q.observe()
    _run(attn, case)
    for _, q in processor.quantizers():
        q.finalize()
    return processor


@pytest.mark.parametrize("case", CASES)
def test_enabled_eight_bit_close_but_different(case: str, sqnr) -> None:
    attn = CASES[case][0]()
    reference = _run(attn, case)
    processor = _calibrated(attn, case, bits=8, softmax_bits=8)
    assert {name for name, _ in processor.quantizers()} == {"q", "k", "v", "probs"}
    assert processor.probs_quantizer.unsigned
    assert float(processor.probs_quantizer.zero_point) == 0
    out = _run(attn, case)
    assert not torch.equal(out, reference)
    assert sqnr(reference, out) > 20


def test_softmax_off_and_low_bits(sqnr) -> None:
    attn = _self_attention()
    reference = _run(attn, "self")
    processor = _calibrated(attn, "self", bits=8, softmax_bits=None)
    assert processor.probs_quantizer is None
    eight = sqnr(reference, _run(attn, "self"))
    _calibrated(attn, "self", bits=3, softmax_bits=3)
    assert sqnr(reference, _run(attn, "self")) < eight


def test_processor_state_in_attention_state_dict(tmp_path) -> None:
    attn = _spatial_attention()
    _calibrated(attn, "spatial", bits=6, softmax_bits=8)
    state = attn.state_dict()
    assert "processor.q_quantizer.scale" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "attn.safetensors"))
    fresh = _spatial_attention()
    fresh.set_processor(QuantAttnProcessor.build(bits=6, softmax_bits=8))
    fresh.load_state_dict(load_file(str(tmp_path / "attn.safetensors")))
    assert torch.equal(_run(fresh, "spatial"), _run(attn, "spatial"))


def test_per_sample_timesteps_through_heads() -> None:
    # q/k/v/probs have B·heads rows: per-sample lookups must give each sample its own row.
    attn = _self_attention()
    processor = QuantAttnProcessor.build(bits=4, softmax_bits=4, per_timestep=True)
    attn.set_processor(processor)
    for _, q in processor.quantizers():
        q.observe()
    torch.manual_seed(2)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        for t, gain in ((1, 1.0), (2, 6.0)):
            with timestep_context(t):
                attn(x * gain)
    for _, q in processor.quantizers():
        q.finalize()
    with torch.no_grad():
        with timestep_context(torch.tensor([2, 1])):
            batched = attn(x)
        for b, t in enumerate([2, 1]):
            with timestep_context(t):
                single = attn(x[b : b + 1])
            assert torch.allclose(batched[b : b + 1], single, atol=1e-6)
        with timestep_context(1):
            assert not torch.allclose(batched[:1], attn(x[:1]), atol=1e-3)


def test_set_quant_attention_on_unet(tiny_unet) -> None:
    originals = {n: m.processor for n, m in tiny_unet.named_modules() if isinstance(m, Attention)}
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        reference = tiny_unet(x, 3).sample
    names = set_quant_attention(tiny_unet, lambda name, attn: QuantAttnProcessor())
    try:
        assert set(names) == set(originals)
        assert all(tiny_unet.get_submodule(n).processor is p for n, p in names.items())
        with torch.no_grad():
            assert torch.allclose(tiny_unet(x, 3).sample, reference, atol=1e-6)
    finally:
        for name, processor in originals.items():
            tiny_unet.get_submodule(name).set_processor(processor)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("observer", ["max", "ema"])
def test_large_attention_is_taken_in_query_slices_with_the_same_result(case, observer,
                                                                        monkeypatch) -> None:
    import gaq.quant.attention as attention_module

    def calibrated_output(limit: int) -> tuple[torch.Tensor, list, int]:
        monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", limit)
        attn = CASES[case][0]().double()
        calls = []
        scores = attn.get_attention_scores
        monkeypatch.setattr(attn, "get_attention_scores",
                            lambda q, k, m=None: calls.append(q.shape[1]) or scores(q, k, m))
        processor = QuantAttnProcessor.build(bits=8, softmax_bits=8,
                                             softmax_observer=observer).double()
        attn.set_processor(processor)
        for _, q in processor.quantizers():
            q.observe()
        torch.manual_seed(1)
        _, make_input, extra = CASES[case]
        (x,) = make_input()
        ctx = torch.randn(*extra["ctx"]).double() if "ctx" in extra else None
        with torch.no_grad():
            attn(x.double(), encoder_hidden_states=ctx)
            observing_calls = len(calls)
            for _, q in processor.quantizers():
                q.finalize()
            out = attn(x.double(), encoder_hidden_states=ctx)
        qp = [float(t) for t in processor.probs_quantizer.qparams(None)]
        return out, qp, observing_calls, len(calls) - observing_calls

    whole, qp_whole, obs_whole, quant_whole = calibrated_output(2**26)
    sliced, qp_sliced, obs_sliced, quant_sliced = calibrated_output(8)
    assert (obs_whole, quant_whole) == (1, 1)
    assert quant_sliced > 1  # quantizing: sliced whatever the observer
    # observing the range: the max observer sees every value either way; an EMA observer
    # counts calls, so it is given the whole tensor
    assert obs_sliced == (1 if observer == "ema" else quant_sliced)
    assert qp_sliced == qp_whole
    assert torch.allclose(sliced, whole, rtol=0, atol=1e-12)
