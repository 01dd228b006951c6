"""How a calibration set is recorded (:class:`CalibrationSpec`), and the registry of the
calibration protocols that choose which sampler steps the training trajectories record
(:class:`StepSelection`): ``"interval"`` and ``"gaussian"`` are recording plans of their
own; a registered protocol (APQ-DM's ``"srm"``, ``baselines/apqdm/srm.py``) keeps as many
steps as ``"interval"`` would, but picks which."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

from gaq.config import Config, ConfigError, non_negative_int, positive_float, positive_int
from gaq.registry import Registry
from gaq.sampling import SamplerConfig, sampler_kind

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

__all__ = ["PROTOCOLS", "CalibrationSpec", "StepSelection", "sampler_fields"]

PLANS = ("interval", "gaussian")


@dataclasses.dataclass(frozen=True)
class CalibrationSpec(Config):
    """How a calibration set is recorded.

    Step conventions. The DDIM sampler runs ``steps`` iterations; iteration ``k``
    (0-based, in sampling order) denoises timestep ``timesteps[k]``, and the timesteps
    *decrease*: iteration 0 is the noisiest (``t`` near ``T``), iteration ``steps-1`` the
    cleanest (``t`` near 0). So iteration ``k`` is not timestep ``k``.

    ``"interval"`` keeps iterations ``0, interval, 2*interval, ...`` of
    ``samples_per_step`` trajectories: ``ceil(steps/interval)`` timesteps ×
    ``samples_per_step`` rows (Q-Diffusion CIFAR: 100 steps, interval 5 → 20 × 256).
    Iteration 0 is always kept, so its ``x_t`` is the initial noise.

    ``"gaussian"`` records one row per trajectory, for ``num_samples`` trajectories. Its
    position ``u ~ N(gauss_mean, gauss_std)`` is measured in *timestep* terms: 0 is the
    clean end (``t = 0``), 1 the noisy end (``t = T``, the scheduler's
    ``num_train_timesteps``). ``u`` is clipped to [0, 1] and the row is recorded at the
    sampling step whose timestep is nearest to ``u·T``. PTQ4DM's code defaults are
    μ = σ = 0.4; its released code compares the drawn position with the sampling-loop
    counter, which counts from the noisy end — to mimic that inverted reading, use
    ``gauss_mean = 1 - μ``.

    A registered protocol (:data:`PROTOCOLS`, a :class:`StepSelection`) keeps the same
    number of iterations as ``"interval"`` would (``ceil(steps/interval)``) for
    ``samples_per_step`` trajectories, but chooses which. APQ-DM's ``"srm"``
    (``baselines/apqdm/srm.py``): ``srm_probe`` probe trajectories (the first training
    ones) are recorded at every step, and the subset minimising
    ``R(S)/R(all) + srm_lambda · MMD²(S, all)`` is picked greedily: ``R`` is the error of an
    ``srm_bits``-bit min/max quantizer fitted on the kept steps' rows (the empirical risk),
    MMD² the squared maximum mean discrepancy between the kept steps' rows and every
    step's rows. Deterministic from ``seed``. Its options stay fields of this spec, so
    the fingerprints of the sets and cells recorded before the protocol moved out are
    unchanged.

    ``holdout_per_step`` adds validation trajectories (GAQ's ``X^V``: equal count per
    timestep), recorded at every kept step (interval) or at every sampler step
    (gaussian, whose training rows are deliberately not balanced). Held-out rows come
    from their own trajectories, so no validation row shares a trajectory with a
    training row.

    ``act_every_step`` (interval and srm): the training trajectories are also recorded at
    every sampler step the protocol does not keep. Those rows serve one purpose: a
    per-timestep activation table gets a row calibrated on its own timestep's inputs at
    every step the sampler visits (TFMQ-DM's released code calibrates weights on every
    n-th step and activations on every step, from the same trajectories). They are held
    apart (:attr:`CalibrationSet.act_extra`, :meth:`CalibrationSet.activation_rows`), so
    the training and held-out rows are exactly those of the same spec without it. Free in
    sampling cost (the steps are computed anyway), ``steps / interval`` times the rows.

    ``sampler_name`` and ``guidance`` are the sampler's (see :class:`SamplerConfig`): with
    guidance every recorded step yields two rows per trajectory, the unconditional input
    first, then the conditional one, both with the trajectory's ``image`` index.

    ``batch_size`` only sets how many trajectories are sampled at once; it does not
    change the recorded data and is left out of :meth:`data_fingerprint`.
    """

    VERSION: ClassVar[int] = 1

    # "interval", "gaussian", or a registered StepSelection (PROTOCOLS)
    protocol: str = "interval"
    steps: int = 100
    eta: float = 0.0
    sampler_name: str = "ddim"
    guidance: float | None = None
    interval: int = 5
    samples_per_step: int = 256
    num_samples: int = 1024
    gauss_mean: float = 0.4
    gauss_std: float = 0.4
    seed: int = 0
    batch_size: int = 64
    holdout_per_step: int = 0
    # "srm" only; left out of to_dict() at their defaults, so adding them changed no
    # existing fingerprint
    srm_lambda: float = 1.0
    srm_probe: int = 4
    srm_bits: int = 4
    # activation-only rows at every other sampler step (left out at its default too)
    act_every_step: bool = False

    def validate(self) -> None:
        if self.protocol not in PLANS and self.protocol not in PROTOCOLS:
            from gaq.errors import did_you_mean

            known = [*PLANS, *PROTOCOLS]
            hint = did_you_mean(self.protocol, known)
            raise ConfigError("protocol", f"must be one of {', '.join(map(repr, known))}, "
                              f"got {self.protocol!r}" + (f"; {hint}" if hint else ""))
        positive_int("steps", self.steps)
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError("eta", f"must lie in [0, 1], got {self.eta!r}")
        try:
            sampler_kind(self.sampler_name)
            self.sampler  # noqa: B018 (validates eta and guidance against the sampler)
        except ValueError as e:
            raise ConfigError("sampler_name", str(e)) from None
        positive_int("interval", self.interval)
        positive_int("samples_per_step", self.samples_per_step)
        positive_int("num_samples", self.num_samples)
        if not (math.isfinite(self.gauss_mean) and 0.0 <= self.gauss_mean <= 1.0):
            raise ConfigError(
                "gauss_mean",
                f"must lie in [0, 1] (0 = clean end, 1 = noisy end), got {self.gauss_mean!r}",
            )
        positive_float("gauss_std", self.gauss_std)
        positive_int("batch_size", self.batch_size)
        non_negative_int("holdout_per_step", self.holdout_per_step)
        if not (math.isfinite(self.srm_lambda) and self.srm_lambda >= 0):
            raise ConfigError("srm_lambda", f"must be a finite number >= 0, got "
                              f"{self.srm_lambda!r}")
        positive_int("srm_probe", self.srm_probe)
        if not (isinstance(self.srm_bits, int) and 2 <= self.srm_bits <= 16):
            raise ConfigError("srm_bits", f"must be an integer in [2, 16], got {self.srm_bits!r}")
        if self.act_every_step and self.protocol == "gaussian":
            raise ConfigError("act_every_step", "needs the interval protocol or a step "
                              "selection such as srm (the gaussian protocol records one "
                              "step per trajectory)")
        if self.protocol != "gaussian" and self.interval > self.steps:
            raise ConfigError(
                "interval", f"must be at most steps ({self.steps}), got {self.interval}"
            )

    @property
    def sampler(self) -> SamplerConfig:
        """The sampler the trajectories run (the spec keeps its four fields flat, as
        every fingerprint recorded so far has them)."""
        return SamplerConfig(steps=self.steps, eta=self.eta, guidance=self.guidance,
                             name=self.sampler_name)

    @classmethod
    def for_sampler(cls, sampler: SamplerConfig, **fields: Any) -> CalibrationSpec:
        """The spec recording along ``sampler``, with ``fields`` for the rest: the one
        place a sampler's settings are copied into a calibration spec."""
        return cls(**sampler_fields(sampler), **fields)

    def _plain_fields(self, toml: bool) -> dict[str, Any]:
        out = super()._plain_fields(toml)
        for name, default in _OMIT_AT_DEFAULT.items():
            if getattr(self, name) == default:
                out.pop(name, None)
        return out

    @property
    def num_train_trajectories(self) -> int:
        return self.num_samples if self.protocol == "gaussian" else self.samples_per_step

    @property
    def num_trajectories(self) -> int:
        """Trajectories sampled: training ones first (indices ``0..``), then held-out ones."""
        return self.num_train_trajectories + self.holdout_per_step

    def kept_steps(self, iterations: int | None = None) -> list[int]:
        """Sampler iterations recorded by every trajectory of the interval protocol (and
        by the held-out trajectories of either protocol), out of ``iterations`` (default
        ``steps``; PLMS makes one iteration more than its steps)."""
        n = self.steps if iterations is None else iterations
        if self.protocol != "gaussian":
            # a step selection: only the count is known before recording (which steps it
            # kept is in the recorded set's meta, e.g. meta["srm_steps"])
            return list(range(0, n, self.interval))
        return list(range(n))

    def data_fingerprint(self) -> str:
        """Fingerprint of the fields that determine the data.

        ``batch_size`` and the fields of the protocol not in use are reset to their
        defaults, so e.g. an interval spec with another ``num_samples`` hits the same cache.
        """
        # a step selection's options are unused by every other protocol
        used = () if self.protocol in PLANS else PROTOCOLS.get(self.protocol).options
        options = tuple(k for k in _SRM_DEFAULTS if k not in used)
        if self.protocol == "gaussian":
            unused = ("interval", "samples_per_step", *options)
        else:
            unused = ("num_samples", "gauss_mean", "gauss_std", *options)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        canonical = dataclasses.replace(
            self, batch_size=defaults["batch_size"], **{k: defaults[k] for k in unused}
        )
        return canonical.fingerprint()


