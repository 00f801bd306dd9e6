"""Checks of a config against its data, run before any stage does expensive work.

``lumen run`` and every stage command call :func:`preflight` first (the CLI before Prefect starts,
the flows again when they open the run folder), so a config that cannot work fails in seconds, with
a message that names the key and the fix, instead of after the models have trained:

1. the dataset opens (folders exist, ``data.classes`` given for seg labels, a val split exists);
2. ``perception.tasks`` are labels the dataset has (null: every label it has), and the perception
   settings fit the adapter (``report_split``, ``test_domains``, the ``real+oracle`` arm);
3. the first samples load, and their mask values are classes (else the config lines that would map
   them, as ``lumen data check`` prints them);
4. the image size fits the generator's downsampling (stages that train a ControlNet or generate).

Defaults that follow the data (``perception.tasks`` and ``perception.report_split`` when null) are
filled in by :func:`resolve_config`; the resolved config is the one a run folder records.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import TASKS, ConfigError, LumenConfig
from pipeline.data import build_dataset
from pipeline.data.labels import SEG_VALUE_REASONS, LabelAdvice, MaskStats, advise
from pipeline.data.sample import DatasetInfo, SampleError, SampleSource
from pipeline.data.validate import validate_sample
from pipeline.runs import RunPaths

__all__ = [
    "STAGES",
    "PreflightReport",
    "check_adapter_settings",
    "check_candidates",
    "check_class_edits",
    "check_label_source",
    "check_quality_filter",
    "label_advice",
    "preflight",
    "resolve_config",
]

log = logging.getLogger(__name__)

Stage = Literal[
    "train-base", "train-lumen", "distill", "train-mapper", "train-controls", "expand", "evaluate", "gains", "run"
]  # fmt: skip
STAGES: tuple[Stage, ...] = (
    "train-base", "train-lumen", "distill", "train-mapper", "train-controls", "expand", "evaluate", "gains", "run"
)  # fmt: skip
_EVALUATES = ("evaluate", "gains", "run")  # stages that train perception models on train + val
_GENERATES = (
    "train-lumen",
    "distill",
    "train-mapper",
    "expand",
    "gains",
    "run",
)  # run the generator's models
SAMPLES_CHECKED = 3
"""Training samples loaded by the preflight (the first keys)."""


@dataclass
class PreflightReport:
    """What :func:`preflight` checked.

    Attributes:
        config: the config with the defaults that follow the data resolved (see :func:`resolve_config`).
        labels: the labels the dataset has.
        checks: one line per check that ran, for the log.
        seconds: time taken.
    """

    config: LumenConfig
    labels: tuple[str, ...]
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def resolve_config(cfg: LumenConfig, info: DatasetInfo | None = None) -> LumenConfig:
    """``cfg`` with the defaults that follow the data filled in (a copy; ``cfg`` if nothing is null).

    ``perception.tasks`` null becomes the labels the dataset has (in the order seg, depth, normal);
    ``perception.report_split`` null becomes ``test`` for toy scenes (they have a test stream) and
    ``val`` for the other adapters. ``info`` defaults to the training split's dataset card.
    """
    p = cfg.perception
    if p.tasks is not None and p.report_split is not None:
        return cfg
    update: dict[str, object] = {}
    if p.report_split is None:
        update["report_split"] = "test" if cfg.data.adapter == "toyscenes" else "val"
    if p.tasks is None:
        labels = (info or build_dataset(cfg.data, "train").info).labels
        tasks = [t for t in TASKS if t in labels]
        if tasks:
            update["tasks"] = tasks
    return cfg.model_copy(update={"perception": p.model_copy(update=update)})


def preflight(cfg: LumenConfig, stage: Stage = "run", run_dir: Path | None = None) -> PreflightReport:
    """Check ``cfg`` against its data for ``stage``; raises :class:`ConfigError` naming the key to fix.

    Cheap checks come first; loading a few samples is the most expensive step (well under a second for
    folder datasets). ``run_dir`` (optional) lets the size check read a base model the run trained.
    """
    t0 = time.time()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    # 1. The dataset opens (folders, classes); its labels.
    train = build_dataset(cfg.data, "train")
    info = train.info
    report = PreflightReport(resolve_config(cfg, info), info.labels)
    report.checks.append(f"dataset {info.name}: {len(train)} training samples, labels {list(info.labels)}")
    # 2. Tasks against labels, perception settings against the adapter.
    report.checks += _check_perception(report.config, info, stage)
    # 3. A val split exists where one is needed.
    if stage in _EVALUATES:
        val = build_dataset(cfg.data, "val")
        note = getattr(val, "split_description", None)
        report.checks.append(f"val split: {len(val)} samples" + (f" ({note})" if note else ""))
    # 4. The first samples load, with mask values that are classes.
    report.checks.append(_check_samples(cfg, train))
    # 5. Image size against the generator.
    if stage in _GENERATES or (stage == "train-base" and cfg.base.source == "tiny"):
        report.checks += _check_sizes(cfg, stage, run_dir)
    # 6. A distilled student fits the generation settings (before anything is trained or generated).
    if stage in ("expand", "gains", "run") and cfg.generate.model != "lumen":
        report.checks.append(check_student_settings(cfg))
    # 7. Class directions: their classes exist; expand finds the directions file.
    if stage == "train-controls" or (
        stage in ("expand", "gains", "run") and cfg.generate.class_edits.classes
    ):
        report.checks.append(check_class_edits(cfg, stage, info, run_dir))
    # 8. The semantic mapper's settings (train-mapper, and expand from label maps).
    maps = cfg.generate.source == "labels" or cfg.generate.edited_per_map > 0
    if stage == "train-mapper" or (stage in ("expand", "gains", "run") and maps):
        report.checks.append(check_label_source(cfg, stage, info, run_dir))
    # 9. The quality filter's object classes exist and the data has seg labels to train its segmenters.
    if stage in ("expand", "gains", "run") and cfg.generate.quality_filter:
        report.checks.append(check_quality_filter(cfg, info))
    # 10. Candidate selection reads layouts back from generated images.
    if stage in ("expand", "gains", "run") and cfg.generate.candidates > 1:
        report.checks.append(check_candidates(cfg))
    report.seconds = round(time.time() - t0, 2)
    log.info("preflight (%s) passed in %.2f s: %s", stage, report.seconds, "; ".join(report.checks))
    return report


def check_candidates(cfg: LumenConfig) -> str:
    """``generate.candidates`` compares neural layouts: the ControlNet must take them."""
    g = cfg.generate
    if cfg.lumen.condition != "layout":
        raise ConfigError(
            f"generate.candidates={g.candidates} keeps the candidate whose neural layout agrees best with its "
            f"condition; lumen.condition={cfg.lumen.condition!r} is not a layout (set generate.candidates=1)"
        )
    return f"candidates: best of {g.candidates} by layout agreement ({g.candidate_score}), {g.candidates}x generation"


def check_quality_filter(cfg: LumenConfig, info: DatasetInfo) -> str:
    """``generate.quality_filter`` trains segmenters on the seg labels; objects mode names object classes."""
    g = cfg.generate
    if "seg" not in info.labels:
        raise ConfigError(
            f"generate.quality_filter trains a segmenter on seg labels; dataset {info.name} has labels "
            f"{list(info.labels)}"
        )
    if g.quality_mode != "objects":
        return f"quality filter: {g.quality_mode} mode"
    unknown = [c for c in g.quality_object_classes if c not in info.classes]
    if unknown:
        raise ConfigError(
            f"generate.quality_object_classes {unknown} are not classes of {info.name}: {list(info.classes)}"
        )
    retries = f", {g.quality_retries} retries" if g.quality_retries else ""
    outlines = ""
    if g.quality_outlines:
        depth = (
            "seg and depth"
            if "depth" in info.labels
            else "seg only: touching objects of one class are not told apart"
        )
        outlines = f", outlines from {depth}"
    return f"quality filter: objects mode over {g.quality_object_classes}{retries}{outlines}"


def check_label_source(cfg: LumenConfig, stage: Stage, info: DatasetInfo, run_dir: Path | None) -> str:
    """The mapper maps seg maps to layouts: the ControlNet must take layouts, the data (or label_dir) give
    seg maps, edit classes exist, and ``lumen expand`` from labels finds a trained mapper."""
    g = cfg.generate
    if cfg.lumen.condition != "layout":
        raise ConfigError(
            f"the semantic mapper maps label maps to neural layouts; lumen.condition={cfg.lumen.condition!r} "
            "takes labels directly (set lumen.condition=layout)"
        )
    if "seg" not in info.labels:
        raise ConfigError(
            f"the mapper learns from seg maps; dataset {info.name} has labels {list(info.labels)}"
        )
    unknown = [c for c in g.edit_classes or [] if c not in info.classes]
    if unknown:
        raise ConfigError(
            f"generate.edit_classes {unknown} are not classes of {info.name}: {list(info.classes)}"
        )
    if g.label_dir is not None and not Path(g.label_dir).is_dir():
        raise ConfigError(f"generate.label_dir={g.label_dir} is not a folder")
    if stage == "train-mapper":
        return f"mapper: {cfg.mapper.input} -> {cfg.layouts.kind} layouts, shots {cfg.mapper.shots or 'all'}"
    folder = Path(g.mapper) if g.mapper is not None else None
    if folder is None and run_dir is not None:
        folder = RunPaths(run_dir).mapper / cfg.mapper.input
    if stage == "expand" and folder is not None and not (folder / "mapper.json").is_file():
        raise ConfigError(
            f"generate.source=labels: no semantic mapper in {folder}; run `lumen train-mapper CONFIG --out RUN` "
            "first (or set generate.mapper to a mapper folder)"
        )
    where = g.label_dir if g.source == "labels" and g.label_dir else "the dataset's seg"
    return f"label maps from {where}, mapper {folder or 'of the run'}"


def check_class_edits(cfg: LumenConfig, stage: Stage, info: DatasetInfo, run_dir: Path | None) -> str:
    """``controls.classes`` and ``generate.class_edits.classes`` are classes of the data (which has seg
    maps); ``lumen expand`` with class edits finds a directions file."""
    if "seg" not in info.labels:
        raise ConfigError(
            f"class directions need seg masks; dataset {info.name} has labels {list(info.labels)}"
        )
    for key, names in (
        ("controls.classes", cfg.controls.classes or []),
        ("generate.class_edits.classes", cfg.generate.class_edits.classes),
    ):
        unknown = [c for c in names if c not in info.classes]
        if unknown:
            raise ConfigError(f"{key} {unknown} are not classes of {info.name}: {list(info.classes)}")
    e = cfg.generate.class_edits
    if stage == "expand" and e.classes:
        path = (
            Path(e.file)
            if e.file
            else (RunPaths(run_dir).controls / "directions.safetensors" if run_dir else None)
        )
        if path is not None and not path.is_file():
            raise ConfigError(
                f"generate.class_edits: no class directions at {path}; run `lumen train-controls CONFIG --out RUN` "
                "first (or set generate.class_edits.file)"
            )
    return (
        f"class directions: controls.classes {cfg.controls.classes or 'all'}, edits of {e.classes or 'none'}"
    )


def check_student_settings(cfg: LumenConfig) -> str:
    """Check that ``generate.model`` (a distilled student) fits ``generate.steps`` and the sampler; raises
    :class:`ConfigError`. A run's own student need not exist yet (``lumen run`` distils it first)."""
    g = cfg.generate
    if g.scheduler != "ddim":
        raise ConfigError(f"generate.model={g.model}: students sample with DDIM; set generate.scheduler=ddim")
    if g.model == "student":
        steps = cfg.distill.student_steps()
        if g.steps not in steps:
            raise ConfigError(
                f"generate.steps={g.steps}: with generate.model=student it must be a step count a student is "
                f"distilled for: {steps} (distill.teacher_steps halved down to distill.min_steps)"
            )
        return f"generate.model=student: the run's {g.steps}-step student"
    folder = Path(g.model)
    if not (folder / "student.json").is_file():
        raise ConfigError(
            f"generate.model={g.model!r}: neither 'lumen', 'student' nor a folder with a distilled student "
            "(student.json, written by `lumen distill`)"
        )
    steps = json.loads((folder / "student.json").read_text()).get("steps")
    if steps != g.steps:
        raise ConfigError(
            f"generate.model={g.model!r} was distilled for {steps} steps; set generate.steps={steps}"
        )
    return f"generate.model: student folder {folder} ({steps} steps)"


