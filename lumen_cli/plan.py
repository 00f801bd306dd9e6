"""``lumen plan CONFIG [key=value ...] [--out RUN] [--images N] [--gains] [--json]``: a dry run.

Prints what ``lumen run`` of the config will do and produce, before anything runs: the dataset's
counts, the models it trains (optimisation steps, images seen, batch per device), the generation work,
the shard files and their bytes, the data-parallel layout. No model weights are loaded, nothing is
trained or written. :func:`register` adds the command to the main parser's subparsers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError, gains_setting_configs, load_config
from pipeline.lumen.plan import GainsPlan, RunPlan, plan_gains, plan_run

__all__ = ["main", "register"]


def _plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images must be at least 1, got {args.images}")
    if args.out is not None and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is not a run folder; leave --out out to plan a new run")
    if args.gains:
        plan: RunPlan | GainsPlan = plan_gains(gains_setting_configs(args.config, args.overrides), args.out,
                                               images=args.images)  # fmt: skip
    else:
        plan = plan_run(cfg, args.out, images=args.images)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.table())
    if cfg.gains.settings and not args.gains:
        print(
            f"\nthis config has {len(cfg.gains.settings)} gains settings; `lumen plan --gains` plans `lumen gains`"
        )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``plan`` command to a main parser's subparsers."""
    parser = subparsers.add_parser(
        "plan",
        help="dry run: what `lumen run` of a config will train, generate and write (counts, steps, bytes)",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_images=64"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="an existing run folder (its trained models are reused)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images the dataset holds, when data.root is not here (data.num_images still caps them)",
    )
    parser.add_argument(
        "--gains",
        action="store_true",
        help="plan `lumen gains`: every setting of gains.settings (a run each, in OUT/<setting>), and totals",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m lumen_cli.plan plan CONFIG``."""
    parser = argparse.ArgumentParser(prog="lumen")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
