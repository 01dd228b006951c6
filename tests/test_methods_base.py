"""The Method contract: presets, config checks, forward_loop calibration, QuantResult."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest

from gaq.config import MethodConfig, QuantConfig, non_negative_int
from gaq.errors import GaqError
from gaq.methods.base import Method, QuantResult, UnknownPresetError


@dataclasses.dataclass(frozen=True)
class CountingConfig(MethodConfig):
    iters: int = 2

    def validate(self) -> None:
        non_negative_int("iters", self.iters)


class Counting(Method):
    """Calls the forward loop ``iters`` times; stands in for a real method."""

    name: ClassVar[str] = "counting"
    Config = CountingConfig
    presets = {"paper": CountingConfig(iters=3), "cpu": CountingConfig(iters=1)}

    def quantize(self, model: Any, adapter: Any, calib: Any, quant: QuantConfig) -> QuantResult:
        for _ in range(self.config.iters):
            calib(model)
        return QuantResult(model=model, state={"label": quant.label}, stats={"iters": 1.0})


def test_forward_loop_contract() -> None:
    seen: list[object] = []
    model = object()
    result = Counting.from_preset("paper").quantize(
        model, adapter=None, calib=seen.append, quant=QuantConfig.from_bits("W4A8")
    )
    assert seen == [model] * 3
    assert result.model is model and result.state == {"label": "W4A8"}
    assert result.sampler_hook is None and result.report is None


def test_quant_result_stats_are_not_shared() -> None:
    a, b = QuantResult(model=None), QuantResult(model=None)
    a.stats["calib_s"] = 1.0
    assert b.stats == {}


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(UnknownPresetError) as info:
        Counting.from_preset("fast")
    assert str(info.value) == "method 'counting' has no preset 'fast'; presets: cpu, paper"
    assert isinstance(info.value, KeyError) and isinstance(info.value, GaqError)


def test_presets_cannot_be_mutated() -> None:
    with pytest.raises(TypeError):
        Counting.presets["new"] = CountingConfig()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Counting.presets["cpu"].iters = 5  # type: ignore[misc]
    variant = dataclasses.replace(Counting.presets["cpu"], iters=9)
    assert Counting(variant).config.iters == 9 and Counting.presets["cpu"].iters == 1


def test_config_type_is_enforced() -> None:
    @dataclasses.dataclass(frozen=True)
    class OtherConfig(MethodConfig):
        pass

    with pytest.raises(TypeError, match=r"Counting needs a CountingConfig, got .*OtherConfig"):
        Counting(OtherConfig())
    with pytest.raises(TypeError, match=r"presets\['x'\] must be a CountingConfig"):

        class BadPresets(Counting):
            presets = {"x": OtherConfig()}

    with pytest.raises(TypeError, match="Config must be a MethodConfig subclass"):

        class BadConfig(Counting):
            Config = dict  # type: ignore[assignment]


def test_quantize_is_abstract() -> None:
    class Incomplete(Method):
        name = "incomplete"
        Config = CountingConfig

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(CountingConfig())  # type: ignore[abstract]