_SRM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CalibrationSpec)
                 if f.name.startswith("srm_")}
# fields added after sets were cached and results committed: at their defaults they are
# not written, so no existing fingerprint changed
_OMIT_AT_DEFAULT = {**_SRM_DEFAULTS, "act_every_step": False}


def sampler_fields(sampler: SamplerConfig) -> dict[str, Any]:
    """``sampler`` as the fields of a :class:`CalibrationSpec` (no guidance key without
    guidance: the spec's default)."""
    out: dict[str, Any] = {"steps": sampler.steps, "eta": sampler.eta,
                           "sampler_name": sampler.name}
    if sampler.guidance is not None:
        out["guidance"] = sampler.guidance
    return out


class StepSelection:
    """A calibration protocol that chooses which sampler iterations the training
    trajectories record: as many as ``"interval"`` keeps (``len(spec.kept_steps(n))``).
    Registered in :data:`PROTOCOLS` under its ``protocol`` name (``gaq.calibration_protocols``
    entry points for another package's)."""

    #: the :class:`CalibrationSpec` fields this protocol reads (left out of every other
    #: protocol's fingerprint)
    options: tuple[str, ...] = ()

    def select(self, pipe: Pipeline, spec: CalibrationSpec, iterations: int,
               progress: bool) -> tuple[list[int], dict[str, Any]]:
        """The iterations to keep (ascending) out of ``iterations``, and what the choice
        measured (kept in the set's meta under the protocol's name)."""
        raise NotImplementedError


class ProtocolRegistry(Registry):
    kind = "calibration protocol"
    base = "gaq.calibration.spec:StepSelection"

    def __init__(self, builtins: dict[str, str] | None = None,
                 entry_point_group: str | None = "gaq.calibration_protocols") -> None:
        super().__init__(builtins, entry_point_group)


#: The step-selection protocols: APQ-DM's, shipped with its baseline, like its method.
PROTOCOLS = ProtocolRegistry({"srm": "baselines.apqdm.srm:SRM"})
