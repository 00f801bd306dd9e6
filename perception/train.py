"""Train one perception model for a fixed number of optimizer steps and return its validation metrics.

``train()`` is the unit of the real vs real+synthetic protocol: the same seed gives the same initial
weights and the same order of draws, so two arms that differ only in their data are a matched pair.
It writes nothing unless ``out_dir`` is given (then: ``metrics.csv`` logs, ``result.json``, and the
weights when ``save_model``).

With ``parallel`` (``runner.devices`` above 1) the fit runs data-parallel: :func:`pipeline.distributed.launch`
starts the processes, each rebuilds the same seeded data and model and joins Lightning's DDP strategy
(:class:`_JoinedJob`), trains on its share of every global batch (:class:`perception.data.RankSlice`), and
rank 0 hands its weights back; validation then runs in the calling process as for one process.
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
from pytorch_lightning.plugins.environments import LightningEnvironment

from perception.data import PerceptionDataModule, RankSlice, SampleData, as_samples, dataset_info_from_shards
from perception.models import PerceptionModule
from pipeline.config import PerceptionConfig
from pipeline.data.sample import DatasetInfo
from pipeline.distributed import SINGLE, DataParallel, ParallelSettings, launch
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


class _JoinedJob(LightningEnvironment):
    """A Lightning cluster environment for a process that is already one rank of a running job (the
    processes and the process group come from :func:`pipeline.distributed.launch`), so the
    ``Trainer`` neither starts processes nor initialises the group again."""

    def __init__(self, parallel: DataParallel) -> None:
        super().__init__()
        fabric: Any = parallel.fabric
        self._world, self._rank = parallel.world_size, parallel.rank
        self._local, self._node = int(fabric.local_rank), int(fabric.node_rank)

    @property
    def creates_processes_externally(self) -> bool:
        return True

    def world_size(self) -> int:
        return self._world

    def global_rank(self) -> int:
        return self._rank

    def local_rank(self) -> int:
        return self._local

    def node_rank(self) -> int:
        return self._node


class _SyncBuffers(pl.Callback):
    """Give every rank rank 0's buffers (batch-norm running statistics) before each validation and at
    the end of training: DDP broadcasts them only at the start of a training forward, so after one
    each rank holds statistics of its own share of the batch."""

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _broadcast_buffers(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _broadcast_buffers(pl_module)


def _broadcast_buffers(module: torch.nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def _csv_logger(out: Path | None) -> CSVLogger | bool:
    """The run's ``logs/metrics.csv`` (one logger for the fit and the validation after it)."""
    return CSVLogger(str(out), name="", version="logs") if out is not None else False


def _common_trainer_args(device: str, out: Path | None, logger: CSVLogger | bool) -> dict[str, Any]:
    accelerator, devices = trainer_device(device)
    return {
        "accelerator": accelerator,
        "devices": devices,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(out) if out is not None else None,
    }


def _parallel_trainer_args(parallel: DataParallel) -> dict[str, Any]:
    """Trainer arguments that join this rank's job: DDP on the job's devices; on CUDA batch norm
    becomes SyncBatchNorm (statistics over the global batch; PyTorch has it for GPUs only, so CPU
    processes normalise their own share)."""
    from pytorch_lightning.strategies import DDPStrategy

    device = parallel.device or torch.device("cpu")
    cuda = device.type == "cuda"
    return {
        "accelerator": "gpu" if cuda else device.type,
        "devices": parallel.local_world_size,
        "num_nodes": parallel.num_nodes,
        # timm encoders can hold layers the features they return skip (e.g. a classifier stage)
        "strategy": DDPStrategy(cluster_environment=_JoinedJob(parallel), find_unused_parameters=True),
        "use_distributed_sampler": False,  # the loader already holds this rank's share (RankSlice)
        "sync_batchnorm": cuda,
    }


def _fit(
    model: PerceptionModule,
    data: PerceptionDataModule,
    steps: int,
    val_every: int | None,
    schedule: PerceptionConfig,
    device: str,
    out: Path | None,
    logger: CSVLogger | bool,
    callbacks: Sequence[pl.Callback] = (),
    parallel: DataParallel = SINGLE,
) -> tuple[int, list[dict[str, Any]] | None]:
    """Fit for exactly ``steps`` optimizer steps, each over ``schedule.grad_accum`` batches in
    ``schedule.precision``: ``(steps taken, learning curve or None)``.

    In a data-parallel job every rank trains on its share of each global batch; the curve's
    validations run the whole validation data on every rank (the metrics' states are summed over the
    ranks, which leaves their values those of one process)."""
    common = _common_trainer_args(device, out, logger)
    loader = data.train_dataloader(parallel.rank, parallel.world_size)
    if parallel.world_size > 1:
        common.update(_parallel_trainer_args(parallel))
        callbacks = [*callbacks, _SyncBuffers()]
    curve = _Curve()
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accumulate_grad_batches=schedule.grad_accum,
        precision=schedule.precision,
        limit_val_batches=1.0 if val_every else 0,
        val_check_interval=val_every * schedule.grad_accum if val_every else None,  # counted in batches
        check_val_every_n_epoch=None if val_every else 1,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(loader))),
        callbacks=[curve, *callbacks],
        **common,
    )
    with _quiet_lightning():
        trainer.fit(
            model, train_dataloaders=loader, val_dataloaders=data.val_dataloader() if val_every else None
        )
    return int(trainer.global_step), curve.points if val_every else None


