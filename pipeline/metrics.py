"""Seg / depth / normal scores: pure functions on tensors, shared by perception and synthesis evaluation.

Every score is computed over all valid pixels given (pixels are pooled, not averaged per image);
docs/perception.md gives the definitions. :mod:`perception.metrics` accumulates them over batches
(torchmetrics); :mod:`pipeline.synthesis.metrics` applies them to judges' predictions on variants.

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
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ANGLE_THRESHOLDS",
    "CLASS_IOU_PREFIX",
    "METRIC_NAMES",
    "angular_error",
    "depth_from_sums",
    "depth_scores",
    "depth_sums",
    "normal_from_errors",
    "normal_scores",
    "seg_scores",
]

METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "seg": ("miou", "pixel_acc"),
    "depth": ("abs_rel", "rmse", "delta1"),
    "normal": ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"),
}
"""Task -> the metrics reported for it."""

ANGLE_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}
"""Normal metric -> its angle threshold in degrees."""


CLASS_IOU_PREFIX = "iou_"
"""Seg metric name prefix of one class's IoU: ``iou_<class name>``."""


def seg_scores(confusion: Tensor, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """``miou`` and ``pixel_acc`` of a confusion matrix (NaN when it holds no pixel); with
    ``class_names`` (one per row) also ``iou_<name>`` per class (NaN for a class absent from both the
    predictions and the targets)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    total = confusion.sum()
    miou = (tp[present] / union[present]).mean().item() if present.any() else math.nan
    acc = (tp.sum() / total).item() if total > 0 else math.nan
    out = {"miou": miou, "pixel_acc": acc}
    if class_names is not None:
        if len(class_names) != len(tp):
            raise ValueError(f"{len(class_names)} class names for a {len(tp)}-class confusion matrix")
        for name, i, u in zip(class_names, tp.tolist(), union.tolist(), strict=True):
            out[f"{CLASS_IOU_PREFIX}{name}"] = i / u if u > 0 else math.nan
    return out


def depth_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """``abs_rel``, ``rmse`` and ``delta1`` over pixels with a finite ``target > 0`` (NaN if none).

    Args:
        pred: (...) predicted depth (positive).
        target: (...) true depth, same shape; 0 or non-finite = invalid.
    """
    sums = depth_sums(pred, target)
    return depth_from_sums(*sums)


def depth_sums(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


def depth_from_sums(abs_rel: Tensor, sq: Tensor, delta: Tensor, count: Tensor) -> dict[str, float]:
    """``abs_rel``, ``rmse`` and ``delta1`` from the sums of :func:`depth_sums` (NaN for no pixel)."""
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


def normal_from_errors(errors: Tensor) -> dict[str, float]:
    """The normal metrics of (N,) angular errors in degrees (NaN for no pixel)."""
    if errors.numel() == 0:
        return {name: math.nan for name in METRIC_NAMES["normal"]}
    out = {
        "mean_angle": errors.double().mean().item(),
        "median_angle": errors.double().median().item(),  # lower median for an even count
    }
    for name, threshold in ANGLE_THRESHOLDS.items():
        out[name] = (errors < threshold).double().mean().item()
    return out


def normal_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean and median angular error and the shares within 11.25, 22.5 and 30 degrees.

    Args: as :func:`angular_error`. The median of an even count is the lower of the two middle values
    (``torch.median``).
    """
    return normal_from_errors(angular_error(pred, target))
