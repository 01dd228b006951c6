"""The block-reconstruction engine: AdaRound per block, per-sample loss weights, and the
disk cache that streams captured block inputs."""

from __future__ import annotations

import dataclasses
import pickle
import tempfile

import pytest
import torch

from gaq.calibration import CalibrationSpec, record_calibration
from gaq.config import QuantConfig
from gaq.models.adapters import Block, adapter_for
from gaq.models.pipeline import Pipeline
from gaq.quantize import quant_layers, quantize_model
from gaq.reconstruction import (
    BlockData,
    ReconConfig,
    calib_batches,
    capture,
    reconstruct,
    weighted_error,
)

# 60 iterations need a larger step than the paper's 1e-3 (tuned for 20k iterations): with
# lr=1e-3, V moves by at most 0.06 in 60 Adam steps, so only weights a hair from the
# rounding midpoint can flip, and at that point the soft loss (zero at initialisation,
# where the soft weight equals the FP weight) says little about the hard one. Measured on
# this model: lr=1e-3 for 60 (and even 200) iterations leaves down_blocks.0.resnets.0 ~7-10%
# worse than RTN; lr=1e-2 improves every 4-bit block by 12-52%.
# minibatch="one_record": with 8 calibration rows and batch 8, "all_rows" (the authors'
# draw, the default) makes every iteration full-batch; measured there, mid_block's
# attention ends 0.2 % above RTN (0.001339 vs 0.001337) while the other blocks improve.
# The strict every-block check keeps the setting it was tuned with; the sum over blocks is
# checked for the default draw below.
RECON = ReconConfig(weight_iters=60, weight_lr=1e-2, batch_size=8, capture_batch=4,
                    cache="memory", minibatch="one_record")


@pytest.fixture(scope="module")
def unet_and_calib(make_tiny_model, tmp_path_factory):
    from diffusers import DDPMScheduler

    model = make_tiny_model("unet")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    spec = CalibrationSpec(steps=4, interval=2, samples_per_step=4)
    calib = record_calibration(Pipeline(model, sched), spec, model_id="tiny-unet",
                               cache_dir=tmp_path_factory.mktemp("calib"))
    return model, calib


def weights_only_model(model):
    return quantize_model(model, adapter_for(model), QuantConfig.from_bits("W4A32"))[0]


@pytest.mark.slow
def test_adaround_beats_rtn_on_every_block(unet_and_calib):
    model, calib = unet_and_calib
    adapter = adapter_for(model)
    qmodel = weights_only_model(model)
    results = reconstruct(qmodel, model, adapter, calib_batches(calib, RECON.capture_batch, "cpu"),
                          RECON, phase="weights", progress=False)

    assert [r.block for r in results] == [b.name for b in adapter.blocks()]
    assert all(r.samples == len(calib) for r in results)
    assert all(layer.frozen_weight is not None for _, layer in quant_layers(qmodel))
    for r in results:
        rtn, ada = r.metrics["rtn_error"], r.metrics["adaround_error"]
        assert rtn > 0
        if r.block == "conv_in":
            # 8 bits (model policy) on a near-white input: the DDIM x_t of this random model
            # has 3x3-patch correlations below 0.1, so the layer's output-error Hessian is
            # ~diagonal and round-to-nearest is already (almost) the optimal rounding.
            # Measured: 0.996 x RTN here, exactly RTN with 16 calibration rows. On the
            # trained bundled model, whose x_t look like images, AdaRound gets conv_in to
            # 0.83 x RTN (tests/test_bundled_quant.py asserts it strictly there).
            assert ada <= rtn, r.block
        else:
            assert ada < rtn, f"{r.block}: AdaRound {ada:.3g} >= RTN {rtn:.3g}"


@pytest.mark.slow
def test_adaround_with_the_authors_minibatches_beats_rtn_overall(unet_and_calib):
    model, calib = unet_and_calib
    cfg = dataclasses.replace(RECON, minibatch="all_rows")
    results = reconstruct(weights_only_model(model), model, adapter_for(model),
                          calib_batches(calib, cfg.capture_batch, "cpu"), cfg,
                          phase="weights", progress=False)
    rtn = sum(r.metrics["rtn_error"] for r in results)
    ada = sum(r.metrics["adaround_error"] for r in results)
    assert ada < 0.95 * rtn


def test_weighted_error_follows_the_sample_weights():
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    # BRECQ's scale: summed over channels, averaged over positions
    per_sample = (out - target).pow(2).sum(1).flatten(1).mean(1)
    assert len(set(per_sample.tolist())) == 4

    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert weighted_error(out, target, one_hot) == pytest.approx(per_sample[2].item())
    nearly = torch.tensor([1e-9, 1e-9, 1.0, 1e-9])
    assert weighted_error(out, target, nearly) == pytest.approx(per_sample[2].item(), rel=1e-6)
    # uniform weights, at any scale, give the plain mean
    for w in (None, torch.ones(4), torch.full((4,), 7.0)):
        assert weighted_error(out, target, w) == pytest.approx(per_sample.mean().item())
    lp = (out - target).abs().pow(2.4).sum(1).flatten(1).mean(1)
    assert weighted_error(out, target, one_hot, p=2.4) == pytest.approx(lp[2].item())


