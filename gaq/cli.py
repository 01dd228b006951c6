"""The ``gaq`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gaq.errors import GaqError

RESULTS = Path("results")


def _train_default(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from gaq.models import train
    from gaq.models.bundled import BUNDLED_MODELS, CLASSIFIER_DIR

    log_dir = Path(args.results) / "bundled"
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


def _fetch(args: argparse.Namespace) -> None:
    from gaq.models.loading import fetch

    print(fetch(args.model))


def _sample(args: argparse.Namespace) -> None:
    from torchvision.utils import save_image

    from gaq.models.loading import load_model
    from gaq.sampling import SamplerConfig, ddim_sample

    model = load_model(args.model)
    sampler = SamplerConfig(steps=args.steps, eta=args.eta)
    images = ddim_sample(model.denoiser, model.scheduler, args.num, seed=args.seed,
                         sampler=sampler, batch_size=args.batch_size, progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(out), nrow=int(args.num**0.5) or 1)
    report: dict = {"model": args.model, "images": len(images), "out": str(out)}
    if args.model == "digits":
        from gaq.eval.digits import digit_likeness

        report.update(digit_likeness(images))
    print(json.dumps(report))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gaq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-default", help="train the bundled digits model and classifier",
                       description="Train the bundled default diffusion model and digit "
                       "classifier reproducibly from a seed, into the package's weights folder.")
    t.add_argument("--only", choices=("unet", "classifier"), help="train just one of the two")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, help="diffusion training steps (default: the recipe's)")
    t.add_argument("--results", default=str(RESULTS), help="where logs and the sample grid go")
    t.set_defaults(func=_train_default)

    f = sub.add_parser("fetch", help="download a hub pipeline into the local cache",
                       description="Download a diffusers pipeline (e.g. google/ddpm-cifar10-32) "
                       "into the local Hugging Face cache; loading never downloads.")
    f.add_argument("model")
    f.set_defaults(func=_fetch)

    s = sub.add_parser("sample", help="sample a grid of images with seeded DDIM",
                       description="Sample images with DDIM; image i depends only on (seed, i).")
    s.add_argument("--model", default="digits", help="bundled name, pipeline folder or hub id")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (GaqError, ValueError) as e:
        print(f"gaq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
