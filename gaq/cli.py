"""The ``gaq`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gaq.errors import GaqError, one_line

if TYPE_CHECKING:
    from gaq.bench.spec import EvalSpec

RESULTS = Path("results")  # the committed reference
WORKING = Path("runs")  # what benchmark runs write


def _train_default(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from gaq.models import train
    from gaq.models.bundled import BUNDLED_MODELS, CLASSIFIER_DIR

    log_dir = Path(args.results) / "bundled"
    if args.family != "digits":
        from gaq.models.train_latent import train_latent_default

        out = train_latent_default(args.family, log_dir=log_dir, seed=args.seed,
                                   steps=args.steps)
        print(f"{args.family} pipeline -> {out}; logs and samples -> {log_dir}")
        return
    if args.only in (None, "classifier"):
        cfg = replace(train.ClassifierTrainConfig(), seed=args.seed)
        metrics = train.train_classifier(CLASSIFIER_DIR, cfg, log_dir / "train_classifier.jsonl")
        print(f"classifier: held-out accuracy {metrics['accuracy']:.4f}, "
              f"confident (p>=0.8) share {metrics['confident_share']:.4f} -> {CLASSIFIER_DIR}")
    if args.only in (None, "unet"):
        ucfg = train.UNetTrainConfig(seed=args.seed)
        if args.steps is not None:
            ucfg = replace(ucfg, steps=args.steps)
        out = train.train_unet(BUNDLED_MODELS["digits"], ucfg, log_dir / "train_unet.jsonl")
        train.save_sample_grid(out, log_dir / "samples_64.png")
        print(f"diffusion model -> {out}; samples -> {log_dir / 'samples_64.png'}")


def _convert_ldm(args: argparse.Namespace) -> None:
    from gaq.models.convert_ldm import convert_ldm

    out = convert_ldm(args.checkpoint, args.out, preset=args.preset, config=args.config,
                      ema=args.ema)
    print(f"converted: {out} (load it as a model: models = [\"{out}\"])")


def _fetch(args: argparse.Namespace) -> None:
    from gaq.models.loading import fetch

    print(fetch(args.model))


def _pipeline_and_sampler(args: argparse.Namespace):
    """The model on ``--device`` and the sampler the flags describe (checked first)."""
    from gaq.device import check_device
    from gaq.models.loading import load_model
    from gaq.sampling import SamplerConfig

    device = check_device(args.device)
    sampler = SamplerConfig(steps=args.steps, eta=args.eta, guidance=args.guidance,
                            name=args.sampler)
    prompts = None
    if args.prompts:
        from gaq.bench.spec import SamplerSpec

        prompts = SamplerSpec(prompts=args.prompts).prompt_list()
    pipe = load_model(args.model, device=device, prompts=prompts)
    if sampler.guidance is not None and not pipe.conditioning.supports_guidance:
        raise GaqError(f"--guidance: model {args.model!r} has {pipe.conditioning.kind!r} "
                       "conditioning with no unconditional input; leave --guidance out")
    return pipe, sampler


# the sampler flags' defaults; with --state, a flag left out takes the state's calibration
# sampler instead (_fill_sampler_flags)
_SAMPLER_DEFAULTS: dict[str, object] = {"sampler": "ddim", "steps": 50, "eta": 0.0,
                                        "guidance": None}
# the sampler flags and the calibration spec's keys (state.json: meta.calibration)
_CALIBRATION_KEYS = {"sampler": "sampler_name", "steps": "steps", "eta": "eta",
                     "guidance": "guidance"}


def _fill_sampler_flags(args: argparse.Namespace, meta: dict | None) -> None:
    """The sampler flags left out (None): the sampler a state was calibrated with when
    there is one (``meta``: its state.json meta), else the usual defaults. A state samples
    as it was calibrated unless told otherwise: its activation ranges were fitted on that
    sampler's timesteps, and PTQD's correction refuses any other sampler."""
    calibration = (meta or {}).get("calibration")
    recorded = calibration if isinstance(calibration, dict) else {}
    for flag, key in _CALIBRATION_KEYS.items():
        if getattr(args, flag) is None:
            value = recorded.get(key)
            setattr(args, flag, _SAMPLER_DEFAULTS[flag] if value is None else value)


def _state_and_model(args: argparse.Namespace) -> dict:
    """With ``--state``: its meta, read first (a bad folder fails before any model loads),
    and ``args.model`` set to the model to restore it on; without, the default model."""
    from gaq.cell import read_state_meta, state_model

    if args.state is None:
        args.model = args.model or "digits"
        return {}
    meta = read_state_meta(args.state)
    args.model = state_model(args.state, meta, args.model)
    return meta


def _sample(args: argparse.Namespace) -> None:
    import torch
    from torchvision.utils import save_image

    from gaq.outputs import check_output_file
    from gaq.sampling import sample

    if args.num < 1:
        raise GaqError(f"--num must be a positive number of images, got {args.num}")
    check_output_file(args.out, "--out")  # before sampling, not after
    meta = _state_and_model(args)
    _fill_sampler_flags(args, meta)
    pipe, sampler = _pipeline_and_sampler(args)
    hook = denoiser = restored = None  # the FP model
    if args.state is not None:
        from gaq.cell import load_quantized

        restored = load_quantized(args.state, pipe, args.model, meta)
        hook, denoiser = restored.sampler_hook, restored.model
    # the same seeds and batches with or without --state: image i of both comes from the
    # same noise, so FP and quantized grids compare image by image
    images = sample(pipe, args.num, seed=args.seed, sampler=sampler,
                    batch_size=args.batch_size, progress=True, hook=hook, denoiser=denoiser)
    bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
    if bad:  # would save as black squares with exit 0
        what = "" if args.state is None else f" quantized by {args.state}"
        raise GaqError(f"model {args.model}{what}: {bad} of {len(images)} samples are not "
                       "finite (NaN or inf); check the model's weights (nothing was written)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(out), nrow=int(args.num**0.5) or 1)
    report: dict = {"model": args.model, "images": len(images), "out": str(out),
                    "sampler": sampler.name, "steps": sampler.steps,
                    "guidance": sampler.guidance}
    if restored is not None:
        report.update({"state": str(args.state), "method": meta.get("method"),
                       "bits": restored.quant.label})
    from gaq.models.bundled import scoring_for

    if scoring_for(args.model).judges_classes:  # the digit classifier reads its samples
        import torch

        from gaq.eval.digits import digit_likeness

        cond = pipe.conditioning
        labels = (cond.label_of(torch.arange(len(images), device="cpu"))
                  if cond.kind == "class" else None)
        report.update(digit_likeness(images, labels=labels))
    print(json.dumps(report))


# the flag of each EvalSpec field gaq evaluate sets, for its errors
_EVAL_FLAGS = {"num_images": "--num-images", "batch_size": "--batch-size",
               "seeds": "--seed", "metrics": "--metrics",
               "heldout_trajectories": "--heldout-trajectories",
               "feature_space": "--feature-space", "reference": "--reference"}


def _evaluation(args: argparse.Namespace) -> EvalSpec:
    """The evaluation settings the flags give (a benchmark's ``[eval]``, one seed), checked
    before any model loads. Left out, --metrics is a benchmark's default set, without the
    image metrics (FID...) for a model that has no reference images to score them on."""
    from gaq.bench.spec import EvalSpec
    from gaq.config import ConfigError
    from gaq.eval.registry import metrics_of_kind
    from gaq.models.bundled import scoring_for

    has_reference = (scoring_for(args.model).reference is not None
                     or args.reference is not None)
    if args.metrics is not None:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    else:
        default = EvalSpec().metrics
        metrics = tuple(m for m in default
                        if has_reference or m not in metrics_of_kind(default, "image"))
    try:
        evaluation = EvalSpec(num_images=args.num_images, batch_size=args.batch_size,
                              seeds=(args.seed,), metrics=metrics,
                              heldout_trajectories=args.heldout_trajectories,
                              feature_space=args.feature_space, reference=args.reference)
    except ConfigError as e:
        flag = _EVAL_FLAGS.get(e.path[0], e.path[0]) if e.path else "evaluate"
        raise GaqError(f"{flag} {e.reason}") from None
    image = metrics_of_kind(metrics, "image")
    if image and not has_reference:
        raise GaqError(f"--metrics {','.join(image)}: model {args.model!r} has no bundled "
                       "reference images; pass --reference FOLDER (real images), or leave "
                       "the image metrics out (e.g. --metrics psnr,eps_mse)")
    if args.reference is not None and not Path(args.reference).is_dir():
        raise GaqError(f"--reference {args.reference} is not a folder; pass a folder of "
                       "real images")
    return evaluation


def _evaluate(args: argparse.Namespace) -> None:
    from gaq.bench.spec import SamplerSpec
    from gaq.cell import evaluate_state
    from gaq.models.bundled import scoring_for
    from gaq.outputs import check_output_file

    if args.out is not None:
        check_output_file(args.out, "--out")  # before the minutes of sampling
    meta = _state_and_model(args)
    _fill_sampler_flags(args, meta)
    evaluation = _evaluation(args)
    pipe, sampler = _pipeline_and_sampler(args)
    if "class_acc" in evaluation.metrics and not (scoring_for(args.model).judges_classes
                                                  and pipe.conditioning.kind == "class"):
        raise GaqError("--metrics class_acc needs a bundled class-conditional model "
                       f"(digits-ldm, digits-dit), not {args.model!r}; leave it out")
    spec = SamplerSpec(steps=sampler.steps, eta=sampler.eta, guidance=sampler.guidance,
                       name=sampler.name, prompts=args.prompts)
    summary = evaluate_state(args.state, pipe, args.model, meta, sampler=spec,
                             evaluation=evaluation, seed=args.seed)
    text = json.dumps(summary, indent=1)
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def _methods(args: argparse.Namespace) -> None:
    from gaq.registry import get_method, usable_methods

    names, problems = usable_methods(preset=None)
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    for name in names:
        cls = get_method(name)
        # the class's own summary line, else its module's
        own = cls.__dict__.get("__doc__")
        text = own.strip().splitlines()[0] if own else sys.modules[cls.__module__].__doc__
        doc = " ".join((text or "").split()).split(": ")[0]
        print(f"{name:14s} presets: {', '.join(sorted(cls.presets)) or '-':14s} {doc}")


def _quantize(args: argparse.Namespace) -> None:
    from gaq.calibration import CalibrationSpec
    from gaq.cell import WEIGHTS_DIGEST, quantize_pipeline, save_quantized
    from gaq.config import QuantConfig
    from gaq.identity import state_dict_digest
    from gaq.outputs import check_output_folder, output_folder
    from gaq.registry import get_method

    # the output folder is checked before the minutes of calibration, and written whole
    out_flags = {"what": "quantization state", "marker": "state.json",
                 "overwrite": args.overwrite}
    check_output_folder(args.out, "--out", **out_flags)
    method = get_method(args.method).from_preset(args.preset)
    quant = QuantConfig.from_bits(args.bits)
    model, sampler = _pipeline_and_sampler(args)
    holdout = args.holdout_per_step
    if holdout is None:  # GAQ's validation set: 5 % of the training rows per timestep
        holdout = math.ceil(0.05 * args.samples_per_step)
    spec = CalibrationSpec.for_sampler(sampler, interval=args.interval,
                                       samples_per_step=args.samples_per_step, seed=args.seed,
                                       holdout_per_step=holdout)
    # the FP weights the state is made from, so `gaq sample --state` and `gaq evaluate`
    # can tell this model from another with the same layers
    digest = state_dict_digest(model.denoiser)
    result = quantize_pipeline(model, method, quant, spec, model_id=args.model, progress=True)
    with output_folder(args.out, "--out", **out_flags) as tmp:
        save_quantized(result, tmp, model, meta={"model": args.model,
                                                 WEIGHTS_DIGEST: digest,
                                                 "calibration": spec.to_dict(),
                                                 "stats": result.stats})
    print(json.dumps({"out": str(args.out), "layers": result.report.counts(),
                      **result.stats}))


def _perf(args: argparse.Namespace) -> None:
    if args.attention_memory:
        from gaq.attention_memory import run as attention_memory
        from gaq.device import check_device

        batches = tuple(_int_list("--attention-memory", args.attention_memory))
        if min(batches) < 1:
            raise GaqError(f"--attention-memory: batch sizes must be positive, got "
                           f"{args.attention_memory!r}")
        rows = attention_memory(batches, device=str(check_device(args.device)),
                                out_dir=args.out)
        print(json.dumps({f"{r['batch']}/{way}": round(r[way]["quantize"]["peak_mb"])
                          for r in rows for way in ("whole", "sliced")}))
        return
    if args.block_memory:
        from gaq.block_memory import run as block_memory
        from gaq.device import check_device

        row = block_memory(args.block_memory, device=str(check_device(args.device)),
                           out_dir=args.out, block=args.block)
        print(json.dumps({"block": row["block"], "variants": len(row["variants"])}))
        return
    if args.paper_memory:
        from gaq.device import check_device
        from gaq.paper_memory import run as paper_memory

        rows = _int_list("--rows", args.rows)
        device = str(check_device(args.device))
        runs = paper_memory(args.paper_memory, rows, device=device, out_dir=args.out)
        print(json.dumps({f"{r['trajectories']}": r["status"] for r in runs}))
        return
    if args.paper_cells:
        from gaq.device import check_device
        from gaq.paper_cells import BUDGETS, run_cells

        device = str(check_device(args.device))
        methods = args.methods.split(",") if args.methods else None
        if args.budget not in BUDGETS:
            raise GaqError(f"--budget: {args.budget!r} is not a profile; profiles: "
                           + ", ".join(BUDGETS))
        rows = run_cells(args.paper_cells.split(","), methods, device=device, out_dir=args.out,
                         budget=BUDGETS[args.budget])
        print(json.dumps({f"{r['arch']}/{r['method']}": r["status"] for r in rows}))
        return
    if args.paper_scale:
        from gaq.device import check_device
        from gaq.perf_paper import ARCHITECTURES, paper_scale, write_report
        from gaq.registry import get_method

        if args.paper_scale not in ARCHITECTURES:
            raise GaqError(f"--paper-scale: unknown architecture {args.paper_scale!r}; choose "
                           f"one of {', '.join(ARCHITECTURES)}")
        methods = tuple(args.methods.split(",")) if args.methods else ("rtn", "qdiffusion",
                                                                       "tfmq", "gaq")
        if methods == ("all",):  # every registered method defined for this architecture
            from gaq.paper_cells import adapter_arch
            from gaq.registry import usable_methods

            arch_name = adapter_arch(args.paper_scale)
            methods = tuple(m for m in usable_methods("paper")[0]
                            if not get_method(m).unsupported(arch_name))
        for m in methods:  # before minutes of measuring; names the close matches
            get_method(m)
        if args.batch < 1:
            raise GaqError(f"--batch must be a positive integer, got {args.batch}")
        device = str(check_device(args.device))
        report = paper_scale(args.paper_scale, methods, device=device, batch=args.batch)
        for path in write_report(report, args.out):
            print(path)
        return
    from gaq.perf import check_sections, run

    sections = check_sections(args.only.split(",") if args.only else None)
    print(json.dumps(run(args.out, sections), indent=2))


def _gpu_check(args: argparse.Namespace) -> None:
    from gaq.gpu_check import run

    sections = args.only.split(",") if args.only else None
    summary = run(args.device, args.out, sections, results=args.results)
    print(json.dumps({k: v["status"] for k, v in summary["sections"].items()}))


def _benchmark_path(name: str) -> Path:
    """A file path, or the name of a shipped benchmark (``w4a8`` -> benchmarks/w4a8.toml)."""
    path = Path(name)
    # a path as given (a folder included: load_benchmark says what it is) unless it is a
    # bare name that only a shipped benchmark has
    if path.suffix == ".toml" or path.exists() or len(path.parts) > 1:
        return path
    return Path("benchmarks") / f"{name}.toml"


def _bench(args: argparse.Namespace) -> int | None:
    from gaq.bench.runner import Runner
    from gaq.bench.spec import load_benchmark, with_overrides
    from gaq.config import ConfigError

    bench = load_benchmark(_benchmark_path(args.file))
    seeds = _int_list("--seeds", args.seeds) if args.seeds else None
    methods = args.methods.split(",") if args.methods else None
    try:
        bench = with_overrides(bench, num_images=args.num_images, seeds=seeds, methods=methods)
    except ConfigError as e:  # the flag, not the file, holds the bad value
        flag = {"seeds": "--seeds", "num_images": "--num-images"}.get(".".join(e.path), "")
        raise GaqError(f"{flag or 'flags'}: {e.reason}") from None
    runner = Runner(bench, args.results, force=args.force, retry_failed=args.retry_failed,
                    device=args.device)
    # the flags win over the file's [setup]
    engine = args.engine or bench.setup.get("engine", "local")
    threads = args.threads or bench.setup.get("threads")
    if args.threads is not None and args.threads < 1:
        raise GaqError(f"--threads must be a positive integer, got {args.threads}")
    import time

    from gaq.bench.engines import get_engine

    runner_engine = get_engine(engine)
    runner_engine.check(args.address)  # before any work
    started = time.perf_counter()
    runner_engine.run(runner, threads=threads, address=args.address)
    print(f"results: {Path(args.results) / bench.name}; tables: {Path(args.results) / 'tables'}")
    reproduced = _against_reference(args, runner, time.perf_counter() - started)
    if runner.failures:  # after the tables and the report, which show them as failed
        names = "; ".join(label for label, _ in runner.failures)
        raise GaqError(f"{len(runner.failures)} cell(s) failed and were recorded as failed in "
                       f"{Path(args.results) / bench.name / 'failures.parquet'} ({names}); "
                       "the others ran. After a fix, --retry-failed runs them again")
    if reproduced is False and not args.report_only:
        return 1  # the verdict line, printed last, says why
    return None


def _against_reference(args: argparse.Namespace, runner,
                       wall_seconds: float | None = None) -> bool | None:
    """Compare the run with the committed reference, ending with the verdict line (the last
    line printed), and with --update-reference make the run the reference. Returns whether
    it reproduced; None when there was nothing to compare."""
    from gaq.bench import reproduce, results, verdict

    if runner.world is not None and not runner.world.main:
        return None  # under torchrun, rank 0 reports
    name = runner.bench.name
    run_dir, ref_root = Path(args.results) / name, Path(args.reference)
    ref_dir = ref_root / name
    if run_dir.resolve() == ref_dir.resolve():
        print("this run wrote into the reference itself; nothing to compare against")
        return None
    if args.update_reference:
        floor = reproduce.kept_floor(runner.metrics_path, ref_dir)
        if floor is not None:
            # FP's cells are the reference's own, so its spread at other seeds is too
            print(f"keeping the noise floor of {ref_dir}: FP's cells did not change")
        else:
            seeds = [max(runner.bench.eval.seeds) + 1 + i
                     for i in range(reproduce.FLOOR_SEEDS)]
            print(f"measuring the noise floor: FP at seeds {seeds[0]}..{seeds[-1]} per model")
            floor = reproduce.noise_floor(runner, seeds)
        reproduce.update_reference(run_dir, ref_dir, floor)
        runner.write_reports(ref_root)
        print(f"reference updated: {ref_dir} (tables and plots under {ref_root})")
        if verdict.read_tolerance(ref_dir) is None:
            print(f"{ref_dir} has no measured numerical tolerance: later runs are judged at "
                  f"{verdict.MIN_REL:g} relative until `gaq tolerance` measures one")
        return None
    reference = reproduce.reference_metrics(ref_dir)
    if reference.empty:
        print(f"no reference under {ref_dir}: nothing to compare against (make this run the "
              "reference with --update-reference)")
        return None
    tolerance = verdict.read_tolerance(ref_dir)
    run_metrics = results.read(runner.metrics_path)
    table = reproduce.compare(run_metrics, reference, tolerance)
    anchor, key = runner.bench.anchor, runner.bench.model_key or None
    checks = verdict.check_conclusions(verdict.conclusions(ref_dir, anchor, key),
                                       verdict.conclusions(run_dir, anchor, key))
    ok, line = verdict.verdict(table, checks)
    out = Path(args.results) / "tables" / f"{name}_reproduction.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(reproduce.report(table, name, ref_dir, checks, tolerance, line),
                   encoding="utf-8")
    # the same verdict for machines: what README sections quote (with the run's wall time)
    computed = None
    if wall_seconds is not None and "timestamp" in run_metrics and len(run_metrics):
        import pandas as pd

        since = pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=wall_seconds)
        computed = int(run_metrics.loc[run_metrics["timestamp"] >= since, "cell_id"].nunique())
    record = verdict.record(table, checks, ok, line, wall_seconds,
                            engine=args.engine or runner.bench.setup.get("engine", "local"),
                            threads=args.threads or runner.bench.setup.get("threads"))
    record["computed_cells"] = computed  # the others were in --results already
    # the machine's 1-minute load at the end: a wall time taken beside other work says so
    record["load_avg_1min"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n",
                                        encoding="utf-8")
    print(f"{reproduce.summary(table)}; details: {out}")
    if tolerance is None:
        print(f"{ref_dir} has no measured numerical tolerance: judged at "
              f"{verdict.MIN_REL:g} relative")
    print(line)
    return ok


def _tolerance(args: argparse.Namespace) -> None:
    """Rerun a benchmark's cells under each condition a user's machine varies (each into
    its own folder under --runs, skipped when it already finished there), then derive
    every metric's numerical tolerance from the changes against the reference."""
    import os
    import subprocess

    from gaq.bench import reproduce, results, verdict
    from gaq.bench.spec import load_benchmark

    path = _benchmark_path(args.file)
    name = load_benchmark(path).name
    ref_dir = Path(args.reference) / name
    reference = reproduce.reference_metrics(ref_dir)
    if reference.empty:
        raise GaqError(f"no reference under {ref_dir}: make one with --update-reference first")
    labels = args.conditions.split(",") if args.conditions else list(verdict.CONDITIONS)
    for label in labels:
        if label not in verdict.CONDITIONS:
            raise GaqError(f"--conditions: unknown condition {label!r}; choose from "
                           f"{', '.join(verdict.CONDITIONS)}")
    if args.margin <= 0:
        raise GaqError(f"--margin must be positive, got {args.margin}")
    runs, commands = {}, {}
    for label in labels:
        cmd, env = verdict.condition_command(str(path), label, Path(args.runs))
        if args.methods:  # a subset of rows: cheaper, and the tolerance says which
            cmd += ["--methods", args.methods]
        simd = env.get("ATEN_CPU_CAPABILITY")
        commands[label] = (f"ATEN_CPU_CAPABILITY={simd} " if simd else "") + " ".join(cmd)
        if not args.derive_only:
            print(f"condition {label}: {commands[label]}", flush=True)
            # through the `gaq` script where there is one, so that the process list shows
            # a `gaq bench` running (what anyone sharing the machine looks for)
            script = Path(sys.executable).with_name("gaq")
            argv = ([sys.executable, str(script)] if script.exists()
                    else [sys.executable, "-m", "gaq.cli"])
            done = subprocess.run([*argv, *cmd[1:]], env={**os.environ, **env}, check=False)
            if done.returncode not in (0, 1):  # 1: not reproduced, which is what is measured
                raise GaqError(f"condition {label}: gaq bench exited {done.returncode}")
        runs[label] = results.read(Path(args.runs) / label / name / "metrics.parquet")
        if runs[label].empty:
            raise GaqError(f"condition {label}: no results under {Path(args.runs) / label}")
    rows = f"the rows {args.methods} (and FP) of" if args.methods else "the cells of"
    # what each condition's folder holds: a condition rerun for fewer rows (an earlier,
    # cheaper measurement) says so here rather than passing for the whole grid
    held = ", ".join(f"{label} {runs[label]['cell_id'].nunique()}" for label in labels)
    how = (f"{rows} {name} rerun from scratch under each condition (its own "
           f"calibration cache; cells per condition: {held} of the reference's "
           f"{reference['cell_id'].nunique()}), on {verdict.machine()}; the reference ran "
           "with the benchmark file's engine and threads at the default SIMD path")
    tol = verdict.derive_tolerance(reference, runs, args.margin, how, commands)
    written = verdict.write_tolerance(ref_dir, tol)
    md = verdict.tolerance_markdown(tol, name)
    table = Path(args.reference) / "tables" / f"{name}_tolerance.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(md, encoding="utf-8")
    print(md)
    print(f"tolerance: {written}; table: {table}")


def _readme(args: argparse.Namespace) -> int | None:
    from gaq import readme

    pages = [Path(p) for p in args.pages] if args.pages else readme.pages()
    results = Path(args.results)
    if args.check:
        problems = readme.check_pages(pages, results)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(pages)} page(s) against {args.results}: "
              f"{len(problems)} problem(s)" if problems else
              f"{len(pages)} page(s): generated sections as their sources give, every "
              "number sourced")
        return 1 if problems else None
    for path in pages:
        text = path.read_text(encoding="utf-8")
        new = readme.update(text, results)
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: generated sections {'rewritten' if new != text else 'unchanged'}")
    return None