def _check_perception(cfg: LumenConfig, info: DatasetInfo, stage: Stage) -> list[str]:
    p = cfg.perception
    if p.tasks is None:
        if stage in _EVALUATES:
            raise ConfigError(
                f"perception.tasks: dataset {info.name} has no labels (seg, depth or normal) to train "
                "perception models on; give label folders (data.seg_dir, ...) or run the stages that need "
                "no labels (train-base, train-lumen, expand)"
            )
        return ["perception.tasks: none (the dataset has no labels)"]
    missing = [t for t in p.tasks if t not in info.labels]
    if missing:
        have = [t for t in TASKS if t in info.labels]
        fix = f"perception.tasks=[{', '.join(have)}]" if have else "label folders (data.seg_dir, ...)"
        raise ConfigError(
            f"perception.tasks=[{', '.join(p.tasks)}]: dataset {info.name} has no {', '.join(missing)} labels "
            f"(it has {', '.join(info.labels) or 'none'}); set {fix}, or null for every label the dataset has"
        )
    check_adapter_settings(cfg)
    return [f"perception.tasks {p.tasks} are labels of the dataset; report split {p.report_split}"]


def check_adapter_settings(cfg: LumenConfig) -> None:
    """Perception settings only toy scenes have (a test split, test domains, the oracle arm): raise
    :class:`ConfigError` naming the key when another adapter asks for them."""
    p = cfg.perception
    if cfg.data.adapter == "toyscenes":
        return
    if p.report_split == "test":
        raise ConfigError(
            f"perception.report_split=test: the {cfg.data.adapter} adapter has no test split; set "
            "perception.report_split=val (or null) and fix the schedule without looking at the reported numbers"
        )
    if p.test_domains:
        raise ConfigError("perception.test_domains is for toy scenes only; set it to null")
    if "real+oracle" in p.arms:
        raise ConfigError(
            f"perception.arms: the real+oracle arm re-renders toy scenes; data.adapter is "
            f"{cfg.data.adapter!r}: remove real+oracle from perception.arms"
        )


