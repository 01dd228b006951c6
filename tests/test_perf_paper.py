"""Paper-scale cost projection: the real architectures' sizes, the fit, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel, VQModel

from gaq import perf_paper
from gaq.perf_paper import ARCHITECTURES, Architecture, Protocol


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_architectures_have_the_papers_sizes():
    # built on the meta device: no memory, no time
    with torch.device("meta"):
        cifar = UNet2DModel(**ARCHITECTURES["ddpm-cifar10"].unet)
        ldm = UNet2DModel(**ARCHITECTURES["ldm4-lsun"].unet)
        vq = VQModel(**ARCHITECTURES["ldm4-lsun"].vq)
    assert _params(cifar) == 35_746_307  # Ho et al.'s CIFAR-10 model
    assert _params(ldm) == pytest.approx(274e6, rel=0.01)  # LDM paper: 274 M
    assert _params(vq) == pytest.approx(55e6, rel=0.02)  # VQ-f4
    assert ARCHITECTURES["ldm4-lsun"].protocol.steps == 200


@pytest.mark.parametrize("name,denoiser,autoencoder,text", [
    ("ldm4-cin256", 401e6, 55e6, 0),     # LDM paper: 400 M (cin256-v2)
    ("dit-xl2-256", 750e6, 84e6, 0),     # DiT-XL/2's 675 M + per-block embedder copies
    ("sd-v1-4", 860e6, 84e6, 123e6),     # SD v1.4: 860 M UNet, 123 M CLIP ViT-L/14
])
def test_the_conditional_architectures_have_their_sizes(name, denoiser, autoencoder, text):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    a = ARCHITECTURES[name]
    with torch.device("meta"):
        d = getattr(diffusers, a.denoiser)(**a.unet)
        ae = getattr(diffusers, a.autoencoder)(**a.vq)
        te = (CLIPTextModel(CLIPTextConfig(**a.conditioning["encoder"]))
              if a.conditioning["kind"] == "text" else None)
    assert _params(d) == pytest.approx(denoiser, rel=0.01)
    assert _params(ae) == pytest.approx(autoencoder, rel=0.02)
    assert (_params(te) if te is not None else 0) == pytest.approx(text, rel=0.01)
    assert a.protocol.guidance


def test_hashed_token_ids_frame_and_pad_like_clip():
    tok = perf_paper.HashedTokenIds()
    ids = tok(["a cat", ""]).input_ids
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == tok.bos and ids[0, 3] == tok.eos and (ids[0, 3:] == tok.eos).all()
    assert (ids[1, 1:] == tok.eos).all()
    assert torch.equal(tok(["a cat"]).input_ids, ids[:1])  # deterministic
    assert int(ids[0, 1:3].max()) < tok.bos


def test_fit_recovers_a_linear_cost_model():
    a, c, b = 3.0, 0.25, 1.5
    points = {(n, k): a + c * n + b * k for n in (16, 32) for k in (2, 6)}
    assert perf_paper._fit(points, (16, 32), (2, 6)) == pytest.approx((a, c, b))


_TINY = Architecture(
    description="tiny test UNet + VQ",
    unet={"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
          "block_out_channels": (8, 16), "norm_num_groups": 4,
          "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
          "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 4},
    vq={"in_channels": 3, "out_channels": 3, "latent_channels": 3, "num_vq_embeddings": 16,
        "block_out_channels": (8, 8), "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2},
    protocol=Protocol("test", steps=10, images=100, calibration_rows=40, trajectories=8),
)


@pytest.mark.slow
def test_paper_scale_report_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "tiny", _TINY)
    calls = []

    def in_process(arch, method, rows, iters, bits, device, threads):
        calls.append((method, rows, iters))
        return perf_paper.measure_method(arch, method, rows, iters, bits, device)

    # the child process would not see the monkeypatched architecture
    monkeypatch.setattr(perf_paper, "_measure_in_child", in_process)
    report = perf_paper.paper_scale("tiny", ("rtn", "brecq"), device="cpu", batch=2, repeats=1,
                                    rows=(2, 4), iters=(1, 2), gpus=(1, 4))
    assert sorted(calls) == [("brecq", 2, 1), ("brecq", 2, 2), ("brecq", 4, 1),
                             ("brecq", 4, 2), ("rtn", 2, 1), ("rtn", 4, 1)]
    h = report["projected_hours"]
    assert h["sampling_fp"][1] == pytest.approx(4 * h["sampling_fp"][4])  # sharded sampling
    assert h["sampling_fp"][1] > 0 and report["decode_seconds_per_batch"] > 0
    assert report["fake_quant_ratio"] > 0
    m, recon = report["methods"]
    # tiny runs are noise-dominated: the fit exists, its sign is not asserted
    assert np.isfinite(m["projected_hours"]) and len(m["peak_memory_mb"]) == 2
    assert m["seconds_per_iteration"] == 0.0 and not m["iterative"]  # no iterations to vary
    assert recon["iterative"] and len(recon["peak_memory_mb"]) == 4
    assert np.isfinite(recon["fit_check_error"])
    assert all(v > 0 for v in m["peak_memory_mb"].values())
    json_path, md = perf_paper.write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["architecture"] == "tiny"
    text = md.read_text()
    assert "| sampling, FP |" in text and "| calibration, brecq (one rank) |" in text
    assert "1 × device" in text


_TINY_CONDITIONAL = {
    "class-embedder": Architecture(
        description="tiny cross-attention UNet + class embedder",
        unet={"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
              "block_out_channels": (8, 16), "norm_num_groups": 4, "cross_attention_dim": 12,
              "attention_head_dim": 4,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
        denoiser="UNet2DConditionModel",
        conditioning={"kind": "class-embedder", "num_classes": 5, "dim": 12},
        protocol=Protocol("test", steps=10, images=100, calibration_rows=40, trajectories=8,
                          guidance=True)),
    "class": Architecture(
        description="tiny DiT + KL autoencoder",
        unet={"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
              "out_channels": 8, "num_layers": 1, "sample_size": 8, "patch_size": 2,
              "num_embeds_ada_norm": 5},
        vq={"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": (8, 8), "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2},
        denoiser="DiTTransformer2DModel", autoencoder="AutoencoderKL",
        conditioning={"kind": "class", "num_classes": 5},
        protocol=Protocol("test", steps=10, images=100, calibration_rows=40, trajectories=8,
                          guidance=True)),
    "text": Architecture(
        description="tiny cross-attention UNet + CLIP text encoder, PLMS",
        unet={"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
              "block_out_channels": (8, 16), "norm_num_groups": 4, "cross_attention_dim": 16,
              "attention_head_dim": 4,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
        denoiser="UNet2DConditionModel",
        conditioning={"kind": "text", "encoder": {
            "vocab_size": 49_408, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77}},
        scheduler={"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
                   "skip_prk_steps": True},
        protocol=Protocol("test", steps=10, images=100, calibration_rows=40, trajectories=8,
                          guidance=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(_TINY_CONDITIONAL))
def test_conditional_architectures_run_the_projection(kind, monkeypatch):
    """Class labels (DiT), a class embedding (LDM) and a text encoder (SD) reach the timed
    calls and the calibration, with both guidance halves recorded."""
    torch.set_num_threads(1)
    monkeypatch.setitem(ARCHITECTURES, "tiny", _TINY_CONDITIONAL[kind])
    monkeypatch.setattr(perf_paper, "_measure_in_child",
                        lambda arch, method, rows, iters, bits, device, threads:
                        perf_paper.measure_method(arch, method, rows, iters, bits, device))
    report = perf_paper.paper_scale("tiny", ("rtn",), device="cpu", batch=2, repeats=1,
                                    rows=(4, 8), iters=(1, 2), gpus=(1,))
    assert report["fp_seconds_per_call"] > 0 and report["fake_quant_ratio"] > 0
    runs = report["methods"][0]
    assert set(runs["runs"]) == {"4x1", "8x1"}
    pipe = perf_paper.build_pipeline("tiny", "cpu")
    spec = perf_paper._calibration_spec(4, ARCHITECTURES["tiny"])
    from gaq.calibration import record_calibration

    calib = record_calibration(pipe, spec, cache=False)
    # both halves of every kept step (PLMS's 10 steps visit 11 timesteps: one more kept)
    rows = len(calib.train())
    assert spec.guidance is not None and rows % 2 == 0 and rows >= 4


def test_paper_scale_refuses_a_bad_grid():
    with pytest.raises(ValueError, match="increasing"):
        perf_paper.paper_scale("ddpm-cifar10", device="cpu", rows=(32, 16))


def test_report_sets_projections_beside_the_papers_reported_costs(tmp_path):
    """The LSUN protocol's table quotes the calibration GPU hours GAQ's paper reports (3.5
    for GAQ, 2.32 for TFMQ-DM, 5.29 for Q-Diffusion: read from the paper, not from our
    table) beside each projection, says a method without a projection was not run, and
    says CPU and GPU hours are different units; a protocol without reported costs adds
    nothing."""
    method = {"runs": {}, "peak_memory_mb": {}, "fixed_seconds": 1.0, "seconds_per_row": 0.1,
              "seconds_per_iteration": 0.01, "fit_check_error": 0.02, "iterative": True}
    report = {
        "architecture": "ldm4-lsun", "description": "d", "parameters": 274e6,
        "protocol": vars(ARCHITECTURES["ldm4-lsun"].protocol), "bits": "W4A8",
        "device": "cpu x86_64", "threads": 2, "batch": 8, "fp_seconds_per_call": 1.0,
        "quant_seconds_per_call": 1.1, "fake_quant_ratio": 1.1,
        "projected_hours": {"recording": 1.0, "sampling_fp": {1: 2.0},
                            "sampling_quantized": {1: 2.2}},
        "methods": [{**method, "method": "gaq", "projected_hours": 400.0},
                    {**method, "method": "tfmq", "projected_hours": 250.0}],
    }
    _, md = perf_paper.write_report(report, tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in md.read_text().splitlines()[-4:] if line.startswith("| ")}
    assert rows["gaq"] == ["400.0", "~3.5"]
    assert rows["tfmq"] == ["250.0", "2.32"]
    assert rows["qdiffusion"] == ["not run", "5.29"]
    assert "not the same unit" in md.read_text()
    cifar = {**report, "architecture": "ddpm-cifar10",
             "protocol": vars(ARCHITECTURES["ddpm-cifar10"].protocol)}
    _, md = perf_paper.write_report(cifar, tmp_path)
    assert "reported (GPU h)" not in md.read_text()
