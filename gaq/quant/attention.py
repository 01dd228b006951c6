"""Attention processor that fake-quantizes the attention matmul operands (Q-Diffusion).

Quantized: ``q`` and ``k`` before ``QKᵀ``, the softmax output before ``P·V``,
and ``v``. The projections ``to_q``/``to_k``/``to_v``/``to_out`` are ordinary
linears, quantized by wrapping them (:class:`~gaq.quant.modules.QuantLinear`).

The operands are quantized after ``head_to_batch_dim``, i.e. with ``B·heads``
rows; per-sample timestep lookups handle that layout (row ``b·heads + h``
belongs to sample ``b``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from diffusers.models.attention_processor import Attention
from diffusers.utils import deprecate
from torch import Tensor, nn

from gaq.quant.quantizer import FakeQuantizer

OPERANDS = ("q", "k", "v", "probs")

#: Largest attention-probability tensor (elements) taken in one piece. The quantized
#: softmax output cannot use a fused kernel, so it is materialised: B·heads × N_q × N_k,
#: which at Stable Diffusion's 64×64 latent (4,096 tokens, 8 heads) is 0.5 GB per row of
#: the batch, several times over (scores, probabilities, their fake-quantized copy).
#: Above this size the queries are taken in slices; each query's softmax and the
#: elementwise quantizer see the same values either way. 2^26 float32 elements = 256 MB;
#: no bundled model comes near it. A processor reads it when built
#: (:attr:`QuantAttnProcessor.chunk_elements`).
CHUNK_ELEMENTS = 2**26


class QuantAttnProcessor(nn.Module):
    """diffusers' ``AttnProcessor`` with optional fake quantizers on q, k, v and the softmax output.

    Being an ``nn.Module``, it is registered under ``attn.processor`` once set,
    so its quantizers move with the model and appear in its ``state_dict``.
    A ``None`` quantizer leaves that operand in full precision; with every
    quantizer ``None`` or disabled the output equals ``AttnProcessor``'s.
    """

    def __init__(
        self,
        q_quantizer: FakeQuantizer | None = None,
        k_quantizer: FakeQuantizer | None = None,
        v_quantizer: FakeQuantizer | None = None,
        probs_quantizer: FakeQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.q_quantizer = q_quantizer
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer
        self.probs_quantizer = probs_quantizer
        # the largest probability tensor taken in one piece (None: never sliced)
        self.chunk_elements: int | None = CHUNK_ELEMENTS

    @classmethod
    def build(
        cls,
        bits: int | None = 8,
        softmax_bits: int | None = 16,
        *,
        symmetric: bool = False,
        observer: str = "max",
        softmax_observer: str = "max",
        per_timestep: bool = False,
        observer_kwargs: dict | None = None,
        softmax_symmetric: bool = False,
        device: torch.device | str | None = None,
    ) -> QuantAttnProcessor:
        """q/k/v at ``bits`` (per tensor; ``observer`` with ``observer_kwargs``), softmax
        output unsigned with ``z = 0`` (or symmetric, ``softmax_symmetric``) at
        ``softmax_bits``; ``None`` keeps the operand(s) in full precision. ``device``: the
        attention module's (the quantizers' state lives beside the operands)."""

        def qkv() -> FakeQuantizer | None:
            if bits is None:
                return None
            return FakeQuantizer(bits, symmetric, observer=observer, per_timestep=per_timestep,
                                 observer_kwargs=observer_kwargs, device=device)

        probs = None
        if softmax_bits is not None:
            probs = FakeQuantizer(
                softmax_bits, softmax_symmetric, unsigned=not softmax_symmetric,
                observer=softmax_observer, per_timestep=per_timestep, device=device,
            )
        return cls(qkv(), qkv(), qkv(), probs)

    def quantizers(self) -> Iterator[tuple[str, FakeQuantizer]]:
        """``(operand, quantizer)`` for every operand that has one."""
        for name in OPERANDS:
            q = getattr(self, f"{name}_quantizer")
            if q is not None:
                yield name, q

    @staticmethod
    def _maybe(quantizer: FakeQuantizer | None, x: Tensor) -> Tensor:
        return x if quantizer is None else quantizer(x)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        # Explicit signature: Attention.forward inspects it to decide which
        # cross_attention_kwargs to pass; routing through nn.Module keeps hooks working.
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )

    def forward(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        # Follows diffusers 0.42 AttnProcessor line by line, plus the four quantizers.
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate(
                "scale",
                "1.0.0",
                "The `scale` argument is deprecated and will be ignored. Please remove it, as "
                "passing it will raise an error in the future. `scale` should directly be "
                "passed while calling the underlying pipeline component i.e., via "
                "`cross_attention_kwargs`.",
            )

        residual = hidden_states

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = self._maybe(self.q_quantizer, attn.head_to_batch_dim(query))
        key = self._maybe(self.k_quantizer, attn.head_to_batch_dim(key))
        value = self._maybe(self.v_quantizer, attn.head_to_batch_dim(value))

        hidden_states = self._attend(attn, query, key, value, attention_mask)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states

    def _slices(self, query: Tensor, key: Tensor) -> int:
        """Query rows per slice: all of them unless the probabilities exceed
        :attr:`chunk_elements` and the quantizer's result does not depend on the slicing:
        it is quantizing (elementwise), or observing the range (``max``: the same extremes;
        ``mse``: the same range and a uniform subsample of the same values). An EMA
        observer counts calls, so it is given the whole tensor."""
        rows = query.shape[1]
        per_row = query.shape[0] * key.shape[1]
        limit = self.chunk_elements
        if limit is None or per_row * rows <= limit:
            return rows
        q = self.probs_quantizer
        if q is not None and q.observing and q.observer_name not in ("max", "mse"):
            return rows
        return max(1, limit // per_row)

    def _attend(self, attn: Attention, query: Tensor, key: Tensor, value: Tensor,
                mask: Tensor | None) -> Tensor:
        """softmax(QKᵀ·scale + mask), fake-quantized, times V; in query slices when large."""
        step = self._slices(query, key)
        out = []
        for i in range(0, query.shape[1], step):
            rows = slice(i, i + step)
            piece = (mask[:, rows] if mask is not None and mask.shape[1] == query.shape[1]
                     else mask)
            probs = attn.get_attention_scores(query[:, rows], key, piece)
            probs = self._maybe(self.probs_quantizer, probs)
            out.append(torch.bmm(probs, value))
            del probs
        return out[0] if len(out) == 1 else torch.cat(out, 1)


def set_quant_attention(
    model: nn.Module, make_processor: Callable[[str, Attention], QuantAttnProcessor]
) -> dict[str, QuantAttnProcessor]:
    """Give every diffusers ``Attention`` in ``model`` the processor ``make_processor(name, attn)``.

    Returns ``{qualified attention name: processor}``.
    """
    installed: dict[str, QuantAttnProcessor] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention):
            processor = make_processor(name, module)
            module.set_processor(processor)
            installed[name] = processor
    return installed
