"""A cell's sample and score steps (the runner's): its images, from the same noise as
FP's, and every metric the benchmark asks for, by kind (:mod:`gaq.eval.registry`)."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

import pandas as pd
import torch

from gaq.bench.context import CellOutcome
from gaq.bench.context import ModelContext as _ModelContext
from gaq.bench.persistence import _model_size_mb
from gaq.bench.spec import FP
from gaq.errors import DivergedError
from gaq.eval.registry import by_function, compute_grouped, metrics_of_kind

if TYPE_CHECKING:
    from gaq.bench.spec import Benchmark

__all__ = ["HELDOUT_SEED_OFFSET", "CellScoring"]

HELDOUT_SEED_OFFSET = 10_000  # held-out trajectories never share noise with calibration


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class CellScoring:
    """The runner's sampling and scoring (mixed into :class:`gaq.bench.runner.Runner`,
    whose ``bench``, ``world``, ``device`` and ``model()`` it reads)."""

    bench: Benchmark

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
            spec = CalibrationSpec.for_sampler(
                ctx.sampler.config(), interval=1,
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
