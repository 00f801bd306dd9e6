"""The paper's comparison conditions, as (C, H, W) float32 maps in [0, 1] (what a ControlNet takes).

- ``seg``: one-hot segmentation labels (ignored pixels are all zeros).
- ``seg_sparse``: one-hot labels with **class-wise random sparse masking**: for every class present a
  random share (between ``min_share`` and ``max_share``) of its pixels is hidden, in blobs of a random
  pattern, mimicking sparse user-drawn layouts.
- ``edges``: Canny edges of the image (1 channel).
- ``depth``: inverse depth normalised per image to [0, 1] (1 channel; invalid = 0).

Neural layouts (the LUMEN condition) come from :mod:`pipeline.layouts`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.data.sample import DatasetInfo, Sample

__all__ = [
    "CONDITIONS",
    "condition_channels",
    "depth_map",
    "edge_map",
    "guided_filter",
    "outline_sharpen",
    "seg_onehot",
    "sharpen",
    "sparse_mask",
]


def seg_onehot(seg: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(H, W) class ids -> (num_classes, H, W) float32 one-hot; ignored / out-of-range pixels all zero."""
    ids = seg.astype(np.int64)
    valid = (ids >= 0) & (ids < num_classes)
    if ignore_index is not None:
        valid &= ids != ignore_index
    out = np.zeros((num_classes, *seg.shape), np.float32)
    rows, cols = np.nonzero(valid)
    out[ids[rows, cols], rows, cols] = 1.0
    return out


def sparse_mask(
    seg: np.ndarray, rng: np.random.Generator, min_share: float = 0.3, max_share: float = 0.9, blob: int = 4
) -> np.ndarray:
    """(H, W) bool mask, True = keep. For every class, a random pattern hides a random share of its pixels.

    The pattern is coarse random noise (cells of ``blob`` pixels, bilinearly smoothed), thresholded per
    class at the quantile that hides the drawn share, so the hidden share is exact up to ties.
    """
    h, w = seg.shape
    keep = np.ones((h, w), bool)
    for cls in np.unique(seg):
        where = seg == cls
        n = int(where.sum())
        share = float(rng.uniform(min_share, max_share))
        hide = round(share * n)
        if hide == 0:
            continue
        coarse = rng.random((h // blob + 2, w // blob + 2))
        ys = np.linspace(0, coarse.shape[0] - 1.001, h)
        xs = np.linspace(0, coarse.shape[1] - 1.001, w)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        pattern = (
            coarse[y0][:, x0] * (1 - fy) * (1 - fx)
            + coarse[y0 + 1][:, x0] * fy * (1 - fx)
            + coarse[y0][:, x0 + 1] * (1 - fy) * fx
            + coarse[y0 + 1][:, x0 + 1] * fy * fx
        )
        pattern += rng.random((h, w)) * 1e-9  # break ties so the hidden share is exact
        values = pattern[where]
        order = np.argsort(values)
        hidden = np.zeros(n, bool)
        hidden[order[:hide]] = True
        idx = np.flatnonzero(where.ravel())
        keep.ravel()[idx[hidden]] = False
    return keep


def edge_map(image: np.ndarray, low: int = 60, high: int = 150) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, H, W) float32 Canny edges in {0, 1}."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return (cv2.Canny(gray, low, high) > 0).astype(np.float32)[None]


def box_blur(conds: np.ndarray, radius: int) -> np.ndarray:
    """(B, C, H, W) conditions under a (2 radius + 1)² box filter with replicated edges, per channel
    (radius < 1: unchanged). The blurred layout keeps where each region is and drops its boundaries."""
    import cv2

    c = np.ascontiguousarray(conds, dtype=np.float32)
    if radius < 1:
        return c
    k = 2 * radius + 1
    return np.stack(
        [np.stack([cv2.blur(ch, (k, k), borderType=cv2.BORDER_REPLICATE) for ch in item]) for item in c]
    )


def sharpen(conds: np.ndarray, amount: float, radius: int) -> np.ndarray:
    """Unsharp masking of (B, C, H, W) conditions: ``conds + amount * (conds - blur)``, ``blur`` a
    (2 radius + 1)² box filter with replicated edges, per channel. Neural layouts are bilinear upsamplings
    of coarse features, so the boundary between two touching objects is a ramp several pixels wide;
    sharpening steepens it (``generate.layout_sharpen``, docs/models.md). Flat regions are unchanged."""
    c = np.ascontiguousarray(conds, dtype=np.float32)
    if amount == 0 or radius < 1:
        return c
    return c + np.float32(amount) * (c - box_blur(c, radius))


def outline_sharpen(
    conds: np.ndarray, outlines: np.ndarray, amount: float, radius: int, width: int
) -> np.ndarray:
    """:func:`sharpen` only near given outlines: ``conds + amount * band * (conds - blur)``.

    The outlines come from the source's labels (``pipeline.synthesis.filter.label_outlines``: seg class
    changes and depth steps), so the layout's boundaries are steepened where the labels say two regions
    meet (e.g. two touching objects of one class, whose layout boundary is faint) and nowhere else.

    Args:
        conds: (B, C, H, W) conditions at the model size.
        outlines: (B, h, w) bool outlines at the labels' size; resized to (H, W) by nearest neighbour.
        amount: the unsharp-mask amount (0: unchanged).
        radius: the box blur's radius, px at the model size.
        width: the band's half width around the outlines, px at the model size (0: the outlines only).

    Returns:
        (B, C, H, W) float32.
    """
    c = np.ascontiguousarray(conds, dtype=np.float32)
    o = np.asarray(outlines, dtype=bool)
    if c.ndim != 4 or o.ndim != 3 or o.shape[0] != c.shape[0]:
        raise ValueError(
            f"outlines must be (B, h, w) for conditions (B, C, H, W); got {o.shape} and {c.shape}"
        )
    if amount == 0 or radius < 1:
        return c
    import cv2

    h, w = c.shape[-2:]
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    band = np.stack([
        cv2.dilate(cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST), kernel)
        for m in o
    ]).astype(np.float32)[:, None]  # fmt: skip
    return c + np.float32(amount) * band * (c - box_blur(c, radius))