def _check_samples(cfg: LumenConfig, source: SampleSource) -> str:
    """Load the first samples; fail when every one with a mask fails on its values (a config problem,
    not a bad file), with the config lines that would fix them."""
    keys = source.keys()[:SAMPLES_CHECKED]
    value_errors: list[tuple[str, SampleError]] = []
    ok, sizes = 0, set()
    for key in keys:
        try:
            sample = source.load(key)
            validate_sample(sample, source.info)
        except SampleError as err:
            if err.reason in SEG_VALUE_REASONS:
                value_errors.append((key, err))
            else:
                log.warning("preflight: sample %s is unusable (%s: %s)", key, err.reason, err.detail)
            continue
        ok += 1
        sizes.add(sample.size)
    if value_errors and ok == 0:
        raise ConfigError(_value_error_message(cfg, source, value_errors))
    for key, value_error in value_errors:
        log.warning("preflight: sample %s is unusable (%s: %s)", key, value_error.reason, value_error.detail)
    return f"{ok} of {len(keys)} first samples load and validate (sizes {sorted(sizes)})"


def _value_error_message(
    cfg: LumenConfig, source: SampleSource, errors: list[tuple[str, SampleError]]
) -> str:
    key, err = errors[0]
    text = (
        f"data.classes / data.label_map: the first {len(errors)} training sample(s) have masks whose values "
        f"are not classes ({key}: {err.reason}: {err.detail})"
    )
    advice = label_advice(cfg, source, [k for k, _ in errors])
    if advice is not None:
        text += "\n" + advice.text()
    else:
        text += "\nRun `lumen data check CONFIG` to see every sample's problem."
    return text


