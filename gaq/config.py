"""Frozen, typed, versioned configuration objects.

Configs are plain data: they are compared, hashed into run identities and written next to
results, so they must round-trip exactly through JSON and TOML and never change after
construction. Everything here is generic over ``dataclasses.fields`` and type hints, so a
method config defined in another package (subclassing :class:`MethodConfig`) gets
validation, serialisation and fingerprinting without writing any code for them.

Deliberately free of torch: configs are read by the CLI, the runner and by tests that must
stay fast.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union

from gaq.errors import GaqError, did_you_mean

__all__ = [
    "ConfigError",
    "Config",
    "TensorQuantSpec",
    "QuantConfig",
    "MethodConfig",
    "weight_spec",
    "act_spec",
    "fingerprint",
    "dumps_toml",
    "loads_toml",
    "non_negative_int",
    "positive_int",
    "positive_float",
    "open_unit_interval",
]

C = TypeVar("C", bound="Config")

#: How ``None`` is written in TOML, which has no null. Chosen over omitting the key so a
#: TOML file shows explicitly that a tensor is left unquantized ("bits = \"off\"").
TOML_NONE = "off"

_NONE_TYPE = type(None)


class ConfigError(GaqError, ValueError):
    """A config value is invalid; ``path`` is the dotted location of the offending field.

    The path is assembled from the inside out (a nested spec does not know whether it is the
    ``weight`` or the ``act`` spec), which is why the message is built lazily.
    """

    def __init__(self, path: tuple[str, ...] | str, reason: str) -> None:
        self.path = (path,) if isinstance(path, str) else tuple(path)
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = ".".join(p for p in self.path if p)
        if not where:
            return self.reason
        # "weight.bits must be ..." reads as a sentence; other reasons get a colon.
        sep = " " if self.reason.startswith(("must ", "is ", "holds ", "keys ")) else ": "
        return f"{where}{sep}{self.reason}"

    def under(self, prefix: str) -> ConfigError:
        """The same error, located one level deeper inside ``prefix``."""
        return ConfigError((prefix, *self.path), self.reason)


# --------------------------------------------------------------------------------------
# Validation helpers shared by all configs (method configs use them in ``validate``).
# --------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_negative_int(name: str, value: object) -> None:
    """Reject anything but an int >= 0 (iteration counts, warm-up steps...)."""
    if not _is_int(value) or value < 0:
        raise ConfigError(name, f"must be a non-negative integer, got {value!r}")


def positive_int(name: str, value: object) -> None:
    """Reject anything but an int >= 1 (batch sizes, group counts...)."""
    if not _is_int(value) or value < 1:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def positive_float(name: str, value: object) -> None:
    """Reject anything but a finite number > 0 (learning rates, temperatures...)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a finite number > 0, got {value!r}")


def open_unit_interval(name: str, value: object) -> None:
    """Reject anything outside (0, 1) (momenta, fractions that must not be degenerate)."""
    if not _is_number(value) or not 0 < value < 1:
        raise ConfigError(name, f"must be a number in the open interval (0, 1), got {value!r}")


_BITS_EXPECTS = "an integer in 2..8 or None (off)"


def _check_bits(name: str, value: object, hi: int) -> None:
    if value is not None and (not _is_int(value) or not 2 <= value <= hi):
        raise ConfigError(name, f"must be an integer in 2..{hi} or None (off), got {value!r}")