def test_sample_weights_change_the_rounding(unet_and_calib):
    model, calib = unet_and_calib
    adapter = adapter_for(model)
    blocks = [Block("down_blocks.1.resnets.0", "resnet")]
    batches = calib_batches(calib, RECON.capture_batch, "cpu")
    calls = []

    def focus_on_one_row(block, data):
        calls.append((block.name, len(data)))
        w = torch.full((len(calib),), 1e-3)
        w[5] = 1.0
        return w

    frozen, row_error = {}, {}
    for label, weight_fn in (("uniform", None), ("one-hot", focus_on_one_row)):
        qmodel = weights_only_model(model)
        reconstruct(qmodel, model, adapter, batches, RECON, phase="weights", blocks=blocks,
                    weight_fn=weight_fn, progress=False)
        frozen[label] = {n: lay.frozen_weight for n, lay in quant_layers(qmodel)
                         if n.startswith(blocks[0].name + ".")}
        # per-row block output error against the FP block, all rows in one capture
        data = capture(qmodel, model, blocks[0].name, calib_batches(calib, len(calib), "cpu"),
                       "memory")
        rec = data.record(0)
        with torch.no_grad():
            out = qmodel.get_submodule(blocks[0].name)(*rec["args"], **rec["kwargs"])
        row_error[label] = (out - rec["target"]).pow(2).flatten(1).mean(1)
    assert calls == [("down_blocks.1.resnets.0", len(calib))]
    assert frozen["uniform"].keys() == frozen["one-hot"].keys() and frozen["uniform"]
    changed = [n for n in frozen["uniform"]
               if not torch.equal(frozen["uniform"][n], frozen["one-hot"][n])]
    assert changed, "weighting the loss onto one sample left every rounding decision as is"
    # Each rounding is better at what it was weighted for (measured: row 5 error 0.0006 vs
    # 0.0008; mean 0.0011 vs 0.0009).
    assert row_error["one-hot"][5] < row_error["uniform"][5]
    assert row_error["uniform"].mean() < row_error["one-hot"].mean()


class NotATensor:
    """An arbitrary Python object: torch.load(weights_only=True) refuses to unpickle it."""


def _record(rows: int, offset: int = 0) -> dict:
    return {"args": (torch.randn(rows, 2),), "kwargs": {}, "target": torch.randn(rows, 2),
            "t": torch.arange(rows), "index": torch.arange(offset, offset + rows)}


def test_disk_cache_writes_files_and_removes_them_on_close():
    data = BlockData("disk")
    folder = data._dir
    try:
        records = [_record(3), _record(2, offset=3)]
        for r in records:
            data.add(r)
        assert sorted(p.name for p in folder.iterdir()) == ["000000.pt", "000001.pt"]
        assert len(data) == 5
        for saved, loaded in zip(records, data.records(), strict=True):
            assert torch.equal(saved["target"], loaded["target"])
            assert torch.equal(saved["args"][0], loaded["args"][0])
        assert torch.equal(data.index(), torch.arange(5))
        batch = data.sample(2, torch.Generator().manual_seed(0))
        assert batch["n"] == 2 and batch["target"].shape == (2, 2)
    finally:
        data.close()
    assert not folder.exists()


def test_disk_cache_loads_with_weights_only():
    data = BlockData("disk")
    try:
        data.add(_record(2) | {"kwargs": {"extra": NotATensor()}})
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            data.record(0)
    finally:
        data.close()
    memory = BlockData("memory")
    assert memory._dir is None  # nothing touches the disk
    memory.add(_record(2))
    assert torch.equal(memory.record(0)["index"], torch.arange(2))


def test_capture_streams_one_file_per_batch(unet_and_calib, tmp_path, monkeypatch):
    model, calib = unet_and_calib
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    qmodel = weights_only_model(model)
    data = capture(qmodel, model, "mid_block.resnets.0", calib_batches(calib, 3, "cpu"), "disk")
    try:
        assert data._dir.parent == tmp_path
        assert len(list(data._dir.iterdir())) == 3  # 8 rows in batches of 3
        assert len(data) == len(calib)
        assert torch.equal(data.index().sort().values, torch.arange(len(calib)))
        rec = data.record(0)
        assert rec["target"].shape == (3, 16, 4, 4) and rec["t"].shape == (3,)
    finally:
        data.close()
    # reconstruct closes every capture it made, also with the disk cache
    seen = []
    cfg = ReconConfig(weight_iters=2, capture_batch=4, cache="disk")
    reconstruct(qmodel, model, adapter_for(model), calib_batches(calib, 4, "cpu"), cfg,
                blocks=[Block("conv_in", "layer"), Block("mid_block.resnets.0", "resnet")],
                weight_fn=lambda block, d: seen.append(len(list(d._dir.iterdir()))),
                progress=False)
    assert seen == [2, 2]
    assert list(tmp_path.iterdir()) == []


