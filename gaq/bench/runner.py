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
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

import gaq

# the data a sweep is made of, re-exported where it was first defined
from gaq.bench.context import Cell, CellOutcome, cells
from gaq.bench.context import ModelContext as _ModelContext
from gaq.bench.diskspace import SpaceNeeded, check_free_space, space_needed
from gaq.bench.persistence import CellPersistence, _engine, _method_code
from gaq.bench.scoring import CellScoring
from gaq.bench.spec import FP, Benchmark
from gaq.config import QuantConfig, fingerprint
from gaq.errors import DivergedError, GaqError
from gaq.eval.registry import metrics_of_kind
from gaq.tempdirs import make_temp_dir, remove_dead_temp_dirs

if TYPE_CHECKING:
    from gaq.models.pipeline import Pipeline

RESULTS_FORMAT = 2  # 2: eps_mse after the sampler hook; noise_k curves


class Runner(CellScoring, CellPersistence):
    """A benchmark sweep: the cells' identity, preflight, claims, the MLflow sweep and the
    four steps of a cell (quantize here; sample and score in :mod:`gaq.bench.scoring`;
    persist in :mod:`gaq.bench.persistence`)."""

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

        check_free_space(self)  # first: it writes nothing
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
        """Bytes the sweep writes, per place (:func:`gaq.bench.diskspace.space_needed`)."""
        return space_needed(self)

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

def skip_reason(cid: str, done: set[str], failed: set[str]) -> str | None:
    """Why a sweep skips cell ``cid`` (see :meth:`Runner.earlier`), or None to run it."""
    if cid in done:
        return "done earlier, skipped"
    if cid in failed:
        return "failed earlier, skipped (--retry-failed runs it again)"
    return None
