"""The ``lumen`` command line: ``lumen <command> CONFIG [key=value ...] [--out DIR]``.

Configs are YAML files (see ``configs/``); any key can be overridden with ``section.key=value``.
New features are config keys, not new flags.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import ConfigError, LumenConfig, config_dict, config_hash, load_config

__all__ = ["main"]

log = logging.getLogger("lumen")

# Sub-packages that contribute command groups through a ``register(subparsers)`` function.
_PLUGINS = ("lumen_cli.layouts", "lumen_cli.shards", "lumen_cli.synthesis", "lumen_cli.plan")


def add_config_args(p: argparse.ArgumentParser, out: bool = True) -> None:
    """The arguments every config-driven command takes."""
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_images=64"
    )
    if out:
        p.add_argument("--out", type=Path, default=None, help="run folder (default: a new one under runs/)")


def config_from_args(args: argparse.Namespace) -> LumenConfig:
    return load_config(args.config, args.overrides)


def _cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    cfg = config_from_args(args)
    print(f"# hash {config_hash(cfg)}")
    print(yaml.safe_dump(config_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from pipeline.data import build_dataset
    from pipeline.data.preview import preview_dataset

    cfg = config_from_args(args)
    path = preview_dataset(build_dataset(cfg.data, args.split), args.out, num=args.num)
    print(f"wrote {path}")
    return 0


ADVICE_SAMPLES = 16
"""Quarantined samples whose masks ``lumen data check`` reads raw to suggest a label mapping."""


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pipeline.data import Quarantine, build_dataset
    from pipeline.data.labels import SEG_VALUE_REASONS
    from pipeline.data.validate import scan_dataset
    from pipeline.preflight import label_advice

    cfg = config_from_args(args)
    quarantine = Quarantine(args.quarantine)
    source = build_dataset(cfg.data, args.split)
    summary = scan_dataset(source, quarantine, progress=True)
    print(json.dumps(summary, indent=2))
    for reason, n in sorted(quarantine.counts().items()):
        example = next(r for r in quarantine.records if r["reason"] == reason)
        print(f"quarantined {n} sample(s): {reason} (e.g. {example['key']}: {example['detail']})")
    keys = [r["key"] for r in quarantine.records if r["reason"] in SEG_VALUE_REASONS]
    advice = label_advice(cfg, source, keys[:ADVICE_SAMPLES]) if keys else None
    if advice is not None:
        print(f"\n{len(keys)} sample(s) have masks the config cannot read as classes: " + advice.text())
    return 0 if summary["quarantined"] == 0 else 1


_LAUNCHED_STAGES = ("train-base", "train-lumen")
"""Stages that run as they are, without Prefect, in every process a distributed launcher started."""


def _launched_stage(name: str, args: argparse.Namespace) -> object:
    """One process of ``torchrun ... -m lumen_cli train-lumen CONFIG --out RUN`` (or SLURM, mpirun):
    every process runs the stage itself (one Prefect flow per process would be N flows), rank 0
    prepares the run folder first. ``--out`` is required: every process must name the same folder."""

    from pipeline.distributed import global_rank
    from pipeline.preflight import preflight
    from pipeline.runs import RunPaths, prepare_run_dir

    if name not in _LAUNCHED_STAGES:
        raise ConfigError(
            f"`lumen {name}` does not run under a distributed launcher; only {', '.join(_LAUNCHED_STAGES)} do"
        )
    if args.out is None:
        raise ConfigError(
            "under a distributed launcher pass --out RUN: every process must use the same folder"
        )
    cfg = preflight(config_from_args(args), name, args.out).config  # type: ignore[arg-type]  # a stage name
    if global_rank() == 0:
        prepare_run_dir(cfg, args.out)
    from pipeline.lumen import stages

    run_dir, paths = Path(args.out), RunPaths(Path(args.out))
    if name == "train-base":
        return paths.base if paths.has_base() else stages.run_train_base(cfg, run_dir)
    return paths.lumen if paths.has_lumen() else stages.run_train_lumen(cfg, run_dir)


def _flow(name: str, args: argparse.Namespace, **kwargs: object) -> object:
    """Run the Prefect flow ``name`` (flows/) on the command line's config, overrides and --out (or,
    in a process of a distributed launcher, the stage itself: :func:`_launched_stage`)."""
    import os

    from pipeline.distributed import externally_launched

    if externally_launched():
        return _launched_stage(name, args)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL Prefect starts a local ephemeral server; give it time on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from pipeline.preflight import preflight

    # Config errors, and the config checked against its data, exit 2 here: before Prefect starts.
    preflight(config_from_args(args), name, args.out)  # type: ignore[arg-type]  # a stage name
    from flows import call_flow

    out = str(args.out) if args.out is not None else None
    return call_flow(name, args.config, args.overrides, out=out, **kwargs)


def _cmd_run(args: argparse.Namespace) -> int:
    s = _flow("run", args)
    if not isinstance(s, dict):
        raise TypeError(f"the run flow returned {type(s).__name__}, expected its summary dict")
    t = s["timings_s"]
    print(f"\nrun folder: {s['run_dir']} ({t['total']:.0f} s)")
    print(
        f"shards: {s['expand']['real_samples']} real + {s['expand']['synthetic_samples']} synthetic samples"
    )
    print(f"summary: {Path(s['run_dir']) / 'summary.md'}")
    print(f"report: {s['report']}")
    return 0


def _cmd_train_base(args: argparse.Namespace) -> int:
    out = Path(str(_flow("train-base", args)))
    if _is_main_process():
        print(f"base model: {out} (samples: {out / 'samples.png'})")
    return 0


def _cmd_train_lumen(args: argparse.Namespace) -> int:
    out = Path(str(_flow("train-lumen", args)))
    if _is_main_process():
        print(f"LUMEN ControlNet: {out} (validation grids: {out.parent / 'lumen_train' / 'validation'})")
    return 0


def _is_main_process() -> bool:
    """False in the ranks but 0 of a distributed launcher (torchrun): one process says where the model is."""
    from pipeline.distributed import global_rank

    return global_rank() == 0


def _cmd_distill(args: argparse.Namespace) -> int:
    students = _flow("distill", args)
    if not isinstance(students, dict):
        raise TypeError(f"the distill flow returned {type(students).__name__}, expected {{steps: folder}}")
    for steps, folder in sorted(students.items(), key=lambda kv: -int(kv[0])):
        print(
            f"{int(steps):3d}-step student: {folder} (validation grid: {Path(folder).parent / 'validation.png'})"
        )
    print("generate with it: generate.model=student generate.steps=<one of the above>")
    return 0


def _cmd_train_mapper(args: argparse.Namespace) -> int:
    out = Path(str(_flow("train-mapper", args)))
    print(f"semantic mapper: {out} (generate from label maps with generate.source=labels)")
    return 0


def _cmd_train_controls(args: argparse.Namespace) -> int:
    out = Path(str(_flow("train-controls", args)))
    print(f"class directions: {out} (previews: {out.parent}/preview-<class>.png; use generate.class_edits)")
    return 0


def _cmd_expand(args: argparse.Namespace) -> int:
    s = _flow("expand", args)
    if not isinstance(s, dict):
        raise TypeError(f"the expand flow returned {type(s).__name__}, expected its summary dict")
    print(
        f"{s['real_samples']} real and {s['synthetic_samples']} synthetic samples "
        f"({s['quarantined']} quarantined, {s['written_this_run']['filtered']} filtered) in {s['seconds']:.0f} s"
    )
    print(
        f"shards: {s['shards']['real']} and {s['shards']['synthetic']} (check them with `lumen shards verify DIR`)"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    s = _flow("evaluate", args)
    if not isinstance(s, dict):
        raise TypeError(f"the evaluate flow returned {type(s).__name__}, expected its summary dict")
    print(f"report: {s['report']} (and report.json, figures/)")
    return 0


def _cmd_gains(args: argparse.Namespace) -> int:
    s = _flow("gains", args)
    if not isinstance(s, dict):
        raise TypeError(f"the gains flow returned {type(s).__name__}, expected its summary dict")
    print(f"report: {s['report']} (and report.json, figures/); {s['runs']} runs in {s['seconds']:.0f} s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import build_deployment, serve

    cfg = config_from_args(args)
    deployment = build_deployment(
        args.config, args.overrides, cron=args.cron, name=args.name or f"lumen-{cfg.name}"
    )
    print(f"deployment {deployment.name!r}: flow lumen-scheduled-run, cron {args.cron!r}, "
          f"parameters {json.dumps(deployment.parameters)}")  # fmt: skip
    print(f"each run writes a new folder under {cfg.runs_dir}/ and, when it succeeds, "
          f"points {cfg.runs_dir}/{cfg.name}-latest at it")  # fmt: skip
    if args.dry_run:
        return 0
    serve(deployment)
    return 0


# A flat table of commands and their arguments: splitting it would scatter the CLI's one overview.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumen",
        description="LUMEN synthetic-data augmentation: neural layouts -> ControlNet -> synthetic variants -> "
        "WebDataset shards -> perception gains.",
    )
    parser.add_argument("--version", action="version", version=f"lumen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    stages = (
        ("run", _cmd_run, "the whole pipeline end to end"),
        ("train-base", _cmd_train_base, "train the tiny base text-to-image model on the dataset's images"),
        (
            "train-lumen",
            _cmd_train_lumen,
            "train the LUMEN ControlNet on images + neural layouts (or lumen.condition)",
        ),
        (
            "distill",
            _cmd_distill,
            "distil the generator into few-step students (progressive distillation, guidance included)",
        ),
        (
            "train-mapper",
            _cmd_train_mapper,
            "train the semantic mapper: label map / sketch / scribble -> layout (for generate.source=labels)",
        ),
        (
            "train-controls",
            _cmd_train_controls,
            "find class-specific appearance directions (for generate.class_edits)",
        ),
        ("expand", _cmd_expand, "generate synthetic variants and shard real + synthetic samples"),
        ("evaluate", _cmd_evaluate, "train perception models of every arm and report the gains"),
        (
            "gains",
            _cmd_gains,
            "the gains study: every setting of gains.settings (expand + every arm), one report",
        ),
    )
    for name, func, text in stages:
        p = sub.add_parser(name, help=text)
        add_config_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("serve", help="serve the end-to-end flow as a scheduled Prefect deployment")
    add_config_args(p, out=False)
    p.add_argument("--cron", default="0 2 * * *", help="schedule (cron syntax; default: daily at 02:00)")
    p.add_argument("--name", default=None, help="deployment name (default: lumen-<config name>)")
    p.add_argument("--dry-run", action="store_true", help="print the deployment and exit")
    p.set_defaults(func=_cmd_serve)

    data = sub.add_parser("data", help="look at and check a dataset").add_subparsers(
        dest="data_command", metavar="ACTION"
    )
    data.required = True
    p = data.add_parser("preview", help="PNG grid of a few samples with their labels")
    add_config_args(p, out=False)
    p.add_argument("--out", type=Path, required=True, help="folder for preview.png")
    p.add_argument("--num", type=int, default=8, help="number of samples")
    p.add_argument("--split", choices=("train", "val"), default=None)
    p.set_defaults(func=_cmd_data_preview)
    p = data.add_parser("check", help="validate every sample; bad ones are listed with a reason")
    add_config_args(p, out=False)
    p.add_argument("--split", choices=("train", "val"), default=None)
    p.add_argument(
        "--quarantine", type=Path, default=None, help="also write the bad samples to this JSONL file"
    )
    p.set_defaults(func=_cmd_data_check)

    cfg = sub.add_parser("config", help="configs").add_subparsers(dest="config_command", metavar="ACTION")
    cfg.required = True
    p = cfg.add_parser("show", help="print the resolved config and its hash")
    add_config_args(p, out=False)
    p.set_defaults(func=_cmd_config_show)

    for module in _PLUGINS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise
    return parser


EXIT_CONFIG = 2
EXIT_IN_USE = 3
EXIT_DISK_FULL = 4
EXIT_PERMISSION = 5
EXIT_SHARDS = 6
EXIT_OS = 7
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a scheduler), raised so that ``finally`` blocks and exit hooks
    run: locks are released and Prefect stops its ephemeral server. A ``BaseException`` like
    ``SystemExit``: ``except Exception`` does not swallow it, and Lightning re-raises it (it turns a
    ``KeyboardInterrupt`` into ``sys.exit(1)``)."""