def _fid_spread(args: argparse.Namespace) -> None:
    import time

    from gaq.bench.fid_spread import measure_fid_spread, write_fid_spread
    from gaq.bench.runner import Runner
    from gaq.bench.spec import load_benchmark

    bench = load_benchmark(_benchmark_path(args.file))
    model = args.model or bench.models[0]
    if model not in bench.models:
        raise GaqError(f"--model {model!r} is not a model of {bench.name} "
                       f"({', '.join(bench.models)})")
    sizes = _int_list("--sizes", args.sizes)
    if args.images < max(sizes):
        raise GaqError(f"--images {args.images} is smaller than the largest set "
                       f"({max(sizes)}): raise --images or drop that size")
    from gaq.tempdirs import temp_dir

    with temp_dir("spread") as tmp:
        runner = Runner(bench, tmp)
        start = time.perf_counter()
        df = measure_fid_spread(runner, model, sizes, args.images)
        md = write_fid_spread(df, Path(args.out), bench.name, time.perf_counter() - start)
    print(md.read_text(encoding="utf-8"))


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise GaqError(f"{flag}: {text!r} is not a comma-separated list of integers, e.g. "
                       f"{flag} 0,1,2") from None


def _judge(args: argparse.Namespace) -> None:
    from gaq.eval.judges import run_judges, write_judges

    if args.num < 1 or args.steps < 1:
        raise GaqError("--num and --steps must be positive integers")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result = run_judges(models, num_images=args.num, steps=args.steps, guidance=args.guidance,
                        seed=args.seed)
    for path in write_judges(result, args.out):
        print(path)
    print(f"wall time {result['wall_s']:.1f} s")


