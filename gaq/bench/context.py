"""The data a benchmark sweep is made of: its cells, what the cells of one model share,
and what one cell has produced so far. The runner (:mod:`gaq.bench.runner`), the engines
(:mod:`gaq.bench.engines`) and ``gaq evaluate`` pass these around."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from gaq.bench.spec import FP, Benchmark, MethodEntry
from gaq.config import QuantConfig
from gaq.errors import GaqError
from gaq.eval.registry import metrics_of_kind

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

__all__ = ["Cell", "CellOutcome", "ModelContext", "cells"]


@dataclass(frozen=True)
class Cell:
    model: str
    method: MethodEntry
    bits: str  # "FP" for the unquantized row
    seed: int

    @property
    def label(self) -> str:
        return f"{self.model} / {self.method.row} / {self.bits} / seed {self.seed}"


def cells(bench: Benchmark) -> list[Cell]:
    """The grid in its fixed order: per model, FP first, then bit-width x method x seed."""
    out = []
    for model in bench.models:
        out += [Cell(model, m, "FP", s) for m in bench.methods if m.name == FP
                for s in bench.eval.seeds]
        for bits in bench.bits:
            for m in bench.methods:
                if m.name != FP:
                    out += [Cell(model, m, bits, s) for s in bench.eval.seeds]
    return out


def _bits(label: str) -> tuple[int | None, int | None]:
    if label == "FP":
        return None, None
    q = QuantConfig.from_bits(label)
    return q.weight.bits, q.act.bits


class ModelContext:
    """What every cell of one model shares: the pipeline, reference features, FP samples."""

    def __init__(self, model_id: str, bench: Benchmark, device: str,
                 pipe: Pipeline | None = None) -> None:
        from gaq.identity import state_dict_digest
        from gaq.models.adapters import adapter_for
        from gaq.models.loading import load_model

        self.id = model_id
        if pipe is not None:  # loaded by the caller (gaq evaluate checks a state against it)
            self.pipe = pipe
        else:
            prompts = bench.sampler.prompt_list(bench.path.parent)
            try:
                self.pipe = load_model(model_id, device=device, prompts=prompts)
            except GaqError as e:
                if not bench.model_help:
                    raise
                raise GaqError(f"{e}. {bench.model_help}") from None
        # [sampler] guidance applies to the conditional models of a benchmark; an
        # unconditional one samples without it, and its rows say so (sampler.guidance off)
        self.sampler = bench.sampler
        self.calibration = bench.calibration
        if bench.sampler.guidance is not None and not self.pipe.conditioning.supports_guidance:
            if self.pipe.conditioning.kind != "none":
                raise GaqError(f"{bench.path}: key 'sampler.guidance' is set but model "
                               f"{model_id!r} has {self.pipe.conditioning.kind!r} conditioning "
                               "with no unconditional input (null class or empty prompt)")
            self.sampler = dataclasses.replace(bench.sampler, guidance=None)
            self.calibration = dataclasses.replace(bench.calibration, guidance=None)
        self.adapter = adapter_for(self.pipe.denoiser)
        self.digest = state_dict_digest(self.pipe.denoiser)
        # class_acc needs a classifier of the model's classes: the bundled digit classifier
        # for the bundled class-conditional models
        from gaq.models.bundled import scoring_for

        self.scoring = scoring_for(model_id)
        self.judges_classes = (self.scoring.judges_classes
                               and self.pipe.conditioning.kind == "class")
        # a feature space only where image metrics are asked for: paired metrics alone
        # need no Inception weights
        needs_features = bool(metrics_of_kind(bench.eval.metrics, "image"))
        self.space = (_feature_space(model_id, bench.eval.feature_space,
                                     bench.eval.inception_weights, device)
                      if needs_features else None)
        self.reference_folder = bench.eval.reference
        self._fp_images: dict[int, torch.Tensor] = {}
        self._heldout: dict[int, object] = {}

    def reference(self):
        from gaq.eval.metrics import reference_features

        return reference_features(self.id, self.space, self.reference_folder)


def _feature_space(model_id: str, kind: str, weights: str | None, device: str):
    from gaq.eval import features

    if kind == "classifier":
        return features.ClassifierFeatures(device=device)
    if kind == "inception":
        return features.InceptionFeatures(weights, device=device)
    return features.feature_space_for(model_id, device=device, weights_path=weights)


@dataclass
class CellOutcome:
    """What one cell has produced so far; each step of :meth:`Runner._run_cell` adds to it.
    ``metrics`` keeps insertion order: it is the order of the cell's Parquet rows."""

    cell: Cell
    cid: str
    started: float  # the MLflow run's start: its duration in the UI is the cell's
    model: torch.nn.Module | None = None
    hook: Any = None
    report: Any = None
    images: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, pd.DataFrame] = field(default_factory=dict)
    per_image: pd.DataFrame | None = None
    per_trajectory: pd.DataFrame | None = None
    curves: dict[str, pd.Series] = field(default_factory=dict)
