"""The gains protocol: matched runs of every arm over seeds and label settings, then the gains.

For every setting (``low-label``: a fraction of the labelled real images; ``full``: all of them), every
seed and every task (or all tasks together with ``multitask``), one model per arm
(``config.arms``) is trained:

- ``real``: the setting's labelled real images only;
- ``real+augment``: the same, plus strongly photometrically augmented copies of them (colour, blur,
  noise, contrast): the classical baseline synthetic data has to beat;
- ``real+oracle`` (toy scenes): plus the same scenes re-rendered with new appearance and exact labels,
  what a perfect generator would give (the ceiling);
- ``real+synthetic``: plus the generator's variants of those images.

With ``mixing: additive`` (the default) every arm sees exactly the real samples of the ``real`` arm,
batch by batch, and the extra samples come on top (``extra_ratio`` per real one); ``replace`` gives
``synthetic_ratio`` of each batch to them instead. All arms of a seed use the same seed (hence the
same initial weights), the same number of optimizer steps and the same labelled subset (chosen by key
with the seed), and are evaluated on the same real images: the test split when given (reported), and
the validation split (for choosing schedules, never reported as the result). The per-run records are
aggregated by :func:`pipeline.report.gains.aggregate` into the ``report.json`` shape.

With ``out_dir``, every run writes ``<out_dir>/<run name>/run.json``; a rerun with the same config and
data reuses finished runs, so an interrupted protocol resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perception.data import SampleData, as_samples, catalog, dataset_info_from_shards
from perception.train import TrainResult, train
from pipeline.config import PerceptionConfig
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.distributed import ParallelSettings
from pipeline.io import atomic_write_json
from pipeline.report.gains import ARMS, aggregate

__all__ = [
    "ARMS",
    "ARM_DESCRIPTIONS",
    "RunSpec",
    "default_settings",
    "plan_runs",
    "protocol_summary",
    "run_identity",
    "run_one",
    "run_protocol",
]

logger = logging.getLogger(__name__)

ARM_DESCRIPTIONS: dict[str, str] = {
    "real": "the setting's labelled real images only",
    "real+augment": "the same real images, plus copies of them under strong photometric augmentation "
    "(colour, gamma, grey, blur, noise)",
    "real+oracle": "the same real images, plus their scenes re-rendered with new appearance "
    "(palette, textures, lighting, domain) and identical geometry, hence exact labels: the ceiling",
    "real+synthetic": "the same real images, plus the generator's variants of those images",
}

_RUN_INDEPENDENT = ("arms", "seeds", "alpha", "full_setting", "low_label_fraction")
"""PerceptionConfig keys that choose which runs exist, not what a run does (left out of its identity)."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the protocol.

    Attributes:
        tasks: the tasks of the model (one, or all of them with ``multitask``).
        setting: ``low-label``, ``full`` or a custom name.
        label_fraction: share of the labelled real images used (None = all).
        arm: one of :data:`ARMS`.
        seed: the run's seed, shared by the arms of a seed.
    """

    tasks: tuple[str, ...]
    setting: str
    label_fraction: float | None
    arm: str
    seed: int

    @property
    def name(self) -> str:
        """A relative folder name, e.g. ``seg/low-label/real-synthetic/seed-0``."""
        arm = self.arm.replace("+", "-")
        return f"{'+'.join(self.tasks)}/{self.setting}/{arm}/seed-{self.seed}"


def default_settings(config: PerceptionConfig) -> dict[str, float | None]:
    """``{"low-label": config.low_label_fraction, "full": None}``: no low-label setting when the fraction
    is None or 1, no full setting when ``config.full_setting`` is false."""
    settings: dict[str, float | None] = {}
    if config.low_label_fraction is not None and config.low_label_fraction < 1:
        settings["low-label"] = config.low_label_fraction
    if config.full_setting or not settings:
        settings["full"] = None
    return settings


def plan_runs(config: PerceptionConfig, settings: Mapping[str, float | None] | None = None) -> list[RunSpec]:
    """Every run of the protocol, the arms of a seed adjacent: settings x seeds x task groups x arms
    (``real`` first)."""
    settings = default_settings(config) if settings is None else settings
    if config.tasks is None:
        raise ValueError(
            "perception.tasks is null (every label of the dataset): resolve it first with "
            "pipeline.preflight.resolve_config(cfg)"
        )
    groups = [tuple(config.tasks)] if config.multitask else [(t,) for t in config.tasks]
    arms = ["real", *[a for a in ARMS if a != "real" and a in config.arms]]
    return [
        RunSpec(group, setting, fraction, arm, seed)
        for setting, fraction in settings.items()
        for seed in config.seeds
        for group in groups
        for arm in arms
    ]


def run_identity(config: PerceptionConfig) -> str:
    """A hash of the settings that change what one run does (not which runs exist: arms, seeds, ...)."""
    data = {k: v for k, v in config.model_dump(mode="json").items() if k not in _RUN_INDEPENDENT}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _data_id(*datasets: Sequence[Sample] | None) -> str:
    """A short hash of the sample keys of each dataset (identifies the data a run used)."""
    h = hashlib.sha256()
    for data in datasets:
        keys = catalog(data)[0] if data is not None else []
        h.update(json.dumps(keys).encode())
    return h.hexdigest()[:16]


def _extra_data(
    spec: RunSpec,
    real: Sequence[Sample],
    synthetic: Sequence[Sample] | None,
    oracle: Sequence[Sample] | None,
    config: PerceptionConfig,
) -> tuple[Sequence[Sample] | None, float]:
    """The extra training samples of the run's arm, and the photometric strength applied to them."""
    if spec.arm not in ARMS:
        raise ValueError(f"unknown arm {spec.arm!r}; valid: {', '.join(ARMS)}")
    if spec.arm == "real":
        return None, 0.0
    if spec.arm == "real+augment":
        return real, config.augment_strength
    data = synthetic if spec.arm == "real+synthetic" else oracle
    if data is None:
        what = "synthetic data" if spec.arm == "real+synthetic" else "oracle re-renders (toy scenes only)"
        raise ValueError(f"the {spec.arm} arm needs {what}")
    return data, 0.0


