"""Train one perception model for a fixed number of optimizer steps and return its validation metrics.

``train()`` is the unit of the real vs real+synthetic protocol: the same seed gives the same initial
weights and the same order of draws, so two arms that differ only in their data are a matched pair.
It writes nothing unless ``out_dir`` is given (then: ``metrics.csv`` logs, ``result.json``, and the
weights when ``save_model``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from perception.data import PerceptionDataModule, SampleData, as_samples, dataset_info_from_shards
from perception.models import PerceptionModule
from pipeline.config import PerceptionConfig
from pipeline.data.sample import DatasetInfo
from pipeline.io import atomic_write_bytes, atomic_write_json

__all__ = ["TrainResult", "state_dict_sha256", "train", "trainer_device"]

_SEED_LOCK = threading.Lock()

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one training run produced.

    Attributes:
        tasks: the tasks the model was trained on.
        seed: the run's seed (weights init, draws, augmentation).
        steps: optimizer steps taken.
        metrics: ``{task: {metric: value}}`` on the reported split: the test data when given, else
            the real validation data.
        model_sha256: sha256 of the trained weights (:func:`state_dict_sha256`).
        num_real, num_synthetic, num_val: samples used (after the low-label selection).
        seconds: wall time of training and validation.
        val_metrics: the validation metrics when ``metrics`` are test metrics, else None.
        num_test: test samples (None without test data).
        curve: with ``val_every``, the validation metrics every that many steps:
            ``[{"step", task: {metric: value}}, ...]``.
    """

    tasks: list[str]
    seed: int
    steps: int
    metrics: dict[str, dict[str, float]]
    model_sha256: str
    num_real: int
    num_synthetic: int
    num_val: int
    seconds: float
    val_metrics: dict[str, dict[str, float]] | None = None
    num_test: int | None = None
    curve: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        return asdict(self)