def test_rounding_variables_are_released_and_the_folded_weights_kept(unet_and_calib,
                                                                       monkeypatch):
    """After a block is reconstructed its AdaRound variables (V, the grid floor: two
    weight-sized tensors per layer) are dropped; the weights the layers froze are exactly
    those of a run that keeps them, and freezing again keeps them."""
    from gaq.quant import AdaRoundQuantizer
    from gaq.quantize import freeze

    model, calib = unet_and_calib
    cfg = dataclasses.replace(RECON, weight_iters=5)

    def frozen_after(release: bool):
        if not release:
            monkeypatch.setattr(AdaRoundQuantizer, "release", lambda self: self)
        qmodel = weights_only_model(model)
        reconstruct(qmodel, model, adapter_for(model), calib_batches(calib, 4, "cpu"), cfg,
                    phase="weights", progress=False)
        monkeypatch.undo()
        return qmodel

    released, kept = frozen_after(True), frozen_after(False)
    ada = [m for m in released.modules() if isinstance(m, AdaRoundQuantizer)]
    assert ada and all(q.released and q.alpha is None and q.w_floor is None for q in ada)
    assert all(not q.released for q in kept.modules() if isinstance(q, AdaRoundQuantizer))
    before = {n: lay.frozen_weight.clone() for n, lay in quant_layers(released)}
    freeze(released)
    for (name, lay), (_, other) in zip(quant_layers(released), quant_layers(kept),
                                       strict=True):
        assert torch.equal(lay.frozen_weight, before[name])
        assert torch.equal(lay.frozen_weight, other.frozen_weight), name
    with pytest.raises(RuntimeError, match="release"):
        ada[0].fold()


    # the model is smaller by exactly the rounding variables: V and ⌊W/Δ⌋ of each layer
    def nbytes(m):
        return sum(t.numel() * t.element_size()
                   for t in [*m.parameters(), *m.buffers()])

    held = sum(q.alpha.numel() * 4 + q.w_floor.numel() * 4
               for q in kept.modules() if isinstance(q, AdaRoundQuantizer))
    assert held > 0 and nbytes(kept) - nbytes(released) == held


def test_recomputed_soft_weight_and_regulariser_give_bit_identical_gradients():
    """The AdaRound loop keeps only V for backward and recomputes the soft weight's and the
    regulariser's steps there; the forward values and V's gradient equal, bit for bit,
    those of autograd keeping every intermediate."""
    from gaq.quant import AdaRoundQuantizer

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    scale = w.abs().amax(dim=(1, 2, 3)) / 7
    x = torch.randn(2, 8, 6, 6, generator=gen)
    target = torch.randn(2, 16, 4, 4, generator=gen)

    def grad(recompute: bool):
        q = AdaRoundQuantizer(w, scale, torch.zeros(16), bits=4, symmetric=True)
        with torch.no_grad():  # away from the initial point, so every branch is used
            q.alpha.add_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(1)))
        q.set_soft(True, recompute)
        out = torch.nn.functional.conv2d(x, q())
        loss = (out - target).pow(2).mean() + 0.01 * q.rounding_regularizer(2.5)
        loss.backward()
        return out.detach(), loss.detach(), q.alpha.grad

    kept, recomputed = grad(False), grad(True)
    for a, b in zip(kept, recomputed, strict=True):
        assert torch.equal(a, b)
    assert kept[2].abs().sum() > 0


def test_the_adaround_loop_recomputes_and_freezes_the_same_weights(unet_and_calib,
                                                                   monkeypatch):
    from gaq.quant import AdaRoundQuantizer

    model, calib = unet_and_calib
    cfg = dataclasses.replace(RECON, weight_iters=4)
    used: list[bool] = []
    real = AdaRoundQuantizer._recomputing

    def spy(self):
        used.append(real(self))
        return used[-1]

    def frozen(recompute: bool):
        if recompute:
            monkeypatch.setattr(AdaRoundQuantizer, "_recomputing", spy)
        else:
            monkeypatch.setattr(AdaRoundQuantizer, "_recomputing", lambda self: False)
        qmodel = weights_only_model(model)
        reconstruct(qmodel, model, adapter_for(model), calib_batches(calib, 4, "cpu"), cfg,
                    phase="weights", progress=False)
        monkeypatch.undo()
        return {n: lay.frozen_weight for n, lay in quant_layers(qmodel)}

    plain, recomputed = frozen(False), frozen(True)
    assert any(used)  # the loop did take the recomputing path
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name