def _box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2 radius + 1)² window of the last two axes, over the pixels inside the image (the
    window shrinks at the borders), by integral images; any leading axes."""
    h, w = x.shape[-2:]
    c = np.zeros((*x.shape[:-2], h + 1, w + 1), np.float64)
    c[..., 1:, 1:] = x.astype(np.float64).cumsum(-2).cumsum(-1)
    y0, y1 = np.clip(np.arange(h) - radius, 0, h), np.clip(np.arange(h) + radius + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - radius, 0, w), np.clip(np.arange(w) + radius + 1, 0, w)
    y0, y1 = y0[:, None], y1[:, None]
    total = c[..., y1, x1] - c[..., y0, x1] - c[..., y1, x0] + c[..., y0, x0]
    count = (y1 - y0) * (x1 - x0)[None, :]
    return total / count


def guided_filter(conds: np.ndarray, guides: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Edge-aware refinement of (B, C, H, W) conditions by their (B, H, W, 3) uint8 source images: the
    colour guided filter (He, Sun and Tang, "Guided Image Filtering", 2010). In each (2 radius + 1)² window
    every channel is fitted as an affine function of the image's RGB (``eps`` regularises the fit, for
    images in [0, 1]), and the averaged fits are applied pixel by pixel. A layout's ramp-like boundaries
    then follow the image's edges, without the overshoot of unsharp masking; flat regions keep their mean.
    """
    c = np.asarray(conds, dtype=np.float64)
    if c.ndim != 4 or guides.shape != (c.shape[0], *c.shape[2:], 3):
        raise ValueError(f"guides must be (B, H, W, 3) matching conditions {c.shape}, got {guides.shape}")
    if radius < 1:
        return c.astype(np.float32)
    out = np.empty_like(c)
    for n in range(len(c)):
        img = np.moveaxis(np.asarray(guides[n], dtype=np.float64) / 255.0, -1, 0)  # (3, H, W)
        mean_i = _box_mean(img, radius)
        # (3, 3, H, W) window covariance of the colours
        sigma = _box_mean(img[:, None] * img[None, :], radius) - mean_i[:, None] * mean_i[None, :]
        sigma = np.moveaxis(sigma, (0, 1), (-2, -1)) + eps * np.eye(3)  # (H, W, 3, 3)
        inv = np.linalg.inv(sigma)
        p = c[n]  # (C, H, W)
        mean_p = _box_mean(p, radius)
        cov = _box_mean(img[None] * p[:, None], radius) - mean_i[None] * mean_p[:, None]  # (C, 3, H, W)
        a = np.einsum("hwij,cjhw->cihw", inv, cov)  # (C, 3, H, W)
        b = mean_p - (a * mean_i[None]).sum(1)
        out[n] = (_box_mean(a, radius) * img[None]).sum(1) + _box_mean(b, radius)
    return out.astype(np.float32)