def _tune_gaq(args: argparse.Namespace) -> None:
    from gaq.device import check_device
    from gaq.gaq_tuning import StudyConfig, run_study, write
    from gaq.outputs import check_output_folder, output_folder

    out = Path(args.out)
    if args.render_only:  # the table and plot again from the stored rows
        record_file = out / "study.json"
        if not record_file.is_file():
            raise GaqError(f"--render-only: no {record_file}; run `gaq tune-gaq` first")
        for path in write(json.loads(record_file.read_text()), out):
            print(path)
        return
    seeds = tuple(_int_list("--seeds", args.seeds))
    if args.blocks < 1 or args.weight_iters < 1 or not seeds:
        raise GaqError("--blocks and --weight-iters must be positive and --seeds non-empty")
    flags = {"what": "tuning study", "marker": "study.json", "overwrite": args.overwrite}
    check_output_folder(out, "--out", **flags)  # before the study's minutes, not after
    cfg = StudyConfig(model=args.model, blocks=args.blocks, seeds=seeds,
                      weight_iters=args.weight_iters)
    record = run_study(cfg, device=str(check_device(args.device)),
                       log=lambda m: print(m, flush=True))
    with output_folder(out, "--out", **flags) as tmp:
        write(record, tmp)
    print(f"{out}: study.json, study.md, proxy_vs_heldout.png")


