"""Quality filter for synthetic variants: a segmenter trained on the real images judges each variant.

Three modes (``generate.quality_mode``):

- ``image``: a variant is kept iff its *agreement* (pixel accuracy of the real-trained segmenter's
  prediction on the variant against the source labels) is at least ``generate.quality_threshold``.
- ``objects``: as ``image``, and no **object** may be lost. The objects of a source are the connected
  regions of each of ``generate.quality_object_classes`` in its labels (at least
  ``generate.quality_min_pixels`` pixels). A second, binary segmenter trained on the real images to tell
  those classes from the rest ("is there an object here") reads the real source image and the variant:
  an object it finds on the source (at least half its pixels) must be found on the variant too. An object
  it misses on the real image is not counted, so the generator is charged only for what it lost. This
  is the gallery's "every object in place", decided per variant; ``expand`` regenerates a variant that
  fails with a new seed, up to ``generate.quality_retries`` times.
  With ``generate.quality_outlines`` a third binary segmenter, trained on the real images to draw
  outlines (:func:`label_outlines`: where the seg class changes or the depth jumps), finds the outlines
  *inside* the source's objects on the real source image (between two touching objects: pixels of the
  object classes whose 3x3 neighbourhood holds only object classes); at least half of them must be found
  on the variant, within one pixel. Two touching spheres drawn as one blob keep both objects' pixels, so
  the object check passes them; their outline is gone, and this drops them.
- ``pixel`` (after FreeMask, arXiv 2310.15160): every variant is kept, but a pixel is set to the ignore
  label when its per-pixel cross-entropy under the real-trained segmenter exceeds
  ``generate.quality_pixel_factor`` x the median loss of its class, the medians being computed once on
  the real training images.

Datasets without an ignore index (toy scenes) get :data:`DEFAULT_IGNORE` (255) as the value of masked
pixels; the shards and the perception stage must then be told about it, see
:func:`info_with_ignore`. The score of each variant goes into its provenance
(:meth:`QualityResult.provenance` -> ``Provenance.quality``).

The segmenter is a seg judge made by the :class:`~pipeline.synthesis.judging.JudgeFactory` the caller
passes (the core trains no perception model; :func:`perception.judges.fit_judge` is the concrete one)::

    qf = QualityFilter.fit(cfg, run_dir, train_samples, info, judge_factory=fit_judge)  # run_dir/quality_filter/
    results = qf.score(images, segs)                                 # (B, H, W, 3) uint8, (B, H, W) source labels
    for r, seg in zip(results, segs):
        if r.keep:
            seg = apply_pixel_mask(seg, r.mask, qf.mask_value)       # no-op in image mode (mask None)
            ... write the variant with seg and provenance quality=r.provenance()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import LumenConfig
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.device import resolve_device
from pipeline.execution import progress_bar
from pipeline.io import atomic_write_json
from pipeline.runs import RunPaths
from pipeline.synthesis.judging import JudgeFactory
from pipeline.synthesis.metrics import confusion_scores, label_outline_pairs, seg_confusion

__all__ = [
    "DEFAULT_IGNORE",
    "FILTER_DIR",
    "OUTLINE_RECALL",
    "QualityFilter",
    "QualityResult",
    "apply_pixel_mask",
    "class_median_losses",
    "ignore_value",
    "info_with_ignore",
    "label_outlines",
    "pixel_losses",
    "pixel_mask",
    "segment_share",
    "segments",
    "summarize",
]

log = logging.getLogger(__name__)

FILTER_DIR = RunPaths(".").quality_filter.name
"""Sub-folder of a run folder holding the filter's segmenter and class medians."""

DEFAULT_IGNORE = 255
"""Value of masked pixels for datasets without an ignore index (65535 beyond 255 classes)."""

OUTLINE_RECALL = 0.5
"""``quality_outlines``: the share of the outlines inside a source's objects a variant must keep."""

