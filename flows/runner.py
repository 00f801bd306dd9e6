"""Task runners and device slots: how the flows' tasks run, chosen by the ``runner`` config section.

- ``runner.kind: thread`` (default): a :class:`~prefect.task_runners.ThreadPoolTaskRunner` with
  ``runner.max_workers`` threads. Device-bound tasks (generation, perception training) also take one
  of ``runner.gpu_concurrency`` slots of a process-wide semaphore, so threads never pile onto one GPU.
- ``runner.kind: dask``: a ``prefect_dask.DaskTaskRunner``. Without ``runner.dask_address`` it starts a
  ``distributed.LocalCluster`` of ``runner.max_workers`` single-threaded worker processes, each with
  ``runner.gpu_concurrency`` units of the Dask resource ``device``; device-bound tasks are submitted
  under ``dask.annotate(resources={"device": 1})``. With ``runner.dask_address`` it connects to that
  scheduler: start its workers with ``--resources device=1`` (one per GPU), see docs/flows.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from pipeline.config import LumenConfig, RunnerConfig

__all__ = ["build_task_runner", "configure_threads", "device_resources", "device_slot"]

_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def build_task_runner(runner: RunnerConfig) -> Any:
    """The Prefect task runner the ``runner`` section asks for."""
    if runner.kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - prefect-dask is a dependency
        raise RuntimeError("runner.kind=dask needs prefect-dask: pip install prefect-dask") from err
    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runner.max_workers,
            "threads_per_worker": 1,
            "processes": True,
            "resources": {"device": runner.gpu_concurrency},
            "dashboard_address": None,
        },
    )


@contextlib.contextmanager
def device_slot(runner: RunnerConfig) -> Iterator[None]:
    """Hold one of the process's ``gpu_concurrency`` device slots while a device-bound task runs."""
    with _SLOTS_LOCK:
        sem = _SLOTS.setdefault(runner.gpu_concurrency, threading.BoundedSemaphore(runner.gpu_concurrency))
    with sem:
        yield


def device_resources(runner: RunnerConfig) -> contextlib.AbstractContextManager[Any]:
    """Context for submitting device-bound tasks: Dask resource annotations, or nothing."""
    if runner.kind != "dask":
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"device": 1})


def configure_threads(cfg: LumenConfig, concurrent: int | None = None) -> None:
    """On CPU, share the cores between the device-bound tasks that run at once in this process
    (``concurrent``, default ``runner.gpu_concurrency``): torch's intra-op pool is process-wide.

    Left alone when ``OMP_NUM_THREADS`` is set (Dask workers set it to 1) or off CPU.
    """
    from pipeline.device import resolve_device

    if resolve_device(cfg.device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // (concurrent or cfg.runner.gpu_concurrency)))
