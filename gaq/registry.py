"""Name -> plug-in, resolved lazily: one :class:`Registry` for every kind of plug-in.

Targets are stored as "module.path:attr" strings and imported only when asked for, so
``gaq --help``, ``list_methods()`` and config parsing never pay for torch or for a plug-in's
dependencies. Third-party packages add plug-ins through an entry-point group per kind
(``gaq.methods``, ``gaq.adapters``, ``gaq.engines``, ``gaq.metrics``, ``gaq.samplers``,
``gaq.calibration_protocols``); entry points are read (not imported) on the first lookup.
A loaded target must subclass the kind's base class, or, for the kinds whose plug-ins are
descriptions rather than classes (metrics, samplers), be an instance of it.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from gaq.errors import GaqError, did_you_mean

if TYPE_CHECKING:
    from gaq.methods.base import Method

__all__ = [
    "BUILTIN_METHODS",
    "import_target",
    "ENTRY_POINT_GROUP",
    "MethodRegistry",
    "Registry",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "register_method",
    "usable_methods",
]

ENTRY_POINT_GROUP = "gaq.methods"

#: Methods shipped with gaq, as lazy targets (nothing is imported until asked for).
BUILTIN_METHODS: dict[str, str] = {
    "rtn": "gaq.methods.rtn:RTN",
    "brecq": "gaq.methods.brecq:BRECQ",
    "qdiffusion": "baselines.qdiffusion.method:QDiffusion",
    "tfmq": "baselines.tfmq.method:TFMQ",
    "tdq": "baselines.tdq.method:TDQ",
    "ptqd": "baselines.ptqd.method:PTQD",
    "apqdm": "baselines.apqdm.method:APQDM",
    "htg": "baselines.htg.method:HTG",
    "dynamic": "baselines.dynamic.method:Dynamic",
    "gaq": "gaq.methods.gaq:GAQ",
    "gaq-uniform": "gaq.methods.gaq:GAQUniform",
    "gaq-mse": "gaq.methods.gaq:GAQMSE",
    "gaq-timestep": "gaq.methods.gaq:GAQTimestep",
}

T = TypeVar("T", bound=type)
# a class, an instance (registries of descriptions), a lazy "module:attr" or an entry point
Target = Any

_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UnknownPluginError(GaqError, KeyError):
    """A name that nothing registered; the message suggests close names."""

    kind = "plug-in"

    def __init__(self, name: str, known: list[str], kind: str | None = None) -> None:
        self.name = name
        self.known = known
        hint = did_you_mean(name, known, n=3)
        msg = f"unknown {kind or self.kind} {name!r}" + (f"; {hint} " if hint else "; ")
        msg += "known: " + (", ".join(known) if known else "(none)")
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return self.message


class BrokenPluginError(GaqError, ImportError):
    """A registered plug-in (typically an entry point) that cannot be imported."""


class NotAPluginError(GaqError, TypeError):
    """A registered target that is not a subclass of its kind's base class."""


class UnknownMethodError(UnknownPluginError):
    kind = "method"


class BrokenMethodError(BrokenPluginError):
    """A registered method (typically a plugin's entry point) that cannot be imported."""


class NotAMethodError(NotAPluginError):
    """A registered target that is not a :class:`gaq.methods.base.Method` subclass."""


def import_target(spec: str) -> Any:
    """The object a lazy ``"package.module:attr.path"`` target names, imported now: the
    one spelling of a lazy import for every registry (methods, adapters, engines,
    metrics' functions, methods' reports)."""
    module_name, _, attr_path = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


def _target_key(target: Target) -> str:
    """The "module:Class" spelling of any target form.

    A class and its lazy spelling must compare equal: re-registering a builtin after it was
    loaded has to stay a no-op.
    """
    if isinstance(target, metadata.EntryPoint):
        return target.value
    if isinstance(target, str):
        return target
    if not isinstance(target, type):  # a loaded description: compared by value
        return target
    return f"{target.__module__}:{target.__qualname__}"


def _is_loaded(target: Target) -> bool:
    return not isinstance(target, (str, metadata.EntryPoint))


def _describe(target: Target) -> str:
    if isinstance(target, metadata.EntryPoint):
        return f"entry point {target.value!r} (group {target.group!r})"
    if isinstance(target, str):
        return repr(target)
    if not isinstance(target, type):
        return repr(target)
    return f"{target.__module__}.{target.__qualname__}"


