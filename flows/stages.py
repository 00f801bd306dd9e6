"""The Prefect flows: ``train_base``, ``train_lumen``, ``expand``, ``evaluate`` and ``run`` (end to end).

Flows only orchestrate: the work is done by the stage functions of :mod:`pipeline` and
:mod:`perception`. Each flow takes a config path, ``key=value`` overrides and the run folder (``out``;
None makes a new versioned folder under ``runs/``), so a deployment can call it with plain parameters.
Call them through :func:`call_flow`, which attaches the task runner the config asks for.

Idempotence: every unit of work (a chunk of images, a perception training run, a training stage)
checks its own outputs in the run folder, keyed on its inputs and the config's hash, and skips what is
finished and verified; that record survives across flow runs, unlike Prefect's in-run cache. Retries
with backoff cover transient failures (I/O, a busy device), never bad input.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import (
    Progress,
    markdown_table,
    opened_run,
    publish_summary,
    publish_table,
    run_lock,
    stage_logger,
    start_server_watchdog,
)
from flows.runner import build_task_runner, configure_threads, device_resources, device_slot
from pipeline.config import LumenConfig, config_hash, load_config
from pipeline.io import atomic_write_text
from pipeline.runs import RunPaths

__all__ = [
    "call_flow",
    "evaluate_flow",
    "expand_flow",
    "gains_flow",
    "run_flow",
    "train_base_flow",
    "train_lumen_flow",
]

_TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that may go away (I/O, connections, a full device), not bad input or bugs."""
    try:
        state.result()
    except _TRANSIENT:
        return True
    except RuntimeError as err:
        return "out of memory" in str(err).lower()
    except BaseException:
        return False
    return False


def _task(name: str, retries: int = 2) -> Callable[[Callable[..., Any]], Any]:
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=[2.0, 10.0, 30.0][:retries] or 0,
        retry_condition_fn=_transient,
        cache_policy=NO_CACHE,
    )


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


@_task("validate-data", retries=0)
def validate_data(cfg: LumenConfig, run_dir: Path) -> dict[str, Any]:
    """Validate both splits (streaming); bad samples go to quarantine.jsonl with a reason."""
    from pipeline.data import Quarantine, build_dataset
    from pipeline.data.validate import scan_dataset

    quarantine = Quarantine(RunPaths(run_dir).quarantine)
    summary = {
        split: scan_dataset(
            build_dataset(cfg.data, split), quarantine, stage=f"validate-{split}", progress=True
        )
        for split in ("train", "val")
    }
    summary["quarantine_reasons"] = quarantine.counts()
    return summary


@_task("train-base", retries=1)
def train_base_task(cfg: LumenConfig, run_dir: Path) -> str:
    """Train the tiny base model (resumes from its latest checkpoint; skipped when saved)."""
    from pipeline.lumen.stages import run_train_base

    if (RunPaths(run_dir).base / "model_index.json").is_file():
        stage_logger(__name__).info("base model already trained: %s", RunPaths(run_dir).base)
        return str(RunPaths(run_dir).base)
    configure_threads(cfg)
    with device_slot(cfg.runner):
        return str(run_train_base(cfg, run_dir))


@_task("train-lumen", retries=1)
def train_lumen_task(cfg: LumenConfig, run_dir: Path) -> str:
    """Train the LUMEN ControlNet (resumes from its latest checkpoint; skipped when saved)."""
    from pipeline.lumen.stages import run_train_lumen

    if (RunPaths(run_dir).lumen / "lumen.json").is_file():
        stage_logger(__name__).info("LUMEN ControlNet already trained: %s", RunPaths(run_dir).lumen)
        return str(RunPaths(run_dir).lumen)
    configure_threads(cfg)
    with device_slot(cfg.runner):
        return str(run_train_lumen(cfg, run_dir))


@_task("generate-chunk")
def generate_chunk_task(cfg: LumenConfig, run_dir: Path, index: int, keys: list[str]) -> Any:
    """Generate (or reuse) the variants of one chunk of source images."""
    from pipeline.lumen.expand import expand_slots, generate_chunk

    configure_threads(cfg, concurrent=expand_slots(cfg))  # cores shared by the chunks generated at once
    with device_slot(cfg.runner):
        return generate_chunk(cfg, run_dir, index, keys)


