"""Fake-quantized conv and linear layers wrapping the original full-precision modules.

Every wrapper keeps the FP module as ``.fp`` (the reference for
reconstruction losses and FP baselines) and runs in one of three modes:

``fp``      the original module (activation quantizers still record when observing);
``weight``  quantized weight, FP input;
``full``    quantized weight and quantized input.

Weight quantizers are applied to ``weight_parts()`` (one part, or two for the
split shortcut) and live in ``weight_quantizers``; input quantizers in
``act_quantizers`` (empty: the layer never quantizes its input). Biases stay FP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaq.quant.adaround import AdaRoundQuantizer
from gaq.quant.quantizer import FakeQuantizer

LAYER_MODES = ("fp", "weight", "full")


class QuantLayer(nn.Module):
    """Common machinery of the wrappers; subclasses say how to split and apply the layer.

    Uncalibrated :class:`FakeQuantizer` weight quantizers are calibrated on the
    weight at construction: weights are known up front, so there is no reason
    to wait for calibration data.
    """

    def __init__(
        self,
        module: nn.Module,
        weight_quantizers: Sequence[nn.Module],
        act_quantizers: Sequence[FakeQuantizer] | None = None,
    ) -> None:
        super().__init__()
        self.fp = module
        self.weight_quantizers = nn.ModuleList(weight_quantizers)
        self.act_quantizers = nn.ModuleList(act_quantizers or [])
        parts = self.weight_parts()
        if len(self.weight_quantizers) != len(parts):
            raise ValueError(f"{type(self).__name__} needs {len(parts)} weight quantizer(s)")
        if self.act_quantizers and len(self.act_quantizers) != len(parts):
            raise ValueError(f"{type(self).__name__} needs 0 or {len(parts)} input quantizer(s)")
        self._mode = "full"
        # The quantizers follow the weight: a step size calibrated on a CUDA weight must not
        # be copied back to a CPU buffer (no-op for quantizers built on the right device).
        self.weight_quantizers.to(module.weight.device)
        self.act_quantizers.to(module.weight.device)
        # Pre-quantized weight (freeze_weights): sampling then pays only for activations.
        self.register_buffer("frozen_weight", None)
        for quantizer, part in zip(self.weight_quantizers, parts, strict=True):
            if isinstance(quantizer, FakeQuantizer) and not quantizer.calibrated:
                quantizer.calibrate(part)
                quantizer.finalize()

    # The FP module's parameters, for diffusers code that inspects layers.
    @property
    def weight(self) -> Tensor:
        return self.fp.weight

    @property
    def bias(self) -> Tensor | None:
        return self.fp.bias

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in LAYER_MODES:
            raise ValueError(f"mode must be one of {LAYER_MODES}, got {mode!r}")
        self._mode = mode

    def set_mode(self, mode: str) -> QuantLayer:
        """``fp``, ``weight`` (weight-only fake quant) or ``full``."""
        self.mode = mode
        return self

    def weight_parts(self) -> list[Tensor]:
        """FP weight pieces, one per weight quantizer, concatenated along the input channels."""
        return [self.fp.weight]

    def input_parts(self, x: Tensor) -> list[Tensor]:
        """Input pieces, one per input quantizer, concatenated along dim 1."""
        return [x]

    def quantized_weight(self) -> Tensor:
        if self.frozen_weight is not None:
            return self.frozen_weight
        pieces = [q(w) for q, w in zip(self.weight_quantizers, self.weight_parts(), strict=True)]
        w = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return w.to(self.fp.weight.dtype)

    def quantized_input(self, x: Tensor) -> Tensor:
        if not self.act_quantizers:
            return x
        parts = [q(p) for q, p in zip(self.act_quantizers, self.input_parts(x), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @torch.no_grad()
    def freeze_weights(self) -> QuantLayer:
        """Quantize the weight once (AdaRound: hard rounding) and keep it dequantized. A
        layer whose AdaRound variables were released keeps the weight it froze then."""
        released = any(isinstance(q, AdaRoundQuantizer) and q.released
                       for q in self.weight_quantizers)
        if released and self.frozen_weight is not None:
            return self
        self.frozen_weight = None
        pieces = []
        for q, w in zip(self.weight_quantizers, self.weight_parts(), strict=True):
            pieces.append(q.fold() if isinstance(q, AdaRoundQuantizer) else q(w))
        w = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        self.frozen_weight = w.to(self.fp.weight.dtype).detach().clone()
        return self

    def unfreeze_weights(self) -> QuantLayer:
        self.frozen_weight = None
        return self

    def use_adaround(self) -> list[AdaRoundQuantizer]:
        """Replace each static weight quantizer by an AdaRound one on the same grid."""
        new = [
            AdaRoundQuantizer.from_quantizer(q, w)
            for q, w in zip(self.weight_quantizers, self.weight_parts(), strict=True)
        ]
        self.weight_quantizers = nn.ModuleList(new)
        self.frozen_weight = None
        return new

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A saved state may carry a frozen weight that this fresh wrapper lacks.
        key = prefix + "frozen_weight"
        if key in state_dict and self.frozen_weight is None:
            self.frozen_weight = torch.empty_like(self.fp.weight)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _layer(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # observing quantizers record x and pass it through unchanged, in any mode
        if self._mode == "full" or any(q.observing for q in self.act_quantizers):
            x = self.quantized_input(x)
        if self._mode == "fp":
            return self.fp(x)
        return self._layer(x, self.quantized_weight())

    def extra_repr(self) -> str:
        return f"mode={self._mode}, frozen={self.frozen_weight is not None}"


class _SingleQuantLayer(QuantLayer):
    """One weight quantizer and at most one input quantizer around a module of type ``wraps``."""

    wraps: type[nn.Module] = nn.Module

    def __init__(
        self,
        module: nn.Module,
        weight_quantizer: nn.Module,
        act_quantizer: FakeQuantizer | None = None,
    ) -> None:
        if not isinstance(module, self.wraps):
            raise TypeError(f"{type(self).__name__} wraps nn.{self.wraps.__name__}, "
                            f"got {type(module).__name__}")
        acts = None if act_quantizer is None else [act_quantizer]
        super().__init__(module, [weight_quantizer], acts)

    @property
    def weight_quantizer(self) -> nn.Module:
        return self.weight_quantizers[0]

    @property
    def act_quantizer(self) -> FakeQuantizer | None:
        return self.act_quantizers[0] if self.act_quantizers else None


class QuantLinear(_SingleQuantLayer):
    """Fake-quantized ``nn.Linear``: per-output-channel weights (axis 0), input per tensor."""

    wraps = nn.Linear

    def _layer(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.fp.bias)


class QuantConv2d(_SingleQuantLayer):
    """Fake-quantized ``nn.Conv2d`` (any padding mode, groups, dilation)."""

    wraps = nn.Conv2d

    def _layer(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.fp._conv_forward(x, weight, self.fp.bias)


class SplitQuantConv2d(QuantLayer):
    """Q-Diffusion's shortcut splitting for a conv fed by ``cat([h, skip], dim=1)``.

    ``h`` (the up path) and ``skip`` (the down-path skip connection) have very
    different ranges, so each half of the input and the matching input
    channels of the weight get their own quantizers. Because a conv is linear
    in its input channels, quantizing the halves and concatenating is exactly
    the layer applied to the two quantized pieces.

    ``split`` is the channel count of ``h``. In diffusers up blocks (UpBlock2D,
    AttnUpBlock2D, CrossAttnUpBlock2D) resnet ``i`` receives
    ``cat([h, res_skip])`` with ``h`` of ``prev_output_channel`` channels for
    ``i = 0`` and ``out_channels`` for ``i > 0``; see :func:`unet_shortcut_splits`.

    Args:
        module: the ``conv_shortcut`` (``groups == 1``).
        split: channels of the first part, ``0 < split < in_channels``.
        weight_quantizers: for ``W[:, :split]`` and ``W[:, split:]``.
        act_quantizers: for ``x[:, :split]`` and ``x[:, split:]``, or ``None``.
    """

    def __init__(
        self,
        module: nn.Conv2d,
        split: int,
        weight_quantizers: Sequence[nn.Module],
        act_quantizers: Sequence[FakeQuantizer] | None = None,
    ) -> None:
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"SplitQuantConv2d wraps nn.Conv2d, got {type(module).__name__}")
        if module.groups != 1:
            raise ValueError("shortcut splitting needs groups == 1")
        if not 0 < split < module.in_channels:
            raise ValueError(f"split must lie in (0, {module.in_channels}), got {split}")
        self.split = split
        super().__init__(module, weight_quantizers, act_quantizers)

    def weight_parts(self) -> list[Tensor]:
        w = self.fp.weight
        return [w[:, : self.split], w[:, self.split :]]

    def input_parts(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] != self.fp.in_channels:
            raise ValueError(f"expected {self.fp.in_channels} input channels, got {x.shape[1]}")
        return [x[:, : self.split], x[:, self.split :]]

    def _layer(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.fp._conv_forward(x, weight, self.fp.bias)

    def extra_repr(self) -> str:
        return f"split={self.split}, " + super().extra_repr()


def unet_shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """``{qualified name of conv_shortcut: split}`` for every up-block resnet of a diffusers UNet.

    Mirrors how diffusers builds up blocks: the first up block starts from the
    mid block's ``block_out_channels[-1]`` channels; inside a block, resnet 0
    gets ``h`` with the previous block's output channels, resnet ``i > 0`` the
    previous resnet's ``out_channels`` (attentions and upsamplers keep the
    channel count); the rest of the concatenated input is the skip.
    Works for ``UNet2DModel`` and ``UNet2DConditionModel``.
    """
    prev = int(unet.config.block_out_channels[-1])
    splits: dict[str, int] = {}
    for b, block in enumerate(unet.up_blocks):
        h_channels = prev
        for i, resnet in enumerate(block.resnets):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if isinstance(shortcut, (nn.Conv2d, QuantLayer)):
                total = resnet.in_channels
                if not 0 < h_channels < total:
                    raise ValueError(
                        f"up_blocks.{b}.resnets.{i}: h has {h_channels} of {total} input channels"
                    )
                splits[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = h_channels
            h_channels = resnet.out_channels
        prev = h_channels
    return splits


def make_weight_quantizer(
    bits: int,
    symmetric: bool = False,
    axis: int | None = 0,
    observer: str = "mse",
    device: torch.device | str | None = None,
    **kwargs: object,
) -> FakeQuantizer:
    """Per-output-channel weight quantizer on ``device``; the ``mse`` search keeps every
    weight."""
    if observer == "mse":
        kwargs.setdefault("max_samples", None)
    return FakeQuantizer(bits, symmetric, axis, observer=observer, observer_kwargs=kwargs or None,
                         device=device)


def quantize_layer(
    module: nn.Module,
    weight_bits: int,
    act_bits: int | None = None,
    *,
    weight_symmetric: bool = False,
    act_symmetric: bool = False,
    weight_observer: str = "mse",
    act_observer: str = "max",
    act_per_timestep: bool = False,
    split: int | None = None,
    weight_axis: int | None = 0,
    weight_observer_kwargs: dict | None = None,
    act_observer_kwargs: dict | None = None,
) -> QuantLayer:
    """Wrap an ``nn.Linear``/``nn.Conv2d`` with fresh quantizers (``split``: a
    :class:`SplitQuantConv2d`).

    Weights: per output channel (``weight_axis=None``: per tensor, as PTQD's code);
    inputs: per tensor (``act_bits=None``: FP input). ``*_observer_kwargs`` go to the
    range observers (``p`` and ``grid`` of ``mse``, ``momentum`` of ``ema``). The
    quantizers are created on the module's device.
    """
    device = module.weight.device

    def act() -> FakeQuantizer | None:
        if act_bits is None:
            return None
        return FakeQuantizer(
            act_bits, act_symmetric, None, observer=act_observer, per_timestep=act_per_timestep,
            observer_kwargs=act_observer_kwargs, device=device,
        )

    def weight() -> FakeQuantizer:
        return make_weight_quantizer(weight_bits, weight_symmetric, weight_axis, weight_observer,
                                     device, **(weight_observer_kwargs or {}))

    if split is not None:
        if not isinstance(module, nn.Conv2d):
            raise TypeError("only a Conv2d can be split")
        acts = None if act_bits is None else [act(), act()]
        return SplitQuantConv2d(module, split, [weight(), weight()], acts)
    weight_q = weight()
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, weight_q, act())
    if isinstance(module, nn.Linear):
        return QuantLinear(module, weight_q, act())
    raise TypeError(f"cannot quantize a {type(module).__name__}")
