"""The timestep context and its attachment to a diffusers denoiser."""

from __future__ import annotations

import pytest
import torch

from gaq.quant.context import (
    attach_timestep_context,
    current_timestep,
    normalize_timestep,
    timestep_context,
    timesteps_per_row,
)


def test_context_nests_and_resets() -> None:
    assert current_timestep() is None
    with timestep_context(10):
        assert current_timestep() == 10
        with timestep_context(torch.tensor([3, 4])) as inner:
            assert torch.equal(current_timestep(), torch.tensor([3, 4]))
            assert inner.dtype == torch.long
        assert current_timestep() == 10
    assert current_timestep() is None
    with pytest.raises(RuntimeError), timestep_context(5):
        raise RuntimeError
    assert current_timestep() is None


def test_normalize_timestep() -> None:
    assert normalize_timestep(torch.tensor(7)) == 7
    assert normalize_timestep(torch.tensor([7])) == 7  # diffusers broadcasts (1,)
    assert normalize_timestep(torch.tensor(7.0)) == 7
    assert normalize_timestep(7.0) == 7
    assert torch.equal(normalize_timestep(torch.tensor([1.0, 2.0])), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integral"):
        normalize_timestep(torch.tensor([1.5, 2.0]))
    with pytest.raises(TypeError):
        normalize_timestep("7")
    with pytest.raises(ValueError):
        normalize_timestep(torch.zeros(2, 2))


def test_timesteps_per_row_head_layout() -> None:
    t = torch.tensor([5, 9])
    assert timesteps_per_row(t, 2) is t
    assert timesteps_per_row(t, 6).tolist() == [5, 5, 5, 9, 9, 9]
    with pytest.raises(ValueError):
        timesteps_per_row(t, 5)


def test_attach_sets_timestep_inside_unet(tiny_unet) -> None:
    seen = []
    probe = tiny_unet.down_blocks[1].attentions[0]
    hook = probe.register_forward_hook(lambda *_: seen.append(current_timestep()))
    handle = attach_timestep_context(tiny_unet)
    try:
        x = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            tiny_unet(x, 7)
            tiny_unet(x, timestep=torch.tensor(11))
            tiny_unet(sample=x, timestep=torch.tensor([3, 5]))
            assert current_timestep() is None  # reset after each forward
            with timestep_context(99):
                tiny_unet(x, 4)
                assert current_timestep() == 99  # the outer context is restored
        assert seen[:2] == [7, 11]
        assert torch.equal(seen[2], torch.tensor([3, 5]))
        assert seen[3] == 4
    finally:
        handle.remove()
    with torch.no_grad():
        tiny_unet(torch.randn(1, 1, 8, 8), 7)
    assert seen[-1] is None  # detached: nothing published any more
    hook.remove()


def test_attach_resets_after_exception(tiny_unet) -> None:
    with attach_timestep_context(tiny_unet), pytest.raises(RuntimeError):
        tiny_unet(torch.randn(1, 3, 8, 8), 7)  # wrong channel count
    assert current_timestep() is None


def test_attach_rejects_model_without_timestep() -> None:
    with pytest.raises(ValueError, match="no parameter named"):
        attach_timestep_context(torch.nn.Linear(2, 2))


def test_a_copy_of_a_hooked_model_hooked_again_leaves_no_timestep_behind():
    """deepcopy keeps the hooks; attaching again must not add a second set, whose resets
    would run first-in-first-out and leave the call's timestep set after it returns."""
    import copy

    class Net(torch.nn.Module):
        def forward(self, x, timestep):
            assert current_timestep() == 7
            return x

    net = Net()
    attach_timestep_context(net)
    twin = copy.deepcopy(net)
    attach_timestep_context(twin)
    twin(torch.zeros(1), torch.tensor([7, 7]))
    assert current_timestep() is None
    attach_timestep_context(net)  # the same model twice: still one set of hooks
    net(torch.zeros(1), 7)
    assert current_timestep() is None
