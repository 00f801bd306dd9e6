"""Synthesis metrics: how well variants follow their source (alignment) and how much they vary (diversity).

Alignment compares what a model trained on *real* data predicts on a synthetic variant with the labels
of the variant's *source* image (the labels the variant inherits). The definitions are the perception
metrics' (:mod:`pipeline.metrics`, which :mod:`perception.metrics` accumulates), pooled over the valid
pixels of all images:

=========================  =======================================================================
metric                     definition
=========================  =======================================================================
seg ``pixel_acc``          correct pixels / labelled pixels (``ignore_index`` and ids outside
                           ``[0, num_classes)`` in the source labels are skipped)
seg ``miou``               mean over classes present in labels or predictions of TP / (TP + FP + FN)
depth ``abs_rel``          mean of \\|d - d*\\| / d* over pixels with a finite d* > 0
depth ``delta1``           share of those pixels with max(d / d*, d* / d) < 1.25
normal ``mean_angle``      mean angle in degrees between predicted and source normals (\\|n*\\| > 0.5)
normal ``within_11_25``    share of those pixels under 11.25 degrees (likewise 22.5 and 30)
=========================  =======================================================================

Diversity is measured per source image over its K variants, then averaged over sources:

- ``pairwise``: mean distance over the K (K - 1) / 2 pairs of variants (NaN when K < 2);
- ``to_source``: mean distance of each variant to the source image.

Two distances are used. **Pixel**: the mean absolute difference of RGB values scaled to [0, 1].
**Latent**: the root-mean-square difference of the base model's VAE encoder posterior means (scaled by
the VAE's ``scaling_factor``, so training latents have unit variance; flattened ``(C, h, w)`` latents),
i.e. an L2 distance divided by sqrt(C h w), in units of the latent standard deviation. Both are exactly
zero for identical images: :class:`LatentEncoder` encodes each distinct image once, so equal images
share one latent.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.metrics import depth_scores, normal_scores, seg_scores

__all__ = [
    "LatentEncoder",
    "SegAlignment",
    "confusion_scores",
    "depth_agreement",
    "diversity",
    "instance_boundaries",
    "l1_distance",
    "layout_agreement",
    "layout_edges",
    "normal_agreement",
    "object_separation",
    "rms_distance",
    "seg_alignment",
    "seg_confusion",
]

Distance = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------


def seg_confusion(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(num_classes, num_classes) int64 confusion matrix, rows = source class, columns = predicted.

    Args:
        pred: (...) predicted class ids in ``[0, num_classes)``.
        target: (...) source class ids, same shape; ``ignore_index`` and out-of-range ids are skipped.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the label shape {target.shape}")
    t = target.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    valid = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        valid &= t != ignore_index
    if valid.any() and (p[valid].min() < 0 or p[valid].max() >= num_classes):
        raise ValueError(f"predicted class ids must lie in [0, {num_classes})")
    counts = np.bincount(t[valid] * num_classes + p[valid], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_scores(confusion: np.ndarray) -> dict[str, float]:
    """``miou`` and ``pixel_acc`` of a (C, C) confusion matrix (:func:`pipeline.metrics.seg_scores`)."""
    return seg_scores(torch.from_numpy(np.asarray(confusion)))


@dataclass
class SegAlignment:
    """Seg agreement of predictions with source labels.

    Attributes:
        pixel_acc, miou: pooled over every labelled pixel of every image.
        per_image: ``{"pixel_acc", "miou"}`` of each image (NaN for an image with no labelled pixel).
        confusion: the pooled (C, C) confusion matrix.
    """

    pixel_acc: float
    miou: float
    per_image: list[dict[str, float]] = field(default_factory=list)
    confusion: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pixel_acc": self.pixel_acc, "miou": self.miou, "per_image": self.per_image}


def seg_alignment(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> SegAlignment:
    """Per-image and pooled pixel accuracy and mIoU.

    Args:
        pred: (B, H, W) predicted class ids.
        target: (B, H, W) source labels.
        num_classes: number of classes.
        ignore_index: label value to skip (None: only out-of-range ids are skipped).
    """
    if np.ndim(pred) != 3:
        raise ValueError(f"expected (B, H, W) predictions, got shape {np.shape(pred)}")
    confusions = [seg_confusion(p, t, num_classes, ignore_index) for p, t in zip(pred, target, strict=True)]
    pooled = np.sum(confusions, axis=0) if confusions else np.zeros((num_classes, num_classes), np.int64)
    total = confusion_scores(pooled)
    return SegAlignment(total["pixel_acc"], total["miou"], [confusion_scores(c) for c in confusions], pooled)


@dataclass
class ObjectPlacement:
    """Which objects of the source images a model finds in the variants (:func:`object_placement`).

    Attributes:
        in_place: share of the counted objects whose pixels are predicted as their class (or as any
            ``accept`` class) for at least ``threshold`` of their area.
        images_all_in_place: share of the images with at least one counted object where every counted
            object is in place (what "every object in place" in a gallery means, as a number).
        objects: number of counted objects (area >= ``min_pixels``).
        recall: each counted object's share of pixels predicted as its class, image by image.
    """

    in_place: float
    images_all_in_place: float
    objects: int
    recall: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"in_place": self.in_place, "images_all_in_place": self.images_all_in_place,
                "objects": self.objects}  # fmt: skip


def object_placement(
    pred: np.ndarray,
    instances: np.ndarray,
    classes: Sequence[Sequence[int]],
    min_pixels: int = 4,
    threshold: float = 0.5,
    accept: Sequence[int] | None = None,
) -> ObjectPlacement:
    """Object-level fidelity: is each source object still where it was, as the class it was?

    Args:
        pred: (B, H, W) class ids predicted on the variants (e.g. by a judge trained on real images).
        instances: (B, H, W) object index of each source pixel (``k`` for object ``k``, -1 elsewhere).
        classes: the class id of each object, image by image.
        min_pixels: objects with a smaller visible area are not counted (too small to judge).
        threshold: the share of an object's pixels that must be predicted as its class.
        accept: class ids that all count as a hit on any object (e.g. every object class: "is there an
            object here", whatever its shape); default: only the object's own class.
    """
    if np.shape(pred) != np.shape(instances) or np.ndim(pred) != 3:
        raise ValueError(f"expected (B, H, W) predictions and instances of one shape, got "
                         f"{np.shape(pred)} and {np.shape(instances)}")  # fmt: skip
    if len(classes) != len(pred):
        raise ValueError(f"{len(classes)} class lists for {len(pred)} images")
    recall: list[list[float]] = []
    accepted = None if accept is None else np.asarray(sorted(set(accept)))
    for p, inst, cls in zip(pred, instances, classes, strict=True):
        row = []
        for k, c in enumerate(cls):
            mask = inst == k
            if int(mask.sum()) >= min_pixels:
                hit = p[mask] == c if accepted is None else np.isin(p[mask], accepted)
                row.append(float(np.mean(hit)))
        recall.append(row)
    flat = [r for row in recall for r in row]
    judged = [row for row in recall if row]
    return ObjectPlacement(
        in_place=float(np.mean([r >= threshold for r in flat])) if flat else float("nan"),
        images_all_in_place=float(np.mean([all(r >= threshold for r in row) for row in judged]))
        if judged
        else float("nan"),
        objects=len(flat),
        recall=recall,
    )


def _neighbour_pairs(
    instances: np.ndarray,
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[Any, ...], tuple[Any, ...]]]:
    """For the right and lower 4-neighbour: (ids here, ids there, index of here, index of there)."""
    h, w = instances.shape[-2:]
    for dy, dx in ((0, 1), (1, 0)):
        here = (..., slice(0, h - dy), slice(0, w - dx))
        there = (..., slice(dy, h), slice(dx, w))
        yield instances[here], instances[there], here, there


def instance_boundaries(instances: np.ndarray) -> np.ndarray:
    """Object outlines: the pixels with a 4-neighbour of another instance, where at least one of the two
    is an object (``instances >= 0``; -1 is background). Both sides of a boundary are marked, so a boundary
    between two touching objects is two pixels wide.

    Args:
        instances: (..., H, W) object index of each pixel (-1: no object).

    Returns:
        (..., H, W) bool.
    """
    inst = np.asarray(instances)
    out = np.zeros(inst.shape, bool)
    for a, b, here, there in _neighbour_pairs(inst):
        edge = (a != b) & ((a >= 0) | (b >= 0))
        out[here] |= edge
        out[there] |= edge
    return out


@dataclass
class ObjectSeparation:
    """Whether touching objects stay apart in the variants (:func:`object_separation`).

    Attributes:
        separated: share of the counted pairs of touching objects whose shared boundary is found.
        pairs: number of counted pairs (both objects at least ``min_pixels``).
        recall: each counted pair's share of its shared boundary found, image by image.
    """

    separated: float
    pairs: int
    recall: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"separated": self.separated, "pairs": self.pairs}


def object_separation(
    boundary: np.ndarray,
    instances: np.ndarray,
    min_pixels: int = 16,
    threshold: float = 0.5,
    tolerance: int = 1,
) -> ObjectSeparation:
    """Are touching objects still two objects? For each pair of source objects that touch (4-neighbours),
    their shared boundary is the pixels of either object next to the other; the pair is **separated** when
    ``boundary`` (e.g. an outline judge's prediction on the variant) marks at least ``threshold`` of those
    pixels, a pixel counting as marked when a marked pixel lies within ``tolerance`` pixels (Chebyshev).
    Two spheres drawn as one blob cover both objects' pixels, so :func:`object_placement` counts both as
    in place; their boundary is gone, and this counts the pair as merged.

    Args:
        boundary: (B, H, W) bool or 0/1 predicted outline pixels.
        instances: (B, H, W) object index of each source pixel (-1: no object).
        min_pixels: pairs with an object of smaller visible area are not counted.
        threshold: the share of the shared boundary that must be found.
        tolerance: how far (pixels) a marked pixel may lie from a boundary pixel it accounts for.
    """
    if np.shape(boundary) != np.shape(instances) or np.ndim(boundary) != 3:
        raise ValueError(f"expected (B, H, W) boundaries and instances of one shape, got "
                         f"{np.shape(boundary)} and {np.shape(instances)}")  # fmt: skip
    found = torch.from_numpy(np.asarray(boundary).astype(np.float32))[:, None]
    if tolerance > 0:
        found = torch.nn.functional.max_pool2d(found, 2 * tolerance + 1, stride=1, padding=tolerance)
    near = found[:, 0].numpy() > 0
    recall: list[list[float]] = []
    for marked, inst in zip(near, np.asarray(instances), strict=True):
        ids, counts = np.unique(inst[inst >= 0], return_counts=True)
        big = set(ids[counts >= min_pixels].tolist())
        shared: dict[tuple[int, int], np.ndarray] = {}
        for a, b, here, there in _neighbour_pairs(inst):
            touch = (a != b) & (a >= 0) & (b >= 0)
            for pair in {
                (min(x, y), max(x, y)) for x, y in zip(a[touch].tolist(), b[touch].tolist(), strict=True)
            }:
                if not set(pair) <= big:
                    continue
                mask = shared.setdefault(pair, np.zeros(inst.shape, bool))
                on = touch & (np.minimum(a, b) == pair[0]) & (np.maximum(a, b) == pair[1])
                mask[here] |= on
                mask[there] |= on
        recall.append([float(marked[m].mean()) for _, m in sorted(shared.items())])
    flat = [r for row in recall for r in row]
    return ObjectSeparation(
        separated=float(np.mean([r >= threshold for r in flat])) if flat else float("nan"),
        pairs=len(flat),
        recall=recall,
    )


LAYOUT_AGREEMENTS = ("cosine", "edges", "mse")
"""The scores :func:`layout_agreement` knows."""


def layout_edges(layouts: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H, W): the gradient magnitude over all channels (central differences)."""
    x = np.asarray(layouts, dtype=np.float64)
    gy = np.zeros_like(x)
    gx = np.zeros_like(x)
    gy[:, :, 1:-1] = (x[:, :, 2:] - x[:, :, :-2]) / 2
    gx[:, :, :, 1:-1] = (x[:, :, :, 2:] - x[:, :, :, :-2]) / 2
    return np.sqrt((gx * gx + gy * gy).sum(axis=1))


def layout_agreement(reference: np.ndarray, candidates: np.ndarray, score: str = "cosine") -> np.ndarray:
    """How well each candidate's own layout matches the layout it was generated from: (B,) float64,
    higher is better. Both are (B, C, H, W) neural layouts in [0, 1] (0.5 the dataset mean, as
    :class:`pipeline.layouts.LayoutExtractor` makes them): ``reference[i]`` the condition, ``candidates[i]``
    the layout extracted again from the generated image. Label-free: a variant that merges two touching
    objects, or loses one, no longer carries the boundary its condition had.

    - ``cosine``: the mean over pixels of the cosine between the centred (``- 0.5``) layout vectors;
    - ``edges``: the Pearson correlation of the two layouts' gradient magnitudes (where the boundaries are);
    - ``mse``: minus the mean squared difference.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 4:
        raise ValueError(f"layouts must both be (B, C, H, W), got {ref.shape} and {cand.shape}")
    if score == "mse":
        return np.asarray(-((ref - cand) ** 2).mean(axis=(1, 2, 3)))
    if score == "cosine":
        a, b = ref - 0.5, cand - 0.5
        num = (a * b).sum(axis=1)
        den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        return np.asarray(np.where(den > 1e-12, num / np.maximum(den, 1e-12), 0.0).mean(axis=(1, 2)))
    if score == "edges":
        ea = layout_edges(ref).reshape(len(ref), -1)
        eb = layout_edges(cand).reshape(len(cand), -1)
        ea = ea - ea.mean(axis=1, keepdims=True)
        eb = eb - eb.mean(axis=1, keepdims=True)
        den = np.sqrt((ea * ea).sum(axis=1) * (eb * eb).sum(axis=1))
        return np.asarray(np.where(den > 1e-12, (ea * eb).sum(axis=1) / np.maximum(den, 1e-12), 0.0))
    raise ValueError(f"unknown layout agreement score {score!r}; expected one of {LAYOUT_AGREEMENTS}")


def label_outline_pairs(
    segs: np.ndarray, depths: np.ndarray | None = None, depth_jump: float = 0.1
) -> Iterator[tuple[np.ndarray, tuple[Any, ...], tuple[Any, ...]]]:
    """The labels' outlines between 4-neighbours: for the right and the lower neighbour, (outline, index of
    here, index of there), where ``outline`` marks the pairs whose seg class differs or, where both depths
    are valid (finite, > 0), whose relative depth step ``|d1 - d2| / min(d1, d2)`` exceeds ``depth_jump``.

    Args:
        segs: (..., H, W) class ids.
        depths: (..., H, W) depth (any positive unit), or None for seg outlines only.
    """
    seg = np.asarray(segs)
    d = None if depths is None else np.asarray(depths, dtype=np.float64)
    if d is not None and d.shape != seg.shape:
        raise ValueError(f"depth shape {d.shape} differs from the label shape {seg.shape}")
    for a, b, here, there in _neighbour_pairs(seg):
        edge = a != b
        if d is not None:
            da, db = d[here], d[there]
            valid = np.isfinite(da) & np.isfinite(db) & (da > 0) & (db > 0)
            edge |= valid & (np.abs(da - db) / np.where(valid, np.minimum(da, db), 1.0) > depth_jump)
        yield edge, here, there


LABEL_EDGE_SCORES = ("all", "inner")
"""The outline sets :func:`label_edge_contrast` knows."""


def label_edge_contrast(
    images: np.ndarray,
    segs: np.ndarray,
    depths: np.ndarray | None = None,
    which: str = "all",
    object_classes: Sequence[int] = (),
    depth_jump: float = 0.1,
    min_pairs: int = 4,
) -> np.ndarray:
    """Are the image's edges where its labels' outlines are? (B,) float64, higher is better.

    A variant reuses its source's labels, so where the labels have an outline (the seg class changes or,
    where both depths are valid, the depth steps by more than ``depth_jump`` relative, as in
    :func:`label_outline_pairs`) the variant should change colour. The score is the
    mean colour step (L2 over channels) across the outline's 4-neighbour pairs, divided by the image's
    colour spread (the square root of the summed per-channel variances, so a darker or brighter copy
    scores the same): a merged pair of touching objects or a lost object leaves an outline with no edge.

    - ``all``: every outline;
    - ``inner``: only outline pairs with both pixels of ``object_classes`` (the boundaries between touching
      objects); an image with fewer than ``min_pairs`` such pairs is scored on all its outlines.

    Args:
        images: (B, H, W, C) images, uint8 or float.
        segs: (B, H, W) class ids.
        depths: (B, H, W) depth, or None for seg outlines only.
    """
    if which not in LABEL_EDGE_SCORES:
        raise ValueError(f"unknown label edge score {which!r}; expected one of {LABEL_EDGE_SCORES}")
    x = np.asarray(images, dtype=np.float64)
    seg = np.asarray(segs)
    if x.ndim != 4 or x.shape[:3] != seg.shape:
        raise ValueError(f"expected (B, H, W, C) images and (B, H, W) labels, got {x.shape} and {seg.shape}")
    objects = np.isin(seg, list(object_classes))
    steps, outline, inner = [], [], []
    for edge, here, there in label_outline_pairs(seg, depths, depth_jump):
        steps.append(
            np.sqrt(((x[(*here, slice(None))] - x[(*there, slice(None))]) ** 2).sum(axis=-1)).reshape(
                len(x), -1
            )
        )
        outline.append(edge.reshape(len(x), -1))
        inner.append((edge & objects[here] & objects[there]).reshape(len(x), -1))
    step, on, inside = (np.concatenate(v, axis=1) for v in (steps, outline, inner))
    spread = np.sqrt(x.reshape(len(x), -1, x.shape[-1]).var(axis=1).sum(axis=1))
    out = np.zeros(len(x))
    for i in range(len(x)):
        mask = inside[i] if which == "inner" and inside[i].sum() >= min_pairs else on[i]
        if mask.any():
            out[i] = step[i][mask].mean() / max(spread[i], 1e-12)
    return out


def depth_agreement(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """``abs_rel``, ``rmse`` and ``delta1`` of predicted vs source depth over valid source pixels.

    Args:
        pred: (B, H, W) depth predicted on the variants (positive).
        target: (B, H, W) source depth; 0 or non-finite = invalid.
    """
    return depth_scores(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(target)))


def normal_agreement(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean / median angle (degrees) and shares within 11.25, 22.5, 30 degrees over valid source pixels.

    Args:
        pred: (B, H, W, 3) normals predicted on the variants.
        target: (B, H, W, 3) source unit normals; zero vectors = invalid.
    """
    p = torch.as_tensor(np.asarray(pred, dtype=np.float32)).permute(0, 3, 1, 2)
    t = torch.as_tensor(np.asarray(target, dtype=np.float32)).permute(0, 3, 1, 2)
    return normal_scores(p, t)