def _benchmarks_with_results(results: Path, name: str | None) -> list[str]:
    names = [name] if name else sorted(p.parent.name for p in results.glob("*/metrics.parquet"))
    if not names:
        raise GaqError(f"no results under {results}; run `gaq bench FILE` first")
    for n in names:
        if not (results / n / "metrics.parquet").is_file():
            raise GaqError(f"no results for benchmark {n!r} under {results}")
    return names


def _tables(args: argparse.Namespace) -> None:
    from gaq.bench.spec import report_settings
    from gaq.bench.tables import write_tables

    results = Path(args.results)
    # the benchmark file's published-rows key and paired-table anchor, as its run used them
    settings = report_settings(args.benchmarks)
    for name in _benchmarks_with_results(results, args.benchmark):
        for path in write_tables(results, name, results / "tables", **settings.get(name, {})):
            print(path)


def _plots(args: argparse.Namespace) -> None:
    from gaq.bench.plots import default_workers, write_plots
    from gaq.bench.spec import report_settings

    results = Path(args.results)
    if args.workers is not None and args.workers < 1:
        raise GaqError(f"--workers must be a positive integer, got {args.workers}")
    workers = args.workers or default_workers()
    # the benchmark file's feature space, which the figures' titles name
    settings = report_settings(args.benchmarks)
    for name in _benchmarks_with_results(results, args.benchmark):
        space = settings.get(name, {}).get("feature_space", "auto")
        for path in write_plots(results, name, results / "plots", workers=workers,
                                feature_space=space):
            print(path)