def _terminate_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated`; returns the previous handler (None off the main thread)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def exit_code(err: BaseException) -> int | None:
    """The exit code of a user-facing failure (one ``error: ...`` line), or None for a bug.

    2 config, 3 folder in use by another process, 4 disk full, 5 permission denied, 6 shard set on
    disk that cannot be used, 7 other file-system errors.
    """
    from pipeline.io import LockError
    from pipeline.shards.writer import ShardSetError

    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if isinstance(err, LockError):
        return EXIT_IN_USE
    if isinstance(err, ShardSetError):
        return EXIT_SHARDS
    if isinstance(err, OSError):
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_DISK_FULL
        if isinstance(err, PermissionError) or err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return EXIT_PERMISSION
        return EXIT_OS
    return None


def _one_line(err: BaseException, verbose: bool) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        text = f"disk full: {text}; free some space and rerun (the run resumes)"
    elif isinstance(err, OSError) and exit_code(err) == EXIT_PERMISSION:
        text = f"permission denied: {text}"
    if isinstance(err, ConfigError) or verbose:
        return text
    return f"{text} (lumen --verbose ... shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`lumen run CFG --out D a.b=1`): argparse leaves those unparsed.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore"):  # one line per Prefect API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    previous = _terminate_on_sigterm()
    try:
        return _run_command(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; user-facing failures become one ``error: ...`` line and an exit code."""
    try:
        return int(args.func(args))
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise  # a bug: the traceback is the report
        print(f"error: {_one_line(err, args.verbose)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return code


if __name__ == "__main__":
    sys.exit(main())