MIN_OUTLINE_PIXELS = 4
"""``quality_outlines``: a source with fewer outline pixels inside its objects has no outline checked."""

_PIXELS_PER_IMAGE = 4096
"""Pixels per training image drawn (seeded) for the class medians, which bounds their memory."""


# --------------------------------------------------------------------------------------------------
# Ignore values and masks
# --------------------------------------------------------------------------------------------------


def ignore_value(info: DatasetInfo) -> int:
    """The label value of masked pixels: the dataset's ignore index, else 255 (65535 beyond 255 classes)."""
    if info.ignore_index is not None:
        return int(info.ignore_index)
    return DEFAULT_IGNORE if info.num_classes < DEFAULT_IGNORE else 65535


def info_with_ignore(info: DatasetInfo) -> DatasetInfo:
    """``info`` with :func:`ignore_value` as its ignore index.

    Pixel mode on a dataset without an ignore index writes 255 into synthetic labels. The shard sets'
    dataset card and the :class:`DatasetInfo` given to perception must then carry ``ignore_index=255``
    (perception maps the ignore index to its own ``-1``, which cross-entropy skips); with
    ``ignore_index=None`` a 255 would be an invalid class id.
    """
    return dataclasses.replace(info, ignore_index=ignore_value(info))


def apply_pixel_mask(seg: np.ndarray, mask: np.ndarray | None, ignore_index: int) -> np.ndarray:
    """A copy of ``seg`` (H, W) with the ``mask`` (H, W) bool pixels set to ``ignore_index``.

    ``mask`` None returns ``seg`` unchanged. The label dtype is widened (uint8 -> uint16) if
    ``ignore_index`` does not fit in it.
    """
    if mask is None:
        return seg
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != seg.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the label shape {seg.shape}")
    out = seg.copy()
    if np.issubdtype(out.dtype, np.integer) and ignore_index > np.iinfo(out.dtype).max:
        out = out.astype(np.uint16 if ignore_index <= 65535 else np.int64)
    out[mask] = ignore_index
    return out