class Registry:
    """Name -> a subclass of ``base`` (a lazy "module:Class"), for one kind of plug-in; with
    ``instances``, name -> an instance of ``base`` (a lazy "module:object"), for the kinds
    described by a value (a :class:`~gaq.eval.registry.Metric`, a
    :class:`~gaq.sampling.SamplerKind`).

    Iterating yields the names in registration order (built-ins first, as declared: the
    order tables and messages list them in); :meth:`names` sorts them. Separate instances
    exist so tests (and embedders) can work on an isolated registry.
    """

    kind = "plug-in"
    base = "builtins:object"
    instances = False
    #: list known names in registration order in "unknown name" messages (metrics,
    #: samplers: the order they are documented in) rather than sorted
    known_in_order = False
    unknown: type[UnknownPluginError] = UnknownPluginError
    broken: type[BrokenPluginError] = BrokenPluginError
    not_a: type[NotAPluginError] = NotAPluginError

    def __init__(self, builtins: dict[str, str] | None = None,
                 entry_point_group: str | None = None) -> None:
        self._targets: dict[str, Target] = {}
        self._group = entry_point_group
        self._entry_points_loaded = entry_point_group is None
        for name, target in (builtins or {}).items():
            self.register(name, target)

    def register(self, name: str, target: Target, *, overwrite: bool = False) -> None:
        """Register ``target`` (a class or a lazy "module:Class" string) under ``name``.

        Re-registering the same target is a no-op, so module reloads are harmless; a
        different target needs ``overwrite=True`` to avoid silent shadowing.
        """
        kind = self.kind
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
        if isinstance(target, str):
            if not _TARGET_RE.match(target):
                raise ValueError(
                    f"lazy target for {kind} {name!r} must look like 'package.module:Class', "
                    f"got {target!r}"
                )
        elif not self.instances and not isinstance(target, (type, metadata.EntryPoint)):
            raise TypeError(
                f"target for {kind} {name!r} must be a class or a 'module:Class' string, "
                f"got {target!r}"
            )
        current = self._targets.get(name)
        if current is not None and _target_key(current) != _target_key(target):
            if not overwrite:
                raise ValueError(
                    f"{kind} {name!r} is already registered as {_describe(current)}; "
                    "pass overwrite=True to replace it"
                )
        elif current is not None and _is_loaded(current) and not _is_loaded(target):
            return  # already loaded: keep the object rather than going back to a string
        self._targets[name] = target

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        # Looked up at call time (not imported by name) so tests can substitute it.
        for ep in metadata.entry_points(group=self._group):
            current = self._targets.get(ep.name)
            if current is None:
                self._targets[ep.name] = ep
            elif _target_key(current) != _target_key(ep):
                warnings.warn(
                    f"ignoring entry point {ep.name!r} = {ep.value!r}: the name is already "
                    f"registered as {_describe(current)}",
                    stacklevel=3,
                )

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._targets)

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(list(self._targets))

    def loaded(self) -> list[Any]:
        """Every registered plug-in, loaded, in registration order. One that cannot be
        loaded (a broken entry point) is warned about once and dropped: listing a kind
        must not fail because of another package."""
        out = []
        for name in self:
            try:
                out.append(self.get(name))
            except (BrokenPluginError, NotAPluginError) as e:
                warnings.warn(f"{e}; skipped", stacklevel=2)
                del self._targets[name]
        return out

    def get(self, name: str) -> Any:
        """The plug-in registered as ``name``, importing it now if it was registered
        lazily."""
        self._load_entry_points()
        try:
            target = self._targets[name]
        except (KeyError, TypeError):
            raise self.unknown(str(name), list(self._known()), self.kind) from None
        if _is_loaded(target):
            return target
        try:
            if isinstance(target, metadata.EntryPoint):
                obj = target.load()
            else:
                obj = import_target(target)
        except Exception as e:  # noqa: BLE001 - a plugin's import may raise anything
            first = (str(e).strip().splitlines() or [""])[0]
            raise self.broken(
                f"{self.kind} {name!r} is registered as {_describe(target)} but could not be "
                f"loaded: {type(e).__name__}: {first}; fix or uninstall the package that "
                "provides it"
            ) from e
        base = import_target(self.base)  # deferred: keeps the registry torch-free
        if self.instances:
            if not isinstance(obj, base):
                raise self.not_a(f"{self.kind} {name!r} ({_describe(target)}) must be a "
                                 f"{self.base.replace(':', '.')}, got {obj!r}")
        elif not (isinstance(obj, type) and issubclass(obj, base)):
            raise self.not_a(
                f"{self.kind} {name!r} ({_describe(target)}) must be a subclass of "
                f"{self.base.replace(':', '.')}, got {obj!r}"
            )
        self._targets[name] = obj  # cache: import once
        return obj

    def _known(self) -> list[str]:
        """The names an "unknown name" message lists (see :attr:`known_in_order`)."""
        return list(self) if self.known_in_order else sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._targets


class MethodRegistry(Registry):
    """The quantization methods (``gaq.methods`` entry points)."""

    kind = "method"
    base = "gaq.methods.base:Method"
    unknown = UnknownMethodError
    broken = BrokenMethodError
    not_a = NotAMethodError

    def __init__(self, builtins: dict[str, str] | None = None,
                 entry_point_group: str | None = ENTRY_POINT_GROUP) -> None:
        super().__init__(builtins, entry_point_group)

    def get(self, name: str) -> type[Method]:
        return super().get(name)


_DEFAULT = MethodRegistry(BUILTIN_METHODS)


def register_method(name: str, target: Target | None = None, *, overwrite: bool = False) -> Any:
    """Register a method class or lazy "module:Class" string; without ``target``, a decorator.

    ``@register_method("mine")`` on a class registers it eagerly (the class is already
    imported); packages that want laziness should use entry points or a string instead.
    """
    if target is None:

        def decorator(cls: T) -> T:
            _DEFAULT.register(name, cls, overwrite=overwrite)
            return cls

        return decorator
    _DEFAULT.register(name, target, overwrite=overwrite)
    return target


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; raises :class:`UnknownMethodError`."""
    return _DEFAULT.get(name)


def list_methods() -> list[str]:
    """All registered method names (built-in, registered and entry points), sorted."""
    return _DEFAULT.names()


def usable_methods(preset: str | None = "cpu") -> tuple[list[str], list[str]]:
    """The registered methods that load (and have ``preset``, unless None), and one line
    for each that does not: a broken plugin must not take ``methods = "all"`` or
    ``gaq methods`` down."""
    usable, problems = [], []
    for name in list_methods():
        try:
            cls = get_method(name)
        except GaqError as e:
            problems.append(str(e))
            continue
        if preset is not None and preset not in cls.presets:
            problems.append(f"method {name!r} has no {preset!r} preset (it has "
                            f"{', '.join(sorted(cls.presets)) or 'none'}); skipped")
            continue
        usable.append(name)
    return usable, problems