@_task("perception-run")
def perception_run_task(cfg: LumenConfig, run_dir: Path, spec: Any, inputs: Any) -> dict[str, Any]:
    """Train and evaluate one perception model of the protocol (or reuse its finished run.json)."""
    from perception.protocol import run_one
    from pipeline.device import resolve_device

    configure_threads(cfg)
    with device_slot(cfg.runner):
        return run_one(spec, inputs.real, inputs.val, inputs.synthetic, config=cfg.perception, info=inputs.info,
                       oracle=inputs.oracle, test=inputs.test, out_dir=RunPaths(run_dir).perception,
                       device=str(resolve_device(cfg.device)))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Stage bodies (shared by the stage flows and the end-to-end flow)
# --------------------------------------------------------------------------------------------------


def _expand(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    from pipeline.data import Quarantine
    from pipeline.lumen.expand import (
        chunk_written,
        expand_context,
        finish_expand,
        prepare_expand,
        quality_summary,
        shard_writers,
        write_chunk,
    )

    t0 = time.time()
    chunks = prepare_expand(cfg, run_dir, progress=progress)
    ctx = expand_context(cfg, run_dir)
    quarantine = Quarantine(RunPaths(run_dir).quarantine)
    real_w, syn_w = shard_writers(cfg, run_dir)
    todo = [i for i, keys in enumerate(chunks) if not chunk_written(ctx, i, keys, real_w, syn_w)]
    stage_logger(__name__).info("expand: %d chunks, %d to do", len(chunks), len(todo))
    with device_resources(cfg.runner):
        futures = {i: generate_chunk_task.submit(cfg, run_dir, i, chunks[i]) for i in todo}
    written = {"real": 0, "synthetic": 0, "filtered": 0}
    generated = reused = 0
    gen_seconds = 0.0
    bar = Progress(sum(map(len, chunks)), "expand", unit="img", enabled=progress)
    with real_w, syn_w:  # chunks are written in order, on this thread: the same bytes on any runner
        for i, keys in enumerate(chunks):
            if i in futures:
                result = futures[i].result()
                reused += result.reused
                generated += not result.reused
                gen_seconds += result.seconds
                r, s, f = write_chunk(ctx, result, real_w, syn_w, quarantine)
                written["real"] += r
                written["synthetic"] += s
                written["filtered"] += f
            else:
                reused += 1
            bar.update(len(keys))
    bar.close()
    finish_expand(run_dir)
    seconds = time.time() - t0
    planned = real_w.num_samples * cfg.generate.variants
    summary = {
        "stage": "expand",
        "source_images": sum(map(len, chunks)),
        "real_samples": real_w.num_samples,
        "synthetic_samples": syn_w.num_samples,
        "variants_planned": planned,
        "written_this_run": written,
        "quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "chunks": len(chunks),
        "chunks_generated": generated,
        "chunks_reused": reused,
        "seconds": round(seconds, 1),
        "generation_images_per_s": round(written["synthetic"] / gen_seconds, 2) if gen_seconds else None,
        "shards": {"real": str(real_w.out_dir), "synthetic": str(syn_w.out_dir)},
        "quality_filter": quality_summary(run_dir, len(chunks)),
    }
    md = (
        f"# Expand: {run_dir.name}\n\n"
        f"- source images: {summary['source_images']} ({summary['quarantined']} quarantined)\n"
        f"- real samples: {summary['real_samples']}, synthetic samples: {summary['synthetic_samples']} "
        f"({cfg.generate.variants} variants per image; {written['filtered']} dropped by the quality filter)\n"
        f"- chunks: {len(chunks)} ({generated} generated now, {reused} already done)\n"
        f"- time: {seconds:.0f} s\n"
        f"- shards: `{real_w.out_dir}` and `{syn_w.out_dir}`\n"
    )
    if (q := summary["quality_filter"]) is not None:
        md += (
            f"- quality filter ({cfg.generate.quality_mode} mode): {q['scored']} variants scored, "
            f"{q['dropped']} dropped; mean agreement {q['mean_agreement']}, "
            f"mean share of pixels set to ignore {q['mean_ignored_share']}\n"
        )
    publish_summary(run_dir, "expand", md, summary)
    return summary


def _perception_runs(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Every perception run of a run folder's protocol (one task each): the inputs and the results."""
    from perception.protocol import default_settings, plan_runs, protocol_summary
    from perception.stages import _models, evaluation_inputs, setting_facts
    from pipeline.report.gains import aggregate

    inputs = evaluation_inputs(cfg, run_dir, progress=progress)
    settings = default_settings(cfg.perception)
    specs = plan_runs(cfg.perception, settings)
    with device_resources(cfg.runner):
        futures = [perception_run_task.submit(cfg, run_dir, spec, inputs) for spec in specs]
    bar = Progress(len(specs), "evaluate", unit="run", enabled=progress)
    runs = []
    for fut in futures:
        runs.append(fut.result())
        bar.update()
    bar.close()
    protocol = protocol_summary(cfg.perception, settings)
    protocol["settings"] = setting_facts(cfg, inputs, _models(cfg, run_dir), settings)
    results = {"protocol": protocol, "tasks": aggregate(runs, alpha=cfg.perception.alpha), "runs": runs}
    return inputs, results


def _evaluate(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    from perception.stages import write_report

    t0 = time.time()
    inputs, results = _perception_runs(cfg, run_dir, progress)
    report_dir = write_report(cfg, run_dir, results, inputs.real, inputs.synthetic, inputs.info)
    return _publish_gains(run_dir, "evaluate", results, report_dir, time.time() - t0)


def _publish_gains(
    run_dir: Path, stage: str, results: dict[str, Any], report_dir: Path, seconds: float
) -> dict[str, Any]:
    rows = gains_rows(dict(results["tasks"]))
    publish_table(
        run_dir, "gains", rows, "perception metrics: gain of each arm over real, mean ± std over seeds"
    )
    runs = results["runs"]
    summary = {
        "stage": stage,
        "runs": len(runs),
        "seconds": round(seconds, 1),
        "report": str(report_dir / "report.md"),
        "gains": rows,
    }
    md = f"# {stage.capitalize()}: {run_dir.name}\n\n{len(runs)} training runs, {seconds:.0f} s. Report: `{report_dir / 'report.md'}`\n\n"
    publish_summary(run_dir, stage, md + markdown_table(rows), summary)
    return summary


def gains_rows(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, setting, arm, metric): real and the arm as mean ± std, the gain, its CI, p,
    the verdict and the share of the oracle gain."""
    rows = []
    for task_name, t in tasks.items():
        for setting, e in t["settings"].items():
            for arm, gains in (e.get("gain") or {}).items():
                for metric, gain in gains.items():
                    sig = e.get("significance", {}).get(arm, {}).get(metric, {})
                    real, other = e["real"][metric], e[arm][metric]
                    share = (e.get("oracle_share") or {}).get(arm, {}).get(metric)
                    ci = sig.get("ci")
                    rows.append(
                        {
                            "task": task_name,
                            "setting": setting,
                            "metric": metric,
                            "arm": arm,
                            "real": f"{real['mean']:.4f} ± {real['std']:.4f}",
                            "arm_value": f"{other['mean']:.4f} ± {other['std']:.4f}",
                            "gain": None if gain is None else round(float(gain), 4),
                            "ci95": None if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]",
                            "p": None if sig.get("p_value") is None else round(float(sig["p_value"]), 3),
                            "verdict": sig.get("verdict", ""),
                            "oracle_share": None if share is None else round(float(share), 2),
                        }
                    )
    return rows


def _study_settings(cfg: LumenConfig) -> dict[str, list[str]]:
    """``gains.settings``, or this config as the one setting (named by its data and label settings)."""
    return dict(cfg.gains.settings) or {"main": []}


def _gains(
    config: str, overrides: Sequence[str], cfg: LumenConfig, run_dir: Path, progress: bool
) -> dict[str, Any]:
    """The study: per setting, expand (when real+synthetic is an arm) and the perception runs in
    ``run_dir/<setting>``; then one report over every setting in ``run_dir/report``."""
    from perception.stages import write_report
    from pipeline.report.gains import aggregate
    from pipeline.runs import prepare_run_dir

    t0 = time.time()
    runs: list[dict[str, Any]] = []
    protocol: dict[str, Any] = {}
    last: tuple[LumenConfig, Path, Any] | None = None
    for name, extra in _study_settings(cfg).items():
        scfg = load_config(config, [*overrides, *extra, "gains.settings={}"])
        sdir = prepare_run_dir(scfg, run_dir / name)
        stage_logger(__name__).info("gains setting %s: %s", name, sdir)
        if "real+synthetic" in scfg.perception.arms:
            _expand(scfg, sdir, progress)
        inputs, results = _perception_runs(scfg, sdir, progress)
        write_report(scfg, sdir, results, inputs.real, inputs.synthetic, inputs.info)
        single = len(results["protocol"]["settings"]) == 1
        for run in results["runs"]:
            runs.append({**run, "setting": name if single else f"{name}/{run['setting']}"})
        protocol = protocol or dict(results["protocol"], settings={})
        for sub, facts in results["protocol"]["settings"].items():
            protocol["settings"][name if single else f"{name}/{sub}"] = facts
        last = (scfg, sdir, inputs)
    if last is None:
        raise ValueError("gains.settings is empty")
    results = {"protocol": protocol, "tasks": aggregate(runs, alpha=cfg.perception.alpha), "runs": runs}
    scfg, sdir, inputs = last
    report_dir = write_report(
        cfg, sdir, results, inputs.real, inputs.synthetic, inputs.info, RunPaths(run_dir).report
    )
    return _publish_gains(run_dir, "gains", results, report_dir, time.time() - t0)


# --------------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------------


@flow(name="lumen-train-base")
def train_base_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> str:
    """Train the tiny base text-to-image model on the dataset's images and captions."""
    with opened_run(config, overrides, out) as (cfg, run_dir):
        return str(train_base_task(cfg, run_dir))


@flow(name="lumen-train-lumen")
def train_lumen_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> str:
    """Train the LUMEN ControlNet on images + neural layouts (or the comparison condition)."""
    with opened_run(config, overrides, out) as (cfg, run_dir):
        return str(train_lumen_task(cfg, run_dir))


@flow(name="lumen-expand")
def expand_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Layouts -> K variants per image (chunked tasks) -> optional quality filter -> real + synthetic shards."""
    with opened_run(config, overrides, out) as (cfg, run_dir):
        return _expand(cfg, run_dir, progress)


@flow(name="lumen-gains")
def gains_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """The gains study: every setting of ``gains.settings`` (expand + every perception arm, resumable)
    and one report over all of them (report.md, report.json, figures) in ``<out>/report``."""
    with opened_run(config, overrides, out) as (cfg, run_dir):
        return _gains(config, overrides, cfg, run_dir, progress)


@flow(name="lumen-evaluate")
def evaluate_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Perception models on real vs real+synthetic (one task per training run) and the gains report."""
    with opened_run(config, overrides, out) as (cfg, run_dir):
        return _evaluate(cfg, run_dir, progress)


def _needs_training(cfg: LumenConfig, run_dir: Path) -> tuple[bool, bool]:
    """Whether the run has to train its base model and its ControlNet (no fitting shipped one)."""
    from pipeline.lumen.stages import lumen_folder, shipped_base

    base = cfg.base.source == "tiny" and not (RunPaths(run_dir).base / "model_index.json").is_file()
    base = base and shipped_base(cfg) is None
    try:
        lumen_folder(cfg, run_dir)
        lumen = base  # a newly trained base model needs its own ControlNet
    except FileNotFoundError:
        lumen = True
    return base, lumen


@flow(name="lumen-run")
def run_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """End to end: validate -> (train base) -> (train LUMEN) -> expand -> evaluate -> summary.

    The shipped tiny models are used when they fit the config (the demo trains nothing); otherwise the
    models are trained first. On success ``runs/<name>-latest`` points at this run folder.
    """
    t0 = time.time()
    with opened_run(config, overrides, out) as (cfg, run_dir):
        return _run(cfg, run_dir, progress, t0)


def _run(cfg: LumenConfig, run_dir: Path, progress: bool, t0: float) -> dict[str, Any]:
    """The body of :func:`run_flow`, on an opened (and locked) run folder."""
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.time()
        value = fn()
        timings[name] = round(time.time() - t, 1)
        return value

    data = timed("validate", lambda: validate_data(cfg, run_dir))
    train_base, train_lumen = _needs_training(cfg, run_dir)
    if train_base:
        timed("train_base", lambda: train_base_task(cfg, run_dir))
    if train_lumen:
        timed("train_lumen", lambda: train_lumen_task(cfg, run_dir))
    expand = timed("expand", lambda: _expand(cfg, run_dir, progress))
    evaluate = timed("evaluate", lambda: _evaluate(cfg, run_dir, progress))
    timings["total"] = round(time.time() - t0, 1)
    summary = {
        "stage": "run",
        "run_dir": str(run_dir),
        "config_hash": config_hash(cfg),
        "data": {s: data[s] for s in ("train", "val")},
        "quarantine_reasons": data["quarantine_reasons"],
        "trained": {"base": train_base, "lumen": train_lumen},
        "expand": {k: expand[k] for k in ("real_samples", "synthetic_samples", "quarantined", "chunks")},
        "timings_s": timings,
        "report": evaluate["report"],
        "gains": evaluate["gains"],
    }
    md = (
        f"# LUMEN run `{run_dir.name}`\n\n"
        f"- config hash `{config_hash(cfg)}`; data: {data['train']['valid']} train / {data['val']['valid']} val "
        f"valid samples, {data['train']['quarantined'] + data['val']['quarantined']} quarantined\n"
        f"- models trained in this run: base {'yes' if train_base else 'no (shipped or given)'}, "
        f"ControlNet {'yes' if train_lumen else 'no (shipped or given)'}\n"
        f"- shards: {expand['real_samples']} real + {expand['synthetic_samples']} synthetic samples\n"
        f"- report: `{evaluate['report']}`\n\n## Timings (s)\n\n"
        + markdown_table([timings])
        + "\n## Gains (mean ± std over seeds)\n\n"
        + markdown_table(evaluate["gains"])
    )
    publish_summary(run_dir, "run", md, summary)
    atomic_write_text(RunPaths(run_dir).summary_md, md)
    mark_latest(run_dir, cfg)
    return summary


def mark_latest(run_dir: Path, cfg: LumenConfig) -> Path:
    """Point ``<runs_dir>/<name>-latest`` at a finished run (an atomic symlink swap; older runs stay)."""
    link = Path(cfg.runs_dir) / f"{cfg.name}-latest"
    if not run_dir.resolve().is_relative_to(Path(cfg.runs_dir).resolve()):
        return link  # runs written elsewhere (--out) are not the scheduled series
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.resolve().name)
    os.replace(tmp, link)
    return link


FLOWS: dict[str, Any] = {
    "train-base": train_base_flow,
    "train-lumen": train_lumen_flow,
    "expand": expand_flow,
    "evaluate": evaluate_flow,
    "gains": gains_flow,
    "run": run_flow,
}


def call_flow(
    name: str, config: str, overrides: Sequence[str] = (), out: str | None = None, **kwargs: Any
) -> Any:
    """Run flow ``name`` with the task runner of the config's ``runner`` section."""
    from pipeline.runs import prepare_run_dir

    cfg = load_config(config, list(overrides))
    with contextlib.ExitStack() as stack:
        if out is not None:  # check and lock the run folder before Prefect starts: fail fast
            prepare_run_dir(cfg, out)
            stack.enter_context(run_lock(out))
        start_server_watchdog()  # an ephemeral Prefect server must not outlive this process
        fl = FLOWS[name].with_options(task_runner=build_task_runner(cfg.runner))
        return fl(config=str(config), overrides=list(overrides), out=out, **kwargs)


def read_summary(run_dir: Path, stage: str) -> dict[str, Any]:
    """A stage summary written by a flow (``summaries/<stage>.json``)."""
    return dict(json.loads(RunPaths(run_dir).summary(stage).read_text()))
