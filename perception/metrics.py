"""Perception metrics: torchmetrics ``Metric`` classes that accumulate the scores of :mod:`pipeline.metrics`.

Every metric is computed over all valid pixels of the evaluation set (pixels are pooled, not averaged
per image); the pure functions and the table of definitions live in :mod:`pipeline.metrics` (the
library core, which synthesis evaluation shares) and are re-exported here. docs/perception.md gives
the definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.utilities import dim_zero_cat

from perception.transforms import IGNORE
from pipeline.metrics import (
    METRIC_NAMES,
    angular_error,
    depth_from_sums,
    depth_scores,
    depth_sums,
    normal_from_errors,
    normal_scores,
    seg_scores,
)

__all__ = [
    "METRIC_NAMES",
    "DepthMetrics",
    "NormalMetrics",
    "SegMetrics",
    "angular_error",
    "depth_scores",
    "normal_scores",
    "seg_confusion",
    "seg_scores",
]


def seg_confusion(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """(num_classes, num_classes) int64 confusion matrix, rows = true class, columns = predicted.

    Args:
        pred: (...) predicted class ids.
        target: (...) true class ids; ``ignore_index`` pixels are skipped.
    """
    return multiclass_confusion_matrix(
        pred.reshape(-1), target.reshape(-1), num_classes=num_classes, ignore_index=ignore_index
    ).long()


# --------------------------------------------------------------------------------------------------
# Accumulating metrics (torchmetrics)
# --------------------------------------------------------------------------------------------------


class SegMetrics(Metric):
    """Accumulates a confusion matrix (torchmetrics) over batches; ``compute()`` -> :func:`seg_scores`."""

    full_state_update = False
    confusion: Tensor

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE, class_names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, H, W) class ids (or (B, C, H, W) logits); target: (B, H, W) ids."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(1)
        self.confusion += seg_confusion(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float]:
        return seg_scores(self.confusion, self.class_names)


class DepthMetrics(Metric):
    """Accumulates the sums behind ``abs_rel``, ``rmse`` and ``delta1`` over all valid pixels."""

    full_state_update = False
    abs_rel: Tensor
    sq: Tensor
    delta: Tensor
    count: Tensor

    def __init__(self) -> None:
        super().__init__()
        for name in ("abs_rel", "sq", "delta", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (B, 1, H, W) depth; target 0 = invalid."""
        abs_rel, sq, delta, count = depth_sums(pred, target)
        self.abs_rel += abs_rel
        self.sq += sq
        self.delta += delta
        self.count += count

    def compute(self) -> dict[str, float]:
        return depth_from_sums(self.abs_rel, self.sq, self.delta, self.count)


class NormalMetrics(Metric):
    """Collects the angular error of every valid pixel (for the exact median)."""

    full_state_update = False
    errors: list[Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("errors", default=[], dist_reduce_fx="cat")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (B, 3, H, W) normals; zero target vectors = invalid."""
        self.errors.append(angular_error(pred, target))

    def compute(self) -> dict[str, float]:
        if isinstance(self.errors, list) and not self.errors:
            return normal_from_errors(torch.zeros(0))
        return normal_from_errors(dim_zero_cat(self.errors))  # a list, or one tensor after a sync
