"""Data-parallel training on Lightning Fabric: one process per device, gradients averaged by DDP.

The trainers (base model, ControlNet) keep their own loops and take a :class:`DataParallel`, this
process's place in the job. Their batches are *global*: every rank draws the same global batch
(indices, noise, timesteps) from the same seeded generator and trains on its own slice of it, so
``P`` processes with batch ``B`` each compute exactly what one process computes with batch ``P*B``
(up to the order of floating-point sums), and a checkpoint (written by rank 0, read by every rank)
resumes every rank at the same place.

Processes come from :func:`launch`:

- under an external launcher (``torchrun``, SLURM: the environment names the rank and world size),
  every process runs the same command and joins the job (Fabric's ``ddp`` strategy);
- otherwise ``launch`` spawns ``devices`` processes on this machine (Fabric's ``ddp_spawn``) and
  returns rank 0's result, so ``lumen train-lumen CONFIG runner.devices=8`` needs no launcher.

Why Fabric rather than ``accelerate``: Lightning is already a dependency (perception trains with
the Lightning ``Trainer``, whose strategies are Fabric's), Fabric wraps hand-written loops without
taking them over, and it knows the cluster environments (torchrun, SLURM, LSF, MPI).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "SINGLE",
    "DataParallel",
    "ParallelSettings",
    "externally_launched",
    "global_rank",
    "launch",
]

log = logging.getLogger(__name__)

Strategy = Literal["auto", "ddp", "ddp_spawn"]

_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def externally_launched() -> bool:
    """Whether this process was started by a distributed launcher (torchrun, SLURM, mpirun) with a
    world of more than one process."""
    if any(v in os.environ for v in _LAUNCHER_ENV[1:]):
        size = os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
        return int(size) > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def global_rank() -> int:
    """This process's rank as its launcher names it (0 without a launcher)."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


@dataclass(frozen=True)
class ParallelSettings:
    """How many processes train, and where (the ``runner`` section's ``devices``, ``num_nodes``,
    ``strategy``; ``accelerator`` from the config's ``device``)."""

    devices: int = 1
    num_nodes: int = 1
    strategy: Strategy = "auto"
    accelerator: str = "auto"

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def fabric_strategy(self) -> str:
        """Fabric's strategy: ``ddp`` under an external launcher, else ``ddp_spawn``. Both average
        the gradients with DDP; they differ in who starts the processes (Fabric's ``ddp`` without
        a launcher would re-run the whole command line in each child, Prefect flow included)."""
        if externally_launched():
            world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 0)
            if world and world != self.world_size:
                raise RuntimeError(
                    f"the launcher started {world} processes but runner.devices x runner.num_nodes = "
                    f"{self.devices} x {self.num_nodes} = {self.world_size}; make them agree"
                )
            if self.strategy == "ddp_spawn":
                raise RuntimeError("runner.strategy=ddp_spawn cannot run under torchrun/SLURM; use ddp")
            return "ddp"
        if self.num_nodes > 1:
            raise RuntimeError(
                f"runner.num_nodes={self.num_nodes} needs a launcher on every node, e.g. torchrun "
                "--nnodes N --nproc-per-node G ... -m lumen_cli train-lumen CONFIG (docs/scaling.md)"
            )
        return "ddp_spawn"


def accelerator_of(device: str) -> str:
    """Fabric's accelerator name for the config's ``device`` (auto, cpu, cuda, cuda:N, mps)."""
    if device.startswith("cuda"):
        return "cuda"
    return device if device in ("cpu", "mps") else "auto"


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel job; ``SINGLE`` (no Fabric) is a job of one."""

    fabric: Any | None = None

    @property
    def world_size(self) -> int:
        return 1 if self.fabric is None else int(self.fabric.world_size)

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else int(self.fabric.global_rank)

    @property
    def num_nodes(self) -> int:
        return 1 if self.fabric is None else int(getattr(self.fabric.strategy, "num_nodes", 1))

    @property
    def local_world_size(self) -> int:
        """Processes on this node."""
        return max(1, self.world_size // self.num_nodes)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs, grids and the saved model."""
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device Fabric gave this rank (None for a job of one: the caller's device holds)."""
        return None if self.fabric is None else torch.device(self.fabric.device)

    def local(self, global_batch: int) -> slice:
        """This rank's slice of a global batch (which must divide evenly over the ranks)."""
        if global_batch % self.world_size:
            raise ValueError(
                f"the batch of {global_batch} does not divide over {self.world_size} processes; "
                "make the batch size a multiple of runner.devices x runner.num_nodes"
            )
        n = global_batch // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def setup(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module DDP-wrapped (its forward all-reduces the gradients in backward), or as is.
        The caller keeps the unwrapped module for saving: both share the parameters."""
        if self.fabric is None:
            return module
        return self.fabric.setup_module(module)

    def no_sync(self, module: torch.nn.Module, skip: bool) -> Any:
        """Skip the gradient all-reduce of this backward (accumulation steps but the last)."""
        if self.fabric is None or not skip:
            return nullcontext()
        return self.fabric.no_backward_sync(module, enabled=True)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (for logging a loss)."""
        if self.fabric is None:
            return value
        return float(self.fabric.all_reduce(torch.tensor(float(value)), reduce_op="mean"))

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block, then the others (which wait for it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = DataParallel()


def _die_with_parent() -> None:
    """Linux: have the kernel kill this spawned process when its parent dies (a ``kill -9`` of the
    command), so no orphaned rank keeps writing checkpoints into a run folder that a resumed run
    has reopened."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


class _Packed:
    """Arguments handed to the processes as one opaque object: Fabric walks its launch arguments as
    collections and refuses frozen dataclasses (configs' parts, dataset infos) among them."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args


def _entry(fabric: Any, fn: Callable[..., Any], packed: _Packed, spawned: bool) -> Any:
    args = packed.args
    if spawned:  # by launch(): die with the command that spawned us
        _die_with_parent()
    if fabric.device.type == "cpu":  # share the cores between the local processes
        parallel = DataParallel(fabric)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel.local_world_size))
    return _plain(fn(DataParallel(fabric), *args))


def _plain(value: Any) -> Any:
    """Tensors (in dicts, lists, tuples) as numpy arrays: a tensor sent back from a spawned process
    would be a handle to shared memory that dies with the process."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def launch(settings: ParallelSettings, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(parallel, *args)`` in every process of the job and return rank 0's result.

    Keep the result small (a path, a few numbers): from spawned processes it comes back through a
    pipe that is read only after they exit, so a large one would block them. Tensors in it come back
    as numpy arrays.

    A job of one process calls ``fn(SINGLE, *args)`` here. Otherwise ``fn`` and ``args`` must be
    picklable (a module-level function; configs and paths are), as the spawned processes receive
    them. CPU processes use the gloo backend, CUDA ones NCCL (Fabric's choice).
    """
    if settings.world_size == 1 and not externally_launched():
        return fn(SINGLE, *args)
    from lightning_fabric import Fabric

    strategy = settings.fabric_strategy()
    fabric = Fabric(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
    )
    log.info(
        "data-parallel training: %d process(es) x %d node(s), strategy %s, accelerator %s",
        settings.devices, settings.num_nodes, strategy, settings.accelerator,
    )  # fmt: skip
    return fabric.launch(_entry, fn, _Packed(args), strategy == "ddp_spawn")  # type: ignore[arg-type]  # Fabric passes extra args through
