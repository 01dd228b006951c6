"""Configs: validation messages, exact JSON/TOML round-trips, stable fingerprints."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

from gaq.config import (
    Config,
    ConfigError,
    MethodConfig,
    QuantConfig,
    TensorQuantSpec,
    act_spec,
    dumps_toml,
    fingerprint,
    loads_toml,
    non_negative_int,
    positive_float,
    positive_int,
    weight_spec,
)
from gaq.errors import GaqError

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class DemoConfig(MethodConfig):
    VERSION: ClassVar[int] = 3

    quant: QuantConfig
    iters: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    timesteps: tuple[int, ...] = (0, 10, 20)
    pair: tuple[str, float] = ("adam", 0.9)
    seed: int | None = None
    tag: str | None = None
    name: str | None = "demo"
    groups: tuple[TensorQuantSpec, ...] = ()
    extra: QuantConfig | None = None

    def validate(self) -> None:
        non_negative_int("iters", self.iters)
        positive_int("batch_size", self.batch_size)
        positive_float("lr", self.lr)


def demo(**kw: object) -> DemoConfig:
    kw.setdefault("quant", QuantConfig.from_bits("W4A8"))
    return DemoConfig(**kw)


SPECS = [
    weight_spec(4),
    weight_spec(None),
    act_spec(8, per_timestep=True, range_init="ema", ema_momentum=0.9),
    act_spec(6, symmetric=True, granularity="per_channel", mse_p=2.0, mse_grid=80),
    TensorQuantSpec(bits=2, symmetric=True, granularity="per_tensor", range_init="max"),
]

CONFIGS: list[Config] = [
    *SPECS,
    *(QuantConfig.from_bits(b) for b in ["W4A8", "W8A8", "W4A32", "W3A8", "W4A6"]),
    QuantConfig(weight_spec(4), act_spec(8), attention=True, softmax_bits=None),
    demo(),
    demo(
        iters=0,
        lr=2.5e-5,
        timesteps=(),
        seed=7,
        tag='quote " backslash \\ newline \n tab \t ünï ✓ \x7f',
        name="other",
        groups=(weight_spec(3), act_spec(None)),
        extra=QuantConfig.from_bits("W4A32"),
    ),
    demo(lr=1e16, pair=("off", 0.1 + 0.2)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_json_round_trip_is_exact(cfg: Config) -> None:
    text = cfg.to_json()
    back = type(cfg).from_json(text)
    assert back == cfg
    assert type(back) is type(cfg)
    assert json.loads(text)["_type"] == type(cfg).__qualname__
    assert json.loads(text)["_version"] == type(cfg).VERSION
    assert fingerprint(back) == fingerprint(cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_toml_round_trip_is_exact(cfg: Config) -> None:
    text = cfg.to_toml()
    assert loads_toml(text) == cfg.to_toml_dict()  # our writer emits valid TOML
    back = type(cfg).from_toml(text)
    assert back == cfg
    assert fingerprint(back) == fingerprint(cfg)


def test_toml_spells_none_as_off() -> None:
    q = QuantConfig.from_bits("W4A32")
    data = loads_toml(q.to_toml())
    assert data["act"]["bits"] == "off"
    assert data["weight"]["bits"] == 4
    assert QuantConfig.from_toml(q.to_toml()).act.bits is None


def test_toml_str_or_none_fields() -> None:
    # "off" is a legitimate string here, so None is omitted (exact when None is the default)...
    cfg = demo(tag=None, pair=("off", 1.0))
    assert "tag" not in cfg.to_toml_dict()
    assert DemoConfig.from_toml(cfg.to_toml()).pair == ("off", 1.0)
    assert DemoConfig.from_toml(demo(tag="off").to_toml()).tag == "off"
    # ...and refused, naming the field, when the default is not None.
    with pytest.raises(ConfigError, match=r"^name is None .*cannot be written to TOML"):
        demo(name=None).to_toml()
    assert DemoConfig.from_json(demo(name=None).to_json()).name is None


def test_base_class_loads_the_subclass_named_by_type() -> None:
    cfg = demo(iters=5)
    back = MethodConfig.from_dict(cfg.to_dict())
    assert type(back) is DemoConfig and back == cfg
    with pytest.raises(ConfigError, match=r"_type: 'Nope' is not DemoConfig"):
        DemoConfig.from_dict({**cfg.to_dict(), "_type": "Nope"})
    with pytest.raises(ConfigError, match="_type: 'TensorQuantSpec' is not QuantConfig"):
        QuantConfig.from_dict(weight_spec(4).to_dict())


def test_third_party_config_round_trips_without_extra_code(tmp_path: Path) -> None:
    (tmp_path / "gaq_thirdparty_cfg.py").write_text(
        textwrap.dedent(
            '''
            from __future__ import annotations
            import dataclasses
            from typing import ClassVar, Literal
            from gaq.config import MethodConfig, QuantConfig, TensorQuantSpec

            @dataclasses.dataclass(frozen=True)
            class FancyConfig(MethodConfig):
                VERSION: ClassVar[int] = 2
                quant: QuantConfig
                schedule: tuple[tuple[int, float], ...] = ((0, 1.0), (5, 0.5))
                mode: Literal["fast", "slow"] = "fast"
                layers: dict[str, TensorQuantSpec | None] = dataclasses.field(
                    default_factory=dict
                )
            '''
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.invalidate_caches()
        mod = importlib.import_module("gaq_thirdparty_cfg")
        cfg = mod.FancyConfig(
            quant=QuantConfig.from_bits("W4A8"),
            schedule=[[1, 2], [3, 4.5]],  # lists and ints are normalised on construction
            mode="slow",
            layers={"conv_in": weight_spec(8), "conv_out": None},
        )
        assert cfg.schedule == ((1, 2.0), (3, 4.5))
        assert mod.FancyConfig.from_json(cfg.to_json()) == cfg
        assert mod.FancyConfig.from_toml(cfg.to_toml()) == cfg
        assert MethodConfig.from_toml(cfg.to_toml()) == cfg
        with pytest.raises(ConfigError, match=r"^mode must be one of 'fast', 'slow', got 'x'"):
            dataclasses.replace(cfg, mode="x")
        bad = cfg.to_dict()
        bad["layers"]["conv_in"]["bits"] = 12
        with pytest.raises(ConfigError, match=r"^layers\.conv_in\.bits must be an integer"):
            mod.FancyConfig.from_dict(bad)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gaq_thirdparty_cfg", None)


def test_same_named_subclasses_are_disambiguated_by_module(tmp_path: Path) -> None:
    source = textwrap.dedent(
        """
        import dataclasses
        from gaq.config import MethodConfig

        @dataclasses.dataclass(frozen=True)
        class SharedConfig(MethodConfig):
            k: int = {k}
        """
    )
    (tmp_path / "gaq_shared_one.py").write_text(source.format(k=1))
    (tmp_path / "gaq_shared_two.py").write_text(source.format(k=2))
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.invalidate_caches()
        one = importlib.import_module("gaq_shared_one").SharedConfig()
        two = importlib.import_module("gaq_shared_two").SharedConfig()
        assert type(two).from_dict(two.to_dict()) == two  # the class itself: no ambiguity
        with pytest.raises(ConfigError, match=r"^_type: 'SharedConfig' is ambiguous; .*"
                           r"'gaq_shared_one:SharedConfig', 'gaq_shared_two:SharedConfig'"):
            MethodConfig.from_dict(one.to_dict())
        picked = MethodConfig.from_dict({**one.to_dict(), "_type": "gaq_shared_one:SharedConfig"})
        assert picked == one
        # a module that is gone (unloaded) no longer competes
        del sys.modules["gaq_shared_two"]
        assert MethodConfig.from_dict(one.to_dict()) == one
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gaq_shared_one", None)
        sys.modules.pop("gaq_shared_two", None)


# -- fingerprints ------------------------------------------------------------------------


def test_fingerprint_is_16_hex_and_pinned() -> None:
    fp = fingerprint(QuantConfig.from_bits("W4A8"))
    assert len(fp) == 16 and int(fp, 16) >= 0
    # Pinned: a change here changes every stored run identity. Update only on purpose.
    assert fp == "65088058fd0a0a4a"  # softmax_symmetric joined QuantConfig
    assert QuantConfig.from_bits("W4A8").fingerprint() == fp


def test_fingerprint_is_identical_in_a_fresh_process() -> None:
    code = textwrap.dedent(
        """
        import dataclasses
        from gaq.config import QuantConfig, fingerprint, weight_spec
        q = QuantConfig.from_bits("W4A8")
        print(fingerprint(q))
        print(fingerprint(dataclasses.replace(q, weight=weight_spec(3, mse_p=2.0))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    q = QuantConfig.from_bits("W4A8")
    assert out == [
        fingerprint(q),
        fingerprint(dataclasses.replace(q, weight=weight_spec(3, mse_p=2.0))),
    ]


SPEC_CHANGES = {
    "bits": 3,
    "symmetric": True,
    "granularity": "per_tensor",
    "range_init": "max",
    "mse_p": 2.0,
    "mse_grid": 80,
    "ema_momentum": 0.9,
    "per_timestep": True,
}


def test_spec_changes_cover_every_field() -> None:
    assert set(SPEC_CHANGES) == {f.name for f in dataclasses.fields(TensorQuantSpec)}


@pytest.mark.parametrize("field,value", SPEC_CHANGES.items())
def test_fingerprint_changes_with_every_spec_field(field: str, value: object) -> None:
    q = QuantConfig.from_bits("W4A8")
    changed = dataclasses.replace(q, weight=dataclasses.replace(q.weight, **{field: value}))
    assert changed != q
    assert fingerprint(changed) != fingerprint(q)
    # nested two levels deep, inside a method config
    assert fingerprint(demo(quant=changed)) != fingerprint(demo())


@pytest.mark.parametrize(
    "change",
    [
        {"attention": False},
        {"softmax_bits": 8},
        {"softmax_bits": None},
        {"split_shortcut": False},
        {"act": act_spec(6)},
    ],
)
def test_fingerprint_changes_with_quant_fields(change: dict) -> None:
    q = QuantConfig.from_bits("W4A8")
    assert fingerprint(dataclasses.replace(q, **change)) != fingerprint(q)


def test_fingerprint_changes_with_method_fields_and_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = demo()
    for change in [{"iters": 101}, {"lr": 2e-3}, {"timesteps": (0, 10)}, {"seed": 0}]:
        assert fingerprint(dataclasses.replace(base, **change)) != fingerprint(base)

    # Bumping VERSION alone must change the identity of every run that used the config.
    before = fingerprint(base)
    monkeypatch.setattr(DemoConfig, "VERSION", 4)
    assert fingerprint(base) != before


def test_equal_configs_share_a_fingerprint() -> None:
    assert fingerprint(demo(lr=1)) == fingerprint(demo(lr=1.0))
    assert demo(timesteps=[0, 10, 20]) == demo()
    assert hash(demo()) == hash(demo(timesteps=[0, 10, 20]))


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 0}, "weight.bits must be an integer in 2..8 or None (off), got 0"),
        ({"bits": 1}, "weight.bits must be an integer in 2..8 or None (off), got 1"),
        ({"bits": 9}, "weight.bits must be an integer in 2..8 or None (off), got 9"),
        ({"bits": 33}, "weight.bits must be an integer in 2..8 or None (off), got 33"),
        ({"bits": -4}, "weight.bits must be an integer in 2..8 or None (off), got -4"),
        ({"bits": 4.0}, "weight.bits must be an integer in 2..8 or None (off), got 4.0"),
        ({"bits": "4"}, "weight.bits must be an integer in 2..8 or None (off), got '4'"),
        ({"bits": True}, "weight.bits must be an integer in 2..8 or None (off), got True"),
        ({"granularity": "per_group"}, "weight.granularity must be one of 'per_tensor'"),
        ({"range_init": "minmax"}, "weight.range_init must be one of 'max', 'mse', 'ema'"),
        ({"mse_grid": 0}, "weight.mse_grid must be a positive integer, got 0"),
        ({"mse_grid": -3}, "weight.mse_grid must be a positive integer, got -3"),
        ({"mse_grid": 2.5}, "weight.mse_grid must be an integer, got 2.5"),
        ({"ema_momentum": 0.0}, "weight.ema_momentum must be a number in the open interval"),
        ({"ema_momentum": 1.0}, "weight.ema_momentum must be a number in the open interval"),
        ({"ema_momentum": 1.5}, "weight.ema_momentum must be a number in the open interval"),
        ({"ema_momentum": -0.5}, "weight.ema_momentum must be a number in the open interval"),
        ({"mse_p": 0}, "weight.mse_p must be a finite number > 0, got 0.0"),
        ({"mse_p": math.inf}, "weight.mse_p must be a finite number > 0, got inf"),
        ({"symmetric": "yes"}, "weight.symmetric must be a boolean, got 'yes'"),
        ({"per_timestep": 1}, "weight.per_timestep must be a boolean, got 1"),
    ],
)
def test_invalid_spec_values_are_rejected_naming_the_field(kwargs: dict, message: str) -> None:
    bits = kwargs.pop("bits", 4)
    with pytest.raises(ValueError) as info:
        weight_spec(bits, **kwargs)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, GaqError)


