"""Judges: perception models trained on *real* labelled images that look at synthetic ones.

:func:`fit_judge` is the concrete :class:`pipeline.synthesis.judging.JudgeFactory` that callers above the
core (``lumen evaluate-synthesis``, ``benchmarks/ceiling.py``) hand to :mod:`pipeline.synthesis`.
A judge is one :class:`perception.models.PerceptionModule` (task ``seg``, ``depth`` or ``normal``)
trained with :func:`perception.train.train` for a fixed number of steps and a fixed seed. It is saved
in a folder as ``model.safetensors`` plus ``judge.json``, whose ``key`` hashes everything that defines
the weights (task, network and optimisation settings, steps, seed, dataset card, training keys); a
folder with the same key is reloaded (and its weights checked against the recorded sha256) instead of
retrained. The quality filter and ``lumen evaluate-synthesis`` both use judges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from perception.models import PerceptionModule
from perception.train import state_dict_sha256, train
from perception.transforms import to_tensors
from pipeline.config import PerceptionConfig, config_dict
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.io import atomic_write_json

__all__ = ["JUDGE_VERSION", "PerceptionJudge", "fit_judge", "judge_key"]

log = logging.getLogger(__name__)

JUDGE_VERSION = 1
"""Bumped when the way judges are trained changes, so old folders are retrained."""

_WEIGHT_KEYS = (
    "arch", "encoder", "encoder_weights", "encoder_depth", "decoder_channels", "batch_size",
    "learning_rate", "weight_decay", "depth_loss", "silog_lambda", "crop_size", "crop_scale", "hflip",
    "color_jitter",
)  # fmt: skip
"""The perception settings that change a judge's weights (seeds, ratios and workers do not)."""


def judge_key(
    task: str, config: PerceptionConfig, steps: int, seed: int, keys: Sequence[str], info: DatasetInfo
) -> str:
    """sha256 of what defines a judge's weights: task, settings, steps, seed, dataset card, sorted keys."""
    settings = {k: v for k, v in config_dict(config).items() if k in _WEIGHT_KEYS}
    doc = {
        "version": JUDGE_VERSION,
        "task": task,
        "settings": settings,
        "steps": int(steps),
        "seed": int(seed),
        "dataset": info.card(),
        "keys": sorted(keys),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class PerceptionJudge:
    """A trained perception model for one task, in eval mode (a :class:`pipeline.synthesis.judging.Judge`).

    Attributes:
        task: ``seg``, ``depth`` or ``normal``.
        module: the :class:`~perception.models.PerceptionModule`.
        device: where it runs.
        batch_size: images per forward pass.
        meta: the ``judge.json`` content (key, steps, seed, weights sha256, fit metrics).
    """

    task: str
    module: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module = self.module.to(self.device).eval()

    @property
    def pad_multiple(self) -> int:
        return int(2 ** self.module.hparams["encoder_depth"])

    @torch.no_grad()
    def raw(self, images: np.ndarray) -> torch.Tensor:
        """Raw outputs of the task head. images: (B, H, W, 3) uint8 -> (B, channels, H, W) float32, CPU."""
        images = np.asarray(images)
        h, w = images.shape[1:3]
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([
                to_tensors(Sample("judge", im), [], pad_multiple=self.pad_multiple)["image"]
                for im in images[i : i + self.batch_size]
            ])  # fmt: skip
            out.append(self.module.raw(x.to(self.device))[self.task][..., :h, :w].float().cpu())
        return torch.cat(out)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predictions: ``seg`` (B, H, W) int64 ids, ``depth`` (B, H, W) float32, ``normal`` (B, H, W, 3)."""
        pred = self.module.heads[self.task].predict(self.raw(images))
        if self.task == "seg":
            return pred.numpy().astype(np.int64)
        if self.task == "depth":
            return pred[:, 0].numpy().astype(np.float32)
        return pred.permute(0, 2, 3, 1).numpy().astype(np.float32)


def _build_module(task: str, config: PerceptionConfig, info: DatasetInfo) -> PerceptionModule:
    return PerceptionModule.from_config(
        config, [task], num_classes=info.num_classes if task == "seg" else None
    )


def _load(
    folder: Path, task: str, config: PerceptionConfig, info: DatasetInfo, key: str
) -> PerceptionModule | None:
    """The saved module if ``folder`` holds a judge with this key and intact weights, else None."""
    meta_path, weights = folder / "judge.json", folder / "model.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        log.info("judge in %s was trained with other settings or data: retraining", folder)
        return None
    module = _build_module(task, config, info)
    module.net.load_state_dict(load_file(str(weights)))
    if state_dict_sha256(module.net) != meta.get("model_sha256"):
        log.warning("judge weights in %s do not match judge.json: retraining", folder)
        return None
    return module


def fit_judge(
    task: str,
    samples: Sequence[Sample],
    info: DatasetInfo,
    folder: str | os.PathLike[str],
    *,
    config: PerceptionConfig,
    steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    val_samples: int = 16,
) -> PerceptionJudge:
    """Train a judge on real labelled samples, or reload it from ``folder`` when the key matches.

    Args:
        task: ``seg``, ``depth`` or ``normal``.
        samples: real training samples; those without the task's label are left out.
        info: the dataset (classes and ignore index for ``seg``).
        folder: where ``model.safetensors`` and ``judge.json`` go (training logs in ``folder/train``).
        config: network and optimisation settings (``steps`` overrides ``config.steps``).
        steps: optimizer steps.
        seed: weights, draws and augmentation seed.
        device: torch device.
        val_samples: the first few training samples are re-scored after training (``fit_metrics`` in
            ``judge.json``, a sanity number, not a held-out score).
    """
    out = Path(folder)
    labelled = [s for s in samples if getattr(s, task) is not None]
    if not labelled:
        raise ValueError(f"no training sample has a {task} label: a {task} judge cannot be trained")
    key = judge_key(task, config, steps, seed, [s.key for s in labelled], info)
    dev = torch.device(device)
    module = _load(out, task, config, info, key)
    if module is not None:
        return PerceptionJudge(task, module, dev, meta=json.loads((out / "judge.json").read_text()))

    log.info("training a %s judge on %d real images for %d steps", task, len(labelled), steps)
    cfg = config.model_copy(update={"tasks": [task], "steps": int(steps)})
    result = train(
        task, labelled, labelled[:val_samples], config=cfg, info=info, seed=seed, steps=steps,
        out_dir=out / "train", save_model=True, device=str(dev),
    )  # fmt: skip
    os.replace(out / "train" / "model.safetensors", out / "model.safetensors")
    meta = {
        "key": key,
        "version": JUDGE_VERSION,
        "task": task,
        "steps": result.steps,
        "seed": seed,
        "num_train": len(labelled),
        "model_sha256": result.model_sha256,
        "fit_metrics": result.metrics.get(task, {}),
        "dataset": info.card(),
    }
    atomic_write_json(out / "judge.json", meta)
    module = _load(out, task, config, info, key)
    if module is None:  # pragma: no cover - just written
        raise RuntimeError(f"the judge just saved in {out} could not be reloaded")
    return PerceptionJudge(task, module, dev, meta=meta)
