"""Quantized conv/linear wrappers, weight freezing and shortcut splitting."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gaq.quant.context import timestep_context
from gaq.quant.modules import (
    QuantConv2d,
    QuantLinear,
    SplitQuantConv2d,
    quantize_layer,
    unet_shortcut_splits,
)


def _calibrate(layer, x) -> None:
    for q in layer.act_quantizers:
        q.observe()
    layer(x)
    for q in layer.act_quantizers:
        q.finalize()


def _conv_and_input():
    torch.manual_seed(0)
    return nn.Conv2d(6, 5, 3, padding=1), torch.randn(4, 6, 8, 8)


def _linear_and_input():
    torch.manual_seed(0)
    return nn.Linear(16, 12), torch.randn(8, 16)


@pytest.mark.parametrize("make", [_conv_and_input, _linear_and_input])
def test_eight_bit_sqnr(make, sqnr) -> None:
    module, x = make()
    layer = quantize_layer(module, weight_bits=8, act_bits=8)
    assert isinstance(layer, QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear)
    _calibrate(layer, x)
    with torch.no_grad():
        ref = module(x)
        assert torch.equal(layer.set_mode("fp")(x), ref)
        weight_only = layer.set_mode("weight")(x)
        full = layer.set_mode("full")(x)
    assert sqnr(ref, weight_only) >= 30
    assert sqnr(ref, full) >= 30
    assert sqnr(ref, weight_only) > sqnr(ref, full)  # input quantization adds noise
    with pytest.raises(ValueError):
        layer.set_mode("int8")


def test_low_bits_lose_accuracy(sqnr) -> None:
    module, x = _conv_and_input()
    results = {}
    for bits in (3, 8):
        layer = quantize_layer(module, weight_bits=bits, act_bits=bits)
        _calibrate(layer, x)
        with torch.no_grad():
            results[bits] = sqnr(module(x), layer(x))
    assert results[3] < results[8] - 15


def test_freeze_weights_same_output() -> None:
    module, x = _conv_and_input()
    layer = quantize_layer(module, weight_bits=4, act_bits=8)
    _calibrate(layer, x)
    with torch.no_grad():
        before = layer(x)
        layer.freeze_weights()
        assert layer.frozen_weight is not None
        assert torch.equal(layer(x), before)
        assert torch.equal(layer.quantized_weight(), layer.frozen_weight)
    layer.unfreeze_weights()
    assert layer.frozen_weight is None


def test_adaround_weights_start_at_rtn() -> None:
    module, x = _conv_and_input()
    layer = quantize_layer(module, weight_bits=4, act_bits=None, weight_observer="max")
    with torch.no_grad():
        rtn = layer(x)
        layer.use_adaround()
        layer.freeze_weights()  # folds the (hard) AdaRound weight
        assert torch.allclose(layer(x), rtn, atol=1e-5)


def test_state_roundtrip_with_frozen_weight(tmp_path) -> None:
    module, x = _conv_and_input()
    layer = quantize_layer(module, weight_bits=4, act_bits=6, act_per_timestep=True)
    for q in layer.act_quantizers:
        q.observe()
    for t in (3, 7):
        with timestep_context(t):
            layer(x * t)
    for q in layer.act_quantizers:
        q.finalize()
    layer.freeze_weights()
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))

    fresh = quantize_layer(nn.Conv2d(6, 5, 3, padding=1), weight_bits=4, act_bits=6)
    fresh.load_state_dict(load_file(str(path)))
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad(), timestep_context(torch.tensor([7, 3, 3, 7])):
        assert torch.equal(fresh(x), layer(x))


def test_split_shortcut(sqnr) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 4, 1)
    # h and the skip have very different ranges: one grid for both wastes levels on h.
    x = torch.cat([torch.randn(2, 8, 4, 4) * 0.05, torch.randn(2, 4, 4, 4) * 20], dim=1)
    split = quantize_layer(conv, weight_bits=6, act_bits=6, split=8)
    joint = quantize_layer(conv, weight_bits=6, act_bits=6)
    assert isinstance(split, SplitQuantConv2d)
    assert len(split.weight_quantizers) == len(split.act_quantizers) == 2
    for layer in (split, joint):
        _calibrate(layer, x)
    with torch.no_grad():
        ref = conv(x)
        assert torch.allclose(split.set_mode("fp")(x), ref)
        split.set_mode("full")
        # The h half alone: its contribution survives only with its own quantizers.
        h_only = torch.cat([x[:, :8], torch.zeros(2, 4, 4, 4)], dim=1)
        h_ref = conv(h_only) - conv.bias.reshape(1, -1, 1, 1)
        h_split = split.fp._conv_forward(
            split.quantized_input(h_only), split.quantized_weight(), None
        )
        h_joint = joint.fp._conv_forward(
            joint.quantized_input(h_only), joint.quantized_weight(), None
        )
    assert sqnr(h_ref, h_split) > sqnr(h_ref, h_joint) + 10
    assert sqnr(ref, split(x)) > 25
    with pytest.raises(ValueError):
        SplitQuantConv2d(conv, 12, [])


def test_unet_shortcut_splits_match_forward(tiny_unet) -> None:
    splits = unet_shortcut_splits(tiny_unet)
    assert splits  # every up-block resnet of this UNet has a 1x1 shortcut
    observed = {}
    hooks = []
    for b, block in enumerate(tiny_unet.up_blocks):
        # Channels of h entering resnet i: the block input for i = 0, else resnet i−1's output.
        def block_hook(_m, args, kwargs, b=b):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            observed[f"up_blocks.{b}.resnets.0.conv_shortcut"] = hs.shape[1]

        hooks.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        for i, resnet in enumerate(block.resnets[:-1]):
            name = f"up_blocks.{b}.resnets.{i + 1}.conv_shortcut"
            hooks.append(
                resnet.register_forward_hook(
                    lambda _m, _a, out, name=name: observed.__setitem__(name, out.shape[1])
                )
            )
    with torch.no_grad():
        tiny_unet(torch.randn(1, 1, 8, 8), 5)
    for h in hooks:
        h.remove()
    assert splits == {name: observed[name] for name in splits}

    # Wrapping every shortcut keeps the UNet's FP output exact in fp mode.
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = tiny_unet(x, 5).sample
    originals = {}
    for name, split in splits.items():
        parent_name, attr = name.rsplit(".", 1)
        parent = tiny_unet.get_submodule(parent_name)
        originals[name] = getattr(parent, attr)
        wrapped = quantize_layer(originals[name], weight_bits=8, act_bits=8, split=split)
        _calibrate(wrapped.set_mode("fp"), torch.randn(2, originals[name].in_channels, 4, 4))
        setattr(parent, attr, wrapped)
    try:
        with torch.no_grad():
            assert torch.equal(tiny_unet(x, 5).sample, ref)
    finally:
        for name, module in originals.items():
            parent_name, attr = name.rsplit(".", 1)
            setattr(tiny_unet.get_submodule(parent_name), attr, module)


def test_bfloat16_layer_keeps_float32_grid(sqnr) -> None:
    module, x = _linear_and_input()
    layer = quantize_layer(module, weight_bits=8, act_bits=8)
    _calibrate(layer, x)
    with torch.no_grad():
        ref = layer(x)
        layer.to(torch.bfloat16)
        out = layer(x.bfloat16())
    assert layer.weight_quantizer.scale.dtype == torch.float32
    assert layer.act_quantizer.scale.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    assert sqnr(ref, out.float()) > 30
