"""Benchmark definitions: TOML files under ``benchmarks/``, validated in full before any
work starts. A malformed file is rejected naming the file, the key and the problem."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from gaq.calibration import CalibrationSpec, sampler_fields
from gaq.config import (
    Config,
    ConfigError,
    MethodConfig,
    QuantConfig,
    loads_toml,
    non_negative_int,
    positive_int,
)
from gaq.errors import GaqError, did_you_mean
from gaq.sampling import SamplerConfig

FP = "fp"  # the unquantized model: a row of every benchmark, measured in the same harness
# class_acc: share of class-conditional samples the bundled digit classifier reads as the
# requested class (the bundled conditional models only; absent from other models' rows)


@dataclass(frozen=True)
class SamplerSpec(Config):
    """``[sampler]``: which sampler (``ddim``, ``plms``, ``dpm-solver++``), its steps, eta
    (DDIM), the classifier-free guidance scale, and for text-conditional models the file of
    prompts (one per line; image ``i`` gets line ``i mod n``)."""

    VERSION: ClassVar[int] = 1
    steps: int = 50
    eta: float = 0.0
    guidance: float | None = None
    name: str = "ddim"
    prompts: str | None = None

    def validate(self) -> None:
        try:
            self.config()
        except ValueError as e:
            msg = str(e)
            key = next((k for k in ("steps", "eta", "guidance")
                        if msg.startswith(f"sampler.{k}")), "name")
            raise ConfigError(key, msg) from None

    def config(self) -> SamplerConfig:
        return SamplerConfig(steps=self.steps, eta=self.eta, guidance=self.guidance,
                             name=self.name)

    def prompt_list(self, base: Path | None = None) -> list[str] | None:
        """The prompts of ``prompts`` (relative to ``base``), or None when unset."""
        if self.prompts is None:
            return None
        path = Path(self.prompts).expanduser()
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        if not path.is_file():
            raise GaqError(f"[sampler] prompts names {self.prompts}, which is not a file; "
                           "point it to a captions file with one prompt per line")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise GaqError(f"[sampler] prompts file {path} holds no prompt")
        return lines


#: More images than any protocol asks for (FID-50k is the largest): a typo, not a plan.
MAX_IMAGES = 1_000_000


@dataclass(frozen=True)
class EvalSpec(Config):
    VERSION: ClassVar[int] = 1
    num_images: int = 512
    batch_size: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = ("fid", "kid", "precision", "recall", "psnr", "eps_mse")
    feature_space: Literal["auto", "classifier", "inception"] = "auto"
    inception_weights: str | None = None
    # folder of reference images for models without a bundled reference set
    reference: str | None = None
    # held-out FP trajectories (their own seed) for the per-timestep noise-prediction error
    heldout_trajectories: int = 32

    def validate(self) -> None:
        positive_int("num_images", self.num_images)
        positive_int("batch_size", self.batch_size)
        non_negative_int("heldout_trajectories", self.heldout_trajectories)
        if self.num_images > MAX_IMAGES:
            raise ConfigError("num_images", f"must be at most {MAX_IMAGES:,}, got "
                              f"{self.num_images:,}")
        if not self.seeds:
            raise ConfigError("seeds", "must list at least one seed")
        for s in self.seeds:  # numpy and torch generators take 0..2^32-1
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**32:
                raise ConfigError("seeds", f"must be integers in 0..{2**32 - 1}, got {s!r}")
        if len(set(self.seeds)) < len(self.seeds):
            raise ConfigError("seeds", f"lists a seed more than once: {list(self.seeds)}")
        from gaq.eval.registry import UnknownMetricError, get_metric, requestable

        for m in self.metrics:
            try:
                kind = get_metric(m).kind
            except UnknownMetricError as e:
                raise ConfigError("metrics", f"has {e}") from None
            if kind == "cost":
                raise ConfigError("metrics", f"lists {m!r}, which every cell measures; "
                                  f"metrics to ask for: {', '.join(requestable())}")


@dataclass(frozen=True)
class MethodEntry:
    """One method row: a registered name, a preset, and overrides applied on top of it."""

    name: str
    preset: str = "cpu"
    overrides: dict = field(default_factory=dict)
    label: str = ""

    @property
    def row(self) -> str:
        return self.label or self.name

    def config(self) -> MethodConfig | None:
        if self.name == FP:
            return None
        from gaq.registry import get_method

        base = get_method(self.name).from_preset(self.preset).config
        return type(base).from_dict(_merge(base.to_dict(), self.overrides))


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path
    description: str
    models: tuple[str, ...]
    model_key: str  # which published numbers match (e.g. "cifar10-ddim100"), or ""
    sampler: SamplerSpec
    calibration: CalibrationSpec
    eval: EvalSpec
    bits: tuple[str, ...]
    methods: tuple[MethodEntry, ...]
    setup: dict = field(default_factory=dict)
    # how to get the models when they are not on this machine (said with a loading error)
    model_help: str = ""
    # the row the paired tables measure every other row against (the method under study)
    anchor: str = "gaq"


_TOP = {"benchmark", "models", "sampler", "calibration", "eval", "bits", "methods", "setup",
        "method_overrides"}
_BENCH = {"name", "description", "model_key", "model_help", "anchor"}
_METHOD = {"name", "preset", "config", "label"}
_SETUP = {"device", "gpus", "engine", "threads"}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unknown(where: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            hint = did_you_mean(key, sorted(allowed))
            hint = f"; {hint}" if hint else f"; allowed: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{where}{key}" if where else key, f"is not a known key{hint}")


def _section(cls: type[Config], data: Any, name: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(name, "must be a table")
    _unknown(f"{name}.", data, {f.name for f in dataclasses.fields(cls)} | {"_type", "_version"})
    try:
        return cls.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{name}.{'.'.join(e.path)}" if e.path else name, e.reason) from None


def _common_overrides(raw: Any, usable: Callable[[], list[str]]) -> dict[str, dict]:
    """``method_overrides``: config keys set for every method that has them (e.g. a main
    job's smaller reconstruction budget), per method name. A key no method has is an error."""
    from gaq.registry import get_method

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("method_overrides", "must be a table of method config keys")
    per_method, used = {}, set()
    for name in usable():
        fields = set(get_method(name).from_preset("cpu").config.to_dict())
        per_method[name] = {k: v for k, v in raw.items() if k in fields}
        used |= set(per_method[name])
    for key in raw:
        if key not in used:
            raise ConfigError(f"method_overrides.{key}", "is a config key of no registered method")
    return per_method


def _usable() -> list[str]:
    """Registered methods with a ``cpu`` preset that load; each other one is one warning."""
    import warnings

    from gaq.registry import usable_methods

    names, problems = usable_methods("cpu")
    for line in problems:
        warnings.warn(line, stacklevel=3)
    return names


def _methods(raw: Any, common: dict[str, dict], usable: Callable[[], list[str]],
             ) -> tuple[MethodEntry, ...]:
    from gaq.registry import get_method

    if raw == "all":
        # every registered method at its CPU preset: new methods join with no edit here
        return (MethodEntry(FP),) + tuple(MethodEntry(n, overrides=common.get(n, {}))
                                          for n in usable())
    if not isinstance(raw, list) or not raw:
        raise ConfigError("methods", 'must be "all" or a non-empty array of tables')
    entries = []
    for i, m in enumerate(raw):
        where = f"methods[{i}]"
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            raise ConfigError(where, "must be a method name or a table with a 'name'")
        _unknown(f"{where}.", m, _METHOD)
        entry = MethodEntry(m["name"], m.get("preset", "cpu"),
                            _merge(common.get(m["name"], {}), m.get("config", {})),
                            m.get("label", ""))
        if entry.name != FP:
            try:
                get_method(entry.name)
                entry.config()
            except ConfigError as e:
                raise ConfigError(f"{where}.config.{'.'.join(e.path)}", e.reason) from None
            except GaqError as e:
                raise ConfigError(f"{where}.name", str(e)) from None
        entries.append(entry)
    if FP not in {e.name for e in entries}:
        entries.insert(0, MethodEntry(FP))
    return tuple(entries)


def load_benchmark(path: str | Path) -> Benchmark:
    """Parse and fully validate a benchmark file; errors name the file and the key."""
    path = Path(path)
    if path.is_dir():
        tomls = sorted(p.name for p in path.glob("*.toml"))
        hint = f" (it holds {', '.join(tomls[:5])})" if tomls else ""
        raise GaqError(f"benchmark file {path} is a folder{hint}; pass a benchmark's .toml "
                       "file, e.g. benchmarks/w4a8.toml")
    if not path.is_file():
        raise GaqError(f"benchmark file {path} does not exist (see benchmarks/*.toml)")
    try:
        return _parse(path, loads_toml(path.read_text()))
    except ConfigError as e:
        key = ".".join(e.path) if e.path else "(top level)"
        raise GaqError(f"{path}: key '{key}' {e.reason}") from None
    except ValueError as e:  # TOML syntax errors carry their line
        raise GaqError(f"{path}: {e}") from None


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _parse(path: Path, raw: dict) -> Benchmark:
    _unknown("", raw, _TOP)
    bench = raw.get("benchmark", {})
    _unknown("benchmark.", bench, _BENCH)
    models = raw.get("models", ["digits"])
    if isinstance(models, str):
        models = [models]
    if not models or not all(isinstance(m, str) for m in models):
        raise ConfigError("models", "must be a model id or a non-empty array of model ids")
    sampler = _section(SamplerSpec, raw.get("sampler"), "sampler")
    calib_raw = dict(raw.get("calibration", {}))
    # the calibration trajectory uses the benchmark's sampler unless it says otherwise
    for key, value in sampler_fields(sampler.config()).items():
        calib_raw.setdefault(key, value)
    calibration = _section(CalibrationSpec, calib_raw, "calibration")
    ev = _section(EvalSpec, raw.get("eval"), "eval")
    bits = raw.get("bits", ["W4A8"])
    if isinstance(bits, str):
        bits = [bits]
    for b in bits:
        try:
            QuantConfig.from_bits(b)
        except (ConfigError, ValueError) as e:
            raise ConfigError("bits", f"has {b!r}: {e}") from None
    for key, values in (("models", models), ("bits", [str(b).upper() for b in bits])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(key, f"lists {', '.join(twice)} more than once")
    # the loadable methods, looked up (and broken plugins warned about) once per file
    usable = functools.cache(_usable)
    setup = raw.get("setup", {})
    _unknown("setup.", setup, _SETUP)
    from gaq.bench.engines import ENGINES

    if setup.get("engine", "local") not in ENGINES:
        raise ConfigError("setup.engine", f"must be one of {', '.join(ENGINES.names())}, got "
                          f"{setup['engine']!r}")
    threads = setup.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError("setup.threads", f"must be a positive integer, got {threads!r}")
    gpus = setup.get("gpus", 0)  # GPUs per Ray task: fractions share a GPU between cells
    if (not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or not gpus >= 0
            or gpus == float("inf")):
        raise ConfigError("setup.gpus", f"must be a number of GPUs per cell (e.g. 1 or 0.5), "
                          f"got {gpus!r}")
    name = bench.get("name", path.stem)
    # the name is a folder under --results and a file stem under tables/ and plots/
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        default = "" if "name" in bench else " (by default the file name)"
        raise ConfigError("benchmark.name",
                          f"{name!r}{default} is not a usable name: letters, digits, '.', '_' "
                          "and '-' only, starting with a letter or digit (it names a results "
                          "folder)")
    methods = _methods(raw.get("methods", "all"),
                       _common_overrides(raw.get("method_overrides"), usable), usable)
    rows = [m.row for m in methods]
    if "anchor" in bench and bench["anchor"] not in rows:
        hint = did_you_mean(str(bench["anchor"]), rows)
        raise ConfigError("benchmark.anchor", f"{bench['anchor']!r} is not a row of this "
                          f"benchmark{'; ' + hint if hint else ''} (rows: {', '.join(rows)})")
    return Benchmark(
        name=name, path=path, description=bench.get("description", ""),
        models=tuple(models), model_key=bench.get("model_key", ""), sampler=sampler,
        calibration=calibration, eval=ev, bits=tuple(bits), methods=methods,
        setup=setup,
        model_help=bench.get("model_help", ""),
        anchor=bench.get("anchor", "gaq"),
    )


def report_settings(benchmarks_dir: str | Path) -> dict[str, dict[str, str]]:
    """Per benchmark name, the settings its tables and figures depend on: ``[benchmark]``'s
    ``model_key`` and ``anchor``, and ``[eval]``'s ``feature_space`` (which captions and
    titles name; the results do not record it). Read from the files in ``benchmarks_dir``
    without validating the rest: a file whose methods no longer load still says how its
    stored results are tabulated."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(Path(benchmarks_dir).glob("*.toml")):
        try:
            raw = loads_toml(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a broken file is reported when it is run, not when tables are made
        bench, ev = raw.get("benchmark", {}), raw.get("eval", {})
        name = bench.get("name", path.stem)
        out[str(name)] = ({k: str(bench[k]) for k in ("model_key", "anchor") if bench.get(k)}
                          | ({"feature_space": str(ev["feature_space"])}
                             if ev.get("feature_space") else {}))
    return out


def with_overrides(b: Benchmark, *, num_images: int | None = None, seeds: list[int] | None = None,
                   methods: list[str] | None = None) -> Benchmark:
    """Quick runs: fewer images, other seeds, a subset of methods (FP always stays)."""
    ev = b.eval
    if num_images is not None:
        ev = dataclasses.replace(ev, num_images=num_images)
    if seeds is not None:
        ev = dataclasses.replace(ev, seeds=tuple(seeds))
    entries = b.methods
    if methods is not None:
        known = {e.row for e in entries} | {e.name for e in entries}
        missing = [m for m in methods if m not in known]
        if missing:
            raise GaqError(f"--methods: {', '.join(missing)} not in benchmark {b.name} "
                           f"(it has {', '.join(e.row for e in entries)})")
        entries = tuple(e for e in entries if e.name == FP or e.row in methods or e.name in methods)
    return dataclasses.replace(b, eval=ev, methods=entries)