def test_field_path_follows_the_nesting() -> None:
    with pytest.raises(ConfigError, match=r"^bits must be an integer in 2\.\.8"):
        TensorQuantSpec(bits=33, symmetric=False, granularity="per_tensor", range_init="max")
    with pytest.raises(ConfigError, match=r"^act\.ema_momentum must be"):
        act_spec(8, ema_momentum=1.0)
    good = demo().to_dict()
    good["quant"]["weight"]["bits"] = 33
    with pytest.raises(ConfigError) as info:
        DemoConfig.from_dict(good)
    assert str(info.value) == "quant.weight.bits must be an integer in 2..8 or None (off), got 33"
    assert info.value.path == ("quant", "weight", "bits")
    bad_group = demo().to_dict()
    bad_group["groups"] = [weight_spec(4).to_dict(), {**act_spec(8).to_dict(), "mse_grid": 0}]
    with pytest.raises(ConfigError, match=r"^groups\[1\]\.mse_grid must be a positive integer"):
        DemoConfig.from_dict(bad_group)


def test_quant_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"^softmax_bits must be an integer in 2\.\.16 or None"):
        QuantConfig(weight_spec(4), act_spec(8), attention=True, softmax_bits=17)
    with pytest.raises(ConfigError, match=r"^softmax_bits must be an integer in 2\.\.16"):
        QuantConfig(weight_spec(4), act_spec(8), attention=True, softmax_bits=1)
    with pytest.raises(ConfigError, match=r"^softmax_bits must be an integer in 2\.\.16"):
        QuantConfig(weight_spec(4), act_spec(8), attention=True, softmax_bits=8.0)
    assert QuantConfig(weight_spec(4), act_spec(8), True, softmax_bits=16).softmax_bits == 16
    with pytest.raises(ConfigError, match=r"^attention is True but act\.bits is None"):
        QuantConfig(weight_spec(4), act_spec(None), attention=True)
    with pytest.raises(ConfigError, match=r"^weight must be a TensorQuantSpec"):
        QuantConfig(weight=4, act=act_spec(8), attention=True)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"iters": -1}, "iters must be a non-negative integer, got -1"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"lr": -1e-3}, "lr must be a finite number > 0, got -0.001"),
        ({"timesteps": (1, "a")}, "timesteps[1] must be an integer, got 'a'"),
        ({"pair": ("a",)}, "pair must have exactly 2 items"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
    ],
)
def test_method_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        demo(**change)
    assert str(info.value).startswith(message)


