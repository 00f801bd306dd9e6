"""Perception metrics: pure functions on tensors, and torchmetrics ``Metric`` classes that accumulate them.

Every metric is computed over all valid pixels of the evaluation set (pixels are pooled, not averaged
per image); docs/perception.md gives the definitions.

========================  ==========================================================================
task / metric             definition (over valid pixels)
========================  ==========================================================================
seg ``miou``              mean over classes of TP / (TP + FP + FN), classes with TP + FP + FN = 0
                          (absent from both labels and predictions) left out; ignored pixels skipped
seg ``pixel_acc``         correct pixels / labelled pixels
depth ``abs_rel``         mean of \\|d - d*\\| / d*  (d* > 0 is valid)
depth ``rmse``            sqrt(mean of (d - d*)^2), in the depth's units
depth ``delta1``          share of pixels with max(d / d*, d* / d) < 1.25
normal ``mean_angle``     mean angle between predicted and true normal, degrees (|n*| > 0.5 is valid)
normal ``median_angle``   median of the same angles
normal ``within_11_25``   share of pixels with an angle below 11.25 degrees (likewise 22.5 and 30)
========================  ==========================================================================

Shares are fractions in [0, 1]. The metric names and their direction (higher or lower is better) are
shared with the gains report, :data:`pipeline.report.gains.METRICS`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.utilities import dim_zero_cat

from perception.transforms import IGNORE

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

METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "seg": ("miou", "pixel_acc"),
    "depth": ("abs_rel", "rmse", "delta1"),
    "normal": ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"),
}
"""Task -> the metrics reported for it."""

_ANGLE_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def seg_confusion(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """(num_classes, num_classes) int64 confusion matrix, rows = true class, columns = predicted.

    Args:
        pred: (...) predicted class ids.
        target: (...) true class ids; ``ignore_index`` pixels are skipped.
    """
    return multiclass_confusion_matrix(
        pred.reshape(-1), target.reshape(-1), num_classes=num_classes, ignore_index=ignore_index
    ).long()


def seg_scores(confusion: Tensor) -> dict[str, float]:
    """``miou`` and ``pixel_acc`` of a confusion matrix (NaN when it holds no pixel)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    total = confusion.sum()
    miou = (tp[present] / union[present]).mean().item() if present.any() else math.nan
    acc = (tp.sum() / total).item() if total > 0 else math.nan
    return {"miou": miou, "pixel_acc": acc}


def depth_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """``abs_rel``, ``rmse`` and ``delta1`` over pixels with a finite ``target > 0`` (NaN if none).

    Args:
        pred: (...) predicted depth (positive).
        target: (...) true depth, same shape; 0 or non-finite = invalid.
    """
    sums = _depth_sums(pred, target)
    return _depth_from_sums(*sums)


def _depth_sums(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sum |d - d*| / d*, sum (d - d*)^2, count delta < 1.25, count) over valid pixels, float64."""
    valid = torch.isfinite(target) & (target > 0)
    p = pred[valid].double().clamp_min(1e-6)
    t = target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return (
        ((p - t).abs() / t).sum(),
        ((p - t) ** 2).sum(),
        (ratio < 1.25).sum().double(),
        torch.tensor(float(valid.sum()), dtype=torch.float64),
    )


def _depth_from_sums(abs_rel: Tensor, sq: Tensor, delta: Tensor, count: Tensor) -> dict[str, float]:
    n = float(count)
    if n == 0:
        return {"abs_rel": math.nan, "rmse": math.nan, "delta1": math.nan}
    return {"abs_rel": float(abs_rel) / n, "rmse": math.sqrt(float(sq) / n), "delta1": float(delta) / n}


def angular_error(pred: Tensor, target: Tensor) -> Tensor:
    """Angles in degrees between normals at valid pixels (``|target| > 0.5``), flattened.

    Args:
        pred: (B, 3, H, W) predicted normals (normalised here).
        target: (B, 3, H, W) true unit normals, zero vectors = invalid.

    Returns:
        (N,) float32 angles of the N valid pixels.
    """
    valid = target.norm(dim=1) > 0.5
    p = torch.nn.functional.normalize(pred.float(), dim=1)
    t = torch.nn.functional.normalize(target.float(), dim=1)
    cos = (p * t).sum(1)[valid].clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def _normal_from_errors(errors: Tensor) -> dict[str, float]:
    if errors.numel() == 0:
        return {name: math.nan for name in METRIC_NAMES["normal"]}
    out = {
        "mean_angle": errors.double().mean().item(),
        "median_angle": errors.double().median().item(),  # lower median for an even count
    }
    for name, threshold in _ANGLE_THRESHOLDS.items():
        out[name] = (errors < threshold).double().mean().item()
    return out


def normal_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean and median angular error and the shares within 11.25, 22.5 and 30 degrees.

    Args: as :func:`angular_error`. The median of an even count is the lower of the two middle values
    (``torch.median``).
    """
    return _normal_from_errors(angular_error(pred, target))


# --------------------------------------------------------------------------------------------------
# Accumulating metrics (torchmetrics)
# --------------------------------------------------------------------------------------------------


class SegMetrics(Metric):
    """Accumulates a confusion matrix (torchmetrics) over batches; ``compute()`` -> :func:`seg_scores`."""

    full_state_update = False
    confusion: Tensor

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, H, W) class ids (or (B, C, H, W) logits); target: (B, H, W) ids."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(1)
        self.confusion += seg_confusion(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float]:
        return seg_scores(self.confusion)


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
        abs_rel, sq, delta, count = _depth_sums(pred, target)
        self.abs_rel += abs_rel
        self.sq += sq
        self.delta += delta
        self.count += count

    def compute(self) -> dict[str, float]:
        return _depth_from_sums(self.abs_rel, self.sq, self.delta, self.count)


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
            return _normal_from_errors(torch.zeros(0))
        return _normal_from_errors(dim_zero_cat(self.errors))  # a list, or one tensor after a sync
