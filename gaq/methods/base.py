"""The contract every quantization method implements (after ModelOpt's ``forward_loop``).

A method receives the full-precision denoiser, the model adapter (which owns the skip
policy and the block structure), calibration data and a :class:`~gaq.config.QuantConfig`,
and returns a :class:`QuantResult`. Methods never load data and never compute metrics: the
runner owns both, so every method is compared on identical inputs and outputs.

torch is imported only for type checking, so the registry can validate a method class
without importing torch.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from gaq.config import MethodConfig, QuantConfig
from gaq.errors import GaqError

if TYPE_CHECKING:
    import torch

__all__ = ["ForwardLoop", "Method", "QuantResult", "UnknownPresetError"]

M = TypeVar("M", bound="Method")

#: Runs calibration batches through the model it is given; the method decides what to
#: observe (hooks, observers) while it runs.
ForwardLoop = Callable[["torch.nn.Module"], None]


class UnknownPresetError(GaqError, KeyError):
    """A preset name the method does not define; the message lists the ones it does."""

    def __init__(self, method: str, name: str, known: list[str]) -> None:
        self.message = (
            f"method {method!r} has no preset {name!r}; "
            f"presets: {', '.join(known) if known else '(none)'}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass
class QuantResult:
    """What a method hands back to the runner.

    ``state`` is kept separate from ``model`` so a calibration can be saved and reloaded
    without pickling modules. ``sampler_hook`` exists because some methods (PTQD) correct
    errors inside the sampler rather than in the model; it is ``None`` for the rest.
    """

    model: torch.nn.Module
    state: Any = None
    sampler_hook: Any | None = None
    report: Any = None
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    # named tables of per-block findings (lists of flat records): Parquet + MLflow artifacts
    diagnostics: dict[str, list[dict]] = dataclasses.field(default_factory=dict)

    @property
    def quant(self) -> QuantConfig:
        """The config the model was actually quantized with: methods adapt the run's config
        (TFMQ-DM's per-timestep tables, PTQD's per-tensor weights), and a saved state must
        rebuild exactly those quantizers."""
        return QuantConfig.from_dict(self.state["quant"])


@dataclasses.dataclass(frozen=True)
class RowStyle:
    """How a variant row shows: its ``label`` in tables and legends, a ``short`` form for
    narrow tables (default: the label), its ``color`` in figures (a matplotlib colour;
    default: derived from the row name)."""

    label: str
    short: str | None = None
    color: str | tuple[float, float, float] | None = None


class Method(abc.ABC):
    """Base class of quantization methods.

    Subclasses set ``name``, ``Config`` (their :class:`~gaq.config.MethodConfig` subclass)
    and optionally ``presets`` and ``label``. Presets are frozen config instances behind a
    read-only mapping, so a run can never alter a preset another run relies on; derive
    variants with ``dataclasses.replace``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    presets: ClassVar[Mapping[str, MethodConfig]] = MappingProxyType({})
    #: the method's name in tables, plots and figure legends (default: ``name``)
    label: ClassVar[str | None] = None
    #: its name in narrow tables (one column of a two-column paper, the caption spells it
    #: out); None: the label. Not inherited.
    short: ClassVar[str | None] = None
    #: its colour in figures (a matplotlib colour); None: a palette slot or a colour
    #: derived from the name (:func:`gaq.bench.plots.method_color`). Not inherited.
    color: ClassVar[str | tuple[float, float, float] | None] = None
    #: the variant rows of this method that the shipped benchmark files define
    #: (``{ name = "ptqd", label = "ptqd-base", config = {...} }``), each row name (this
    #: method's name, a dash, a suffix) with how tables and figures show it; a variant
    #: sorts beside its method. Not inherited.
    rows: ClassVar[Mapping[str, RowStyle]] = MappingProxyType({})
    #: the model architectures (``ModelAdapter.arch``: "UNet2D", "DiT", ...) the method
    #: is defined for; None = every one. A benchmark with ``methods = "all"`` leaves the
    #: method out on the other models instead of failing their cells.
    archs: ClassVar[frozenset[str] | None] = None
    #: the :class:`gaq.bench.reports.MethodReport` rendering the diagnostics tables this
    #: method's results carry (``QuantResult.diagnostics``), as a lazy "module:Class"
    report: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_cls = cls.__dict__.get("Config")
        if config_cls is not None and not (
            isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)
        ):
            raise TypeError(f"{cls.__qualname__}.Config must be a MethodConfig subclass")
        if "presets" in cls.__dict__:
            presets = dict(cls.__dict__["presets"])
            expected = getattr(cls, "Config", None)
            for key, cfg in presets.items():
                if expected is not None and not isinstance(cfg, expected):
                    raise TypeError(
                        f"{cls.__qualname__}.presets[{key!r}] must be a "
                        f"{expected.__qualname__}, got {type(cfg).__qualname__}"
                    )
            cls.presets = MappingProxyType(presets)

    def __init__(self, config: MethodConfig) -> None:
        expected = getattr(type(self), "Config", None)
        if expected is None:
            raise TypeError(f"{type(self).__qualname__} does not define a Config class")
        if not isinstance(config, expected):
            raise TypeError(
                f"{type(self).__qualname__} needs a {expected.__qualname__}, "
                f"got {type(config).__qualname__}"
            )
        self.config = config

    @classmethod
    def from_preset(cls: type[M], name: str) -> M:
        """An instance configured with the named preset (e.g. "paper", "cpu")."""
        try:
            config = cls.presets[name]
        except KeyError:
            method = getattr(cls, "name", cls.__qualname__)
            raise UnknownPresetError(method, name, sorted(cls.presets)) from None
        return cls(config)

    @abc.abstractmethod
    def quantize(
        self,
        model: torch.nn.Module,
        adapter: Any,
        calib: Any | ForwardLoop,
        quant: QuantConfig,
    ) -> QuantResult:
        """Quantize ``model`` (the denoiser) and return it with its state.

        ``calib`` is a calibration-set object or a :data:`ForwardLoop`; a method that only
        needs activation statistics should accept the loop so the runner can stream data.
        ``quant`` is passed here rather than stored in ``config`` so one method config can
        be swept over bit-widths without creating new configs.
        """

    @classmethod
    def unsupported(cls, arch: str) -> str | None:
        """Why this method cannot quantize a model of architecture ``arch`` (one line), or
        None when it can."""
        if cls.archs is None or arch in cls.archs:
            return None
        return (f"{getattr(cls, 'name', cls.__qualname__)} is defined for "
                f"{', '.join(sorted(cls.archs))} models, not {arch}")

    def effective_quant(self, quant: QuantConfig) -> QuantConfig:
        """The config this method actually quantizes with, given the run's ``quant``: its
        own choices applied (attention, shortcut splitting, first/last layer, activation
        calibration). The runner and ``gaq quantize`` record this one with the results."""
        return quant

    @classmethod
    def prepare_restore(cls, model: torch.nn.Module, state: Mapping[str, Any]
                        ) -> torch.nn.Module:
        """The FP ``model`` as the saved quantized layers were built on (``state``: the
        ``QuantResult.state`` saved with them). Methods that rewrite the FP model before
        quantizing it (HTG folds its shift and scale into neighbouring layers) redo that
        here; the rest return ``model`` unchanged."""
        return model

    @classmethod
    def finish_restore(cls, qmodel: torch.nn.Module, state: Mapping[str, Any]
                       ) -> torch.nn.Module:
        """The restored quantized model made ready to sample (``state``: the
        ``QuantResult.state`` saved with it). Methods whose quantizers hold nothing a state
        can save (dynamic ranges, computed at every call) rebuild them here; the rest
        return ``qmodel`` unchanged."""
        return qmodel

    @classmethod
    def restore_hook(cls, state: Mapping[str, Any]) -> Any | None:
        """The sampler hook of a saved quantization (``state``: the ``QuantResult.state``
        saved with it); None for methods that correct nothing in the sampler."""
        return None

    def skip(self, module: torch.nn.Module, name: str, role: str | None) -> Any:
        """Extra skip rule (a :class:`~gaq.models.adapters.SkipRule` or None) on top of the
        model's policy; methods can only add restrictions, never lift the model's. ``role``
        is the layer's architectural role as the model's adapter names it
        (:data:`gaq.models.adapters.ROLES`), so a rule holds for every model family."""
        return None

    def skip_filter(self, adapter: Any) -> Any:
        """This method's rules as a ``filter(module, name)`` over ``adapter``'s model."""
        return lambda module, name: self.skip(module, name, adapter.role(name))

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({self.config!r})"
