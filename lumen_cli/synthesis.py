"""``lumen evaluate-synthesis``: alignment and diversity of synthetic variants across trained ControlNets.

::

    lumen evaluate-synthesis --run layout-N8=runs/tiny-lumen --run seg=runs/tiny-lumen-seg --run none \\
        --images 32 --variants 4 --seeds 0 1 2 --out runs/synthesis-eval

The main CLI calls :func:`register` with its subparsers; the handler returns the exit code. Heavy
imports happen inside the handler, so registering the command costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "register"]


def _evaluate(args: argparse.Namespace) -> int:
    from perception.judges import fit_judge
    from pipeline.config import load_config
    from pipeline.synthesis.evaluate import EvalSettings, evaluate_synthesis, parse_run, render_table

    try:
        runs = [parse_run(r) for r in args.run]
        downstream = dict(_pair(d, "--downstream") for d in args.downstream)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = EvalSettings(
        images=args.images, variants=args.variants, seeds=tuple(args.seeds), steps=args.steps,
        guidance=args.guidance, batch_size=args.batch_size, train_images=args.train_images,
        judge_steps=args.judge_steps, device=args.device,
    )  # fmt: skip
    if args.overrides and args.config is None:
        print("error: key=value overrides need --config", file=sys.stderr)
        return 2
    config = load_config(args.config, args.overrides) if args.config is not None else None
    doc = evaluate_synthesis(
        runs,
        args.out,
        settings,
        judge_factory=fit_judge,
        config=config,
        base=args.base,
        downstream=downstream,
    )
    print(render_table(doc))
    print(f"wrote {args.out / 'table.md'}, table.json and tradeoff.png")
    return 0


def _pair(text: str, flag: str) -> tuple[str, Path]:
    if "=" not in text:
        raise ValueError(f"{flag} {text!r}: use NAME=PATH")
    name, path = text.split("=", 1)
    return name, Path(path)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``evaluate-synthesis`` to a main parser's subparsers."""
    p = subparsers.add_parser(
        "evaluate-synthesis",
        help="compare trained ControlNets: seg/depth/normal agreement and diversity of their variants",
        description="Generate K variants of M held-out images with each run's ControlNet (and 'none', the "
        "base model alone), score them with perception models trained on real images, and write table.md, "
        "table.json and a diversity-fidelity figure (docs/synthesis.md).",
    )
    p.add_argument(
        "--run", action="append", default=[], metavar="NAME=RUN_DIR",
        help="a run folder with config.yaml and lumen/ (repeatable); 'none' = the base model alone",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", default=None, help="config naming the data (default: the first run's)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of --config, e.g. data.num_val_images=64"
    )
    p.add_argument("--base", type=Path, default=None, help="base model folder (default: the first run's)")
    p.add_argument("--images", type=int, default=32, help="held-out validation images (M)")
    p.add_argument("--variants", type=int, default=4, help="variants per image (K)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="generation seeds")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: generate.steps)")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: generate.guidance_scale)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per generation call")
    p.add_argument("--train-images", type=int, default=512, help="real training images of the judges")
    p.add_argument("--judge-steps", type=int, default=400, help="optimizer steps of each judge")
    p.add_argument(
        "--downstream", action="append", default=[], metavar="NAME=REPORT_JSON",
        help="add the perception gains of a report.json to the row NAME (repeatable)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.set_defaults(func=_evaluate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m lumen_cli.synthesis evaluate-synthesis ...``."""
    parser = argparse.ArgumentParser(prog="lumen")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