def label_advice(cfg: LumenConfig, source: SampleSource, keys: list[str]) -> LabelAdvice | None:
    """:func:`~pipeline.data.labels.advise` on the stored masks of ``keys`` (read raw), or None when the
    adapter has no mask files to read or nothing is recognised. With a ``data.label_map`` set, the
    quarantine detail says what is unmapped, and None is returned."""
    label_file = getattr(source, "label_file", None)
    if label_file is None or cfg.data.label_map:
        return None
    stats = MaskStats()
    for key in keys:
        path = label_file(key, "seg")
        if path is not None:
            stats.add_file(path)
    return advise(stats, source.info.classes, source.info.ignore_index)


def _check_sizes(cfg: LumenConfig, stage: Stage, run_dir: Path | None) -> list[str]:
    """Image sides must be multiples of the base model's total downsampling (VAE x UNet)."""
    factor, model = _downsampling(cfg, run_dir, shipped=stage != "train-base")
    if factor is None:
        return ["sizes: not checked (the base model's config is not available locally)"]
    res = cfg.base.resolution
    if cfg.base.source == "tiny" and res % factor:
        raise ConfigError(
            f"base.resolution={res} must be a multiple of {factor} for {model}; try "
            f"base.resolution={max(factor, res // factor * factor)}"
        )
    if stage == "train-base":
        return [f"base.resolution {res} fits {model} (multiple of {factor})"]
    h, w = cfg.data.image_size or (res, res)
    factors = [("lumen.supersample", cfg.lumen.supersample)]
    if cfg.generate.supersample is not None and stage in ("expand", "gains", "run"):
        factors.append(("generate.supersample", cfg.generate.supersample))
    for name, k in factors:
        if (k * h) % factor or (k * w) % factor:
            step = factor // math.gcd(factor, k)  # sides whose k-fold is a multiple of factor
            near = [max(step, round(v / step) * step) for v in (h, w)]
            times = f" x {name}={k}" if k > 1 else ""
            raise ConfigError(
                f"data.image_size={[h, w]}{times}: the generator ({model}) needs sides that are multiples of "
                f"{factor}; try data.image_size={near}"
            )
    k = factors[-1][1]
    at = f" (generated at {[k * h, k * w]})" if k > 1 else ""
    return [f"data.image_size {[h, w]}{at} fits {model} (multiple of {factor})"]


