import time

import pytest
import torch

from gaq.cli import main
from gaq.errors import GaqError
from gaq.models.loading import load_model


def test_saved_tiny_pipeline_loads_with_identical_outputs(tiny_pipeline_dir, tiny_unet):
    model = load_model(str(tiny_pipeline_dir))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(x, t).sample, tiny_unet(x, t).sample,
                                   atol=0, rtol=0)
    assert type(model.scheduler).__name__ == "DDPMScheduler"
    assert model.scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_uncached_hub_id_fails_fast_with_fetch_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    with pytest.raises(GaqError) as err:
        load_model("google/ddpm-cifar10-32")
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert "google/ddpm-cifar10-32" in msg and "not in the local" in msg
    assert "gaq fetch google/ddpm-cifar10-32" in msg and "\n" not in msg


def test_cli_reports_bad_model_in_one_line(capsys, tmp_path):
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    assert main(["sample", "--model", str(not_a_pipeline), "--num", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gaq: error:") and "model_index.json" in err and "\n" not in err
    assert main(["sample", "--model", "no such model", "--num", "1"]) == 2
    assert "neither a bundled model" in capsys.readouterr().err


def test_cli_sample_writes_grid(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--num", "4", "--steps", "2",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def _sample_exits_2(path, unet, out, capsys) -> str:
    """Save ``unet`` as a DDPM pipeline at ``path``, run ``gaq sample`` on it (expecting
    exit code 2) and return the last stderr line (after the progress bar)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)
                 ).save_pretrained(path, safe_serialization=True)
    assert main(["sample", "--model", str(path), "--num", "2", "--steps", "2",
                 "--out", str(out)]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_sample_refuses_a_non_finite_model(tmp_path, tiny_unet, capsys):

    with torch.no_grad():
        next(tiny_unet.parameters()).fill_(float("nan"))
    out = tmp_path / "grid.png"
    err = _sample_exits_2(tmp_path / "nan-ddpm", tiny_unet, out, capsys)
    # refused at load, before sampling: the tensor is named
    assert err.startswith("gaq: error:") and "tensor" in err and "NaN or infinite" in err
    assert not out.exists()


def test_cli_sample_refuses_non_finite_samples(tmp_path, tiny_unet, capsys):
    """Finite weights whose samples overflow (a diverging model) are caught after sampling."""
    with torch.no_grad():
        tiny_unet.conv_out.bias.fill_(3e38)  # finite, but the sampler's update overflows
    out = tmp_path / "grid.png"
    err = _sample_exits_2(tmp_path / "huge-ddpm", tiny_unet, out, capsys)
    assert err.startswith("gaq: error:") and "2 of 2 samples are not finite" in err
    assert not out.exists()