def sharpen_schedule(
    conds: np.ndarray, amount: float, radius: int, until: float = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(conditions, early_conditions)`` for ``LumenGenerator.generate``: with ``until`` >= 1 the sharpened
    conditions for every step (no early ones); below 1 the plain conditions, and the sharpened ones for
    the first ``until`` of the steps (``generate.layout_sharpen_until``); ``amount`` 0 leaves both plain."""
    if not amount:
        return np.asarray(conds, dtype=np.float32), None
    sharp = sharpen(conds, amount, radius)
    return (sharp, None) if until >= 1 else (np.asarray(conds, dtype=np.float32), sharp)


def depth_map(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> (1, H, W) float32 inverse depth scaled to [0, 1] per image; invalid (0) stays 0."""
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape, np.float32)
    if valid.any():
        inv = 1.0 / depth[valid]
        lo, hi = inv.min(), inv.max()
        out[valid] = 0.05 + 0.95 * (inv - lo) / max(hi - lo, 1e-9)
    return out[None]


def _seg(sample: Sample, info: DatasetInfo, rng: np.random.Generator, **_: float) -> np.ndarray:
    if sample.seg is None:
        raise ValueError(f"{sample.key}: the seg condition needs seg labels")
    return seg_onehot(sample.seg, info.num_classes, info.ignore_index)


def _seg_sparse(
    sample: Sample,
    info: DatasetInfo,
    rng: np.random.Generator,
    min_share: float = 0.3,
    max_share: float = 0.9,
) -> np.ndarray:
    onehot = _seg(sample, info, rng)
    seg = sample.seg if sample.seg is not None else np.zeros(sample.size, np.uint8)  # _seg raised if None
    return onehot * sparse_mask(seg, rng, min_share, max_share)[None]


def _edges(sample: Sample, info: DatasetInfo, rng: np.random.Generator, **_: float) -> np.ndarray:
    return edge_map(sample.image)


def _depth(sample: Sample, info: DatasetInfo, rng: np.random.Generator, **_: float) -> np.ndarray:
    if sample.depth is None:
        raise ValueError(f"{sample.key}: the depth condition needs depth labels")
    return depth_map(sample.depth)


CONDITIONS: dict[str, Callable[..., np.ndarray]] = {
    "seg": _seg,
    "seg_sparse": _seg_sparse,
    "edges": _edges,
    "depth": _depth,
}


def condition_channels(name: str, info: DatasetInfo, layout_components: int) -> int:
    """Number of channels of a condition (``layout`` uses the PCA's N; ``none`` has no ControlNet)."""
    if name == "layout":
        return layout_components
    if name in ("seg", "seg_sparse"):
        return info.num_classes
    if name in ("edges", "depth"):
        return 1
    if name == "none":
        return 0
    raise KeyError(f"unknown condition {name!r}; valid: layout, none, {', '.join(CONDITIONS)}")
