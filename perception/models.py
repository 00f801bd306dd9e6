"""One LightningModule for segmentation, depth and surface normals, with task heads chosen by name.

The network is a segmentation-models-pytorch model (``smp.create_model(arch, encoder_name,
encoder_weights, classes=C)``) whose C output channels are split between the tasks: ``seg`` takes
``num_classes`` channels (logits), ``depth`` one (log depth), ``normal`` three (normalised to unit
vectors). One task gives a plain smp model; several share the encoder and decoder (multi-task).

Losses, over valid pixels only:

- ``seg``: cross-entropy; ignored and padded pixels (-1 in the batch) are skipped.
- ``depth``: scale-invariant log loss (Eigen et al. 2014), ``mean(g^2) - lambda * mean(g)^2`` with
  ``g = log d - log d*`` (``lambda`` = 1 is fully scale invariant, 0 is the log MSE), or L1 on depth.
- ``normal``: ``1 - cos`` between the predicted and the true unit normal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from perception.metrics import DepthMetrics, NormalMetrics, SegMetrics
from perception.transforms import IGNORE
from pipeline.config import PerceptionConfig

__all__ = [
    "HEADS",
    "DepthHead",
    "NormalHead",
    "PerceptionModule",
    "SegHead",
    "TaskHead",
    "build_head",
    "build_net",
    "cosine_normal_loss",
    "l1_depth_loss",
    "seg_loss",
    "silog_loss",
]

_UNET_FAMILY = ("unet", "unetplusplus")
_SMP_DEFAULT_DECODER = (256, 128, 64, 32, 16)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def seg_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy. logits: (B, C, H, W); target: (B, H, W) int64, -1 = ignored. 0 if none valid."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def silog_loss(log_pred: Tensor, target: Tensor, lam: float = 0.85) -> Tensor:
    """Scale-invariant log loss ``mean(g^2) - lam * mean(g)^2``, ``g = log_pred - log target``.

    Args:
        log_pred: (B, 1, H, W) predicted log depth.
        target: (B, 1, H, W) depth, 0 = invalid.
        lam: scale invariance in [0, 1].
    """
    valid = target > 0
    if not valid.any():
        return log_pred.sum() * 0.0
    g = log_pred[valid] - torch.log(target[valid])
    return (g**2).mean() - lam * g.mean() ** 2


def l1_depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute depth error over valid pixels. pred, target: (B, 1, H, W); target 0 = invalid."""
    valid = target > 0
    if not valid.any():
        return pred.sum() * 0.0
    return (pred[valid] - target[valid]).abs().mean()