# --------------------------------------------------------------------------------------------------
# Diversity
# --------------------------------------------------------------------------------------------------


def l1_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference. For uint8 images the values are first scaled to [0, 1]."""
    scale = 255.0 if np.asarray(a).dtype == np.uint8 else 1.0
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(diff.mean() / scale)


def rms_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference: ``||a - b||_2 / sqrt(size)``."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


def diversity(
    variants: np.ndarray, source: np.ndarray | None = None, distance: Distance = l1_distance
) -> dict[str, float]:
    """Diversity of the K variants of one source.

    Args:
        variants: (K, ...) images (uint8 RGB) or features of the variants.
        source: (...) the source image or its features; None skips ``to_source``.
        distance: :func:`l1_distance` (pixels) or :func:`rms_distance` (latents), or any symmetric one.

    Returns:
        ``pairwise``: mean distance over pairs of variants (NaN when K < 2); ``to_source``: mean
        distance of the variants to the source (NaN without a source).
    """
    k = len(variants)
    pairs = [distance(variants[i], variants[j]) for i, j in itertools.combinations(range(k), 2)]
    out = {"pairwise": float(np.mean(pairs)) if pairs else math.nan, "to_source": math.nan}
    if source is not None and k:
        out["to_source"] = float(np.mean([distance(v, source) for v in variants]))
    return out


class LatentEncoder:
    """The base model's VAE encoder as a feature space: posterior mean x ``scaling_factor``.

    Each distinct image (by content) is encoded once and cached, so identical images get the very same
    latent (and a distance of exactly zero), whatever batch they came in.

    Args:
        vae: a diffusers ``AutoencoderKL`` (e.g. ``load_base(folder).vae``).
        device: where to run it.
        batch_size: images per encoder call.
    """

    def __init__(self, vae: Any, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        self.vae = vae.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self._cache: dict[str, np.ndarray] = {}

    @staticmethod
    def _digest(image: np.ndarray) -> str:
        arr = np.ascontiguousarray(image)
        return hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode() + arr.tobytes()).hexdigest()

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, C, h, w) float32 latents (posterior means, scaled)."""
        keys = [self._digest(im) for im in images]
        todo = {k: im for k, im in zip(keys, images, strict=True) if k not in self._cache}
        items = list(todo.items())
        dtype = next(self.vae.parameters()).dtype
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            x = torch.from_numpy(np.stack([im for _, im in chunk]).astype(np.float32) / 127.5 - 1.0)
            x = x.permute(0, 3, 1, 2).to(self.device, dtype)
            mean = self.vae.encode(x).latent_dist.mean * self.scale
            for (k, _), z in zip(chunk, mean.float().cpu().numpy(), strict=True):
                self._cache[k] = z
        return np.stack([self._cache[k] for k in keys])

    def clear(self) -> None:
        """Forget the cached latents."""
        self._cache.clear()
