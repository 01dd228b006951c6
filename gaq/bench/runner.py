"""The benchmark runner: every (model, bit-width, method, seed) cell of a benchmark, in a
fixed order, measured in one harness; each cell logged to MLflow and appended to Parquet.

A cell's identity is a content hash of everything that determines its result (model
weights, method and config fingerprint, quantization config, calibration protocol,
sampler, evaluation settings, seed, gaq version). A cell whose id is already in the
Parquet results is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlparse

import pandas as pd
import torch

import gaq
from gaq.bench import labels
from gaq.bench.spec import FP, Benchmark, MethodEntry
from gaq.config import QuantConfig, fingerprint
from gaq.errors import DivergedError, GaqError
from gaq.eval.registry import by_function, compute_grouped, metrics_of_kind
from gaq.tempdirs import make_temp_dir, remove_dead_temp_dirs

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

RESULTS_FORMAT = 2  # 2: eps_mse after the sampler hook; noise_k curves
HELDOUT_SEED_OFFSET = 10_000  # held-out trajectories never share noise with calibration


# the disk estimate's allowances (space_needed): curves a cell logs (eps_mse before and
# after a sampler correction, slopes), each curve's PNG on the run page, a Parquet row,
# diagnostics rows of a quantized cell, the tables and plots (per bit-width, and fixed)
_CURVES_PER_CELL = 4
_CURVE_PNG_BYTES = 200 * 2**10
_PARQUET_ROW_BYTES = 128
_DIAGNOSTIC_ROWS = 10_000
_REPORT_BYTES_PER_BITS = 4 * 2**20
_REPORT_BYTES = 4 * 2**20


class SpaceNeeded(NamedTuple):
    """Bytes a sweep writes (:meth:`Runner.space_needed`), per place."""

    artifacts: int  # the MLflow artifact store
    cache: int  # the calibration cache
    results: int  # the results folder (grids, Parquet, tables, plots)


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


class _ModelContext:
    """What every cell of one model shares: the pipeline, reference features, FP samples."""

    def __init__(self, model_id: str, bench: Benchmark, device: str,
                 pipe: Pipeline | None = None) -> None:
        from gaq.calibration import state_dict_digest
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


class Runner:
    def __init__(self, bench: Benchmark, results_dir: str | Path = "results", *,
                 force: bool = False, retry_failed: bool = False, device: str | None = None,
                 log=print) -> None:
        self.bench = bench
        self.dir = Path(results_dir) / bench.name
        self.force = force
        self._device_flag = device is not None
        self.device = device or bench.setup.get("device", "cpu")
        self._log = log
        self._models: dict[str, _ModelContext] = {}
        self.world = None  # joined in preflight, after the device is checked
        self.engine = "local"  # "ray" in a Ray engine worker; "torchrun" follows the world
        self.sweep_run: str | None = None  # MLflow parent run of this invocation's cells
        self.retry_failed = retry_failed
        self.failures: list[tuple[str, str]] = []  # (cell label, error) of this invocation
        self._left_out: set[tuple[str, str]] = set()  # (model, method row) already said
        self._classifier = None  # the bundled digit classifier, once class_acc needs it

    def log(self, text: str) -> None:
        if self.world is None or self.world.main:
            self._log(text)

    # -- identity ---------------------------------------------------------------------
    def cell_id(self, cell: Cell) -> str:
        ctx = self.model(cell.model)
        b = self.bench
        method_cfg = cell.method.config()
        doc = {
            "format": RESULTS_FORMAT, "gaq": gaq.__version__,
            "model": cell.model, "weights": ctx.digest,
            "method": cell.method.name,
            "method_config": None if method_cfg is None else fingerprint(method_cfg),
            "quant": None if cell.bits == "FP" else fingerprint(QuantConfig.from_bits(cell.bits)),
            "calibration": ctx.calibration.data_fingerprint(),
            "sampler": ctx.sampler.to_dict(), "eval": b.eval.to_dict(), "seed": cell.seed,
        }
        code = _method_code(cell.method.name)
        if code is not None:  # plugins only: the ids of gaq's own methods stay as they were
            doc["method_code"] = code
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]

    def model(self, model_id: str, pipe: Pipeline | None = None) -> _ModelContext:
        """What the cells of ``model_id`` share, made on first use; ``pipe``: the model
        already loaded on the runner's device (else it is loaded here)."""
        if model_id not in self._models:
            self._models[model_id] = _ModelContext(model_id, self.bench, self.device, pipe)
        return self._models[model_id]

    # -- running ----------------------------------------------------------------------
    def run(self) -> pd.DataFrame:
        """Preflight, then every cell left to run, one after another in this process (the
        local engine, :mod:`gaq.bench.engines`)."""
        from gaq.bench.engines.local import LocalEngine

        self.preflight()
        with self.sweep():
            return LocalEngine().run_planned(self)

    @contextlib.contextmanager
    def sweep(self) -> Iterator[None]:
        """One MLflow parent run for this invocation (rank 0), its cells' runs nested under
        it; closed FINISHED, FAILED on an error, KILLED on an interrupt. Sweeps a killed
        process left RUNNING are marked KILLED when the next one opens."""
        from gaq.bench.provenance import provenance
        from gaq.bench.tracking import close_sweep, open_sweep

        if not self.world.main:
            yield
            return
        b = self.bench
        self.sweep_run = open_sweep(
            f"gaq-{b.name}", f"{b.name} sweep",
            {"models": list(b.models), "bits": list(b.bits),
             "methods": [m.row for m in b.methods], "cells": len(cells(b)),
             "sampler": b.sampler.to_dict(), "calibration": b.calibration.to_dict(),
             "eval": b.eval.to_dict()},
            provenance(list(b.eval.seeds)) | {"gaq.benchmark": b.name,
                                              "gaq.engine": _engine(self.engine, self.world.size),
                                              "gaq.device": self.device})
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            close_sweep(self.sweep_run, status)

    @contextlib.contextmanager
    def claim(self, cid: str) -> Iterator[bool]:
        """Hold cell ``cid`` for this process: yields False when another process (a second
        sweep on the same results folder) is running it, so each cell runs once. An
        advisory lock, released when the process ends however it ends; on Windows and
        under torchrun (whose ranks must agree) every cell is claimed."""
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is None or (self.world is not None and self.world.distributed):
            yield True
            return
        lock = self.dir / ".running" / f"{cid}.lock"
        while True:
            lock.parent.mkdir(parents=True, exist_ok=True)
            try:
                handle = lock.open("a")
            except FileNotFoundError:  # the folder was just removed by a finished cell
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                yield False
                return
            try:  # the holder before us may have removed the file once done: lock anew
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        try:
            yield True
        finally:
            # removed while still held, so no lock file outlives its cell (a process that
            # opened it meanwhile sees it gone above and locks a new one)
            lock.unlink(missing_ok=True)
            handle.close()
            with contextlib.suppress(OSError):
                lock.parent.rmdir()  # the last cell out removes the folder

    def join_local(self) -> None:
        """Run single cells in this process without a torchrun job (a Ray engine worker,
        whose driver did the preflight)."""
        from gaq.dist import World

        self.world = World()

    def preflight(self) -> None:
        """Fail before any work: the device exists, every model loads, its feature space and
        reference exist, the results folder and the MLflow store take writes."""
        from gaq import dist
        from gaq.device import check_device
        from gaq.sampling import check_steps

        check_device(self.device, "--device" if self._device_flag else
                     f"{self.bench.path}: key 'setup.device'")
        # under torchrun: join the job (each CUDA rank on its LOCAL_RANK GPU)
        self.world = dist.init(self.device)
        self.device = str(self.world.device) if self.world.distributed else self.device
        if self.world.distributed:
            self.log(f"torchrun: {self.world.size} ranks, sampling sharded by global batch")
        if self.world.main:  # a damaged table fails here, not when a cell appends to it
            from gaq.bench.results import check_tables

            check_tables(self.dir)
        needs_reference = bool(metrics_of_kind(self.bench.eval.metrics, "image"))
        contexts = [self.model(model_id) for model_id in self.bench.models]
        unguided = [c.id for c in contexts if c.sampler.guidance != self.bench.sampler.guidance]
        if unguided and len(unguided) == len(contexts):
            raise GaqError(f"{self.bench.path}: key 'sampler.guidance' is set but no model of "
                           "the benchmark is conditional; remove the key")
        if unguided:
            self.log(f"unconditional, sampled without guidance: {', '.join(unguided)}")
        for c in contexts:  # the schedulers refuse more steps than training timesteps
            for key, steps in (("sampler.steps", c.sampler.steps),
                               ("calibration.steps", c.calibration.steps)):
                try:
                    check_steps(c.pipe.scheduler, steps, f"key '{key}'")
                except GaqError as e:
                    raise GaqError(f"{self.bench.path}: {e} (model {c.id!r})") from None
        if "class_acc" in self.bench.eval.metrics:
            judged = [c.id for c in contexts if c.judges_classes]
            if not judged:
                raise GaqError(f"{self.bench.path}: key 'eval.metrics' asks for class_acc, "
                               "which needs a bundled class-conditional model (digits-ldm, "
                               "digits-dit); remove it")
            if len(judged) < len(contexts):
                self.log("class_acc only for the bundled class-conditional models: "
                         f"{', '.join(judged)}")
        for model_id in self.bench.models:
            ref = self.bench.eval.reference
            if needs_reference and self.model(model_id).scoring.reference is None:
                if ref is None:
                    raise GaqError(f"{self.bench.path}: key 'eval.reference' must name a folder "
                                   f"of reference images for model {model_id!r}")
                if not Path(ref).is_dir():
                    raise GaqError(f"{self.bench.path}: key 'eval.reference' names {ref}, "
                                   "which is not a folder")
        if self.world.main:
            self._check_writable()  # last: a failed check above leaves nothing behind
        remove_dead_temp_dirs()

    def _check_writable(self) -> None:
        """The results folder and the MLflow store take writes, checked before any work
        (a failure there would otherwise cost a cell's calibration and sampling)."""
        from gaq.bench.results import probe_writable
        from gaq.bench.tracking import check_store

        self._check_free_space()  # first: it writes nothing
        made = [p for p in (self.dir, *self.dir.parents) if not p.exists()]
        try:
            try:
                probe_writable(self.dir)
            except OSError as e:
                raise GaqError(f"--results: cannot write to {self.dir} ({e.strerror or e}); "
                               "choose a writable folder") from None
            check_store(f"gaq-{self.bench.name}")
        except GaqError:
            for folder in made:  # the folders the probe made, innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise

    def space_needed(self) -> SpaceNeeded:
        """Bytes the sweep writes, per place (an upper estimate: every file a cell
        writes). The MLflow artifact store: each quantized cell's state (weight codes at
        their bit-width and activation tables, :func:`gaq.cell.state_size_bound`; cells a
        method is left out of keep nothing), and each cell's sample grid and curve files.
        The calibration cache: each model's calibration sets. The results folder: each
        cell's sample grid, its Parquet rows (twice: a table is rewritten beside the old
        one, then renamed) and the tables and plots. Block caches streamed during
        reconstruction are transient and not counted."""
        from gaq.cell import state_size_bound
        from gaq.registry import get_method

        grid = cells(self.bench)
        ev = self.bench.eval
        artifacts = cache = written = 0
        for model_id in self.bench.models:
            ctx = self.model(model_id)
            run = [c for c in grid if c.model == model_id and (
                c.method.name == FP
                or not get_method(c.method.name).unsupported(ctx.adapter.arch))]
            quantized = sum(1 for c in run if c.method.name != FP)
            bounds: dict[tuple[int, str], int] = {}  # a method's seeds share a state size
            for c in run:
                if c.method.name != FP and (id(c.method), c.bits) not in bounds:
                    bounds[id(c.method), c.bits] = state_size_bound(
                        ctx.pipe, get_method(c.method.name)(c.method.config()),
                        QuantConfig.from_bits(c.bits))
                if c.method.name != FP:
                    artifacts += bounds[id(c.method), c.bits]
            # the grid of up to 64 images at twice their size, as uncompressed RGB at
            # most; a copy goes to the artifact store
            _, h, w = ctx.pipe.latent_shape
            if ctx.pipe.autoencoder is not None:
                scale = 2 ** (len(getattr(ctx.pipe.autoencoder.config, "block_out_channels",
                                          (0,))) - 1)
                h, w = h * scale, w * scale
            images = min(64, ev.num_images)
            grid_bytes = images * 3 * (2 * h + 2) * (2 * w + 2) + 2**16
            curves = (_CURVES_PER_CELL if metrics_of_kind(ev.metrics, "curve")
                      and ev.heldout_trajectories > 0 else 0)
            steps = ctx.sampler.steps + 1
            artifacts += len(run) * (grid_bytes + curves * (_CURVE_PNG_BYTES + 32 * steps))
            rows = (len(ev.metrics) + 16 + curves * (steps + ev.heldout_trajectories)
                    + ev.num_images * len(metrics_of_kind(ev.metrics, "paired")))
            written += len(run) * (grid_bytes + 2 * rows * _PARQUET_ROW_BYTES)
            written += quantized * 2 * _DIAGNOSTIC_ROWS * _PARQUET_ROW_BYTES
            written += len(self.bench.bits) * _REPORT_BYTES_PER_BITS
            cal = ctx.calibration
            kept = len(cal.kept_steps())  # held-out rows at each; training rows too (interval)
            # training trajectories: at the kept steps (interval, srm), at every step with
            # activation-only rows, at one step each (gaussian)
            train_steps = (cal.steps if cal.act_every_step
                           else kept if cal.protocol in ("interval", "srm") else 1)
            rows = (cal.num_train_trajectories * train_steps
                    + cal.holdout_per_step * kept) * (2 if cal.guidance else 1)
            per_row = 2 * math.prod(ctx.pipe.latent_shape) * 4  # x_t and the FP noise
            cache += len(self.bench.eval.seeds) * rows * per_row
        return SpaceNeeded(artifacts, cache, written + _REPORT_BYTES)

    def _check_free_space(self) -> None:
        """Enough free disk for :meth:`space_needed`, checked before any cell runs: per
        place, and summed over the places that share a file system."""
        from gaq.bench.tracking import artifact_root
        from gaq.calibration import default_cache_dir

        need = self.space_needed()
        root = artifact_root()
        places = [(Path(unquote(urlparse(root).path)) if root else self.dir, need.artifacts,
                   "the MLflow artifact store (a quantized state per cell)",
                   "or move the store (MLFLOW_TRACKING_URI)"),
                  (default_cache_dir(), need.cache, "the calibration cache ($GAQ_CACHE)",
                   "or move the cache (GAQ_CACHE)"),
                  (self.dir, need.results, "the results (sample grids, Parquet tables, "
                   "tables and plots)", "or choose another --results")]
        devices: dict[int, list] = {}
        for folder, bytes_, what, fix in places:
            probe = next((p for p in (folder, *folder.parents) if p.exists()), None)
            if probe is None or bytes_ == 0:
                continue
            devices.setdefault(probe.stat().st_dev, []).append((folder, bytes_, what, fix,
                                                                probe))
        for shared in devices.values():
            free = shutil.disk_usage(shared[0][4]).free
            for folder, bytes_, what, fix, _ in shared:
                if bytes_ * 1.1 > free:
                    raise GaqError(f"{self.bench.path}: this sweep needs about {_size(bytes_)} "
                                   f"free for {what} under {folder}, but {_size(free)} are "
                                   f"free; free some space, {fix}")
            total = sum(b for _, b, *_ in shared)
            if total * 1.1 > free:
                names = "; ".join(f"{_size(b)} for {what} under {folder}"
                                  for folder, b, what, _, _ in shared)
                raise GaqError(f"{self.bench.path}: this sweep needs about {_size(total)} "
                               f"free on one file system ({names}), but {_size(free)} are "
                               "free; free some space, or move the MLflow store, the cache "
                               "(MLFLOW_TRACKING_URI, GAQ_CACHE) or --results elsewhere")

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.parquet"

    @property
    def curves_path(self) -> Path:
        return self.dir / "curves.parquet"

    def write_reports(self, root: Path | None = None) -> list[Path]:
        """Tables and plots of this benchmark from the results under ``root`` (default: the
        folder this runner writes), into ``root/tables`` and ``root/plots``."""
        from gaq.bench.plots import default_workers, write_plots
        from gaq.bench.tables import write_tables

        root = self.dir.parent if root is None else Path(root)
        return (write_tables(root, self.bench.name, root / "tables",
                             model_key=self.bench.model_key or None,
                             anchor=self.bench.anchor)
                + write_plots(root, self.bench.name, root / "plots", workers=default_workers()))

    def _sample(self, ctx: _ModelContext, model: torch.nn.Module, seed: int, hook) -> tuple:
        """All images of the cell, on rank 0 (under torchrun each rank samples its share of
        the global batches, and rank 0 gathers them in global order)."""
        from gaq.sampling import batch_ranges, sample_batch

        start = time.perf_counter()
        layout = batch_ranges(self.bench.eval.num_images, self.bench.eval.batch_size)
        with torch.no_grad():
            local = [sample_batch(ctx.pipe, layout[b], seed=seed, sampler=ctx.sampler.config(),
                                  hook=hook, denoiser=model)
                     for b in self.world.shard(len(layout))]
        # every rank agrees, so under torchrun all of them move on to the next cell
        if self.world.any(any(not bool(torch.isfinite(x).all()) for x in local)):
            what = "the FP model" if model is ctx.pipe.denoiser else "the quantized model"
            raise DivergedError(f"sampling {ctx.id} with {what} produced NaN or infinite "
                                "images")
        images = self.world.gather_batches(local, len(layout))
        return images, time.perf_counter() - start

    @staticmethod
    def _paired(keys: list[str], images: torch.Tensor, fp_images: torch.Tensor,
                metrics: dict[str, float]) -> pd.DataFrame | None:
        """Paired metrics against the FP images of the same noise, added to ``metrics``;
        the per-image values of the requested ones as rows (image i of every row comes from
        the same noise: kept for paired differences)."""
        frames = []
        for fn, served in by_function(keys):
            paired = fn(images, fp_images)
            metrics.update({k: float(v) for k, v in paired.items() if _is_number(v)})
            frames += [pd.DataFrame({"image": range(len(images)), "metric": k,
                                     "value": paired[f"{k}_per_image"]})
                       for k in served if f"{k}_per_image" in paired]
        return pd.concat(frames, ignore_index=True) if frames else None

    def class_accuracy(self, ctx: _ModelContext, images: torch.Tensor) -> float:
        """The share of ``images`` the bundled classifier reads as the class each was asked
        for (image ``i`` is asked for the class the conditioning assigns to index ``i``)."""
        from gaq.eval.digits import digit_likeness
        from gaq.models.bundled import load_classifier

        if self._classifier is None:  # loaded once, on the device the cells run on
            self._classifier = load_classifier(self.device)
        requested = ctx.pipe.conditioning.label_of(torch.arange(len(images), device="cpu"))
        scores = digit_likeness(images, classifier=self._classifier, labels=requested)
        return float(scores["class_accuracy"])

    def _heldout(self, ctx: _ModelContext, seed: int):
        from gaq.calibration import CalibrationSpec, record_calibration

        if seed not in ctx._heldout:
            s = ctx.sampler
            spec = CalibrationSpec(steps=s.steps, eta=s.eta, sampler_name=s.name,
                                   guidance=s.guidance, interval=1,
                                   samples_per_step=max(1, self.bench.eval.heldout_trajectories),
                                   seed=seed + HELDOUT_SEED_OFFSET)
            ctx._heldout[seed] = record_calibration(ctx.pipe, spec, model_id=ctx.id)
        return ctx._heldout[seed]

    def _noise_curves(self, ctx: _ModelContext, model: torch.nn.Module, seed: int,
                      hook) -> tuple[dict[str, pd.Series], pd.DataFrame | None]:
        """Per-timestep noise-prediction MSE against FP and the slope k_t of the error on
        eps_fp, on held-out FP trajectories, after the method's sampler correction (and
        before it, for a method that has one); and each held-out trajectory's MSE averaged
        over the timesteps, as rows (the spread the reproduction report's tolerance for
        ``eps_mse`` is computed from)."""
        from gaq.eval.eps import noise_measurements

        curves, by_traj = noise_measurements(model, self._heldout(ctx, seed),
                                             self.bench.eval.batch_size, hook)
        frames = [pd.DataFrame({"trajectory": list(values), "metric": name,
                                "value": list(values.values())})
                  for name, values in by_traj.items()]
        per_traj = pd.concat(frames, ignore_index=True) if frames else None
        return {name: pd.Series(points) for name, points in curves.items()}, per_traj

    def left_out(self, cell: Cell) -> str | None:
        """Why ``cell`` is not part of this run: its method is defined only for other
        architectures (``Method.archs``, e.g. HTG for DiT) than its model's. Said once per
        model and method row; such cells have no rows, not failed ones."""
        if cell.method.name == FP:
            return None
        from gaq.registry import get_method

        why = get_method(cell.method.name).unsupported(self.model(cell.model).adapter.arch)
        if why and (cell.model, cell.method.row) not in self._left_out:
            self._left_out.add((cell.model, cell.method.row))
            self.log(f"{cell.model} / {cell.method.row}: left out, {why}")
        return why

    def earlier(self) -> tuple[set[str], set[str]]:
        """Ids of the cells earlier sweeps completed and of those they recorded as failed,
        both skipped: all are re-run with --force, the failed ones with --retry-failed (a
        diverged cell diverges again: its id fixes the code, the config and the seed)."""
        from gaq.bench import results

        if self.force:
            return set(), set()
        done = set(results.read(self.metrics_path)["cell_id"])
        if self.retry_failed:
            return done, set()
        return done, set(results.failed_cells(self.dir)["cell_id"])

    def attempt_cell(self, cell: Cell, cid: str) -> dict[str, float] | None:
        """:meth:`run_cell`, except that a cell which diverges is recorded as failed (in
        ``failures.parquet`` and as a FAILED MLflow run) and the sweep goes on; any other
        error still stops the sweep."""
        try:
            return self.run_cell(cell, cid)
        except DivergedError as e:
            self.failures.append((cell.label, str(e)))
            self.log(f"    FAILED: {e}; recorded in {self.dir / 'failures.parquet'}, the "
                     "sweep goes on")
            if self.world.main:
                self.record_failure(cell, cid, str(e))
            return None

    def record_failure(self, cell: Cell, cid: str, error: str) -> None:
        from gaq.bench import results
        from gaq.bench.tracking import log_run

        ctx = self.model(cell.model)
        run_id = log_run(f"gaq-{self.bench.name}", _run_name(cell),
                         self._params(cell, ctx), {},
                         self._tags(cell, cid, ctx) | {"gaq.error": error},
                         start_time=time.time(), parent=self.sweep_run, status="FAILED")
        row = _cell_keys(cell, cid, run_id, self.bench.name) | {"error": error}
        results.append(self.dir / "failures.parquet", pd.DataFrame([row]))

    def _params(self, cell: Cell, ctx: _ModelContext) -> dict:
        return {"model": cell.model, "method": cell.method.name, "row": cell.method.row,
                "preset": cell.method.preset, "bits": cell.bits, "seed": cell.seed,
                "sampler": ctx.sampler.to_dict(),
                "calibration": ctx.calibration.to_dict(),
                "eval": self.bench.eval.to_dict(),
                "method_config": (cell.method.config().to_dict()
                                  if cell.method.name != FP else {})}

    def _tags(self, cell: Cell, cid: str, ctx: _ModelContext) -> dict[str, str]:
        from gaq.bench.provenance import provenance

        code = _method_code(cell.method.name) or {}
        tags = provenance([cell.seed]) | {f"gaq.method_code.{k}": v for k, v in code.items()}
        what = ("the full-precision model" if cell.method.name == FP else
                f"{labels.method_label(cell.method.row)} (`{cell.method.row}`, preset "
                f"`{cell.method.preset}`) at {cell.bits}")
        note = (f"Benchmark `{self.bench.name}`, model `{cell.model}`: {what}, seed "
                f"{cell.seed}. Its rows in Parquet carry cell id `{cid}`.")
        return tags | {"mlflow.note.content": note,
                       "gaq.cell_id": cid, "gaq.benchmark": self.bench.name,
                       "gaq.backend": "fake-quant (PyTorch)",
                       "gaq.engine": _engine(self.engine, self.world.size),
                       "gaq.dtype": str(ctx.pipe.dtype).replace("torch.", ""),
                       "gaq.device": self.device}

    def run_cell(self, cell: Cell, cid: str) -> dict[str, float] | None:
        """Run one cell, log it to MLflow and append it to the results; returns the headline
        metrics it logged (None on a non-main torchrun rank)."""
        # the cell's state files live in a temp folder until MLflow has copied them; it goes
        # however the cell ends (a killed process's: at the next start, see preflight)
        state_dir = make_temp_dir("state")
        try:
            return self._run_cell(cell, cid, state_dir)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)

    def _run_cell(self, cell: Cell, cid: str, state_dir: Path) -> dict[str, float] | None:
        """A cell is four steps over one :class:`CellOutcome`: quantize (and save the
        state), sample, score, persist (artifacts, MLflow, Parquet)."""
        out = CellOutcome(cell, cid, started=time.time())
        self._quantize_step(out, state_dir)
        if not self.measure(out):
            return None
        return self._persist_step(out, state_dir)

    def measure(self, out: CellOutcome) -> bool:
        """Sample ``out.model`` (with the sampler hook ``out.hook``) and score its images
        into ``out``, as every cell does once its model is quantized: ``gaq evaluate``
        calls this on a restored state, so a saved state and a benchmark cell are scored
        by the same code. False on a torchrun rank other than 0, which only samples its
        share (metrics are rank 0's)."""
        self._sample_step(out)
        if not self.world.main:
            return False
        self._score_step(out)
        return True

    def _quantize_step(self, out: CellOutcome, state_dir: Path) -> None:
        """The method's quantization of the denoiser (FP: the denoiser itself), through
        the steps ``gaq quantize`` runs too (:mod:`gaq.cell`); the state goes to
        ``state_dir``."""
        from gaq.registry import get_method

        cell, ctx = out.cell, self.model(out.cell.model)
        if torch.device(self.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if cell.method.name == FP:
            out.model = ctx.pipe.denoiser
            out.metrics["calibration_seconds"] = 0.0
            return
        from gaq.cell import quantize_pipeline, save_quantized

        def quantize():
            return quantize_pipeline(
                ctx.pipe, get_method(cell.method.name)(cell.method.config()),
                QuantConfig.from_bits(cell.bits),
                dataclasses.replace(ctx.calibration, seed=cell.seed), model_id=cell.model)

        # calibration on rank 0 only; the other ranks receive the quantized model
        result = self.world.from_main(quantize)
        result.model.to(self.device)
        out.model, out.hook, out.report = result.model, result.sampler_hook, result.report
        out.metrics.update({k: float(v) for k, v in result.stats.items()})
        out.diagnostics = {name: pd.DataFrame(records)
                           for name, records in result.diagnostics.items() if records}
        save_quantized(result, state_dir, ctx.pipe)

    def _sample_step(self, out: CellOutcome) -> None:
        """Peak memory so far, the cell's images and their throughput, the model's size;
        the FP images of the seed, which paired metrics compare against."""
        cell, ctx, metrics = out.cell, self.model(out.cell.model), out.metrics
        # the device actually used (cuda:1 included); on the CPU, the process's peak RSS
        metrics["peak_memory_mb"] = (
            torch.cuda.max_memory_allocated(self.device) / 2**20
            if torch.device(self.device).type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out.images, seconds = self._sample(ctx, out.model, cell.seed, out.hook)
        metrics["images_per_second"] = self.bench.eval.num_images / seconds
        metrics["model_size_mb"] = _model_size_mb(ctx.pipe.denoiser, out.report)
        if cell.method.name == FP:
            ctx._fp_images[cell.seed] = out.images
        elif (metrics_of_kind(self.bench.eval.metrics, "paired")
              and ctx._fp_images.get(cell.seed) is None):
            ctx._fp_images[cell.seed] = self._sample(ctx, ctx.pipe.denoiser, cell.seed, None)[0]

    def _score_step(self, out: CellOutcome) -> None:
        """Every requested metric, by its kind (:mod:`gaq.eval.registry`)."""
        from gaq.sampling import to_uint8

        cell, ctx, metrics, images = out.cell, self.model(out.cell.model), out.metrics, out.images
        wanted = self.bench.eval.metrics
        image_keys = metrics_of_kind(wanted, "image")
        if image_keys:
            metrics.update(compute_grouped(image_keys, to_uint8(images), ctx.reference(),
                                           ctx.space, seed=cell.seed))
        paired_keys = metrics_of_kind(wanted, "paired")
        if cell.method.name != FP and paired_keys:
            out.per_image = self._paired(paired_keys, images, ctx._fp_images[cell.seed],
                                         metrics)
        if metrics_of_kind(wanted, "classes") and ctx.judges_classes:
            metrics["class_acc"] = self.class_accuracy(ctx, images)
        if metrics_of_kind(wanted, "curve") and self.bench.eval.heldout_trajectories > 0:
            out.curves, out.per_trajectory = self._noise_curves(ctx, out.model, cell.seed,
                                                                 out.hook)
            for name, curve in out.curves.items():
                if name.startswith("eps_mse"):
                    metrics[name] = float(curve.mean())
                else:  # a slope k_t: its mean and the step farthest from 0
                    metrics[f"{name}_mean"] = float(curve.mean())
                    metrics[f"{name}_max_abs"] = float(curve.abs().max())

    def _persist_step(self, out: CellOutcome, state_dir: Path) -> dict[str, float]:
        """The sample grid, the MLflow run (with the state files as artifacts), then the
        Parquet rows; returns the headline metrics it logged."""
        from gaq.bench import results
        from gaq.bench.tracking import log_run

        cell, cid, ctx, metrics = out.cell, out.cid, self.model(out.cell.model), out.metrics
        stem = _file_name(f"{ctx.pipe.name}_{cell.method.row}_{cell.bits}_seed{cell.seed}")
        grid_path = self.dir / "grids" / f"{stem}.png"
        _save_grid(out.images[:64], grid_path)
        artifacts = {"samples": grid_path}  # the noise curves go as curves/*.csv and *.png
        for f in state_dir.iterdir():
            artifacts[f"state/{f.name}"] = f

        w_bits, a_bits = _bits(cell.bits)
        run_id = log_run(f"gaq-{self.bench.name}", _run_name(cell),
                         self._params(cell, ctx), metrics, self._tags(cell, cid, ctx), artifacts,
                         {f"{name}_by_timestep": list(curve.items())
                          for name, curve in out.curves.items()},
                         start_time=out.started, parent=self.sweep_run)
        setup = _setup_label(self.device, ctx.pipe.dtype, self.world.size)
        base = _cell_keys(cell, cid, run_id, self.bench.name) | {
            "w_bits": w_bits, "a_bits": a_bits, "setup": setup}
        # the columns that tie a curve or diagnostic row to its cell; the metric rows go
        # last: they mark the cell done, so a cell killed before them is re-run, and the
        # rerun's rows replace what the killed attempt appended (same cell id)
        keys = ("run_id", "cell_id", "benchmark", "model", "method", "bits", "seed")
        tables = dict(out.diagnostics)
        if out.per_image is not None:
            tables["per_image"] = out.per_image
        if out.per_trajectory is not None and cell.method.name != FP:
            tables["per_trajectory"] = out.per_trajectory
        for name, frame in tables.items():
            for k in reversed(keys):
                frame.insert(0, k, base[k])
            results.append(self.dir / f"{name}.parquet", frame)
        if out.curves:
            crow = [{k: base[k] for k in keys}
                    | {"curve": name, "timestep": int(t), "value": float(v)}
                    for name, curve in out.curves.items() for t, v in curve.items()]
            results.append(self.curves_path, pd.DataFrame(crow))
        rows = [base | {"metric": k, "value": float(v)} for k, v in metrics.items()]
        results.append(self.metrics_path, pd.DataFrame(rows))
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("fid", "kid", "psnr", "eps_mse", "calibration_seconds")}
        self.log(f"    {shown}")
        return shown


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


def skip_reason(cid: str, done: set[str], failed: set[str]) -> str | None:
    """Why a sweep skips cell ``cid`` (see :meth:`Runner.earlier`), or None to run it."""
    if cid in done:
        return "done earlier, skipped"
    if cid in failed:
        return "failed earlier, skipped (--retry-failed runs it again)"
    return None


def _cell_keys(cell: Cell, cid: str, run_id: str, benchmark: str) -> dict:
    """The columns that identify a cell's rows in every results table."""
    return {"run_id": run_id, "cell_id": cid, "benchmark": benchmark, "model": cell.model,
            "method": cell.method.row, "preset": cell.method.preset, "bits": cell.bits,
            "seed": cell.seed}


def _run_name(cell: Cell) -> str:
    """A cell's MLflow run name: the row's label first (the UI cuts long names at the
    right, and GAQ's variants differ only in their label's end), then model, bit-width
    and seed (one experiment holds every model of a benchmark)."""
    return f"{labels.method_label(cell.method.row)} · {cell.model} {cell.bits} s{cell.seed}"


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _engine(engine: str, world_size: int) -> str:
    return "torchrun" if world_size > 1 else engine


def _method_code(name: str) -> dict[str, str] | None:
    from gaq.bench.provenance import method_code
    from gaq.bench.spec import FP
    from gaq.registry import get_method

    return None if name == FP else method_code(get_method(name))


def _setup_label(device: str, dtype: torch.dtype, world_size: int) -> str:
    """The setup a row was measured on, for tables and plots to pivot on: device type and
    GPU model, world size, dtype and engine (e.g. ``cpu x1 float32 local``)."""
    dev = torch.device(device)
    name = dev.type
    if dev.type == "cuda":
        name += f" {torch.cuda.get_device_name(dev)}"
    dtype_name = str(dtype).replace("torch.", "")
    # a Ray task runs its cell exactly as the local engine does (identical results at the
    # same thread count), so its rows pivot with the local ones; the run's tags name Ray
    return f"{name} x{world_size} {dtype_name} {_engine('local', world_size)}"


def _file_name(text: str) -> str:
    """A name that stays one file inside its folder: model ids may be paths or hub ids."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text).lstrip(".") or "_"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _model_size_mb(model: torch.nn.Module, report) -> float:
    """Storage of the denoiser: quantized weights at their bit-width, everything else fp32."""
    bits = {d.name: d.weight_bits for d in report or [] if d.weight_bits is not None}
    total = 0
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        total += p.numel() * (bits[layer] if name.endswith(".weight") and layer in bits else 32)
    return total / 8 / 2**20


def _save_grid(images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, int(len(images) ** 0.5))
    big = torch.nn.functional.interpolate((images + 1) / 2, scale_factor=2, mode="nearest")
    save_image(big, str(path), nrow=n, padding=1, pad_value=1.0)