def cosine_normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean ``1 - cos`` over valid pixels. pred: (B, 3, H, W) unit normals; target: same, 0 = invalid."""
    valid = target.norm(dim=1) > 0.5
    if not valid.any():
        return pred.sum() * 0.0
    cos = (pred * target).sum(1)
    return (1.0 - cos[valid]).mean()


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class TaskHead:
    """What a task adds to the shared network: its channels, activation, loss and metric.

    Attributes:
        name: the task name; also the batch key of its target.
        channels: output channels it takes from the network.
    """

    name = ""
    channels = 0

    def predict(self, raw: Tensor) -> Tensor:
        """Raw (B, channels, H, W) output -> the task's prediction."""
        raise NotImplementedError

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss of the raw output against the batch target."""
        raise NotImplementedError

    def metric(self) -> Metric:
        """A fresh accumulating validation metric."""
        raise NotImplementedError


class SegHead(TaskHead):
    """Semantic segmentation: ``num_classes`` logits, cross-entropy; prediction = (B, H, W) class ids."""

    name = "seg"

    def __init__(
        self, num_classes: int | None = None, class_names: Sequence[str] | None = None, **_: Any
    ) -> None:
        if not num_classes or num_classes < 2:
            raise ValueError(
                f"the seg head needs num_classes >= 2 (the dataset's classes), got {num_classes}"
            )
        self.num_classes = self.channels = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None

    def predict(self, raw: Tensor) -> Tensor:
        return raw.argmax(1)

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        return seg_loss(raw, target)

    def metric(self) -> Metric:
        return SegMetrics(self.num_classes, class_names=self.class_names)


class DepthHead(TaskHead):
    """Depth: one channel of log depth; prediction = (B, 1, H, W) depth ``exp(raw)``."""

    name = "depth"
    channels = 1

    def __init__(self, depth_loss: str = "silog", silog_lambda: float = 0.85, **_: Any) -> None:
        if depth_loss not in ("silog", "l1"):
            raise ValueError(f"depth_loss must be 'silog' or 'l1', got {depth_loss!r}")
        self.depth_loss, self.silog_lambda = depth_loss, float(silog_lambda)

    def predict(self, raw: Tensor) -> Tensor:
        return torch.exp(raw.clamp(-20.0, 20.0))

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        if self.depth_loss == "silog":
            return silog_loss(raw, target, self.silog_lambda)
        return l1_depth_loss(self.predict(raw), target)

    def metric(self) -> Metric:
        return DepthMetrics()


class NormalHead(TaskHead):
    """Surface normals: three channels normalised to unit vectors (camera frame)."""

    name = "normal"
    channels = 3

    def __init__(self, **_: Any) -> None:
        pass

    def predict(self, raw: Tensor) -> Tensor:
        return F.normalize(raw, dim=1, eps=1e-6)

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        return cosine_normal_loss(self.predict(raw), target)

    def metric(self) -> Metric:
        return NormalMetrics()


HEADS: dict[str, type[TaskHead]] = {"seg": SegHead, "depth": DepthHead, "normal": NormalHead}
"""Task name -> head class."""


def build_head(task: str, **kwargs: Any) -> TaskHead:
    """The head of ``task`` (``seg`` needs ``num_classes``; ``depth`` takes ``depth_loss``, ``silog_lambda``)."""
    if task not in HEADS:
        raise KeyError(f"unknown perception task {task!r}; valid: {', '.join(HEADS)}")
    return HEADS[task](**kwargs)


def build_net(
    arch: str,
    encoder: str,
    encoder_weights: str | None,
    classes: int,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] | None = None,
) -> nn.Module:
    """An smp model with ``classes`` output channels.

    ``decoder_channels`` applies to Unet and UnetPlusPlus only (None = smp's widths, the first
    ``encoder_depth`` of 256, 128, 64, 32, 16). ``encoder_weights`` other than None must already be in
    the local cache (nothing is downloaded offline).
    """
    kwargs: dict[str, Any] = {"encoder_depth": encoder_depth}
    if arch.lower() in _UNET_FAMILY:
        kwargs["decoder_channels"] = tuple(decoder_channels or _SMP_DEFAULT_DECODER[:encoder_depth])
    elif decoder_channels is not None:
        raise ValueError(
            f"decoder_channels applies to Unet/UnetPlusPlus, not {arch}: set perception.decoder_channels=null"
        )
    return smp.create_model(
        arch, encoder_name=encoder, encoder_weights=encoder_weights, classes=classes, **kwargs
    )


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class PerceptionModule(pl.LightningModule):
    """A segmentation / depth / normal model (one task or several sharing one network).

    Args:
        tasks: task names, from :data:`HEADS`.
        num_classes: segmentation classes (needed for ``seg``).
        arch, encoder, encoder_weights, encoder_depth, decoder_channels: the smp network
            (:func:`build_net`).
        learning_rate: AdamW peak learning rate; cosine decay to 1% over the trainer's ``max_steps``.
        weight_decay: AdamW weight decay.
        depth_loss: ``silog`` or ``l1``; silog_lambda: its scale-invariance weight.
        task_weights: loss weight per task (default 1 each).
        class_names: the seg classes; given, the seg metrics add each class's IoU (``iou_<name>``).

    Batches are dicts: ``image`` (B, 3, H, W) and the targets ``seg`` (B, H, W) int64 (-1 ignored),
    ``depth`` (B, 1, H, W), ``normal`` (B, 3, H, W) (see :func:`perception.transforms.to_tensors`).
    After a validation epoch, :attr:`val_results` holds ``{task: {metric: value}}``.
    """

    def __init__(
        self,
        tasks: Sequence[str] | str = ("seg",),
        *,
        num_classes: int | None = None,
        arch: str = "Unet",
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: Sequence[int] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        depth_loss: str = "silog",
        silog_lambda: float = 0.85,
        task_weights: Mapping[str, float] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        if not task_list or len(set(task_list)) != len(task_list):
            raise ValueError(f"tasks must be distinct and non-empty, got {task_list}")
        self.save_hyperparameters()
        self.tasks = task_list
        self.heads = {
            t: build_head(
                t,
                num_classes=num_classes,
                depth_loss=depth_loss,
                silog_lambda=silog_lambda,
                class_names=class_names,
            )
            for t in task_list
        }
        self.net = build_net(
            arch,
            encoder,
            encoder_weights,
            sum(h.channels for h in self.heads.values()),
            encoder_depth,
            decoder_channels,
        )
        self.task_weights = {t: float((task_weights or {}).get(t, 1.0)) for t in task_list}
        self.val_metrics = nn.ModuleDict({t: h.metric() for t, h in self.heads.items()})
        self.val_results: dict[str, dict[str, float]] = {}

    def raw(self, image: Tensor) -> dict[str, Tensor]:
        """Raw network outputs per task. image: (B, 3, H, W), H and W multiples of 2^encoder_depth."""
        out = self.net(image)
        parts = torch.split(out, [self.heads[t].channels for t in self.tasks], dim=1)
        return dict(zip(self.tasks, parts, strict=True))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Predictions per task: ``seg`` (B, H, W) ids, ``depth`` (B, 1, H, W), ``normal`` (B, 3, H, W)."""
        return {t: self.heads[t].predict(r) for t, r in self.raw(image).items()}

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-task losses of a batch."""
        raw = self.raw(batch["image"])
        return {t: self.heads[t].loss(raw[t], batch[t]) for t in self.tasks}

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        total = torch.stack([self.task_weights[t] * loss for t, loss in losses.items()]).sum()
        size = batch["image"].shape[0]
        for t, loss in losses.items():
            self.log(f"train/{t}_loss", loss.detach(), batch_size=size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=size)
        return total

    def _metric(self, task: str) -> Metric:
        return cast(Metric, self.val_metrics[task])

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        raw = self.raw(batch["image"])
        for t in self.tasks:
            pred = raw[t] if t == "seg" else self.heads[t].predict(raw[t])
            self._metric(t).update(pred, batch[t])

    def on_validation_epoch_end(self) -> None:
        results: dict[str, dict[str, float]] = {}
        for t in self.tasks:
            metric = self._metric(t)
            results[t] = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            for name, value in results[t].items():
                if math.isfinite(value):
                    self.log(f"val/{t}/{name}", value)
        self.val_results = results

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams["learning_rate"], weight_decay=self.hparams["weight_decay"]
        )
        total = int(self.trainer.max_steps) if self._trainer is not None else -1
        if total <= 0:
            return optimizer

        def cosine(step: int) -> float:
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def from_config(
        cls,
        config: PerceptionConfig,
        tasks: Sequence[str] | str,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> PerceptionModule:
        """The module for ``tasks`` with the network and optimisation settings of ``config``
        (``class_names``: the dataset's, for ``config.class_iou``)."""
        return cls(
            tasks,
            num_classes=num_classes,
            class_names=list(class_names) if config.class_iou and class_names is not None else None,
            arch=config.arch,
            encoder=config.encoder,
            encoder_weights=config.encoder_weights,
            encoder_depth=config.encoder_depth,
            decoder_channels=config.decoder_channels,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            depth_loss=config.depth_loss,
            silog_lambda=config.silog_lambda,
        )
