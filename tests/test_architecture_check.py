"""A denoiser gaq has no adapter for (here SD3's transformer) is refused in one line by
every command, before any weight is read; the conditioning is inferred from the
architecture, not from a config key other architectures share (PixArt's transformer has
``num_embeds_ada_norm`` too)."""

from __future__ import annotations

import json

import pytest
import torch

from gaq.cli import main

TINY_PIXART = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
    "num_layers": 1, "cross_attention_dim": 16, "caption_channels": 16, "sample_size": 8,
    "patch_size": 2, "norm_num_groups": 4,
}
TINY_SD3 = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 1,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
            "caption_projection_dim": 16, "pooled_projection_dim": 16, "out_channels": 4}
UNSUPPORTED = "SD3Transformer2DModel"


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory):
    """A tiny random SD3-like pipeline folder (transformer and scheduler)."""
    from diffusers import DDIMScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    SD3Transformer2DModel(**TINY_SD3).save_pretrained(path / "transformer")
    DDIMScheduler().save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", UNSUPPORTED],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_sample_quantize_and_bench_refuse_alike(unsupported_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GAQ_CACHE", str(tmp_path / "cache"))
    lines = []
    assert main(["sample", "--model", str(unsupported_dir), "--num", "1", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 2
    lines.append(_one_line(capsys))
    assert main(["quantize", "--model", str(unsupported_dir), "--method", "rtn", "--steps", "2",
                 "--out", str(tmp_path / "state")]) == 2
    lines.append(_one_line(capsys))
    bench = tmp_path / "b.toml"
    bench.write_text(f'models = ["{unsupported_dir}"]\nbits = ["W8A8"]\nmethods = ["rtn"]\n'
                     '[benchmark]\nname = "b"\n[sampler]\nsteps = 2\n'
                     '[calibration]\ninterval = 1\n')
    assert main(["bench", str(bench), "--results", str(tmp_path / "results")]) != 0
    lines.append(_one_line(capsys))
    for line in lines:
        assert f"unsupported architecture {UNSUPPORTED}" in line, line
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "state").exists()


def test_refused_before_any_weight_is_read(unsupported_dir, tmp_path, capsys):
    """Damaged weights are never opened: the architecture alone decides."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(unsupported_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    assert main(["sample", "--model", str(broken), "--num", "1", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 2
    assert f"unsupported architecture {UNSUPPORTED}" in _one_line(capsys)


def test_conditioning_follows_the_architecture():
    """The loader's family test, on the model itself: PixArt is not read as a DiT."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    from gaq.models.adapters import is_dit

    pixart = PixArtTransformer2DModel(**TINY_PIXART)
    assert pixart.config.num_embeds_ada_norm  # the key the old test relied on
    assert not is_dit(pixart)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=10)
    assert is_dit(dit)
