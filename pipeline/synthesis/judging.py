"""Judges as the core sees them: models trained on *real* labelled images that look at synthetic ones.

The core never builds one. A :class:`Judge` is whatever a :class:`JudgeFactory` returns; the callers
above the core pass the concrete factory (``lumen evaluate-synthesis`` and ``benchmarks/ceiling.py``
pass :func:`perception.judges.fit_judge`, which trains a perception model or reloads it from its
folder). :func:`fit_judges` is the evaluation's orchestration: one judge per label the dataset has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import LumenConfig, PerceptionConfig
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.synthesis.inputs import EvalSettings, load_split

__all__ = ["JUDGE_TASKS", "Judge", "JudgeFactory", "fit_judges", "judge_tasks"]

JUDGE_TASKS = ("seg", "depth", "normal")
"""The tasks a judge can have, in table order."""


class Judge(Protocol):
    """A model trained on real images that predicts one task's labels on (synthetic) images."""

    @property
    def task(self) -> str:
        """``seg``, ``depth`` or ``normal``."""
        ...

    @property
    def meta(self) -> Mapping[str, Any]:
        """What defines it (``key``: a hash of everything that defines its weights) and how it was fitted
        (``steps``, ``seed``, ``num_train``, ``model_sha256``, ``fit_metrics``)."""
        ...

    def raw(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, channels, H, W) float32 raw head outputs (``seg``: logits), CPU."""
        ...

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predictions: ``seg`` (B, H, W) int64 ids, ``depth`` (B, H, W) float32, ``normal`` (B, H, W, 3)."""
        ...


class JudgeFactory(Protocol):
    """Trains a judge on real samples into ``folder``, or reloads the one already there for the same key."""

    def __call__(
        self,
        task: str,
        samples: Sequence[Sample],
        info: DatasetInfo,
        folder: str | os.PathLike[str],
        *,
        config: PerceptionConfig,
        steps: int,
        seed: int = ...,
        device: torch.device | str = ...,
    ) -> Judge: ...


def judge_tasks(info: DatasetInfo) -> list[str]:
    """The tasks a dataset's labels allow judges for (seg needs at least two classes)."""
    return [t for t in JUDGE_TASKS if t in info.labels and (t != "seg" or info.num_classes > 1)]


def fit_judges(
    factory: JudgeFactory,
    cfg: LumenConfig,
    info: DatasetInfo,
    size: tuple[int, int],
    settings: EvalSettings,
    folder: Path,
    device: torch.device,
) -> dict[str, Judge]:
    """One judge per task of :func:`judge_tasks`, trained (or reloaded) in ``folder/<task>`` on the first
    ``settings.train_images`` real training images, for ``settings.judge_steps`` steps."""
    tasks = judge_tasks(info)
    if not tasks:
        return {}
    train = load_split(cfg, "train", settings.train_images, size)
    return {
        t: factory(t, train, info, folder / t, config=cfg.perception, steps=settings.judge_steps,
                   seed=settings.judge_seed, device=device)
        for t in tasks
    }  # fmt: skip