def _targets(segs: np.ndarray, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """(B, H, W) labels -> int64 tensor with ignored and out-of-range ids as -1."""
    t = torch.as_tensor(np.asarray(segs).astype(np.int64))
    invalid = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        invalid |= t == ignore_index
    return t.masked_fill(invalid, -1)


def pixel_losses(logits: torch.Tensor, segs: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Per-pixel cross-entropy. logits: (B, C, H, W); segs: (B, H, W) -> (B, H, W) float32, NaN where
    the label is ignored or out of range."""
    target = _targets(segs, logits.shape[1], ignore_index)
    loss = F.cross_entropy(logits.float(), target.clamp_min(0), reduction="none")
    return loss.masked_fill(target < 0, math.nan).numpy().astype(np.float32)


def class_median_losses(losses: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) median loss per class over pixels (NaN for a class with no pixel).

    Args:
        losses: (N,) per-pixel losses (NaN = ignored).
        labels: (N,) their class ids.
    """
    losses, labels = np.asarray(losses).ravel(), np.asarray(labels).ravel()
    out = np.full(num_classes, np.nan, dtype=np.float64)
    for c in range(num_classes):
        values = losses[(labels == c) & np.isfinite(losses)]
        if values.size:
            out[c] = float(np.median(values))
    return out


def segments(
    seg: np.ndarray, num_classes: int, ignore_index: int | None = None, min_pixels: int = 16
) -> tuple[np.ndarray, list[int]]:
    """The connected regions of each class in ``seg`` (8-connected), at least ``min_pixels`` pixels each.

    Returns:
        (H, W) int32 segment index of each pixel (-1: ignored label or a smaller region) and the class id
        of each segment.
    """
    from scipy import ndimage

    seg = np.asarray(seg).astype(np.int64)
    out = np.full(seg.shape, -1, np.int32)
    classes: list[int] = []
    for c in np.unique(seg):
        if c < 0 or c >= num_classes or (ignore_index is not None and c == ignore_index):
            continue
        labelled, n = ndimage.label(seg == c, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if sizes[k] >= min_pixels:
                out[labelled == k] = len(classes)
                classes.append(int(c))
    return out, classes


def segment_share(mask: np.ndarray, seg_index: np.ndarray, num_segments: int) -> np.ndarray:
    """(S,) share of each segment's pixels where ``mask`` (H, W) bool is true."""
    inside = seg_index >= 0
    total = np.bincount(seg_index[inside], minlength=num_segments)
    found = np.bincount(seg_index[inside], weights=np.asarray(mask)[inside], minlength=num_segments)
    return found / np.maximum(total, 1)


def label_outlines(seg: np.ndarray, depth: np.ndarray | None = None, depth_jump: float = 0.1) -> np.ndarray:
    """Outlines from labels: pixels with a 4-neighbour of another seg class or, where both depths are
    valid (finite, > 0), a relative depth step ``|d1 - d2| / min(d1, d2)`` above ``depth_jump``. Both sides
    of an outline are marked, so it is two pixels wide. Two touching objects of one class are told apart by
    the depth step where one occludes the other.

    Args:
        seg: (H, W) class ids.
        depth: (H, W) depth (any positive unit), or None for seg outlines only.
        depth_jump: the relative depth step that is an outline.

    Returns:
        (H, W) bool.
    """
    seg = np.asarray(seg)
    out = np.zeros(seg.shape, bool)
    for edge, here, there in label_outline_pairs(seg, depth, depth_jump):
        out[here] |= edge
        out[there] |= edge
    return out


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (H, W) bool whose whole 3x3 neighbourhood is in ``mask`` (edges: outside)."""
    t = torch.from_numpy(~np.asarray(mask, bool)).float()[None, None]
    return ~(F.max_pool2d(t, 3, stride=1, padding=1)[0, 0].numpy() > 0) & np.asarray(mask, bool)


def _grow(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """``mask`` (B, H, W) bool dilated by ``pixels`` (Chebyshev)."""
    t = torch.from_numpy(np.asarray(mask, bool)).float()[:, None]
    return F.max_pool2d(t, 2 * pixels + 1, stride=1, padding=pixels)[:, 0].numpy() > 0


def pixel_mask(
    losses: np.ndarray,
    seg: np.ndarray,
    class_medians: np.ndarray,
    factor: float,
    ignore_index: int | None = None,
) -> np.ndarray:
    """FreeMask-style mask: pixels whose loss exceeds ``factor`` x the median loss of their class.

    Args:
        losses: (H, W) per-pixel losses of the variant against its source labels (NaN = ignored).
        seg: (H, W) source labels.
        class_medians: (C,) median loss per class on the real images (NaN = class unseen: never masked).
        factor: the multiple of the median above which a pixel is masked.
        ignore_index: label value never masked (already ignored).

    Returns:
        (H, W) bool, True = set to ignore.
    """
    seg = np.asarray(seg).astype(np.int64)
    num_classes = len(class_medians)
    valid = (seg >= 0) & (seg < num_classes) & np.isfinite(losses)
    if ignore_index is not None:
        valid &= seg != ignore_index
    limit = np.full(seg.shape, np.inf)
    limit[valid] = factor * np.asarray(class_medians, dtype=np.float64)[seg[valid]]
    limit[~np.isfinite(limit)] = np.inf  # unseen class
    return valid & (np.nan_to_num(losses, nan=-np.inf) > limit)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class QualityResult:
    """The filter's verdict on one variant.

    Attributes:
        agreement: pixel accuracy of the real-trained segmenter on the variant vs the source labels
            (NaN if the source has no labelled pixel).
        miou: the same prediction's mIoU.
        keep: whether to write the variant (image mode: ``agreement >= threshold``; objects mode: that
            and no segment lost; pixel mode: True).
        mask: pixel mode: (H, W) bool, pixels to set to the ignore label; other modes: None.
        ignored_share: share of the labelled pixels masked (0 outside pixel mode).
        segments: objects mode: source objects the object segmenter finds on the real source image
            (the ones checked).
        lost: objects mode: how many of them it does not find on the variant.
        outline_recall: ``quality_outlines``: share of the outlines inside the source's objects (found
            on the real source image) found on the variant; None when there were none to check.
    """

    agreement: float
    miou: float
    keep: bool
    mask: np.ndarray | None = None
    ignored_share: float = 0.0
    segments: int | None = None
    lost: int | None = None
    outline_recall: float | None = None

    def provenance(self) -> dict[str, float]:
        """``{"agreement", "miou", "ignored_share"}`` for ``Provenance.quality`` (NaN values left out),
        plus ``segments`` and ``segments_lost`` in objects mode and ``outline_recall`` when outlines were
        checked."""
        values = {"agreement": self.agreement, "miou": self.miou, "ignored_share": self.ignored_share}
        out = {k: float(v) for k, v in values.items() if math.isfinite(v)}
        if self.segments is not None:
            out["segments"], out["segments_lost"] = float(self.segments), float(self.lost or 0)
        if self.outline_recall is not None:
            out["outline_recall"] = float(self.outline_recall)
        return out


def summarize(results: Sequence[QualityResult]) -> dict[str, float]:
    """Counts and means for a report: scored, kept, dropped, kept_share, mean agreement / mIoU /
    ignored share (over the scored variants)."""
    n = len(results)
    kept = sum(r.keep for r in results)

    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    out = {
        "scored": float(n),
        "kept": float(kept),
        "dropped": float(n - kept),
        "kept_share": kept / n if n else math.nan,
        "mean_agreement": mean([r.agreement for r in results]),
        "mean_miou": mean([r.miou for r in results]),
        "mean_ignored_share": mean([r.ignored_share for r in results]),
    }
    checked = [r for r in results if r.segments is not None]
    if checked:
        out["segments_checked"] = float(sum(r.segments or 0 for r in checked))
        out["segments_lost"] = float(sum(r.lost or 0 for r in checked))
    outlined = [r.outline_recall for r in results if r.outline_recall is not None]
    if outlined:
        out["outlines_checked"] = float(len(outlined))
        out["outlines_merged"] = float(sum(v < OUTLINE_RECALL for v in outlined))
    return out


# --------------------------------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------------------------------


class Segmenter(Protocol):
    """What the filter needs from a segmentation model (a seg :class:`pipeline.synthesis.judging.Judge`)."""

    def raw(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, C, H, W) logits."""
        ...


def _same_size_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        if batch and (len(batch) == batch_size or s.image.shape != batch[0].image.shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _object_ids(names: Sequence[str], info: DatasetInfo) -> list[int]:
    """The class ids of ``generate.quality_object_classes`` (a clear error for unknown names)."""
    if not names:
        raise ValueError("generate.quality_mode=objects needs generate.quality_object_classes: the classes "
                         f"that are objects (of {list(info.classes)})")  # fmt: skip
    unknown = [n for n in names if n not in info.classes]
    if unknown:
        raise ValueError(f"generate.quality_object_classes {unknown} are not classes of {info.name}: "
                         f"{list(info.classes)}")  # fmt: skip
    return [info.classes.index(n) for n in names]


class QualityFilter:
    """Scores synthetic variants with a segmenter trained on the real labelled images.

    Args:
        segmenter: the real-trained model (``raw(images) -> logits``).
        num_classes: segmentation classes.
        class_medians: (num_classes,) median per-pixel loss of each class on the real training images.
        mode: ``image`` (drop variants under ``threshold``), ``objects`` (also drop variants that lose a
            source object that ``object_judge`` finds on the source image) or ``pixel`` (mask pixels, keep
            variants).
        threshold: image and objects modes: minimum agreement kept.
        factor: pixel mode: a pixel is masked when its loss exceeds factor x its class's median.
        ignore_index: the source labels' ignore index (None: every in-range id is a label).
        mask_value: label value written to masked pixels (:func:`ignore_value`).
        min_pixels: objects mode: smallest object checked.
        object_judge: objects mode: the binary segmenter (class 1 = an object of ``object_classes``).
        object_classes: objects mode: the class ids that are objects.
        outline_judge: objects mode, optional: the binary outline segmenter (class 1 = an outline,
            :func:`label_outlines`); given, a variant must also keep the outlines inside the source's objects.
        meta: what defines the filter (written to ``filter.json``).
    """

    def __init__(
        self,
        segmenter: Segmenter,
        num_classes: int,
        class_medians: np.ndarray,
        *,
        mode: Literal["image", "objects", "pixel"] = "image",
        threshold: float = 0.3,
        factor: float = 2.0,
        ignore_index: int | None = None,
        mask_value: int = DEFAULT_IGNORE,
        min_pixels: int = 16,
        object_judge: Segmenter | None = None,
        object_classes: Sequence[int] = (),
        outline_judge: Segmenter | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("image", "objects", "pixel"):
            raise ValueError(f"quality mode must be 'image', 'objects' or 'pixel', got {mode!r}")
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be at least 1, got {min_pixels}")
        if mode == "objects" and (object_judge is None or not object_classes):
            raise ValueError("objects mode needs object_judge and object_classes")
        if len(class_medians) != num_classes:
            raise ValueError(f"{len(class_medians)} class medians for {num_classes} classes")
        self.segmenter = segmenter
        self.num_classes = num_classes
        self.class_medians = np.asarray(class_medians, dtype=np.float64)
        self.mode, self.threshold, self.factor = mode, float(threshold), float(factor)
        self.ignore_index, self.mask_value = ignore_index, int(mask_value)
        self.min_pixels = int(min_pixels)
        if outline_judge is not None and mode != "objects":
            raise ValueError("an outline judge checks touching objects in objects mode only")
        self.object_judge, self.object_classes = object_judge, [int(c) for c in object_classes]
        self.outline_judge = outline_judge
        self.meta = dict(meta or {})

    @classmethod
    def fit(
        cls,
        cfg: LumenConfig,
        run_dir: Path,
        train_samples: Sequence[Sample],
        info: DatasetInfo,
        progress: bool = True,
        *,
        steps: int | None = None,
        judge_factory: JudgeFactory | None = None,
    ) -> QualityFilter:
        """Train the segmenter on the real labelled samples (or reload it from ``run_dir/quality_filter``).

        The segmenter is the seg judge of ``judge_factory`` (:func:`perception.judges.fit_judge`:
        :func:`perception.train.train`) with ``cfg.perception``'s network and optimisation settings for
        ``steps`` (default ``generate.quality_judge_steps``, else ``cfg.perception.steps``) steps, seed
        ``cfg.seed``. Objects mode trains a second, binary one the same way in ``objects/`` (object
        classes against the rest). The class medians of its
        per-pixel loss on ``train_samples`` are computed once and saved with it (``filter.json``). Mode,
        threshold and factor come from ``cfg.generate`` and can change without retraining.
        """
        if judge_factory is None:
            raise ValueError(
                "QualityFilter.fit needs judge_factory=, the function that trains its segmenter (e.g. "
                "perception.judges.fit_judge): the library core does not import perception"
            )
        folder = RunPaths(run_dir).quality_filter
        device = resolve_device(cfg.device)
        g = cfg.generate
        labelled = [s for s in train_samples if s.seg is not None]
        steps = steps or g.quality_judge_steps or cfg.perception.steps
        object_ids = _object_ids(g.quality_object_classes, info) if g.quality_mode == "objects" else []
        judge = judge_factory(
            "seg", labelled, info, folder, config=cfg.perception, steps=steps, seed=cfg.seed, device=device
        )
        key = judge.meta["key"]
        meta_path = folder / "filter.json"
        medians: np.ndarray | None = None
        if meta_path.is_file():
            stored = json.loads(meta_path.read_text())
            if stored.get("key") == key:
                medians = np.array([np.nan if v is None else v for v in stored["class_medians"]], np.float64)
        if medians is None:
            medians = cls._class_medians(judge, labelled, info, cfg.seed, progress)
            atomic_write_json(
                meta_path,
                {
                    "key": key,
                    "classes": list(info.classes),
                    "class_medians": [None if not math.isfinite(v) else float(v) for v in medians],
                    "pixels_per_image": _PIXELS_PER_IMAGE,
                    "num_train": len(labelled),
                    "judge": "judge.json",
                },
            )
        object_judge, meta = None, {"key": key, "folder": str(folder), **judge.meta}
        if object_ids:  # the binary "is there an object here" segmenter of objects mode
            binary = DatasetInfo(name=f"{info.name}-objects", classes=("other", "object"), labels=("seg",))
            as_objects = [dataclasses.replace(s, seg=np.isin(np.asarray(s.seg), object_ids).astype(np.uint8))
                          for s in labelled]  # fmt: skip
            object_judge = judge_factory("seg", as_objects, binary, folder / "objects", config=cfg.perception,
                                         steps=steps, seed=cfg.seed, device=device)  # fmt: skip
            meta["objects"] = {
                "classes": [info.classes[i] for i in object_ids],
                "key": object_judge.meta["key"],
            }
        outline_judge = None
        if object_ids and g.quality_outlines:  # the binary outline segmenter (label_outlines)
            outlines = DatasetInfo(
                name=f"{info.name}-outlines", classes=("other", "outline"), labels=("seg",)
            )
            outlined = [dataclasses.replace(s, seg=label_outlines(np.asarray(s.seg), s.depth, g.quality_depth_jump)
                                            .astype(np.uint8)) for s in labelled]  # fmt: skip
            outline_judge = judge_factory("seg", outlined, outlines, folder / "outlines", config=cfg.perception,
                                          steps=steps, seed=cfg.seed, device=device)  # fmt: skip
            with_depth = sum(s.depth is not None for s in labelled)
            meta["outlines"] = {"key": outline_judge.meta["key"], "depth_jump": g.quality_depth_jump,
                                "images_with_depth": with_depth}  # fmt: skip
        return cls(
            judge, info.num_classes, medians, mode=g.quality_mode, threshold=g.quality_threshold,
            factor=g.quality_pixel_factor, ignore_index=info.ignore_index, mask_value=ignore_value(info),
            min_pixels=g.quality_min_pixels, object_judge=object_judge, object_classes=object_ids,
            outline_judge=outline_judge, meta=meta,
        )  # fmt: skip

    @staticmethod
    def _class_medians(
        judge: Segmenter, samples: Sequence[Sample], info: DatasetInfo, seed: int, progress: bool
    ) -> np.ndarray:
        """Median per-pixel loss of each class on the real samples (at most 4096 pixels per image)."""
        rng = np.random.default_rng(seed)
        losses, labels = [], []
        bar = progress_bar(total=len(samples), desc="filter class medians", unit="img", enabled=progress)
        for batch in _same_size_batches(samples, 32):
            segs = np.stack([np.asarray(s.seg) for s in batch])
            loss = pixel_losses(judge.raw(np.stack([s.image for s in batch])), segs, info.ignore_index)
            for lo, se in zip(loss, segs, strict=True):
                idx = np.flatnonzero(np.isfinite(lo))
                if idx.size > _PIXELS_PER_IMAGE:
                    idx = rng.choice(idx, _PIXELS_PER_IMAGE, replace=False)
                losses.append(lo.ravel()[idx])
                labels.append(se.ravel()[idx])
            bar.update(len(batch))
        bar.close()
        return class_median_losses(np.concatenate(losses), np.concatenate(labels), info.num_classes)

    def _outline_recall(
        self, images: np.ndarray, segs: np.ndarray, sources: np.ndarray
    ) -> list[float | None]:
        """Per variant: the share of the outlines inside its source's objects that the outline judge finds
        on the real source image and, within one pixel, on the variant (None: no outline judge, or fewer
        than :data:`MIN_OUTLINE_PIXELS` such outline pixels on the source)."""
        if self.outline_judge is None:
            return [None] * len(images)
        on_source = self.outline_judge.raw(sources).argmax(1).numpy() == 1
        near_variant = _grow(self.outline_judge.raw(images).argmax(1).numpy() == 1)
        out: list[float | None] = []
        for seg, src, var in zip(segs, on_source, near_variant, strict=True):
            checked = src & _interior(np.isin(np.asarray(seg), self.object_classes))
            out.append(float(var[checked].mean()) if checked.sum() >= MIN_OUTLINE_PIXELS else None)
        return out

    def score(
        self, images: np.ndarray, segs: np.ndarray, sources: np.ndarray | None = None
    ) -> list[QualityResult]:
        """Score variants against their source labels.

        Args:
            images: (B, H, W, 3) uint8 variants.
            segs: (B, H, W) labels of each variant's source.
            sources: (B, H, W, 3) uint8 real source images (objects mode only, where it is required).
        """
        images, segs = np.asarray(images), np.asarray(segs)
        if images.shape[:3] != segs.shape:
            raise ValueError(f"images {images.shape} and labels {segs.shape} do not match")
        found: list[np.ndarray] = []
        objects: list[np.ndarray] = []
        outline_recall: list[float | None] = [None] * len(images)
        if self.mode == "objects":
            if sources is None or np.shape(sources) != images.shape:
                raise ValueError(
                    f"objects mode scores variants against their real source images: expected sources of "
                    f"shape {images.shape}, got {None if sources is None else np.shape(sources)}"
                )
            if self.object_judge is None:  # checked in __init__; the attribute may be reassigned
                raise ValueError("objects mode needs object_judge")
            on_source = self.object_judge.raw(np.asarray(sources)).argmax(1).numpy() == 1
            on_variant = self.object_judge.raw(images).argmax(1).numpy() == 1
            for seg, src, var in zip(segs, on_source, on_variant, strict=True):
                seg = np.asarray(seg).astype(np.int64)
                index, classes = segments(np.where(np.isin(seg, self.object_classes), seg, -1), self.num_classes,
                                          None, self.min_pixels)  # fmt: skip
                found.append(segment_share(src, index, len(classes)) >= 0.5)
                objects.append(segment_share(var, index, len(classes)) >= 0.5)
            outline_recall = self._outline_recall(images, segs, np.asarray(sources))
        logits = self.segmenter.raw(images)
        preds = logits.argmax(1).numpy()
        losses = pixel_losses(logits, segs, self.ignore_index) if self.mode == "pixel" else None
        results = []
        for i in range(len(images)):
            scores = confusion_scores(seg_confusion(preds[i], segs[i], self.num_classes, self.ignore_index))
            agreement, miou = scores["pixel_acc"], scores["miou"]
            if losses is None:
                keep = not (math.isfinite(agreement) and agreement < self.threshold)
                if self.mode == "image":
                    results.append(QualityResult(agreement, miou, keep))
                    continue
                lost = int(np.sum(found[i] & ~objects[i]))
                recall = outline_recall[i]
                apart = recall is None or recall >= OUTLINE_RECALL
                results.append(QualityResult(agreement, miou, keep and lost == 0 and apart,
                                             segments=int(found[i].sum()), lost=lost,
                                             outline_recall=recall))  # fmt: skip
                continue
            mask = pixel_mask(losses[i], segs[i], self.class_medians, self.factor, self.ignore_index)
            labelled = int(np.isfinite(losses[i]).sum())
            share = float(mask.sum()) / labelled if labelled else 0.0
            results.append(QualityResult(agreement, miou, True, mask, share))
        return results