def _ls(args: argparse.Namespace) -> None:
    from gaq.bench import results as res

    print("benchmarks:")
    for path in sorted(Path(args.benchmarks).glob("*.toml")):
        print(f"  {path.stem:16s} {path}")
    print("results:")
    for path in sorted(Path(args.results).glob("*/metrics.parquet")):
        df = res.read(path)
        print(f"  {path.parent.name:16s} {df['cell_id'].nunique()} cells, "
              f"methods: {', '.join(sorted(df['method'].unique()))}")


def _sampler_flags(p: argparse.ArgumentParser, *, state: str | None = None) -> None:
    """The sampler flags. ``state``: the help's default with a state, a template of the
    plain default ("{} ..."); the flags left out then take the sampler the state was
    calibrated with, so they default to None here (filled in by _fill_sampler_flags)."""
    from gaq.sampling import SAMPLERS

    d = _SAMPLER_DEFAULTS if state is None else dict.fromkeys(_SAMPLER_DEFAULTS)

    def default(plain: str) -> str:
        return f"default: {plain if state is None else state.format(plain)}"

    p.add_argument("--sampler", default=d["sampler"], choices=sorted(SAMPLERS),
                   help=f"sampler ({default('ddim')})")
    p.add_argument("--steps", type=int, default=d["steps"],
                   help=f"sampler steps ({default('50')})")
    p.add_argument("--eta", type=float, default=d["eta"],
                   help=f"DDIM eta, 0: deterministic ({default('0')})")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale, conditional models ({default('off')})")
    p.add_argument("--prompts", help="text-conditional models: file of prompts, one per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gaq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-default", help="train a bundled model (and the classifier)",
                       description="Train a bundled model reproducibly from a seed, into the "
                       "package's weights folder: the pixel DDPM and the digit classifier "
                       "(digits), the latent diffusion model with its autoencoder (ldm), or "
                       "the DiT on the ldm autoencoder's latents (dit).")
    t.add_argument("--family", choices=("digits", "ldm", "dit"), default="digits",
                   help="which bundled model (default: digits)")
    t.add_argument("--only", choices=("unet", "classifier"),
                   help="digits: train just one of the two")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, help="diffusion training steps (default: the recipe's)")
    t.add_argument("--results", default=str(RESULTS), help="where logs and the sample grid go")
    t.set_defaults(func=_train_default)

    cv = sub.add_parser("convert-ldm", help="convert a CompVis LDM checkpoint to a pipeline "
                        "folder", description="Convert a CompVis latent-diffusion checkpoint "
                        "with a VQ autoencoder (LDM-4 LSUN-Bedroom, cin256-v2) into a diffusers "
                        "pipeline folder (safetensors) that benchmarks load.")
    cv.add_argument("checkpoint", help="the .ckpt (read with weights_only=True) or .safetensors")
    cv.add_argument("--out", required=True, help="the new pipeline folder (must not exist)")
    cv.add_argument("--preset", help="the original config: lsun-bedroom or cin256-v2")
    cv.add_argument("--config", help="instead of --preset: the original YAML config")
    cv.add_argument("--ema", action="store_true", help="take the UNet's EMA weights")
    cv.set_defaults(func=_convert_ldm)

    f = sub.add_parser("fetch", help="download a hub pipeline into the local cache",
                       description="Download a diffusers pipeline (e.g. google/ddpm-cifar10-32) "
                       "into the local Hugging Face cache; loading never downloads.")
    f.add_argument("model")
    f.set_defaults(func=_fetch)

    s = sub.add_parser("sample", help="sample a grid of images with a seeded sampler",
                       description="Sample images (decoded to pixels for latent models); "
                       "image i depends only on (seed, i). With --state, the model "
                       "quantized by a saved state (and its method's sampler correction) "
                       "samples from the same noise as the FP model.")
    s.add_argument("--model", default=None, help="bundled name, pipeline folder or hub id "
                   "(default: digits, or the model the --state was made for)")
    s.add_argument("--state", help="a quantization state (the folder `gaq quantize --out` "
                   "wrote): sample the model it quantized")
    s.add_argument("--num", type=int, default=64)
    _sampler_flags(s, state="{}; with --state, the state's calibration sampler's")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=_sample)

    m = sub.add_parser("methods", help="list registered quantization methods",
                       description="List the registered methods (built-in and entry points "
                       "in the 'gaq.methods' group) with their presets.")
    m.set_defaults(func=_methods)

    q = sub.add_parser("quantize", help="quantize a model with one method and save its state",
                       description="Record a calibration set from the FP sampler, run one "
                       "method, and save the quantization state (safetensors + JSON) and its "
                       "layer report.")
    q.add_argument("--model", default="digits", help="bundled name, pipeline folder or hub id")
    q.add_argument("--method", default="rtn")
    q.add_argument("--preset", default="cpu")
    q.add_argument("--bits", default="W4A8", help="e.g. W4A8, W8A8, W4A32 (weight-only)")
    _sampler_flags(q)
    q.add_argument("--interval", type=int, default=5, help="keep every n-th step")
    q.add_argument("--samples-per-step", type=int, default=64)
    q.add_argument("--holdout-per-step", type=int, default=None,
                   help="held-out trajectories per kept step, which no method trains on "
                   "(GAQ's validation set; default: 5 %% of --samples-per-step, rounded up)")
    q.add_argument("--out", required=True, help="folder for the quantization state (new "
                   "or empty)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the quantization state an earlier run wrote to --out")
    q.set_defaults(func=_quantize)

    ev = sub.add_parser("evaluate", help="score a saved quantization state against FP",
                        description="Sample the FP model and the model a saved state "
                        "quantized (with its method's sampler correction) from the same "
                        "noise, and score both as a benchmark cell does: image metrics "
                        "(FID...) against the reference set, paired metrics (PSNR) against "
                        "the FP images, eps_mse on held-out FP trajectories. Prints a JSON "
                        "summary (and writes it to --out); no MLflow run, no results rows.")
    ev.add_argument("--state", required=True, help="the folder `gaq quantize --out` wrote")
    ev.add_argument("--model", default=None, help="bundled name, pipeline folder or hub id "
                    "(default: the model the state was made for)")
    from gaq.bench.spec import EvalSpec

    benchmark_eval = EvalSpec()  # a benchmark's defaults are evaluate's
    ev.add_argument("--num-images", type=int, default=benchmark_eval.num_images,
                    help=f"images per model (default: {benchmark_eval.num_images})")
    ev.add_argument("--batch-size", type=int, default=benchmark_eval.batch_size)
    ev.add_argument("--metrics", help="comma-separated, e.g. psnr,eps_mse,fid (default: "
                    f"{','.join(benchmark_eval.metrics)}; without the image metrics for a "
                    "model with no reference images)")
    ev.add_argument("--heldout-trajectories", type=int,
                    default=benchmark_eval.heldout_trajectories,
                    help="held-out FP trajectories for eps_mse, on their own seed "
                    f"(default: {benchmark_eval.heldout_trajectories})")
    ev.add_argument("--feature-space", choices=("auto", "classifier", "inception"),
                    default="auto", help="image metrics' features (default: auto, the "
                    "bundled classifier's for bundled models)")
    ev.add_argument("--reference", help="folder of real images, for image metrics of a "
                    "model without a bundled reference set")
    _sampler_flags(ev, state="the state's calibration sampler's, else {}")
    ev.add_argument("--out", help="also write the JSON summary to this file")
    ev.set_defaults(func=_evaluate)

    b = sub.add_parser("bench", help="run a benchmark file",
                       description="Run every cell of a benchmark (TOML under benchmarks/, or "
                       "a shipped name such as w4a8): quantize, sample, measure, log to MLflow, "
                       "append to Parquet, and regenerate tables and plots. Completed cells are "
                       "skipped unless --force.")
    b.add_argument("file", help="benchmark TOML file or shipped name (w4a8, w8a8, ...)")
    b.add_argument("--num-images", type=int, help="override eval.num_images")
    b.add_argument("--seeds", help="override eval.seeds, e.g. 0,1")
    b.add_argument("--methods", help="run only these rows (FP always runs), e.g. rtn,brecq")
    b.add_argument("--force", action="store_true", help="re-run completed cells")
    b.add_argument("--retry-failed", action="store_true",
                   help="run again the cells an earlier sweep recorded as failed (diverged); "
                   "by default they are skipped")
    b.add_argument("--device", help="cpu, cuda or cuda:N (default: the file's setup.device)")
    b.add_argument("--engine",
                   help="local (under torchrun, sampling is sharded across ranks) or ray (one "
                   "Ray task per cell, as many at once as the CPUs or GPUs allow; needs "
                   "gaq[ray]); default: the file's setup.engine, else local")
    b.add_argument("--address", help="--engine ray: the Ray cluster to join (default: start "
                   "a local runtime)")
    b.add_argument("--threads", type=int, help="intra-op threads per cell (with --engine ray "
                   "also the CPUs each task reserves); default: the file's setup.threads, else "
                   "torch's own count")
    b.add_argument("--results", default=str(WORKING),
                   help="the working store this run writes and resumes from (default: runs)")
    b.add_argument("--reference", default=str(RESULTS),
                   help="the committed reference results the run is compared with at the end "
                   "(default: results)")
    b.add_argument("--report-only", action="store_true",
                   help="print the comparison with the reference and its verdict, but exit 0 "
                   "when it says NOT REPRODUCED (by default that exits 1)")
    b.add_argument("--update-reference", action="store_true",
                   help="after the run, make it the reference: copy its results into "
                   "--reference, measure the noise floor, regenerate the reference tables")
    b.set_defaults(func=_bench)

    tl = sub.add_parser("tolerance", help="measure a reference's numerical tolerance",
                        description="Rerun a benchmark's cells from scratch under each "
                        "condition a user's machine varies (threads-2: two intra-op threads; "
                        "local: the local engine; avx2: ATEN_CPU_CAPABILITY=avx2), each into "
                        "its own folder, and write each metric's numerical tolerance (margin x "
                        "its largest change against the reference) to "
                        "<reference>/<benchmark>/tolerance.json, which later runs are judged "
                        "by. One run of the benchmark per condition.")
    tl.add_argument("file", help="benchmark TOML file or shipped name")
    tl.add_argument("--runs", default=str(WORKING / "tolerance"),
                    help="where the reruns go, one folder per condition (default: "
                    "runs/tolerance)")
    tl.add_argument("--reference", default=str(RESULTS))
    tl.add_argument("--conditions", help="comma-separated subset of threads-2,local,avx2")
    tl.add_argument("--methods", help="rerun only these rows (FP always runs), e.g. "
                    "rtn,ptqd,tfmq,gaq: a cheaper measurement that still covers every metric "
                    "those rows measure")
    tl.add_argument("--margin", type=float, default=4.0,
                    help="tolerance = margin x the largest observed change (default 4)")
    tl.add_argument("--derive-only", action="store_true",
                    help="derive from the reruns already under --runs, run nothing")
    tl.set_defaults(func=_tolerance)

    rd = sub.add_parser("readme", help="rewrite the README's and docs' generated sections",
                        description="Rewrite every <!-- gen:NAME --> section of the README "
                        "and docs/ from the committed files under results/ (the numbers they "
                        "quote); "
                        "--check instead fails (exit 1) when a section is not what its "
                        "files give.")
    rd.add_argument("--check", action="store_true", help="compare, write nothing; also "
                    "fail on a number in the README outside a generated section, or one in "
                    "a results page that the results/ files it cites do not give")
    rd.add_argument("pages", nargs="*", help="the pages (default: README.md and docs/*.md)")
    rd.add_argument("--results", default=str(RESULTS))
    rd.set_defaults(func=_readme)

    for name, fn, what in (("tables", _tables, "Markdown and LaTeX tables"),
                           ("plots", _plots, "plots (PNG and PDF)")):
        c = sub.add_parser(name, help=f"regenerate {what} from the Parquet results",
                           description=f"Regenerate {what} from results/<benchmark>/*.parquet "
                           "alone; nothing is re-run.")
        c.add_argument("--benchmark", help="one benchmark (default: every one with results)")
        c.add_argument("--results", default=str(RESULTS))
        c.add_argument("--benchmarks", default="benchmarks",
                       help="the benchmark files, read for each one's model_key, anchor "
                       "and feature space (default: benchmarks)")
        if name == "plots":
            c.add_argument("--workers", type=int, default=None,
                           help="processes rendering figures (default: the cores, at most 4)")
        c.set_defaults(func=fn)

    jd = sub.add_parser("judge", help="score the bundled models' samples with two judges",
                        description="Sample each bundled model as its quality figures are "
                        "sampled (guided, conditional and null-class sets; the pixel model: "
                        "unconditional) and score every set, and the real held-out digits, "
                        "with the bundled classifier and an independent RBF SVC trained on "
                        "scikit-learn's 8x8 digits. Writes JSON and a Markdown table beside it.")
    jd.add_argument("--models", default="digits,digits-ldm,digits-dit",
                    help="comma-separated bundled models (default: all three)")
    jd.add_argument("--num", type=int, default=500, help="images per sample set")
    jd.add_argument("--steps", type=int, default=50, help="DDIM steps")
    jd.add_argument("--guidance", type=float, default=3.0, help="guided sets' scale")
    jd.add_argument("--seed", type=int, default=0)
    jd.add_argument("--out", default=str(RESULTS / "bundled" / "judges.json"),
                    help="the JSON file (the .md goes beside it)")
    jd.set_defaults(func=_judge)

    tg = sub.add_parser("tune-gaq", help="GAQ's tuning study: meta objective against "
                        "held-out block error, per setting",
                        description="On a few blocks of a model and several AdaRound seeds, "
                        "learn ω under each meta-learning setting, reconstruct the block with "
                        "learned and with uniform ω, and compare their errors on test rows of "
                        "trajectories nothing trains on (gaq/METHOD.md, 'Tuning study'). "
                        "Writes study.json, study.md and proxy_vs_heldout.png.")
    tg.add_argument("--model", default="digits", help="model to study (default: digits)")
    tg.add_argument("--blocks", type=int, default=3,
                    help="blocks studied, spread over the reconstruction order (default 3)")
    tg.add_argument("--seeds", default="0,1", help="AdaRound seeds (default 0,1)")
    tg.add_argument("--weight-iters", type=int, default=200,
                    help="AdaRound iterations per block (default 200, GAQ's cpu preset)")
    tg.add_argument("--device", default="cpu")
    tg.add_argument("--out", default=str(RESULTS / "gaq_tuning"))
    tg.add_argument("--overwrite", action="store_true",
                    help="replace an earlier study in --out")
    tg.add_argument("--render-only", action="store_true",
                    help="rewrite study.md and the plot from the stored study.json")
    tg.set_defaults(func=_tune_gaq)

    ls = sub.add_parser("ls", help="list benchmarks and stored results",
                        description="List benchmark files and the results stored for them.")
    ls.add_argument("--benchmarks", default="benchmarks")
    ls.add_argument("--results", default=str(RESULTS))
    ls.set_defaults(func=_ls)

    fs = sub.add_parser("fid-spread", help="measure FID's spread across disjoint FP sample sets",
                        description="Sample FP images once with a benchmark's sampler and "
                        "score disjoint sets of each size against its reference: the "
                        "seed-to-seed spread of FID at that image count (written to "
                        "results/protocol).")
    fs.add_argument("file", nargs="?", default="w4a8-full",
                    help="benchmark whose model, sampler and metrics to use (default w4a8-full)")
    fs.add_argument("--model", help="model of the benchmark (default: its first)")
    fs.add_argument("--images", type=int, default=16384, help="FP images to sample")
    fs.add_argument("--sizes", default="256,1024,4096", help="set sizes, comma-separated")
    fs.add_argument("--out", default=str(RESULTS / "protocol"))
    fs.set_defaults(func=_fid_spread)

    f = sub.add_parser("perf", help="measure sampling overhead and calibration memory",
                       description="Speed and memory figures on the bundled model, written "
                       "to results/perf (fake quantization on this CPU).")
    f.add_argument("--out", default=str(RESULTS / "perf"))
    f.add_argument("--paper-scale", metavar="ARCH",
                   help="instead: measure a randomly initialised model of a paper's size "
                   "(ddpm-cifar10, ldm4-lsun, ldm4-cin256, dit-xl2-256, sd-v1-4) and project "
                   "the full protocol's cost")
    f.add_argument("--paper-cells", metavar="ARCHS",
                   help="instead: run every method end to end on these paper architectures "
                   "(comma-separated), a fresh process per cell, phase by phase "
                   "(results/perf/paper_cells.md)")
    f.add_argument("--paper-memory", metavar="ARCH",
                   help="instead: peak memory of block reconstruction on this paper "
                   "architecture against calibration rows (--rows) and block size "
                   "(results/perf/paper_memory_ARCH.md)")
    f.add_argument("--block-memory", metavar="ARCH",
                   help="instead: one block's AdaRound on this paper architecture, stage by "
                   "stage (rounding variables, forward, backward, Adam, freeze), its memory "
                   "in weight-sized copies (results/perf/block_memory_ARCH.md)")
    f.add_argument("--attention-memory", metavar="BATCHES",
                   help="instead: the quantized attention's peak memory at Stable Diffusion's "
                   "64×64 latent, whole against query slices, at these batch sizes "
                   "(comma-separated; results/perf/attention_memory.md)")
    f.add_argument("--block", help="with --block-memory: the block (default: the one with "
                   "the most parameters)")
    f.add_argument("--rows", default="2,4,8",
                   help="with --paper-memory: trajectories per kept step, comma-separated "
                   "(two kept steps; guided architectures record both halves)")
    f.add_argument("--budget", default="cpu",
                   help="with --paper-cells: the budget profile, cpu (default) or gpu")
    f.add_argument("--methods", help="with --paper-scale: comma-separated methods "
                   "(default rtn,qdiffusion,tfmq,gaq; 'all': every method defined for the "
                   "architecture); with --paper-cells: default all")
    f.add_argument("--device", default="cpu", help="with --paper-scale: e.g. cuda, cuda:1")
    f.add_argument("--batch", type=int, default=8,
                   help="with --paper-scale: sampling batch size for the timing")
    f.add_argument("--only", metavar="SECTIONS",
                   help="comma-separated sections to re-measure (sampling, calibration_memory, "
                   "memory_scaling, gaq_overhead); the others keep their figures in perf.json")
    f.set_defaults(func=_perf)

    g = sub.add_parser("gpu-check", help="every GPU measurement in one run (results/gpu)",
                       description="On a CUDA GPU: the fake-quant sampling overhead at batch "
                       "32/128/512, calibration time and memory of RTN, BRECQ, TFMQ-DM and GAQ "
                       "on the 35.7 M CIFAR-10 DDPM architecture, and gpu-smoke (every method "
                       "on every bundled family). Writes results/gpu/; refuses without CUDA.")
    g.add_argument("--device", default="cuda", help="a CUDA device (default cuda)")
    g.add_argument("--out", default=str(RESULTS / "gpu"))
    g.add_argument("--results", default="runs", help="where gpu-smoke's runs go")
    g.add_argument("--only", metavar="SECTIONS",
                   help="comma-separated sections (overhead, paper-scale, smoke; paper-cells "
                   "only when named: about an hour)")
    g.set_defaults(func=_gpu_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gaq.memwatch import bound_heap

    bound_heap()  # freed tensor memory goes back to the kernel (see its docstring)
    try:
        code = args.func(args)  # a command with a verdict returns 1 when it fails
    except (GaqError, ValueError) as e:
        # one line, whatever a library put in the text it passed through (escapes, breaks)
        print(f"gaq: error: {one_line(e)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