def _validate(
    model: PerceptionModule,
    data: PerceptionDataModule,
    test: SampleData | None,
    device: str,
    out: Path | None,
    logger: CSVLogger | bool,
) -> dict[str, dict[str, float]]:
    """Validate on the real validation data (returned), then on ``test`` when given, which leaves the
    test metrics in ``model.val_results``."""
    evaluator = pl.Trainer(**_common_trainer_args(device, out, logger))
    with _quiet_lightning():
        evaluator.validate(model, dataloaders=data.val_dataloader(), verbose=False)
        val_metrics = model.val_results
        if test is not None:
            evaluator.validate(model, dataloaders=data.eval_dataloader(test), verbose=False)
    return val_metrics


def _fit_and_validate(
    model: PerceptionModule,
    data: PerceptionDataModule,
    test: SampleData | None,
    steps: int,
    val_every: int | None,
    schedule: PerceptionConfig,
    device: str,
    out: Path | None,
    callbacks: Sequence[pl.Callback] = (),
) -> _Fit:
    """Fit for exactly ``steps`` optimizer steps in this process, then validate (:func:`_validate`)."""
    logger = _csv_logger(out)
    taken, curve = _fit(model, data, steps, val_every, schedule, device, out, logger, callbacks)
    return _Fit(taken, _validate(model, data, test, device, out, logger), curve)


@dataclass(frozen=True)
class _RankJob:
    """What every process of a data-parallel perception run needs: the same inputs, so that each
    builds the same seeded data and model."""

    config: PerceptionConfig
    tasks: list[str]
    info: DatasetInfo | None
    seed: int
    label_seed: int | None
    real: SampleData
    val: SampleData
    synthetic: SampleData | None
    data_options: dict[str, Any]
    steps: int
    val_every: int | None
    out: Path | None
    weights: Path  # where rank 0 leaves the trained weights for the caller
    callbacks: tuple[pl.Callback, ...]


def _fit_rank(parallel: DataParallel, job: _RankJob) -> dict[str, Any]:
    """One rank of a data-parallel perception run: fit, and rank 0 saves the weights (net and buffers)."""
    data, model = _seeded_data_and_model(job.config, job.tasks, job.info, job.seed, job.label_seed, job.real,
                                         job.val, job.synthetic, **job.data_options)  # fmt: skip
    device = "cuda" if parallel.device is not None and parallel.device.type == "cuda" else "cpu"
    logger = _csv_logger(job.out)
    steps, curve = _fit(
        model, data, job.steps, job.val_every, job.config, device, job.out, logger, job.callbacks, parallel
    )
    if parallel.is_main:
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
        atomic_write_bytes(job.weights, save(state))
    parallel.barrier()
    return {"steps": steps, "curve": curve}


_LAUNCH_LOCK = threading.Lock()  # one data-parallel job at a time: it holds every device


def _fit_data_parallel(
    settings: ParallelSettings,
    model: PerceptionModule,
    data: PerceptionDataModule,
    job: dict[str, Any],
    test: SampleData | None,
    device: str,
    out: Path | None,
) -> _Fit:
    """Fit over the processes of ``settings`` (each rebuilds the seeded data and model, as ``model``
    and ``data`` were built here), load rank 0's weights into ``model``, and validate it here, as a
    single-process run would."""
    import tempfile

    from safetensors.torch import load_file

    RankSlice.check(data.train_batch_size, settings.world_size)  # before any process starts
    with tempfile.TemporaryDirectory(prefix="lumen-perception-") as tmp, _LAUNCH_LOCK:
        rank_job = _RankJob(out=out, weights=Path(tmp) / "model.safetensors", **job)
        fitted = launch(settings, _fit_rank, rank_job)
        model.net.load_state_dict(load_file(str(rank_job.weights)))
    # logs/metrics.csv holds the ranks' training log; the metrics are in result.json
    return _Fit(int(fitted["steps"]), _validate(model, data, test, device, out, False), fitted["curve"])


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
    parallel: ParallelSettings | None = None,
    callbacks: Sequence[pl.Callback] = (),
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
        parallel: train data-parallel over ``parallel.world_size`` processes
            (:func:`pipeline.distributed.launch`), each on its share of every batch of
            ``config.batch_size`` (plus extra samples), which must divide over them; the result is that
            of one process up to batch norm, whose statistics on CPU are per process (CUDA processes
            use SyncBatchNorm). Validation runs here afterwards. None or one process: train here.
        callbacks: extra Lightning callbacks for the fit (picklable for ``parallel``).

    Returns:
        A :class:`TrainResult` whose ``metrics`` are ``{task: {metric: value}}``.
    """
    config = config or PerceptionConfig()
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    steps = int(steps or config.steps)
    info = _checked_info(info, real, task_list)
    out = Path(out_dir) if out_dir is not None else None
    started = time.perf_counter()
    options = {"synthetic_ratio": synthetic_ratio, "extra_photometric": extra_photometric,
               "low_label_fraction": low_label_fraction}  # fmt: skip
    data, model = _seeded_data_and_model(
        config, task_list, info, seed, label_seed, real, val, synthetic, **options
    )
    if parallel is not None and parallel.world_size > 1:
        job = {"config": config, "tasks": task_list, "info": info, "seed": seed, "label_seed": label_seed,
               "real": real, "val": val, "synthetic": synthetic, "data_options": options, "steps": steps,
               "val_every": val_every, "callbacks": tuple(callbacks)}  # fmt: skip
        fit = _fit_data_parallel(parallel, model, data, job, test, device, out)
    else:
        fit = _fit_and_validate(model, data, test, steps, val_every, config, device, out, callbacks)
    result = _train_result(task_list, seed, model, data, fit, test, started)
    _write_outputs(out, result, model, save_model)
    logger.info("trained %s, seed %d, %d steps: %s", "+".join(task_list), seed, result.steps, result.metrics)
    return result