def test_configs_are_frozen_and_replace_revalidates() -> None:
    q = QuantConfig.from_bits("W4A8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.attention = False  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"^bits must be"):
        dataclasses.replace(q.weight, bits=33)


def test_mutable_config_classes_are_refused() -> None:
    @dataclasses.dataclass
    class Mutable(Config):
        x: int = 1

    with pytest.raises(TypeError, match=r"must be a @dataclass\(frozen=True\)"):
        Mutable()


# -- from_dict strictness -----------------------------------------------------------------


def test_unknown_keys_are_named_with_a_suggestion() -> None:
    d = weight_spec(4).to_dict()
    d["bitz"] = 3
    d["zzz"] = 1
    with pytest.raises(ConfigError) as info:
        TensorQuantSpec.from_dict(d)
    msg = str(info.value)
    assert "unknown key(s) for TensorQuantSpec: 'bitz' (did you mean 'bits'?), 'zzz'" in msg
    nested = QuantConfig.from_bits("W4A8").to_dict()
    nested["act"]["granularty"] = "per_tensor"
    with pytest.raises(ConfigError, match=r"^act: unknown key\(s\) .*'granularty'"):
        QuantConfig.from_dict(nested)


def test_wrong_version_is_rejected() -> None:
    d = QuantConfig.from_bits("W4A8").to_dict()
    with pytest.raises(ConfigError, match=r"^_version: 2 is not supported by QuantConfig"):
        QuantConfig.from_dict({**d, "_version": 2})
    d["weight"]["_version"] = 0
    with pytest.raises(ConfigError, match=r"^weight\._version: 0 is not supported"):
        QuantConfig.from_dict(d)
    text = demo().to_toml().replace("_version = 3", "_version = 1", 1)
    with pytest.raises(ConfigError, match="_version: 1 is not supported by DemoConfig"):
        DemoConfig.from_toml(text)


def test_upgrade_hook_migrates_old_versions() -> None:
    @dataclasses.dataclass(frozen=True)
    class Migrating(MethodConfig):
        VERSION: ClassVar[int] = 2
        iterations: int = 1

        @classmethod
        def upgrade(cls, data: dict, version: int) -> dict:
            assert version == 1
            return {"iterations": data.pop("iters")}

    old = {"_type": Migrating.type_name(), "_version": 1, "iters": 7}
    assert Migrating.from_dict(old) == Migrating(iterations=7)


def test_missing_keys_and_metadata_are_handled() -> None:
    with pytest.raises(ConfigError, match=r"missing required key\(s\) for QuantConfig: attention"):
        QuantConfig.from_dict({"weight": weight_spec(4).to_dict(), "act": act_spec(8).to_dict()})
    # hand-written files may leave out _type/_version: this class, current version
    hand = "bits = 4\nsymmetric = true\ngranularity = 'per_tensor'\nrange_init = 'max'\n"
    assert TensorQuantSpec.from_toml(hand) == TensorQuantSpec(4, True, "per_tensor", "max")
    with pytest.raises(ConfigError, match="must be read from a mapping"):
        TensorQuantSpec.from_dict([1, 2])  # type: ignore[arg-type]


# -- from_bits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label,w,a,attention",
    [
        ("W4A8", 4, 8, True),
        ("W8A8", 8, 8, True),
        ("W4A32", 4, None, False),
        ("W4A16", 4, None, False),
        ("W3A8", 3, 8, True),
        ("W4A6", 4, 6, True),
        ("W2A4", 2, 4, True),
        ("w4a8", 4, 8, True),
        (" W4A8 ", 4, 8, True),
        ("W32A32", None, None, False),
    ],
)
def test_from_bits(label: str, w: int | None, a: int | None, attention: bool) -> None:
    q = QuantConfig.from_bits(label)
    assert (q.weight.bits, q.act.bits, q.attention) == (w, a, attention)
    assert q.weight == weight_spec(w)
    assert q.act == act_spec(a)
    assert q.weight.granularity == "per_channel" and not q.weight.symmetric
    assert q.act.granularity == "per_tensor" and q.act.range_init == "mse"
    assert q.softmax_bits == 16 and q.split_shortcut
    assert QuantConfig.from_bits(q.label) == q


