"""The real-only vs real+synthetic protocol: matched runs over seeds and label settings, then the gains.

For every setting (``low-label``: a fraction of the labelled real images; ``full``: all of them), every
seed and every task (or all tasks together with ``multitask``), two models are trained:

- ``real``: the setting's labelled real images only;
- ``real+synthetic``: the same real images mixed with the synthetic variants of those images, at
  ``synthetic_ratio`` of every batch.

Both arms of a pair use the same seed (hence the same initial weights), the same batch size and the
same number of optimizer steps, and are validated on the same real validation images. In the low-label setting the labelled subset is chosen by key with the
run's seed, so each seed pair has its own subset, shared by its two arms. The per-run records are
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
from perception.train import train
from pipeline.config import PerceptionConfig, config_hash
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.io import atomic_write_json
from pipeline.report.gains import ARMS, aggregate

__all__ = ["ARMS", "RunSpec", "default_settings", "plan_runs", "protocol_summary", "run_one", "run_protocol"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the protocol.

    Attributes:
        tasks: the tasks of the model (one, or all of them with ``multitask``).
        setting: ``low-label``, ``full`` or a custom name.
        label_fraction: share of the labelled real images used (None = all).
        arm: ``real`` or ``real+synthetic``.
        seed: the run's seed, shared by the two arms of a pair.
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
    """``{"low-label": config.low_label_fraction, "full": None}`` (no low-label setting when it is None or 1)."""
    settings: dict[str, float | None] = {}
    if config.low_label_fraction is not None and config.low_label_fraction < 1:
        settings["low-label"] = config.low_label_fraction
    settings["full"] = None
    return settings


def plan_runs(config: PerceptionConfig, settings: Mapping[str, float | None] | None = None) -> list[RunSpec]:
    """Every run of the protocol, pairs adjacent: settings x seeds x task groups x arms."""
    settings = default_settings(config) if settings is None else settings
    groups = [tuple(config.tasks)] if config.multitask else [(t,) for t in config.tasks]
    return [
        RunSpec(group, setting, fraction, arm, seed)
        for setting, fraction in settings.items()
        for seed in config.seeds
        for group in groups
        for arm in ARMS
    ]


def _data_id(*datasets: Sequence[Sample] | None) -> str:
    """A short hash of the sample keys of each dataset (identifies the data a run used)."""
    h = hashlib.sha256()
    for data in datasets:
        keys = catalog(data)[0] if data is not None else []
        h.update(json.dumps(keys).encode())
    return h.hexdigest()[:16]


def run_one(
    spec: RunSpec,
    real: SampleData,
    val: SampleData,
    synthetic: SampleData | None,
    *,
    config: PerceptionConfig,
    info: DatasetInfo | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the run ``spec`` (or reuse its finished ``run.json`` under ``out_dir``) and return its record.

    Returns:
        ``{"tasks", "setting", "label_fraction", "arm", "seed", "synthetic_ratio", "steps", "metrics":
        {task: {metric: value}}, "model_sha256", "num_real", "num_synthetic", "num_val", "seconds",
        "config_hash", "data_id"}``.
    """
    real_s, val_s = as_samples(real), as_samples(val)
    syn_s = as_samples(synthetic) if synthetic is not None and spec.arm != "real" else None
    if spec.arm not in ARMS:
        raise ValueError(f"unknown arm {spec.arm!r}; valid: {', '.join(ARMS)}")
    if spec.arm == "real+synthetic" and syn_s is None:
        raise ValueError("the real+synthetic arm needs synthetic data")
    ident = {"config_hash": config_hash(config), "data_id": _data_id(real_s, val_s, syn_s)}
    run_dir = Path(out_dir) / spec.name if out_dir is not None else None
    if run_dir is not None and (run_dir / "run.json").is_file():
        record = json.loads((run_dir / "run.json").read_text())
        if all(record.get(k) == v for k, v in ident.items()):
            logger.info("reusing finished run %s", spec.name)
            return dict(record)
    ratio = config.synthetic_ratio if spec.arm == "real+synthetic" else 0.0
    result = train(
        list(spec.tasks),
        real_s,
        val_s,
        synthetic=syn_s,
        config=config,
        info=info,
        seed=spec.seed,
        synthetic_ratio=ratio,
        low_label_fraction=spec.label_fraction,
        label_seed=spec.seed,
        out_dir=run_dir,
        device=device,
    )
    record = {
        **asdict(spec),
        "tasks": list(spec.tasks),
        "synthetic_ratio": ratio,
        **result.to_dict(),
        **ident,
    }
    if run_dir is not None:
        atomic_write_json(run_dir / "run.json", record)
    return record


def protocol_summary(config: PerceptionConfig, settings: Mapping[str, float | None]) -> dict[str, Any]:
    """The protocol's description for the report."""
    return {
        "arms": {
            "real": "the setting's labelled real images only",
            "real+synthetic": "the same real images plus the synthetic variants of those images",
        },
        "settings": {name: {"label_fraction": fraction} for name, fraction in settings.items()},
        "seeds": list(config.seeds),
        "steps": config.steps,
        "batch_size": config.batch_size,
        "synthetic_ratio": config.synthetic_ratio,
        "multitask": config.multitask,
        "model": {
            "arch": config.arch,
            "encoder": config.encoder,
            "encoder_weights": config.encoder_weights,
            "encoder_depth": config.encoder_depth,
            "decoder_channels": config.decoder_channels,
        },
        "pairing": "the two arms of a seed share initial weights, steps, batch size and labelled subset",
        "alpha": config.alpha,
    }


def run_protocol(
    real: SampleData,
    val: SampleData,
    synthetic: SampleData,
    *,
    config: PerceptionConfig | None = None,
    info: DatasetInfo | None = None,
    settings: Mapping[str, float | None] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every pair of the protocol and aggregate the gains.

    Args:
        real: labelled real training data (samples or shard-set folders).
        val: real validation data.
        synthetic: synthetic training data (variants of ``real``).
        config: the perception settings (tasks, seeds, steps, ratio, model, ...).
        info: the dataset (classes, ignore index); from the real shard set's manifest if None.
        settings: ``{name: label fraction or None}``; default :func:`default_settings`.
        out_dir: per-run logs and ``run.json`` (resumable); None writes nothing.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.

    Returns:
        ``{"protocol": ..., "tasks": {task: {"settings": {setting: {"real": {metric: {"mean", "std",
        "n", "values"}}, "real+synthetic": {...}, "gain": {metric: x}, "significance": {...}}}}},
        "runs": [record, ...]}`` (see docs/perception.md).
    """
    config = config or PerceptionConfig()
    settings = default_settings(config) if settings is None else dict(settings)
    if info is None and isinstance(real, (str, os.PathLike)):
        info = dataset_info_from_shards(real)
    real_s, val_s, syn_s = as_samples(real), as_samples(val), as_samples(synthetic)
    specs = plan_runs(config, settings)
    runs = []
    for i, spec in enumerate(specs):
        logger.info("protocol run %d/%d: %s", i + 1, len(specs), spec.name)
        runs.append(
            run_one(spec, real_s, val_s, syn_s, config=config, info=info, out_dir=out_dir, device=device)
        )
    return {
        "protocol": protocol_summary(config, settings),
        "tasks": aggregate(runs, alpha=config.alpha),
        "runs": runs,
    }
