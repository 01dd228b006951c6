"""Non-finite values are named where they enter: a pipeline's weights, a calibration that
diverged (the calibration set's own checks are in test_calibration.py)."""

from __future__ import annotations

import pytest
import torch

from gaq.config import QuantConfig
from gaq.errors import DivergedError, GaqError
from gaq.methods.stages import finish, start, wrap
from gaq.models.adapters import adapter_for
from gaq.models.loading import load_model
from gaq.quantize import act_quantizers, calibrate_activations
from gaq.registry import get_method


def test_a_nan_weight_in_a_pipeline_folder_is_named(tiny_pipeline_dir):
    from safetensors.torch import load_file, save_file

    path = next((tiny_pipeline_dir / "unet").glob("*.safetensors"))
    tensors = load_file(path)
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(GaqError) as err:
        load_model(str(tiny_pipeline_dir))
    msg = str(err.value)
    assert "conv_in.weight" in msg and "'unet'" in msg and "NaN" in msg and "\n" not in msg


def test_a_diverged_calibration_fails_with_the_method_and_tensor_named(tiny_unet):
    cfg = tiny_unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor([10, 10])
    run = start(get_method("rtn").from_preset("cpu"), tiny_unet, adapter_for(tiny_unet),
                lambda m: m(x, t), QuantConfig.from_bits("W8A8"), needs_set=False)
    wrap(run)
    calibrate_activations(run.qmodel, run.calib)
    name, q = next(iter(act_quantizers(run.qmodel)))
    q.scale.fill_(float("nan"))  # what a diverged step-size update leaves
    with pytest.raises(DivergedError) as err:  # a cell's failure: a sweep goes on
        finish(run)
    msg = str(err.value)
    assert msg.startswith("rtn calibration") and name in msg and "diverged" in msg
