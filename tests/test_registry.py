"""Method registry: lazy targets, entry points, helpful errors, no torch on import."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gaq.registry as registry
from gaq.errors import GaqError
from gaq.methods.base import Method
from gaq.registry import (
    BUILTIN_METHODS,
    ENTRY_POINT_GROUP,
    MethodRegistry,
    UnknownMethodError,
    get_method,
    list_methods,
    register_method,
)

REPO = Path(__file__).resolve().parents[1]

PLUGIN_SOURCE = '''
import dataclasses
from typing import ClassVar

from gaq.config import MethodConfig
from gaq.methods.base import Method, QuantResult


@dataclasses.dataclass(frozen=True)
class {name}Config(MethodConfig):
    iters: int = 10


class {name}(Method):
    name: ClassVar[str] = "{name_lower}"
    Config = {name}Config
    presets = {{"cpu": {name}Config(iters=1)}}

    def quantize(self, model, adapter, calib, quant):
        return QuantResult(model=model)


IMPORTED = True
'''


@pytest.fixture
def make_module(tmp_path: Path) -> Iterator[Callable[[str, str], str]]:
    """Write a module outside the repo (a stand-in third-party package) and put it on sys.path."""
    names: list[str] = []
    sys.path.insert(0, str(tmp_path))

    def make(module: str, source: str) -> str:
        path = tmp_path.joinpath(*module.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            if str(parent) != ".":
                (tmp_path / parent / "__init__.py").touch()
        path.with_suffix(".py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(module)
        return module

    yield make
    sys.path.remove(str(tmp_path))
    for module in names:
        for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
            del sys.modules[key]
        root = module.split(".")[0]
        sys.modules.pop(root, None)


def plugin(class_name: str) -> str:
    return PLUGIN_SOURCE.format(name=class_name, name_lower=class_name.lower())


@pytest.fixture
def no_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])


@pytest.fixture
def fresh_default(monkeypatch: pytest.MonkeyPatch, no_entry_points: None) -> MethodRegistry:
    """Isolate the module-level functions from registrations made by other tests."""
    reg = MethodRegistry(BUILTIN_METHODS)
    monkeypatch.setattr(registry, "_DEFAULT", reg)
    return reg


def test_builtins_are_lazy_strings() -> None:
    assert BUILTIN_METHODS["rtn"] == "gaq.methods.rtn:RTN"
    assert all(isinstance(t, str) and ":" in t for t in BUILTIN_METHODS.values())
    assert ENTRY_POINT_GROUP == "gaq.methods"


def test_unknown_name_suggests_and_lists_known(no_entry_points: None) -> None:
    reg = MethodRegistry(
        {n: f"not_imported_{n}:Cls" for n in ["fp", "gaq", "qdiffusion", "rtn", "ptqd"]}
    )
    with pytest.raises(UnknownMethodError) as info:
        reg.get("qdifusion")
    msg = str(info.value)
    assert msg == (
        "unknown method 'qdifusion'; did you mean 'qdiffusion'? "
        "known: fp, gaq, ptqd, qdiffusion, rtn"
    )
    assert isinstance(info.value, KeyError) and isinstance(info.value, GaqError)
    assert info.value.known == ["fp", "gaq", "ptqd", "qdiffusion", "rtn"]
    with pytest.raises(KeyError, match=r"^unknown method 'zzzzzz'; known: fp, gaq, ptqd"):
        reg.get("zzzzzz")
    assert not any(m.startswith("not_imported_") for m in sys.modules)


def test_module_functions_use_the_default_registry(
    fresh_default: MethodRegistry, make_module: Callable[[str, str], str]
) -> None:
    assert list_methods() == sorted(BUILTIN_METHODS)
    make_module("gaq_test_plugin_a", plugin("Alpha"))
    register_method("alpha", "gaq_test_plugin_a:Alpha")
    assert list_methods() == sorted([*BUILTIN_METHODS, "alpha"])
    cls = get_method("alpha")
    assert cls.__name__ == "Alpha" and issubclass(cls, Method)

    @register_method("beta")
    class Beta(cls):  # type: ignore[misc, valid-type]
        name = "beta"

    assert get_method("beta") is Beta
    assert list_methods() == sorted([*BUILTIN_METHODS, "alpha", "beta"])
    with pytest.raises(UnknownMethodError, match="did you mean 'alpha'"):
        get_method("alpah")


def test_lazy_target_is_not_imported_until_get(
    no_entry_points: None, make_module: Callable[[str, str], str]
) -> None:
    module = make_module("gaq_test_plugin_lazy", plugin("Lazy"))
    reg = MethodRegistry()
    reg.register("lazy", f"{module}:Lazy")
    assert reg.names() == ["lazy"] and "lazy" in reg
    assert module not in sys.modules
    cls = reg.get("lazy")
    assert module in sys.modules and sys.modules[module].IMPORTED
    assert cls is sys.modules[module].Lazy
    assert reg.get("lazy") is cls  # cached
    assert cls.from_preset("cpu").config.iters == 1


def test_entry_points_register_third_party_methods(
    monkeypatch: pytest.MonkeyPatch, make_module: Callable[[str, str], str]
) -> None:
    module = make_module("gaq_thirdparty_pkg.methods", plugin("Fancy"))
    calls: list[str | None] = []

    def fake_entry_points(group: str | None = None) -> list[importlib.metadata.EntryPoint]:
        calls.append(group)
        if group != ENTRY_POINT_GROUP:
            return []
        return [
            importlib.metadata.EntryPoint(
                name="fancy", value=f"{module}:Fancy", group=ENTRY_POINT_GROUP
            )
        ]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    reg = MethodRegistry(BUILTIN_METHODS)
    assert calls == []  # discovery is lazy: nothing read at construction
    assert reg.names() == sorted([*BUILTIN_METHODS, "fancy"])
    assert calls == [ENTRY_POINT_GROUP]
    assert module not in sys.modules  # listed, not imported
    cls = reg.get("fancy")
    assert cls.__name__ == "Fancy" and cls.__module__ == module
    assert issubclass(cls, Method)
    assert calls == [ENTRY_POINT_GROUP]  # read once

    # the third-party config round-trips through the generic machinery
    cfg = cls.Config(iters=3)
    from gaq.config import MethodConfig

    assert MethodConfig.from_toml(cfg.to_toml()) == cfg


def test_entry_point_cannot_shadow_a_registered_name(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = importlib.metadata.EntryPoint(name="rtn", value="evil:RTN", group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [ep])
    reg = MethodRegistry(BUILTIN_METHODS)
    with pytest.warns(UserWarning, match="ignoring entry point 'rtn'"):
        assert reg.names() == sorted(BUILTIN_METHODS)


def test_registration_rules(no_entry_points: None) -> None:
    reg = MethodRegistry()
    reg.register("a", "pkg.mod:Cls")
    reg.register("a", "pkg.mod:Cls")  # idempotent
    with pytest.raises(ValueError, match="already registered as 'pkg.mod:Cls'"):
        reg.register("a", "pkg.other:Cls")
    reg.register("a", "pkg.other:Cls", overwrite=True)
    reg.register("m", Method)
    reg.register("m", "gaq.methods.base:Method")  # a class and its lazy spelling are equal
    assert reg.get("m") is Method
    for bad in ["pkg.mod", "pkg.mod:", ":Cls", "pkg mod:Cls", "pkg.mod:Cls:X"]:
        with pytest.raises(ValueError, match="must look like 'package.module:Class'"):
            reg.register("b", bad)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", "pkg.mod:Cls")
    with pytest.raises(TypeError, match="must be a class"):
        reg.register("c", 42)  # type: ignore[arg-type]


def test_broken_targets_fail_clearly(
    no_entry_points: None, make_module: Callable[[str, str], str]
) -> None:
    module = make_module("gaq_test_plugin_broken", "class NotAMethod:\n    pass\n")
    reg = MethodRegistry()
    reg.register("missing_module", "gaq_no_such_module_xyz:Cls")
    reg.register("missing_attr", f"{module}:Nope")
    reg.register("not_a_method", f"{module}:NotAMethod")
    with pytest.raises(ImportError, match="method 'missing_module' is registered as"):
        reg.get("missing_module")
    with pytest.raises(ImportError, match="method 'missing_attr' .*could not be loaded"):
        reg.get("missing_attr")
    with pytest.raises(TypeError, match="must be a subclass of gaq.methods.base.Method"):
        reg.get("not_a_method")


def test_importing_the_registry_does_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import gaq.registry, gaq.config, gaq.methods, gaq.methods.base
        names = gaq.registry.list_methods()
        assert "rtn" in names, names
        heavy = sorted(m for m in ("torch", "diffusers", "numpy") if m in sys.modules)
        print(",".join(heavy) or "clean")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "clean"


def test_a_broken_plugin_is_one_line_and_skipped_by_methods_all(
    monkeypatch: pytest.MonkeyPatch, make_module: Callable[[str, str], str], tmp_path: Path
) -> None:
    """A plugin that raises at import, and one without a ``cpu`` preset, are reported in
    one line each; ``gaq methods`` and a ``methods = "all"`` benchmark go on without them."""
    from gaq.bench.spec import load_benchmark

    # no entry points read (patching importlib's would break torch's own plugin lookup)
    fresh_default = MethodRegistry(BUILTIN_METHODS, entry_point_group=None)
    monkeypatch.setattr(registry, "_DEFAULT", fresh_default)

    crash = make_module("gaq_test_plugin_crash", "raise RuntimeError('half-installed')\n")
    no_cpu = make_module("gaq_test_plugin_nocpu",
                         plugin("Paper").replace('{"cpu": PaperConfig(iters=1)}',
                                                 '{"paper": PaperConfig()}'))
    fresh_default.register("crashy", f"{crash}:Cls")
    fresh_default.register("paperonly", f"{no_cpu}:Paper")
    with pytest.raises(GaqError) as err:
        registry.get_method("crashy")
    assert "RuntimeError: half-installed" in str(err.value) and "\n" not in str(err.value)
    names, problems = registry.usable_methods("cpu")
    assert "crashy" not in names and "paperonly" not in names and "rtn" in names
    assert len(problems) == 2 and any("no 'cpu' preset" in p for p in problems)
    bench = tmp_path / "all.toml"
    bench.write_text(textwrap.dedent("""
        models = ["digits"]
        bits = ["W8A8"]
        methods = "all"
        [benchmark]
        name = "all"
    """))
    with pytest.warns(UserWarning, match="crashy"):
        spec = load_benchmark(bench)
    rows = {m.name for m in spec.methods}
    assert "rtn" in rows and "crashy" not in rows and "paperonly" not in rows


def test_descriptions_come_from_entry_points_through_the_one_registry(
    monkeypatch: pytest.MonkeyPatch, make_module: Callable[[str, str], str]
) -> None:
    """Metrics and samplers are instances of a description class in the same Registry: an
    entry point names the object, a wrong type or a broken import is left out with a
    warning when the kind is listed, and unknown names still suggest close ones."""
    from gaq.eval.registry import MetricRegistry, UnknownMetricError
    from gaq.sampling import SamplerKind, SamplerRegistry, UnknownSamplerError

    make_module("descplug.things", """
        from gaq.eval.registry import Metric
        from gaq.sampling import SamplerKind

        MAX_ERR = Metric("max_err", "paired", "Max. error", "lower")
        EULER = SamplerKind("euler", "EulerDiscreteScheduler")
        NOT_ONE = 3
    """)
    eps = {
        "gaq.metrics": [("max_err", "descplug.things:MAX_ERR"),
                        ("wrong", "descplug.things:NOT_ONE"),
                        ("broken", "descplug.missing:X")],
        "gaq.samplers": [("euler", "descplug.things:EULER")],
    }

    def fake_entry_points(group: str | None = None) -> list[importlib.metadata.EntryPoint]:
        return [importlib.metadata.EntryPoint(name=n, value=v, group=group)
                for n, v in eps.get(group or "", [])]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    samplers = SamplerRegistry((SamplerKind("ddim", "DDIMScheduler", stochastic=True),))
    assert list(samplers) == ["ddim", "euler"]
    assert samplers.get("euler").scheduler == "EulerDiscreteScheduler"
    with pytest.raises(UnknownSamplerError, match="did you mean 'euler'") as err:
        samplers.get("eulr")
    assert isinstance(err.value, ValueError)  # a bad config value, as before
    metrics = MetricRegistry()
    with pytest.warns(UserWarning) as warned:
        loaded = metrics.loaded()
    assert [m.name for m in loaded] == ["max_err"] and len(warned) == 2
    assert list(metrics) == ["max_err"]  # the two bad ones are dropped, once
    with pytest.raises(UnknownMetricError, match="did you mean 'max_err'"):
        metrics.get("max_er")