def _finished_record(spec: RunSpec, run_dir: Path | None, ident: Mapping[str, str]) -> dict[str, Any] | None:
    """The record in ``run_dir/run.json`` when the run finished there with the same config and data."""
    if run_dir is None or not (run_dir / "run.json").is_file():
        return None
    record = json.loads((run_dir / "run.json").read_text())
    if not all(record.get(k) == v for k, v in ident.items()):
        return None
    logger.info("reusing finished run %s", spec.name)
    return dict(record)


def _record_run(
    spec: RunSpec,
    config: PerceptionConfig,
    result: TrainResult,
    ident: Mapping[str, str],
    *,
    has_extra: bool,
    ratio: float,
    has_test: bool,
    run_dir: Path | None,
) -> dict[str, Any]:
    """The run's record, written to ``run_dir/run.json`` when given; a short run is never recorded."""
    if result.steps != config.steps:  # e.g. Lightning stopped on SIGTERM
        raise RuntimeError(f"{spec.name} stopped after {result.steps} of {config.steps} steps; not recorded")
    record = {
        **asdict(spec),
        "tasks": list(spec.tasks),
        "mixing": config.mixing,
        "extra_ratio": config.extra_ratio if has_extra and config.mixing == "additive" else 0.0,
        "synthetic_ratio": ratio,
        "eval_split": "test" if has_test else "val",
        **result.to_dict(),
        **ident,
    }
    if run_dir is not None:
        atomic_write_json(run_dir / "run.json", record)
    return record


def run_one(
    spec: RunSpec,
    real: SampleData,
    val: SampleData,
    synthetic: SampleData | None,
    *,
    config: PerceptionConfig,
    info: DatasetInfo | None = None,
    oracle: SampleData | None = None,
    test: SampleData | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    parallel: ParallelSettings | None = None,
) -> dict[str, Any]:
    """Train the run ``spec`` (or reuse its finished ``run.json`` under ``out_dir``) and return its record.

    Args:
        spec: the run.
        real, val: labelled real training data and real validation data.
        synthetic: the generator's variants (the ``real+synthetic`` arm), or None.
        config: the perception settings.
        info: the dataset (classes, ignore index).
        oracle: toy scenes re-rendered with new appearance (the ``real+oracle`` arm), or None.
        test: test data; when given, ``metrics`` are test metrics (and ``val_metrics`` validation ones).
        out_dir: where ``<spec.name>/run.json`` and the logs go; None writes nothing.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        parallel: train data-parallel over these processes (:func:`perception.train.train`).

    Returns:
        ``{"tasks", "setting", "label_fraction", "arm", "seed", "mixing", "extra_ratio",
        "synthetic_ratio", "eval_split", "steps", "metrics": {task: {metric: value}}, "val_metrics",
        "curve", "model_sha256", "num_real", "num_synthetic", "num_val", "num_test", "seconds",
        "config_hash", "data_id"}``.
    """
    real_s, val_s = as_samples(real), as_samples(val)
    test_s, syn_s, oracle_s = (as_samples(d) if d is not None else None for d in (test, synthetic, oracle))
    extra, photometric = _extra_data(spec, real_s, syn_s, oracle_s, config)
    ident = {"config_hash": run_identity(config), "data_id": _data_id(real_s, val_s, extra, test_s)}
    run_dir = Path(out_dir) / spec.name if out_dir is not None else None
    if (finished := _finished_record(spec, run_dir, ident)) is not None:
        return finished
    ratio = config.synthetic_ratio if extra is not None and config.mixing == "replace" else 0.0
    result = train(
        list(spec.tasks),
        real_s,
        val_s,
        synthetic=extra,
        config=config,
        info=info,
        seed=spec.seed,
        synthetic_ratio=ratio,
        extra_photometric=photometric,
        low_label_fraction=spec.label_fraction,
        label_seed=spec.seed,
        test=test_s,
        val_every=config.val_every,
        out_dir=run_dir,
        device=device,
        parallel=parallel,
    )
    return _record_run(spec, config, result, ident, has_extra=extra is not None, ratio=ratio,
                       has_test=test_s is not None, run_dir=run_dir)  # fmt: skip


