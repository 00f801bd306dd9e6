"""Functions that run inside the processes of a data-parallel test job (tests/test_distributed.py).

They live in an importable module because spawned processes receive them by reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from _tiny import PRESET
from safetensors.torch import save_file

from pipeline.data import ToyScenes
from pipeline.distributed import DataParallel
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.controlnet import ControlTrainSettings, LumenTrainer, build_controlnet
from pipeline.lumen.tokenizer import build_tokenizer

RES = 16
CHANNELS = 5


def controlnet_data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = ToyScenes(num_images=6, image_size=(RES, RES), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    conds = np.random.default_rng(0).random((len(samples), CHANNELS, RES, RES)).astype(np.float32)
    return np.stack([s.image for s in samples]), conds, [s.caption for s in samples]


def initial_controlnet_state() -> dict[str, torch.Tensor]:
    """The seeded initial weights every worker starts from."""
    base = build_tiny_components(
        build_tokenizer(controlnet_data()[2], max_length=16), RES, seed=0, preset=PRESET
    )
    return dict(build_controlnet(base, CHANNELS, seed=1).state_dict())


def train_controlnet(
    parallel: DataParallel, out: Path, batch_size: int, steps: int, stop_after: int | None = None
) -> str:
    """Train a tiny seeded ControlNet with global batch ``batch_size``; record the noisy latents each
    rank's ControlNet saw at its first forward (``inputs-rank<R>.npy``); rank 0 saves the weights to
    ``final.safetensors`` (returned; results come back from spawned processes through a pipe)."""
    images, conds, captions = controlnet_data()
    base = build_tiny_components(build_tokenizer(captions, max_length=16), RES, seed=0, preset=PRESET)
    settings = ControlTrainSettings(steps=steps, batch_size=batch_size, grad_accum=2, lr=1e-3, warmup_steps=1,
                                    checkpoint_every=3, validate_every=1000, seed=0, mixed_precision="no")  # fmt: skip
    controlnet = build_controlnet(base, CHANNELS, seed=1)
    seen: list[np.ndarray] = []

    def record(module: Any, args: tuple[Any, ...]) -> None:
        if not seen:
            seen.append(args[0].detach().numpy().copy())

    controlnet.register_forward_pre_hook(record)
    trainer = LumenTrainer(base, controlnet, out, settings, parallel=parallel)
    trainer.fit(images, conds, captions, progress=False, stop_after=stop_after)
    if seen:
        np.save(out / f"inputs-rank{parallel.rank}.npy", seen[0])
    (out / f"steps-rank{parallel.rank}.json").write_text(json.dumps({"step": trainer.step}))
    if parallel.is_main:
        save_file(
            {k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(out / "final.safetensors")
        )
    parallel.barrier()
    return str(out / "final.safetensors")


def read_shard_keys(parallel: DataParallel, shards: Path, out: Path) -> list[str]:
    """The sample keys this rank reads with ``split_by_node`` (written to ``keys-rank<R>.json``)."""
    from pipeline.shards import read_shards

    keys = [s["__key__"] for s in read_shards(shards, split_by_node=True, split_by_worker=True)]
    (out / f"keys-rank{parallel.rank}.json").write_text(json.dumps(keys))
    parallel.barrier()
    return keys


def train_tiny_base(parallel: DataParallel, out: Path) -> str:
    """Train the tiny base model (both phases, global batches of 4) on 6 toy scenes; rank 0 saves."""
    from pipeline.lumen.train_base import BaseTrainSettings, train_base

    ds = ToyScenes(num_images=6, image_size=(RES, RES), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    s = BaseTrainSettings(resolution=RES, vae_steps=4, vae_batch_size=4, vae_crop=RES, unet_steps=4, batch_size=4,
                          warmup_steps=1, checkpoint_every=2, mixed_precision="no")  # fmt: skip
    train_base(np.stack([x.image for x in samples]), [x.caption for x in samples], out, s, preset=PRESET,
               progress=False, sample_prompts=[samples[0].caption], parallel=parallel)  # fmt: skip
    return str(out)


class FreezeBatchNorm(pl.Callback):
    """Batch norm in eval mode while training (fixed running statistics). CPU processes have no
    SyncBatchNorm, so each rank would otherwise normalise with the statistics of its own share of the
    batch, and a data-parallel run could not equal a single process's."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        for module in pl_module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
