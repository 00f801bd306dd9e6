"""The Prefect flows: ``train_base``, ``train_lumen``, ``distill``, ``train_mapper``, ``train_controls``, ``expand``, ``evaluate``, ``gains`` and
``run`` (end to end).

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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import (
    Progress,
    checked_config,
    opened_run,
    publish_summary,
    publish_table,
    run_lock,
    stage_logger,
    start_server_watchdog,
)
from flows.runner import build_task_runner, configure_threads, device_resources, device_slot
from perception.protocol import RunSpec
from perception.stages import EvalInputs
from pipeline.config import LumenConfig, config_hash, gains_setting_configs, load_config
from pipeline.io import atomic_write_text
from pipeline.lumen.expand import ChunkResult
from pipeline.lumen.expand_context import uses_mapper
from pipeline.lumen.plan import models_to_train
from pipeline.preflight import STAGES, Stage
from pipeline.report.tables import markdown_table
from pipeline.runs import RunPaths, mark_latest

__all__ = [
    "call_flow",
    "distill_flow",
    "evaluate_flow",
    "expand_flow",
    "gains_flow",
    "run_flow",
    "train_base_flow",
    "train_controls_flow",
    "train_lumen_flow",
    "train_mapper_flow",
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

    if RunPaths(run_dir).has_base():
        stage_logger(__name__).info("base model already trained: %s", RunPaths(run_dir).base)
        return str(RunPaths(run_dir).base)
    configure_threads(cfg)
    with device_slot(cfg.runner):
        return str(run_train_base(cfg, run_dir))


@_task("train-lumen", retries=1)
def train_lumen_task(cfg: LumenConfig, run_dir: Path) -> str:
    """Train the LUMEN ControlNet (resumes from its latest checkpoint; skipped when saved)."""
    from pipeline.lumen.stages import run_train_lumen

    if RunPaths(run_dir).has_lumen():
        stage_logger(__name__).info("LUMEN ControlNet already trained: %s", RunPaths(run_dir).lumen)
        return str(RunPaths(run_dir).lumen)
    configure_threads(cfg)
    with device_slot(cfg.runner):
        return str(run_train_lumen(cfg, run_dir))


@_task("distill", retries=1)
def distill_task(cfg: LumenConfig, run_dir: Path) -> dict[int, str]:
    """Distil the generator into few-step students (a saved round is reused, a started one resumes)."""
    from pipeline.lumen.stages import run_distill

    configure_threads(cfg)
    with device_slot(cfg.runner):
        return {k: str(v) for k, v in run_distill(cfg, run_dir).items()}


@_task("train-mapper", retries=1)
def train_mapper_task(cfg: LumenConfig, run_dir: Path) -> str:
    """Train the semantic mapper for ``mapper.input`` (skipped when saved)."""
    from pipeline.lumen.mapping import run_train_mapper

    folder = RunPaths(run_dir).mapper / cfg.mapper.input
    if (folder / "mapper.json").is_file():
        stage_logger(__name__).info("semantic mapper already trained: %s", folder)
        return str(folder)
    configure_threads(cfg)
    with device_slot(cfg.runner):
        return str(run_train_mapper(cfg, run_dir))


@_task("train-controls", retries=1)
def train_controls_task(cfg: LumenConfig, run_dir: Path) -> str:
    """Find the class-specific appearance directions (skipped when saved)."""
    from pipeline.lumen.controls import CONTROLS_FILE, run_train_controls

    path = RunPaths(run_dir).controls / CONTROLS_FILE
    if path.is_file():
        stage_logger(__name__).info("class directions already found: %s", path)
        return str(path)
    configure_threads(cfg)
    with device_slot(cfg.runner):
        return str(run_train_controls(cfg, run_dir))


@_task("generate-chunk")
def generate_chunk_task(cfg: LumenConfig, run_dir: Path, index: int, keys: list[str]) -> ChunkResult:
    """Generate (or reuse) the variants of one chunk of source images."""
    from perception.judges import fit_judge
    from pipeline.lumen.expand import expand_slots, generate_chunk

    configure_threads(cfg, concurrent=expand_slots(cfg))  # cores shared by the chunks generated at once
    with device_slot(cfg.runner):
        return generate_chunk(cfg, run_dir, index, keys, judge_factory=fit_judge)


@_task("perception-run")
def perception_run_task(cfg: LumenConfig, run_dir: Path, spec: RunSpec, inputs: EvalInputs) -> dict[str, Any]:
    """Train and evaluate one perception model of the protocol (or reuse its finished run.json)."""
    from perception.stages import train_one

    configure_threads(cfg)
    with device_slot(cfg.runner):
        return train_one(cfg, run_dir, spec, inputs)


# --------------------------------------------------------------------------------------------------
# Stage bodies (shared by the stage flows and the end-to-end flow)
# --------------------------------------------------------------------------------------------------


def _tracker(progress: bool) -> Callable[[int, str, str], Progress]:
    return lambda total, desc, unit: Progress(total, desc, unit=unit, enabled=progress)


def _submit_chunk(cfg: LumenConfig, run_dir: Path, index: int, keys: list[str]) -> Any:
    with device_resources(cfg.runner):
        return generate_chunk_task.submit(cfg, run_dir, index, keys)


def _submit_run(cfg: LumenConfig, run_dir: Path, spec: RunSpec, inputs: EvalInputs) -> Any:
    with device_resources(cfg.runner):
        return perception_run_task.submit(cfg, run_dir, spec, inputs)


def _expand(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    from perception.judges import fit_judge
    from pipeline.lumen.expand import run_expand

    result = run_expand(cfg, run_dir, progress, submit=_submit_chunk, tracker=_tracker(progress),
                        judge_factory=fit_judge)  # fmt: skip
    summary = result.as_dict()
    publish_summary(run_dir, "expand", result.markdown(run_dir.name, cfg), summary)
    return summary


def _publish_gains(run_dir: Path, result: Any) -> dict[str, Any]:
    publish_table(run_dir, "gains", result.gains,
                  "perception metrics: gain of each arm over real, mean ± std over seeds")  # fmt: skip
    summary = dict(result.as_dict())
    publish_summary(run_dir, result.stage, result.markdown(run_dir.name), summary)
    return summary


def _evaluate(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    from perception.stages import run_evaluate

    result = run_evaluate(cfg, run_dir, progress, submit=_submit_run, tracker=_tracker(progress))
    return _publish_gains(run_dir, result)


def _gains(
    config: str, overrides: Sequence[str], cfg: LumenConfig, run_dir: Path, progress: bool
) -> dict[str, Any]:
    """The gains study (:func:`perception.stages.run_gains`) with Prefect tasks, and its summary."""
    from perception.stages import run_gains

    settings = {
        name: checked_config(scfg, "gains") for name, scfg in gains_setting_configs(config, overrides).items()
    }
    result = run_gains(settings, cfg, run_dir, progress, submit_chunk=_submit_chunk,
                       submit=_submit_run, tracker=_tracker(progress))  # fmt: skip
    return _publish_gains(run_dir, result)


# --------------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------------


@flow(name="lumen-train-base")
def train_base_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> str:
    """Train the tiny base text-to-image model on the dataset's images and captions."""
    with opened_run(config, overrides, out, "train-base") as (cfg, run_dir):
        return str(train_base_task(cfg, run_dir))