class _Curve(pl.Callback):
    """Collects the validation metrics of every validation run during ``fit`` (the learning curve)."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            results = getattr(pl_module, "val_results", {})
            self.points.append({"step": int(trainer.global_step), **results})


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's parameters and buffers (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainer_device(device: str) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if device == "auto":
        return "auto", "auto"
    if device == "cpu":
        return "cpu", 1
    if device == "cuda":
        return "gpu", 1
    if device.startswith("cuda:"):
        return "gpu", [int(device.split(":", 1)[1])]
    if device == "mps":
        return "mps", 1
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def _resolve_info(info: DatasetInfo | None, real: SampleData) -> DatasetInfo | None:
    if info is not None:
        return info
    if isinstance(real, (str, os.PathLike)):
        return dataset_info_from_shards(real)
    return None


def _checked_info(info: DatasetInfo | None, real: SampleData, tasks: list[str]) -> DatasetInfo | None:
    """The dataset (:func:`_resolve_info`); the seg task needs its classes."""
    info = _resolve_info(info, real)
    if "seg" in tasks and (info is None or info.num_classes < 2):
        raise ValueError("the seg task needs info=DatasetInfo(classes=..., ignore_index=...) with 2+ classes")
    return info


def _seeded_data_and_model(
    config: PerceptionConfig,
    tasks: list[str],
    info: DatasetInfo | None,
    seed: int,
    label_seed: int | None,
    real: SampleData,
    val: SampleData,
    synthetic: SampleData | None,
    **data_options: Any,
) -> tuple[PerceptionDataModule, PerceptionModule]:
    """Data and model, both from the seed (the low-label choice from ``label_seed``, default ``seed``;
    ``data_options`` go to :meth:`PerceptionDataModule.from_config`).

    The initial weights come from torch's process-wide generator, so runs on concurrent threads (the
    flows' runner) seed and draw it one at a time.
    """
    with _SEED_LOCK:
        pl.seed_everything(seed, workers=True, verbose=False)
        data = PerceptionDataModule.from_config(
            config,
            real,
            val,
            synthetic,
            tasks=tasks,
            label_seed=seed if label_seed is None else label_seed,
            seed=seed,
            ignore_index=info.ignore_index if info is not None else None,
            **data_options,
        )
        data.setup("fit")
        model = PerceptionModule.from_config(
            config,
            tasks,
            num_classes=info.num_classes if info else None,
            class_names=info.classes if info else None,
        )
    return data, model


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's warnings that do not apply to these short, worker-less runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings(
            "ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*"
        )
        warnings.filterwarnings(
            "ignore", message=".*isinstance\\(treespec, LeafSpec\\).*"
        )  # Lightning internal
        yield


class _Fit(NamedTuple):
    """What fitting and validating produced (the metrics themselves stay on the model)."""

    steps: int
    val_metrics: dict[str, dict[str, float]]
    curve: list[dict[str, Any]] | None


def _fit_and_validate(
    model: PerceptionModule,
    data: PerceptionDataModule,
    test: SampleData | None,
    steps: int,
    val_every: int | None,
    device: str,
    out: Path | None,
) -> _Fit:
    """Fit for exactly ``steps`` optimizer steps, then validate on the real validation data (and on
    ``test``, which leaves the test metrics in ``model.val_results``)."""
    accelerator, devices = trainer_device(device)
    csv = CSVLogger(str(out), name="", version="logs") if out is not None else False
    common: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": devices,
        "logger": csv,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(out) if out is not None else None,
    }
    loader = data.train_dataloader()
    curve = _Curve()
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=1.0 if val_every else 0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(loader))),
        callbacks=[curve],
        **common,
    )
    with _quiet_lightning():
        trainer.fit(
            model, train_dataloaders=loader, val_dataloaders=data.val_dataloader() if val_every else None
        )
        evaluator = pl.Trainer(**common)
        evaluator.validate(model, dataloaders=data.val_dataloader(), verbose=False)
        val_metrics = model.val_results
        if test is not None:
            evaluator.validate(model, dataloaders=data.eval_dataloader(test), verbose=False)
    return _Fit(int(trainer.global_step), val_metrics, curve.points if val_every else None)


def _train_result(
    tasks: list[str],
    seed: int,
    model: PerceptionModule,
    data: PerceptionDataModule,
    fit: _Fit,
    test: SampleData | None,
    started: float,
) -> TrainResult:
    """The :class:`TrainResult` of a fitted and validated model (``seconds`` since ``started``)."""
    return TrainResult(
        tasks=tasks,
        seed=seed,
        steps=fit.steps,
        metrics=model.val_results,
        model_sha256=state_dict_sha256(model.net),
        num_real=len(data.real_train),
        num_synthetic=len(data.synthetic_train),
        num_val=len(data.val_samples),
        seconds=time.perf_counter() - started,
        val_metrics=fit.val_metrics if test is not None else None,
        num_test=len(as_samples(test)) if test is not None else None,
        curve=fit.curve,
    )


def _write_outputs(out: Path | None, result: TrainResult, model: PerceptionModule, save_model: bool) -> None:
    """``result.json`` (and ``model.safetensors`` with ``save_model``) in ``out``; nothing when None."""
    if out is None:
        return
    atomic_write_json(out / "result.json", result.to_dict())
    if save_model:
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
        atomic_write_bytes(out / "model.safetensors", save(state))


def train(
    tasks: str | Sequence[str],
    real: SampleData,
    val: SampleData,
    *,
    synthetic: SampleData | None = None,
    config: PerceptionConfig | None = None,
    info: DatasetInfo | None = None,
    seed: int = 0,
    steps: int | None = None,
    synthetic_ratio: float | None = None,
    extra_photometric: float = 0.0,
    low_label_fraction: float | None = None,
    label_seed: int | None = None,
    test: SampleData | None = None,
    val_every: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    save_model: bool = False,
    device: str = "cpu",
) -> TrainResult:
    """Train a model on real (or real + extra) data for ``steps`` optimizer steps; evaluate on real data.

    Args:
        tasks: ``seg``, ``depth``, ``normal`` or several of them (one shared model).
        real: labelled real training data (samples or shard-set folders, see :data:`SampleData`).
        val: real validation data.
        synthetic: extra training data (synthetic variants, oracle re-renders, or the real data again
            for the augment arm), mixed as ``config.mixing`` says; None trains on real data only.
        config: network, optimisation and augmentation settings (default :class:`PerceptionConfig`).
        info: the dataset (classes, ignore index); read from the real shard set's manifest if None.
        seed: seeds the initial weights, the draws and the augmentation.
        steps: optimizer steps (default ``config.steps``).
        synthetic_ratio: replace mixing: share of synthetic samples per batch (default
            ``config.synthetic_ratio`` when ``synthetic`` is given, else 0).
        extra_photometric: strength of the strong photometric augmentation of the extra samples.
        low_label_fraction: keep this share of the labelled real samples; None = all.
        label_seed: seed of the low-label choice (default ``seed``).
        test: test data: ``metrics`` are then measured on it, and ``val_metrics`` on ``val``.
        val_every: also validate every this many steps (``curve``); the training is the same.
        out_dir: where logs and ``result.json`` go; None writes nothing.
        save_model: also write ``model.safetensors`` to ``out_dir``.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.

    Returns:
        A :class:`TrainResult` whose ``metrics`` are ``{task: {metric: value}}``.
    """
    config = config or PerceptionConfig()
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    steps = int(steps or config.steps)
    info = _checked_info(info, real, task_list)
    out = Path(out_dir) if out_dir is not None else None
    started = time.perf_counter()
    data, model = _seeded_data_and_model(config, task_list, info, seed, label_seed, real, val, synthetic,
        synthetic_ratio=synthetic_ratio, extra_photometric=extra_photometric,
        low_label_fraction=low_label_fraction)  # fmt: skip
    fit = _fit_and_validate(model, data, test, steps, val_every, device, out)
    result = _train_result(task_list, seed, model, data, fit, test, started)
    _write_outputs(out, result, model, save_model)
    logger.info("trained %s, seed %d, %d steps: %s", "+".join(task_list), seed, result.steps, result.metrics)
    return result