def protocol_summary(
    config: PerceptionConfig, settings: Mapping[str, float | None], **extra: Any
) -> dict[str, Any]:
    """The protocol's description for the report (``extra`` items are added as they are)."""
    arms = [spec_arm for spec_arm in ARMS if spec_arm == "real" or spec_arm in config.arms]
    return {
        "arms": {arm: ARM_DESCRIPTIONS[arm] for arm in arms},
        "settings": {name: {"label_fraction": fraction} for name, fraction in settings.items()},
        "seeds": list(config.seeds),
        "steps": config.steps,
        "batch_size": config.batch_size,
        "mixing": config.mixing,
        "extra_ratio": config.extra_ratio,
        "synthetic_ratio": config.synthetic_ratio,
        "augment_strength": config.augment_strength,
        "multitask": config.multitask,
        "report_split": config.report_split,
        "model": {
            "arch": config.arch,
            "encoder": config.encoder,
            "encoder_weights": config.encoder_weights,
            "encoder_depth": config.encoder_depth,
            "decoder_channels": config.decoder_channels,
        },
        "pairing": "the arms of a seed share initial weights, steps, labelled subset and real batches "
        "(additive mixing: the extra samples come on top of the same real samples)",
        "alpha": config.alpha,
        **extra,
    }


def run_protocol(
    real: SampleData,
    val: SampleData,
    synthetic: SampleData | None = None,
    *,
    config: PerceptionConfig | None = None,
    info: DatasetInfo | None = None,
    oracle: SampleData | None = None,
    test: SampleData | None = None,
    settings: Mapping[str, float | None] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every arm of every seed and setting, and aggregate the gains over the ``real`` arm.

    Args:
        real: labelled real training data (samples or shard-set folders).
        val: real validation data.
        synthetic: synthetic training data (variants of ``real``; the ``real+synthetic`` arm).
        config: the perception settings (tasks, arms, seeds, steps, mixing, model, ...).
        info: the dataset (classes, ignore index); from the real shard set's manifest if None.
        oracle: toy-scene re-renders of ``real`` (the ``real+oracle`` arm).
        test: test data, on which the metrics are reported (None: the validation data).
        settings: ``{name: label fraction or None}``; default :func:`default_settings`.
        out_dir: per-run logs and ``run.json`` (resumable); None writes nothing.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.

    Returns:
        ``{"protocol": ..., "tasks": {task: {"settings": {setting: {arm: {metric: {"mean", "std",
        "n", "values"}}, "gain": {arm: {metric: x}}, "significance": {arm: {metric: {...}}},
        "oracle_share": {metric: x}}}}}, "runs": [record, ...]}`` (see docs/perception.md).
    """
    config = config or PerceptionConfig()
    settings = default_settings(config) if settings is None else dict(settings)
    if info is None and isinstance(real, (str, os.PathLike)):
        info = dataset_info_from_shards(real)
    real, val = as_samples(real), as_samples(val)
    synthetic = as_samples(synthetic) if synthetic is not None else None
    oracle = as_samples(oracle) if oracle is not None else None
    test = as_samples(test) if test is not None else None
    specs = plan_runs(config, settings)
    runs = []
    for i, spec in enumerate(specs):
        logger.info("protocol run %d/%d: %s", i + 1, len(specs), spec.name)
        record = run_one(spec, real, val, synthetic, config=config, info=info, oracle=oracle, test=test,
                         out_dir=out_dir, device=device)  # fmt: skip
        runs.append(record)
    return {
        "protocol": protocol_summary(config, settings),
        "tasks": aggregate(runs, alpha=config.alpha),
        "runs": runs,
    }
