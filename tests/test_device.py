"""The device reaches every tensor: library code takes it from the model (or an argument
passed all the way down), never from a ``"cpu"`` default that a caller can forget.

Without a GPU, the checks are structural (no such default anywhere below the entry
points) and behavioural (a requested device that does not exist fails in preflight with
one line); ``nox -s gpu-smoke`` runs everything on CUDA where a GPU exists.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import baselines
import gaq
from gaq.cli import main
from gaq.device import check_device
from gaq.errors import GaqError

# Entry points where the user picks the device: their default is the user-facing default.
ENTRY_POINTS = {"gaq.models.loading.load_model", "gaq.models.bundled.load_classifier"}


def _functions():
    for pkg in (gaq, baselines):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and obj.__module__ == module.__name__:
                    for attr, fn in vars(obj).items():
                        if inspect.isfunction(fn):
                            yield f"{module.__name__}.{name}.{attr}", fn
                elif inspect.isfunction(obj) and obj.__module__ == module.__name__:
                    yield f"{module.__name__}.{name}", obj


def test_no_library_function_defaults_to_the_cpu():
    offenders = []
    for qualname, fn in _functions():
        if qualname in ENTRY_POINTS:
            continue
        for p in inspect.signature(fn).parameters.values():
            if "device" in p.name and isinstance(p.default, str) and p.default.startswith("cpu"):
                offenders.append(f"{qualname}({p.name}={p.default!r})")
    assert not offenders, ("take the device from the model or require it: "
                           + ", ".join(offenders))


def test_the_structural_check_sees_such_a_default():
    def bad(x, device="cpu"):  # what calib_batches and record_calibration used to have
        return x

    params = inspect.signature(bad).parameters
    assert params["device"].default == "cpu"


@pytest.mark.parametrize("device,needle", [
    ("tpu", "not a device"), ("xla", "not supported"), ("cuda:7", "cuda")])
def test_bad_devices_are_one_line(device, needle):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(GaqError, match=needle) as e:
        check_device(device, "--device")
    assert "\n" not in str(e.value) and "--device" in str(e.value)


def test_cli_device_fails_before_any_work(capsys):
    rc = main(["sample", "--num", "1", "--device", "tpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0]


def test_pipeline_device_follows_the_denoiser(tiny_unet):
    from diffusers import DDIMScheduler

    from gaq.models.pipeline import Pipeline

    pipe = Pipeline(tiny_unet, DDIMScheduler())
    assert pipe.device == next(tiny_unet.parameters()).device
