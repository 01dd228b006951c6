"""The PixArt adapter (one file, gaq/models/adapter_pixart.py): its call, its temporal
features and its roles, checked against what the diffusers model computes itself."""

from __future__ import annotations

import pytest
import torch
from test_families import PIXART

from gaq.models.adapters import ADAPTERS, adapter_for, denoise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(**PIXART).eval()


def _inputs(model, batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 500, 1])[:batch]
    text = torch.randn(batch, 5, PIXART["caption_channels"], generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[:, 3:] = 0
    return x, t, {"encoder_hidden_states": text, "encoder_attention_mask": mask}


def test_the_call_is_the_models_own_keyword_call(pixart):
    x, t, cond = _inputs(pixart)
    with torch.no_grad():
        got = denoise(pixart, x, t, cond).sample
        want = pixart(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                      timestep=t, encoder_attention_mask=cond["encoder_attention_mask"],
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        masked_out = denoise(pixart, x, t, {"encoder_hidden_states":
                                            cond["encoder_hidden_states"]}).sample
    assert torch.equal(got, want)
    assert not torch.allclose(got, masked_out)  # the text mask reaches the model


def test_temporal_features_equal_what_the_forward_computes(pixart):
    """The features TFMQ-DM's temporal reconstruction matches are the ones the model's
    own forward pass produces (captured with hooks), for every timestep of a batch."""
    x, t, cond = _inputs(pixart)
    seen = {}
    hooks = [pixart.adaln_single.emb.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("adaln_single.emb", out)),
             pixart.adaln_single.linear.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("adaln_single.linear", out))]
    with torch.no_grad():
        denoise(pixart, x, t, cond)
        got = adapter_for(pixart).temporal_forward(pixart, t, {})
    for h in hooks:
        h.remove()
    assert set(got) == set(seen)
    for key in seen:
        torch.testing.assert_close(got[key], seen[key], rtol=0, atol=0)


def test_roles_blocks_and_temporal_layers(pixart):
    adapter = adapter_for(pixart)
    assert adapter.arch == "PixArt" and ADAPTERS.get("PixArtTransformer2DModel") is type(adapter)
    assert adapter.role("pos_embed.proj") == "input" and adapter.role("proj_out") == "output"
    assert adapter.role("transformer_blocks.0.attn2.to_k") == "cross_kv"
    assert sorted(adapter.temporal_layers()) == [
        "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear"]
    kinds = {b.name: b.kind for b in adapter.blocks()}
    assert kinds["transformer_blocks.0"] == kinds["transformer_blocks.1"] == "transformer"
    # the caption projection is quantized as ordinary layers, in forward order before
    # the blocks that consume it
    names = [b.name for b in adapter.blocks()]
    assert names.index("caption_projection.linear_2") < names.index("transformer_blocks.0")


def test_the_1024px_models_get_resolution_and_aspect_ratio():
    from diffusers import PixArtTransformer2DModel

    from gaq.models.adapter_pixart import _added_cond

    torch.manual_seed(0)
    big = PixArtTransformer2DModel(**{**PIXART, "sample_size": 128}).eval()
    assert big.use_additional_conditions
    x = torch.zeros(2, 4, 16, 8)
    got = _added_cond(big, x)
    assert got["resolution"].tolist() == [[128.0, 64.0]] * 2
    assert got["aspect_ratio"].tolist() == [[2.0]] * 2