# --------------------------------------------------------------------------------------
# Type-hint driven coercion: the one place that knows how values map to/from plain data.
# --------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _admits_str(tp: Any) -> bool:
    """Whether the string "off" could be a legitimate (non-None) value of this type."""
    if tp is Any or tp is str:
        return True
    if _is_union(tp):
        return any(_admits_str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _describe(tp: Any) -> str:
    if tp is None or tp is _NONE_TYPE:
        return "None"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list" if origin is list else "a tuple"
    if origin is dict:
        return "a table with string keys"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", repr(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against ``tp`` and normalise it (list->tuple, int->float, dict->config).

    Normalising on construction, not just on loading, is what makes ``lr=1`` and ``lr=1.0``
    the same config with the same fingerprint.
    """
    if tp is Any:
        return value
    if tp is None or tp is _NONE_TYPE:
        if value is None:
            return None
        raise ConfigError(path, f"must be None, got {value!r}")
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and _NONE_TYPE in args:
            return None
        if value == TOML_NONE and _NONE_TYPE in args and not _admits_str(tp):
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is _NONE_TYPE:
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        # An error from inside a member (a nested config's field) says more than "wrong type".
        deeper = [e for e in errors if e.path != (path,)]
        if deeper:
            raise deeper[0]
        raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, (str, int, bool)) and any(
            value == a and type(value) is type(a) for a in allowed
        ):
            return value
        raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
    if origin is tuple or tp is tuple or origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if not args:
            items = list(value)
        elif origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise ConfigError(
                    path, f"must have exactly {len(args)} items, got {len(value)}: {value!r}"
                )
            items = [
                _coerce(v, a, f"{path}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        return items if (origin is list or tp is list) else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")
        args = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(path, f"keys must be strings, got {k!r}")
            out[k] = _coerce(v, args[1], f"{path}.{k}")
        return out
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            try:
                return tp.from_dict(value)
            except ConfigError as e:
                raise e.under(path) from None
        raise ConfigError(path, f"must be a {tp.__name__} (or a table), got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(path, f"must be one of {allowed}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if _is_int(value):
            return value
    elif tp is float:
        if _is_number(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an exotic annotation we cannot check: trust the caller
        return value
    raise ConfigError(path, f"must be {_describe(tp)}, got {value!r}")


def _to_plain(value: Any, tp: Any, path: str, toml: bool) -> Any:
    """The JSON (or TOML, where None has no spelling) form of a field value."""
    if isinstance(value, Config):
        return value.to_toml_dict() if toml else value.to_dict()
    if value is None:
        if not toml:
            return None
        if _admits_str(tp):
            raise ConfigError(
                path,
                f"is None but its type ({_describe(tp)}) also admits strings, so None cannot "
                f"be written to TOML as {TOML_NONE!r}",
            )
        return TOML_NONE
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        args = typing.get_args(_strip_none(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif args and len(args) == len(value):
            item_types = list(args)
        elif len(args) == 1:  # list[X]
            item_types = [args[0]] * len(value)
        else:
            item_types = [Any] * len(value)
        return [
            _to_plain(v, t, f"{path}[{i}]", toml)
            for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        ]
    if isinstance(value, Mapping):
        args = typing.get_args(_strip_none(tp))
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _to_plain(v, vt, f"{path}.{k}", toml) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(path, f"holds {type(value).__name__} {value!r}, which is not serialisable")


def _strip_none(tp: Any) -> Any:
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not _NONE_TYPE]
        if len(rest) == 1:
            return rest[0]
    return tp


def _is_live(cls: type) -> bool:
    obj: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is cls


def _all_subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


# --------------------------------------------------------------------------------------
# The config base class.
# --------------------------------------------------------------------------------------


class Config:
    """Base of every config: subclasses are ``@dataclass(frozen=True)`` and set ``VERSION``.

    Override :meth:`validate` (not ``__post_init__``) for cross-field or range checks; type
    checks and normalisation are already done by the time it runs. A field may carry
    ``metadata={"expects": "..."}`` so a type error reads like its range error.

    Bump ``VERSION`` when a field's meaning changes, so old files are refused instead of
    silently misread; override :meth:`upgrade` to migrate them instead.

    ``_type`` in serialised form is the class's qualified name, not its module path, so a
    fingerprint survives moving a class between modules (or running it as ``__main__``).
    On input, ``"module:QualName"`` is also accepted, to pick between same-named classes.
    """

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        params = getattr(type(self), "__dataclass_params__", None)
        if params is None or not params.frozen:
            # A mutable config could change after its fingerprint was taken.
            raise TypeError(f"{type(self).__qualname__} must be a @dataclass(frozen=True)")
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            value = getattr(self, f.name)
            try:
                coerced = _coerce(value, hints.get(f.name, Any), f.name)
            except ConfigError as e:
                expects = f.metadata.get("expects")
                if expects is None or e.path != (f.name,):
                    raise
                raise ConfigError(f.name, f"must be {expects}, got {value!r}") from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks; raise :class:`ConfigError` naming the field."""

    # -- plain data ---------------------------------------------------------------------

    @classmethod
    def type_name(cls) -> str:
        return cls.__qualname__

    def _plain_fields(self, toml: bool) -> dict[str, Any]:
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__qualname__} must be a frozen dataclass")
        hints = _hints(type(self))
        out: dict[str, Any] = {"_type": self.type_name(), "_version": self.VERSION}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            tp = hints.get(f.name, Any)
            value = getattr(self, f.name)
            if toml and value is None and _admits_str(tp):
                # No unambiguous spelling; omitting is exact only when None is the default.
                if f.default is None:
                    continue
            out[f.name] = _to_plain(value, tp, f.name, toml)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with ``_type`` and ``_version``; nested configs become dicts."""
        return self._plain_fields(toml=False)

    def to_toml_dict(self) -> dict[str, Any]:
        """Like :meth:`to_dict` but None is spelled ``"off"`` (TOML has no null)."""
        return self._plain_fields(toml=True)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Migrate a dict written by an older ``VERSION``; by default old files are refused."""
        raise ConfigError(
            "_version",
            f"{version!r} is not supported by {cls.type_name()} (reads version {cls.VERSION})",
        )

    @classmethod
    def _resolve_type(cls, type_name: object) -> type[Config]:
        if type_name is None or type_name == cls.type_name():
            return cls
        if not isinstance(type_name, str):
            raise ConfigError("_type", f"must be a string, got {type_name!r}")
        module, sep, qualname = type_name.rpartition(":")
        candidates = [cls, *_all_subclasses(cls)]
        if sep:  # "module:QualName" disambiguates classes that share a name
            matches = [
                c for c in candidates if (c.__module__, c.__qualname__) == (module, qualname)
            ]
        else:
            matches = [c for c in candidates if c.type_name() == type_name]
        # Prefer classes still reachable from their module: reloads and discarded test
        # modules leave stale subclasses behind.
        live = [c for c in matches if _is_live(c)] or matches
        unique = list({id(c): c for c in live}.values())
        if len(unique) == 1:
            return unique[0]
        if unique:
            where = ", ".join(sorted(f"'{c.__module__}:{c.__qualname__}'" for c in unique))
            raise ConfigError(
                "_type", f"{type_name!r} is ambiguous; write one of {where} to choose"
            )
        raise ConfigError(
            "_type",
            f"{type_name!r} is not {cls.type_name()} or a subclass of it that has been "
            "imported (import the package that defines it first)",
        )

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict`/:meth:`to_toml_dict`.

        Called on a base class (``MethodConfig.from_dict``), ``_type`` selects the subclass.
        Missing ``_type``/``_version`` mean "this class, current version", so hand-written
        files stay short.
        """
        if not isinstance(data, Mapping):
            raise ConfigError((), f"{cls.type_name()} must be read from a mapping, got {data!r}")
        data = dict(data)
        target = cls._resolve_type(data.pop("_type", None))
        version = data.pop("_version", target.VERSION)
        if not _is_int(version):
            raise ConfigError("_version", f"must be an integer, got {version!r}")
        if version != target.VERSION:
            data = target.upgrade(data, version)
        if not dataclasses.is_dataclass(target):
            raise TypeError(f"{target.__qualname__} must be a frozen dataclass")
        fields = {f.name: f for f in dataclasses.fields(target) if f.init}
        unknown = sorted(k for k in data if k not in fields)
        if unknown:
            hints = []
            for k in unknown:
                hint = did_you_mean(k, fields)
                hints.append(f"{k!r} ({hint})" if hint else repr(k))
            raise ConfigError(
                (),
                f"unknown key(s) for {target.type_name()}: {', '.join(hints)}; "
                f"known: {', '.join(fields)}",
            )
        missing = [
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                (), f"missing required key(s) for {target.type_name()}: {', '.join(missing)}"
            )
        return target(**data)  # type: ignore[return-value]

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is not None)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def to_toml(self) -> str:
        return dumps_toml(self.to_toml_dict())

    @classmethod
    def from_toml(cls: type[C], text: str) -> C:
        return cls.from_dict(loads_toml(text))

    def fingerprint(self) -> str:
        return fingerprint(self)


def fingerprint(cfg: Config) -> str:
    """First 16 hex chars of sha256 over canonical JSON: stable across processes and runs.

    ``_type`` and ``_version`` are part of the hash, so a version bump changes every run
    identity that depends on the config, as it should.
    """
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Quantization specs.
# --------------------------------------------------------------------------------------

Granularity = Literal["per_tensor", "per_channel"]
RangeInit = Literal["max", "mse", "ema"]


@dataclasses.dataclass(frozen=True)
class TensorQuantSpec(Config):
    """How one kind of tensor (weights or activations) is quantized.

    ``bits=None`` means the tensor stays in floating point; it is kept as a value rather
    than a separate flag so "W4A32" style labels map onto one field.
    """

    VERSION: ClassVar[int] = 1

    bits: int | None = dataclasses.field(metadata={"expects": _BITS_EXPECTS})
    symmetric: bool
    granularity: Granularity
    range_init: RangeInit
    mse_p: float = 2.4
    mse_grid: int = 100
    ema_momentum: float = 0.95
    per_timestep: bool = False

    def validate(self) -> None:
        _check_bits("bits", self.bits, 8)
        positive_float("mse_p", self.mse_p)
        positive_int("mse_grid", self.mse_grid)
        open_unit_interval("ema_momentum", self.ema_momentum)

    @property
    def enabled(self) -> bool:
        return self.bits is not None


def weight_spec(bits: int | None, **overrides: Any) -> TensorQuantSpec:
    """Weights: asymmetric, per output channel, MSE range search.

    Asymmetric per-channel follows BRECQ and Q-Diffusion; MSE follows BRECQ (Q-Diffusion's
    released inference code uses ``range_init="max"``: pass it as an override to match).
    """
    kwargs: dict[str, Any] = dict(
        bits=bits, symmetric=False, granularity="per_channel", range_init="mse"
    )
    kwargs.update(overrides)
    try:
        return TensorQuantSpec(**kwargs)
    except ConfigError as e:
        raise e.under("weight") from None


def act_spec(bits: int | None, **overrides: Any) -> TensorQuantSpec:
    """Activations: asymmetric, per tensor, MSE range search (Q-Diffusion's activation init)."""
    kwargs: dict[str, Any] = dict(
        bits=bits, symmetric=False, granularity="per_tensor", range_init="mse"
    )
    kwargs.update(overrides)
    try:
        return TensorQuantSpec(**kwargs)
    except ConfigError as e:
        raise e.under("act") from None


_BITS_RE = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)
#: The bit-widths that mean "floating point" in labels such as W4A32 or W4A16.
_FP_BITS = (16, 32)


def _label_bits(n: int) -> int | None:
    # any other width goes on to the spec's own check (2..8), so W99A8 is refused there
    return None if n in _FP_BITS else n


#: How the first and last layer are quantized (:attr:`QuantConfig.first_last`).
FIRST_LAST = ("w8a8", "fp", "quantized")


@dataclasses.dataclass(frozen=True)
class QuantConfig(Config):
    """What gets quantized and how: the part of a run shared by every method.

    ``attention`` quantizes q, k, the softmax output and v (Q-Diffusion); it needs quantized
    activations, so it is an error to ask for it with ``act.bits=None`` rather than a
    silently ignored flag that would still change the fingerprint. ``softmax_bits`` may go
    up to 16 because the softmax output is commonly kept at 16 bits.
    """

    VERSION: ClassVar[int] = 1

    weight: TensorQuantSpec
    act: TensorQuantSpec
    attention: bool
    softmax_bits: int | None = dataclasses.field(
        default=16, metadata={"expects": "an integer in 2..16 or None (off)"}
    )
    split_shortcut: bool = True
    # The first and last layer (conv_in / conv_out, DiT's patch embedding and output
    # projection): "w8a8" (BRECQ's convention, the suite's default), "fp" (TFMQ-DM's code)
    # or "quantized" at the run's bits like every other layer (Q-Diffusion's code).
    first_last: str = "w8a8"
    # The softmax output's grid: unsigned (z = 0, all 2^b levels on [0, max]), or symmetric
    # (2^(b-1) of them used): what Q-Diffusion's DDPM attention block does with --a_sym.
    softmax_symmetric: bool = False

    def validate(self) -> None:
        _check_bits("softmax_bits", self.softmax_bits, 16)
        if self.first_last not in FIRST_LAST:
            raise ConfigError("first_last", f"must be one of {', '.join(FIRST_LAST)}, got "
                              f"{self.first_last!r}")
        if self.weight.bits is None and self.act.bits is not None:
            # every quantized layer quantizes its weights (QuantConv2d/QuantLinear): refuse
            # here, not with a TypeError after the calibration set is recorded
            raise ConfigError(
                "weight.bits",
                f"is None (floating point) while act.bits is {self.act.bits}: activation-only "
                "quantization (e.g. W32A8) is not supported; quantize weights too (W8A8) or "
                "keep activations in floating point (W4A32)",
            )
        if self.attention and self.act.bits is None:
            raise ConfigError(
                "attention",
                "is True but act.bits is None (off): attention quantization quantizes "
                "activations (q, k, softmax, v); enable activations or set attention=False",
            )

    @classmethod
    def from_bits(
        cls,
        label: str,
        *,
        attention: bool | None = None,
        softmax_bits: int | None = 16,
        split_shortcut: bool = True,
    ) -> QuantConfig:
        """Parse "W4A8"-style labels: 2..8 bits, or 16 or 32 ("A32", "A16") for not quantized.

        ``attention=None`` quantizes attention exactly when activations are quantized,
        which is the Q-Diffusion protocol the GAQ tables use.
        """
        m = _BITS_RE.match(label.strip()) if isinstance(label, str) else None
        if m is None:
            raise ValueError(
                f"invalid bit-width label {label!r}: expected 'W<bits>A<bits>' such as "
                "'W4A8', 'W8A8' or 'W4A32' (16 or 32 bits means not quantized)"
            )
        w_bits = _label_bits(int(m.group(1)))
        a_bits = _label_bits(int(m.group(2)))
        weight = weight_spec(w_bits)
        act = act_spec(a_bits)
        return cls(
            weight=weight,
            act=act,
            attention=(a_bits is not None) if attention is None else attention,
            softmax_bits=softmax_bits,
            split_shortcut=split_shortcut,
        )

    @property
    def label(self) -> str:
        """The "W4A8" label of this config; floating-point tensors show as 32."""
        w = self.weight.bits if self.weight.bits is not None else 32
        a = self.act.bits if self.act.bits is not None else 32
        return f"W{w}A{a}"


@dataclasses.dataclass(frozen=True)
class MethodConfig(Config):
    """Base of per-method hyper-parameters (iterations, batch size, learning rates...).

    Subclasses are frozen dataclasses; presets are instances, changed only through
    ``dataclasses.replace`` (which re-validates). Use the module-level checks
    (:func:`non_negative_int`, :func:`positive_float`...) in :meth:`validate`.
    """

    VERSION: ClassVar[int] = 1


# --------------------------------------------------------------------------------------
# TOML: reading via tomllib (tomli on 3.10), writing via a small serializer below.
# --------------------------------------------------------------------------------------


def loads_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib as _toml
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as _toml  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "reading TOML needs Python >= 3.11 (tomllib) or the 'tomli' package on 3.10"
            ) from None
    return _toml.loads(text)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise ValueError(f"integer {v} does not fit TOML's 64-bit integers")
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-trip repr; always has '.' or 'e'
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise ValueError("TOML has no null; convert None first (see Config.to_toml_dict)")
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write nested dicts of str/int/float/bool/lists as TOML (no dependency needed).

    Nested dicts become ``[a.b]`` tables; dicts inside lists become inline tables.
    """
    lines: list[str] = []

    def emit(table: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        subtables = []
        for k, v in table.items():
            if isinstance(v, Mapping):
                subtables.append((k, v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables:
            path = (*prefix, k)
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
            emit(v, path)

    emit(data, ())
    return "\n".join(lines) + "\n"