@flow(name="lumen-train-lumen")
def train_lumen_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> str:
    """Train the LUMEN ControlNet on images + neural layouts (or the comparison condition)."""
    with opened_run(config, overrides, out, "train-lumen") as (cfg, run_dir):
        return str(train_lumen_task(cfg, run_dir))


@flow(name="lumen-distill")
def distill_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> dict[int, str]:
    """Progressive distillation of the base model + ControlNet into few-step students (``distill``)."""
    with opened_run(config, overrides, out, "distill") as (cfg, run_dir):
        return distill_task(cfg, run_dir)


@flow(name="lumen-train-mapper")
def train_mapper_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> str:
    """Train the semantic mapper: label map / sketch / scribble -> the run's layouts (``mapper``)."""
    with opened_run(config, overrides, out, "train-mapper") as (cfg, run_dir):
        return str(train_mapper_task(cfg, run_dir))


@flow(name="lumen-train-controls")
def train_controls_flow(config: str, overrides: Sequence[str] = (), out: str | None = None) -> str:
    """Find class-specific appearance directions for the run's generator (``controls``)."""
    with opened_run(config, overrides, out, "train-controls") as (cfg, run_dir):
        return str(train_controls_task(cfg, run_dir))


@flow(name="lumen-expand")
def expand_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Layouts -> K variants per image (chunked tasks) -> optional quality filter -> real + synthetic shards."""
    with opened_run(config, overrides, out, "expand") as (cfg, run_dir):
        return _expand(cfg, run_dir, progress)


@flow(name="lumen-gains")
def gains_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """The gains study: every setting of ``gains.settings`` (expand + every perception arm, resumable)
    and one report over all of them (report.md, report.json, figures) in ``<out>/report``."""
    with opened_run(config, overrides, out, "gains") as (cfg, run_dir):
        return _gains(config, overrides, cfg, run_dir, progress)


@flow(name="lumen-evaluate")
def evaluate_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Perception models on real vs real+synthetic (one task per training run) and the gains report."""
    with opened_run(config, overrides, out, "evaluate") as (cfg, run_dir):
        return _evaluate(cfg, run_dir, progress)


@flow(name="lumen-run")
def run_flow(
    config: str, overrides: Sequence[str] = (), out: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """End to end: validate -> (train base) -> (train LUMEN) -> expand -> evaluate -> summary.

    The shipped tiny models are used when they fit the config (the demo trains nothing); otherwise the
    models are trained first. On success ``runs/<name>-latest`` points at this run folder.
    """
    t0 = time.time()
    with opened_run(config, overrides, out, "run") as (cfg, run_dir):
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
    train_base, train_lumen = models_to_train(cfg, run_dir)
    if train_base:
        timed("train_base", lambda: train_base_task(cfg, run_dir))
    if train_lumen:
        timed("train_lumen", lambda: train_lumen_task(cfg, run_dir))
    if cfg.generate.model == "student":  # the run's own student: distil it (saved rounds are reused)
        timed("distill", lambda: distill_task(cfg, run_dir))
    if uses_mapper(cfg) and cfg.generate.mapper is None:  # the run's own mapper
        timed("train_mapper", lambda: train_mapper_task(cfg, run_dir))
    if cfg.generate.class_edits.classes and cfg.generate.class_edits.file is None:  # the run's own directions
        timed("train_controls", lambda: train_controls_task(cfg, run_dir))
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
        f"valid samples, {data['train']['quarantined'] + data['val']['quarantined']} quarantined"
        + (f" ({data['val']['split']})" if data["val"].get("split") else "")
        + f"\n- perception tasks: {', '.join(cfg.perception.tasks or [])} (report split {cfg.perception.report_split})\n"
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
    mark_latest(run_dir, Path(cfg.runs_dir), cfg.name)
    return summary


FLOWS: dict[str, Any] = {
    "train-base": train_base_flow,
    "train-lumen": train_lumen_flow,
    "distill": distill_flow,
    "train-mapper": train_mapper_flow,
    "train-controls": train_controls_flow,
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

    stage: Stage = name if name in STAGES else "run"
    cfg = checked_config(load_config(config, list(overrides)), stage, out)
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
