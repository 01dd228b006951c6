"""HTG: timestep-aware shift-and-scale folded into a DiT, timesteps grouped by adjacency-
constrained clustering, activation ranges shared within each group."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_inputs import cond_inputs, denoise
from torch import nn

from baselines.htg import HTG, HTGConfig
from baselines.htg.grouping import cluster_adjacent, group_lookup
from baselines.htg.smooth import GroupShifted, apply_fold
from gaq.calibration import CalibrationSet
from gaq.config import QuantConfig
from gaq.models.adapters import adapter_for
from gaq.quantize import save_state
from gaq.reconstruction import ReconConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = HTGConfig(n_groups=3, recon=ReconConfig(weight_iters=5, batch_size=8, capture_batch=8,
                                               cache="memory"),
                 batch_size=16)
STEPS = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, 0]


@pytest.fixture(scope="module")
def digits_dit() -> nn.Module:
    import diffusers

    from gaq.models.bundled import BUNDLED_MODELS

    path = BUNDLED_MODELS["digits-dit"] / "transformer"
    return diffusers.DiTTransformer2DModel.from_pretrained(path).eval()


def calibration(model: nn.Module, per_step: int = 4, seed: int = 1) -> CalibrationSet:
    """Random rows at the STEPS timesteps, ``per_step`` each, with the FP outputs."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    rows = per_step * len(STEPS)
    x = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.tensor(STEPS).repeat_interleave(per_step)
    cond = cond_inputs("dit", model, rows, gen)
    return CalibrationSet(x=x, t=t, eps_fp=denoise("dit", model, x, t, cond), cond=cond)


def outputs(model: nn.Module, calib: CalibrationSet) -> torch.Tensor:
    return denoise("dit", model, calib.x, calib.t, calib.cond)


# -- grouping ----------------------------------------------------------------------------

def test_clustering_merges_only_neighbours_and_is_deterministic():
    feats = torch.tensor([[0.0], [0.1], [10.0], [10.2], [10.1], [20.0]])
    assert cluster_adjacent(feats, 3) == [[0, 1], [2, 3, 4], [5]]
    # rows 0 and 2-3 are equal but not adjacent: never merged past the far row 1
    feats = torch.tensor([[0.0], [50.0], [0.0], [0.0]])
    assert cluster_adjacent(feats, 3) == [[0], [1], [2, 3]]
    assert cluster_adjacent(feats, 2) == [[0, 1], [2, 3]]  # tie: the earliest pair
    rand = torch.randn(17, 5, generator=torch.Generator().manual_seed(0))
    for k in (1, 4, 17, 30):
        groups = cluster_adjacent(rand, k)
        assert len(groups) == min(k, 17)
        assert [i for g in groups for i in g] == list(range(17))  # contiguous, in order
        assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)
        assert cluster_adjacent(rand.clone(), k) == groups
    # ties go to the earliest pair
    assert cluster_adjacent(torch.zeros(4, 2), 2) == [[0, 1, 2], [3]]


def test_group_lookup_uses_the_nearest_calibrated_timestep():
    lookup = group_lookup([10, 20, 40], [[0, 1], [2]], 50, "cpu")
    assert lookup[0] == 0 and lookup[20] == 0 and lookup[29] == 0
    assert lookup[30] == 1  # tie between 20 and 40: the larger, as fill_table resolves it
    assert lookup[49] == 1


# -- folding -----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_fold_leaves_the_fp_tiny_dit_unchanged(make_tiny_model, alpha):
    model = make_tiny_model("dit")
    calib = calibration(model)
    plan = HTG(dataclasses.replace(TINY, alpha=alpha)).plan(model, calib)
    # the fold really moves something: non-trivial scales and shifts
    assert any((s - 1).abs().max() > 0.05 for s in plan.scale.values())
    assert any(z.abs().max() > 1e-3 for z in plan.shift.values())
    folded = apply_fold(model, plan)
    assert sum(isinstance(m, GroupShifted) for m in folded.modules()) == 2 * 5
    ref, got = outputs(model, calib), outputs(folded, calib)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    # and the original model is untouched
    assert not any(isinstance(m, GroupShifted) for m in model.modules())


def test_fold_leaves_the_fp_digits_dit_unchanged(digits_dit):
    calib = calibration(digits_dit)
    plan = HTG(TINY).plan(digits_dit, calib)
    folded = apply_fold(digits_dit, plan)
    ref, got = outputs(digits_dit, calib), outputs(folded, calib)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    # the smoothed inputs are centred: shifting left a smaller range than before
    inputs: list[torch.Tensor] = []
    layer = folded.transformer_blocks[0].attn1.to_q.layer
    h = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    outputs(folded, calib)
    h.remove()
    orig: list[torch.Tensor] = []
    h = digits_dit.transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda m, a: orig.append(a[0]))
    outputs(digits_dit, calib)
    h.remove()
    span = inputs[0].amax((0, 1)) - inputs[0].amin((0, 1))
    span_orig = orig[0].amax((0, 1)) - orig[0].amin((0, 1))
    # per-channel ranges equalised: the ratio of widest to narrowest channel shrinks
    assert (span.max() / span.min()) < (span_orig.max() / span_orig.min())


# -- grouping vs one group ---------------------------------------------------------------

@pytest.mark.slow
def test_groups_lower_the_activation_quantization_error(digits_dit):
    calib = calibration(digits_dit, per_step=6)
    quant = QuantConfig.from_bits("W8A6")
    errs = {}
    for k in (1, 4):
        cfg = dataclasses.replace(TINY, n_groups=k, weight_recon=False)
        res = HTG(cfg).quantize(digits_dit, adapter_for(digits_dit), calib, quant)
        errs[k] = (outputs(res.model, calib) - calib.eps_fp).pow(2).mean().item()
    assert errs[4] < errs[1], errs


# -- end to end, save / restore ----------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(digits_dit):
    calib = calibration(digits_dit)
    res = HTG(TINY).quantize(digits_dit, adapter_for(digits_dit), calib,
                             QuantConfig.from_bits("W4A8"))
    return res, calib


@pytest.mark.slow
@torch.no_grad()
def test_quantize_then_sample(digits_dit, quantized):
    from diffusers import DDIMScheduler

    res, _ = quantized
    assert res.state["method"] == "htg" and len(res.state["htg"]["groups"]) == 3
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(7)  # none of these timesteps was calibrated
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    labels = torch.tensor([1, 2, 3, 4])
    finals = []
    for model in (digits_dit, res.model):
        x = x0.clone()
        for t in sched.timesteps:
            eps = model(x, timestep=t.expand(4), class_labels=labels).sample
            x = sched.step(eps, t, x).prev_sample
        finals.append(x)
    assert torch.isfinite(finals[1]).all()
    rel = (finals[1] - finals[0]).norm() / finals[0].norm()
    assert rel < 0.5, rel


@pytest.mark.slow
def test_save_restore_round_trip(digits_dit, quantized, tmp_path):
    from gaq.cell import restore

    res, calib = quantized
    save_state(res.model, res.report, res.quant, tmp_path, meta=res.state)
    ref = outputs(res.model, calib)
    # a fresh FP model: restore re-applies the fold (HTG.prepare_restore) before loading
    again = restore(digits_dit, tmp_path)
    assert torch.equal(outputs(again.model, calib), ref)


def test_only_dit_is_supported():
    assert HTG.unsupported("UNet2DModel")
    assert HTG.unsupported("UNet2DConditionModel")
    assert HTG.unsupported("DiT") is None
    for cfg in HTG.presets.values():
        assert HTGConfig.from_dict(cfg.to_dict()) == cfg
