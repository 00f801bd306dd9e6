"""Layout edits: new label maps made from existing ones (after Chae et al., NeurIPS 2023, who generate
from user-drawn and edited masks).

A label map with no image yet can be turned into a training pair by the generate-from-labels mode of
``lumen expand`` (``generate.source: labels``). These edits make such maps from the dataset's own:

- ``hflip``: mirror the whole map (and the image, depth and normals when present; normals' x negated);
- ``shift``: move one object (a connected component of an object class) by a random offset;
- ``scale``: grow or shrink one object about its centre;
- ``copy_paste``: paste one object of another map (a *donor*) into this one, at a random offset.
  With depth on both sides (e.g. toy scenes) it is depth-aware: the pasted object shows only where it
  is nearer than what it covers, as a renderer would show it.

``shift`` and ``scale`` leave a hole where the object was: it is filled with the class that surrounds
the object most (its background). They edit the seg map only: the image, depth and normals of the hole
are unknown, so they are dropped (the map's image is to be generated anyway). Every edit returns a
JSON-serialisable record of what it did, which goes into the sample's provenance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "EDITS",
    "EditMap",
    "apply_random_edit",
    "background_class",
    "hflip",
    "object_masks",
    "paste_object",
    "scale_object",
    "shift_object",
]

EDITS = ("hflip", "shift", "scale", "copy_paste")


@dataclass(frozen=True)
class EditMap:
    """A seg map with the image and dense labels that go with it, where known.

    Attributes:
        seg: (H, W) integer class ids.
        image: (H, W, 3) uint8, or None.
        depth: (H, W) float metres, or None.
        normal: (H, W, 3) float unit normals (x right, y down, z forward), or None.
    """

    seg: np.ndarray
    image: np.ndarray | None = None
    depth: np.ndarray | None = None
    normal: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.seg.ndim != 2:
            raise ValueError(f"seg must be (H, W), got shape {self.seg.shape}")
        for name in ("image", "depth", "normal"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[:2] != self.seg.shape:
                raise ValueError(f"{name} is {arr.shape[:2]}, seg is {self.seg.shape}")

    def seg_only(self, seg: np.ndarray) -> EditMap:
        return EditMap(seg)


def object_masks(
    seg: np.ndarray,
    classes: Sequence[int] | None = None,
    min_pixels: int = 12,
    max_share: float = 0.2,
) -> list[tuple[int, np.ndarray]]:
    """The objects of a map: (class, bool mask) of each 8-connected component of ``classes`` (None = any
    class) with at least ``min_pixels`` pixels and at most ``max_share`` of the map (so floors, roads and
    skies are not objects)."""
    import cv2

    out: list[tuple[int, np.ndarray]] = []
    limit = max_share * seg.size
    for cls in np.unique(seg).tolist():
        if classes is not None and cls not in classes:
            continue
        count, labels = cv2.connectedComponents((seg == cls).astype(np.uint8), connectivity=8)
        for i in range(1, count):
            mask = labels == i
            if min_pixels <= mask.sum() <= limit:
                out.append((int(cls), mask))
    return out


def background_class(seg: np.ndarray, mask: np.ndarray, ring: int = 2) -> int:
    """The most common class in a ``ring``-pixel band around ``mask`` (the class the object stands on or
    in front of); the most common class outside the mask if the band is empty."""
    import cv2

    kernel = np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)
    band = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~mask
    values = seg[band] if band.any() else seg[~mask]
    if values.size == 0:
        return int(seg.flat[0])
    ids, counts = np.unique(values, return_counts=True)
    return int(ids[counts.argmax()])


def hflip(m: EditMap) -> EditMap:
    """Mirror left-right: seg, image, depth and normals (whose x component changes sign)."""
    normal = None
    if m.normal is not None:
        normal = m.normal[:, ::-1].copy()
        normal[..., 0] *= -1
    return EditMap(
        m.seg[:, ::-1].copy(),
        None if m.image is None else m.image[:, ::-1].copy(),
        None if m.depth is None else m.depth[:, ::-1].copy(),
        normal,
    )


def _move(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` translated by (dy, dx) pixels; what leaves the frame is cut off."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def shift_object(m: EditMap, mask: np.ndarray, cls: int, dy: int, dx: int) -> EditMap:
    """Move one object (``mask``, class ``cls``) by (dy, dx); its old place takes its background class.
    Returns a seg-only map (see the module doc)."""
    seg = m.seg.copy()
    seg[mask] = background_class(m.seg, mask)
    seg[_move(mask, dy, dx)] = cls
    return m.seg_only(seg)


def scale_object(m: EditMap, mask: np.ndarray, cls: int, factor: float) -> EditMap:
    """Grow or shrink one object by ``factor`` about its centroid (nearest-neighbour); its old place
    takes its background class. Returns a seg-only map."""
    if factor <= 0:
        raise ValueError(f"scale factor must be > 0, got {factor}")
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    gy, gx = np.mgrid[0:h, 0:w]
    src_y = np.rint(cy + (gy - cy) / factor).astype(int)
    src_x = np.rint(cx + (gx - cx) / factor).astype(int)
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    scaled = np.zeros_like(mask)
    scaled[inside] = mask[src_y[inside], src_x[inside]]
    seg = m.seg.copy()
    seg[mask] = background_class(m.seg, mask)
    seg[scaled] = cls
    return m.seg_only(seg)


def paste_object(m: EditMap, donor: EditMap, mask: np.ndarray, cls: int, dy: int = 0, dx: int = 0) -> EditMap:
    """Paste the donor's object (``mask``, class ``cls``) into ``m``, moved by (dy, dx).

    Where both maps have depth the paste is depth-aware: the object covers only the pixels where it is
    nearer than ``m``'s surface (depth 0, e.g. sky, counts as infinitely far). Image, depth and normals
    are pasted with it where both maps have them, else dropped.
    """
    if donor.seg.shape != m.seg.shape:
        raise ValueError(f"donor map is {donor.seg.shape}, the map is {m.seg.shape}")
    ty, tx = np.nonzero(_move(mask, dy, dx))
    src_y, src_x = ty - dy, tx - dx
    if m.depth is not None and donor.depth is not None:
        here, there = m.depth[ty, tx], donor.depth[src_y, src_x]
        nearer = (there > 0) & ((here <= 0) | (there < here))
        ty, tx, src_y, src_x = ty[nearer], tx[nearer], src_y[nearer], src_x[nearer]
    target = np.zeros(m.seg.shape, bool)
    target[ty, tx] = True
    seg = m.seg.copy()
    seg[target] = cls

    def pasted(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        if a is None or b is None:
            return None
        out = a.copy()
        out[target] = b[src_y, src_x]
        return out

    return EditMap(
        seg, pasted(m.image, donor.image), pasted(m.depth, donor.depth), pasted(m.normal, donor.normal)
    )


def apply_random_edit(
    op: str,
    m: EditMap,
    rng: np.random.Generator,
    donor: Callable[[np.random.Generator], tuple[str, EditMap]] | None = None,
    classes: Sequence[int] | None = None,
    max_shift: float = 0.25,
    scale_range: tuple[float, float] = (0.6, 1.5),
) -> tuple[EditMap, dict[str, Any]]:
    """Apply edit ``op`` with random parameters drawn from ``rng``; returns the map and its record.

    ``donor(rng)`` gives ``(key, map)`` of another map for ``copy_paste``. ``classes`` restricts the
    objects that are moved, scaled or pasted (None = any small connected component). An edit with no
    object to act on returns the map unchanged and says so in its record (``"skipped"``).
    """
    if op not in EDITS:
        raise ValueError(f"unknown layout edit {op!r}; valid: {', '.join(EDITS)}")
    if op == "hflip":
        return hflip(m), {"op": "hflip"}
    source_key = None
    if op == "copy_paste":
        if donor is None:
            raise ValueError("copy_paste needs a donor map")
        source_key, source = donor(rng)
    else:
        source = m
    objects = object_masks(source.seg, classes)
    if not objects:
        return m, {"op": op, "skipped": "no object to edit", **({"donor": source_key} if source_key else {})}
    cls, mask = objects[int(rng.integers(len(objects)))]
    ys, xs = np.nonzero(mask)
    box = [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1]
    h, w = m.seg.shape
    dy = int(rng.integers(-int(max_shift * h), int(max_shift * h) + 1))
    dx = int(rng.integers(-int(max_shift * w), int(max_shift * w) + 1))
    record: dict[str, Any] = {"op": op, "class": cls, "object_box": box}
    if op == "shift":
        return shift_object(m, mask, cls, dy, dx), {**record, "offset": [dy, dx]}
    if op == "scale":
        factor = float(rng.uniform(*scale_range))
        return scale_object(m, mask, cls, factor), {**record, "factor": round(factor, 4)}
    out = paste_object(m, source, mask, cls, dy, dx)
    return out, {**record, "donor": source_key, "offset": [dy, dx]}