def _downsampling(cfg: LumenConfig, run_dir: Path | None, shipped: bool = True) -> tuple[int | None, str]:
    """(VAE factor x UNet factor, a name for the model), read from config files, or (None, "").

    The tiny base is the run's own, else (``shipped``: stages that use a base rather than train one) the
    shipped one that fits the config, else a new one of ``base.preset``."""
    folder: Path | None = None
    if run_dir is not None and (RunPaths(run_dir).base / "unet" / "config.json").is_file():
        folder, name = RunPaths(run_dir).base, "the run's base model"
    elif cfg.base.source == "pretrained" and cfg.base.pretrained:
        folder, name = Path(cfg.base.pretrained), f"base.pretrained={cfg.base.pretrained}"
    elif shipped and cfg.base.source == "tiny":
        from pipeline.lumen.stages import shipped_base  # imports torch: after the cheap checks

        if (found := shipped_base(cfg)) is not None:
            folder, name = found, f"the shipped base {found.name}"
    if folder is not None:
        try:
            blocks = [
                len(json.loads((folder / sub / "config.json").read_text())["block_out_channels"])
                for sub in ("vae", "unet")
            ]
        except (OSError, ValueError, KeyError, TypeError):
            return None, ""
        return 2 ** (blocks[0] - 1) * 2 ** (blocks[1] - 1), name
    from pipeline.lumen.base import PRESETS  # imports torch: after the cheap checks

    preset = PRESETS[cfg.base.preset]
    n_vae, n_unet = len(preset["vae"]["block_out_channels"]), len(preset["unet"]["block_out_channels"])
    return 2 ** (n_vae - 1) * 2 ** (n_unet - 1), f"the {cfg.base.preset} base preset"
