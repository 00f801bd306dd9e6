"""``lumen shards verify DIR`` and ``lumen shards info DIR``.

The main CLI calls :func:`register` with its subparsers; each leaf command stores its handler in
``args.func``, which returns the exit code (0 ok, 1 problems)::

    args = parser.parse_args(argv)
    return args.func(args)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.shards.verify import shard_info, verify_shard_set
from pipeline.shards.writer import ShardSetError

__all__ = ["main", "register"]


def _verify(args: argparse.Namespace) -> int:
    report = verify_shard_set(args.dir)
    print(report.summary())
    return 0 if report.ok else 1


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def _info(args: argparse.Namespace) -> int:
    try:
        info = shard_info(args.dir)
    except ShardSetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    card = info["dataset"] or {}
    print(f"shard set {info['directory']}")
    print(
        f"  schema v{info['schema_version']}, config hash {info['config_hash']}, complete: {info['complete']}"
    )
    print(f"  {info['num_shards']} shards, {info['num_samples']} samples, {info['num_bytes'] / 1e6:.1f} MB")
    print(
        f"  dataset: {card.get('name', '?')}, {len(card.get('classes') or [])} classes, ignore_index {card.get('ignore_index')}, depth in {card.get('depth_units')}"
    )
    print(f"  by split:  {_counts(info['by_split'])}")
    print(f"  by source: {_counts(info['by_source'])}")
    print(f"  by kind:   {_counts(info['by_kind'])}")
    print(f"  sample keys: {', '.join(info['sample_keys']) or '-'}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``shards`` command (``verify DIR``, ``info DIR``) to a main parser's subparsers."""
    parser = subparsers.add_parser("shards", help="check and describe WebDataset shard sets")
    commands = parser.add_subparsers(dest="shards_command", required=True, metavar="{verify,info}")
    verify = commands.add_parser(
        "verify",
        help="check every shard against manifest.json (sha256, counts), decode every sample; exit 1 on problems",
    )
    verify.add_argument("dir", type=Path, help="shard-set folder (holding manifest.json)")
    verify.set_defaults(func=_verify)
    info = commands.add_parser("info", help="counts per split/source and a few sample keys")
    info.add_argument("dir", type=Path, help="shard-set folder (holding manifest.json)")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m lumen_cli.shards shards verify DIR``."""
    parser = argparse.ArgumentParser(prog="lumen")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