def test_from_bits_options() -> None:
    q = QuantConfig.from_bits("W4A8", attention=False, softmax_bits=8, split_shortcut=False)
    assert (q.attention, q.softmax_bits, q.split_shortcut) == (False, 8, False)
    with pytest.raises(ConfigError, match="^attention is True"):
        QuantConfig.from_bits("W4A32", attention=True)


@pytest.mark.parametrize(
    "label", ["", "W4", "A8", "4A8", "W4A", "W4A8x", "W4.5A8", "W-4A8", "WxA8", "W4 A8", None, 48]
)
def test_from_bits_rejects_malformed_labels(label: object) -> None:
    with pytest.raises(ValueError, match=r"invalid bit-width label .*expected 'W<bits>A<bits>'"):
        QuantConfig.from_bits(label)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "label,message",
    [
        ("W1A8", "weight.bits must be an integer in 2..8 or None (off), got 1"),
        ("W9A8", "weight.bits must be an integer in 2..8 or None (off), got 9"),
        ("W4A12", "act.bits must be an integer in 2..8 or None (off), got 12"),
        ("W4A0", "act.bits must be an integer in 2..8 or None (off), got 0"),
        # only 16 and 32 mean floating point; an absurd width is refused, not read as FP
        ("W99A8", "weight.bits must be an integer in 2..8 or None (off), got 99"),
        ("W4A64", "act.bits must be an integer in 2..8 or None (off), got 64"),
        ("W32A8", "weight.bits is None (floating point) while act.bits is 8: activation-only "
                  "quantization (e.g. W32A8) is not supported; quantize weights too (W8A8) or "
                  "keep activations in floating point (W4A32)"),
    ],
)
def test_from_bits_rejects_unsupported_widths(label: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        QuantConfig.from_bits(label)
    assert str(info.value) == message


# -- the TOML writer ----------------------------------------------------------------------


def test_dumps_toml_round_trips_through_tomllib() -> None:
    data = {
        "name": 'a "quoted" \\ string\nwith ünïcode and \x01 control',
        "weird key": 1,
        "n": -(2**63),
        "x": 1e-5,
        "big": 1e300,
        "inf": -math.inf,
        "flag": False,
        "mixed": [1, "two", 3.0, [True], {"a": 1}],
        "empty": [],
        "t": {"u": {"v": 1, "w": {"deep": "yes"}}, "after": 2},
        "empty_table": {},
    }
    assert loads_toml(dumps_toml(data)) == data
    with pytest.raises(ValueError, match="64-bit"):
        dumps_toml({"n": 2**63})
    with pytest.raises(ValueError, match="TOML has no null"):
        dumps_toml({"n": None})


def test_loads_toml_explains_missing_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ModuleNotFoundError, match="tomllib.*tomli"):
        loads_toml("a = 1")
