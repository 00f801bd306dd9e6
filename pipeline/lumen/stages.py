"""Stage functions that turn a config into artefacts in a run folder (called by the CLI and the flows)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import LumenConfig
from pipeline.data import Quarantine, build_dataset, iter_valid, resize_sample

__all__ = ["collect_images", "run_train_base"]

log = logging.getLogger(__name__)


def collect_images(
    cfg: LumenConfig, size: int, quarantine: Quarantine, split: str = "train", progress: bool = True
) -> tuple[np.ndarray, list[str], list[str]]:
    """All valid images of a split at ``size`` x ``size`` (cover + centre crop), with captions and keys.

    Returns (N, size, size, 3) uint8 images, N captions, N keys. Memory is N * size^2 * 3 bytes.
    """
    source = build_dataset(cfg.data, split)
    images, captions, keys = [], [], []
    samples = iter_valid(source, quarantine, stage=f"collect-{split}")
    for s in tqdm(
        samples, total=len(source), desc=f"load {source.info.name}", unit="img", disable=not progress
    ):
        s = resize_sample(s, (size, size))
        images.append(s.image)
        captions.append(s.caption)
        keys.append(s.key)
    if not images:
        raise RuntimeError(f"no valid training images in {source.info.name}; see {quarantine.path}")
    return np.stack(images), captions, keys


def run_train_base(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> Path:
    """Train the tiny base model on the run's training images and captions; returns ``run_dir/base``."""
    from pipeline.lumen.train_base import BaseTrainSettings, train_base

    if cfg.base.source != "tiny":
        raise ValueError(
            "train-base trains the tiny preset (base.source=tiny); a pretrained base needs no training"
        )
    b = cfg.base
    images, captions, _ = collect_images(
        cfg, b.resolution, Quarantine(run_dir / "quarantine.jsonl"), progress=progress
    )
    settings = BaseTrainSettings(
        resolution=b.resolution,
        vae_steps=b.vae_steps,
        vae_lr=b.vae_learning_rate,
        unet_steps=b.train_steps,
        batch_size=b.batch_size,
        unet_lr=b.learning_rate,
        ema_decay=b.ema_decay,
        checkpoint_every=b.checkpoint_every,
        seed=cfg.seed,
    )
    out = run_dir / "base"
    train_base(images, captions, out, settings, progress=progress)
    log.info("base model saved to %s", out)
    return out
