"""Colour previews of neural layouts: the first three components as RGB (proxy masks: each cluster in its
own colour), next to the input image and its seg labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.viz import colorize_seg, image_grid, save_png

__all__ = ["layout_to_rgb", "preview_grid", "proxy_to_rgb", "save_preview"]


def layout_to_rgb(layouts: np.ndarray, stretch: bool = True) -> np.ndarray:
    """The first three components of layouts as colour images.

    Args:
        layouts: (B, N, H, W) or (N, H, W) floats in [0, 1]. N = 1 gives grey, N = 2 puts 0.5 in blue.
        stretch: map each of the three channels from its 1st-99th percentile over the whole batch to
            [0, 1] (one mapping for all images, so they stay comparable); False shows the raw values.

    Returns:
        (B, H, W, 3) or (H, W, 3) uint8.
    """
    single = layouts.ndim == 3
    x = np.asarray(layouts, dtype=np.float32)[None] if single else np.asarray(layouts, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] < 1:
        raise ValueError(f"layouts must be (B, N, H, W) or (N, H, W), got {layouts.shape}")
    n = x.shape[1]
    if n == 1:
        rgb = np.repeat(x[:, :1], 3, axis=1)
    elif n == 2:
        rgb = np.concatenate([x[:, :2], np.full_like(x[:, :1], 0.5)], axis=1)
    else:
        rgb = x[:, :3]
    if stretch:
        lo = np.percentile(rgb, 1, axis=(0, 2, 3), keepdims=True)
        hi = np.percentile(rgb, 99, axis=(0, 2, 3), keepdims=True)
        rgb = (rgb - lo) / np.maximum(hi - lo, 1e-6)
    out = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    return out[0] if single else out


def proxy_to_rgb(masks: np.ndarray) -> np.ndarray:
    """(B, K, H, W) or (K, H, W) proxy masks (one-hot or soft) -> uint8 colour images of the argmax
    cluster, one palette colour per cluster."""
    x = np.asarray(masks, dtype=np.float32)
    if x.ndim not in (3, 4) or x.shape[-3] < 1:
        raise ValueError(f"proxy masks must be (B, K, H, W) or (K, H, W), got {x.shape}")
    ids = x.argmax(axis=-3)
    k = x.shape[-3]
    if ids.ndim == 2:
        return colorize_seg(ids, k)
    return np.stack([colorize_seg(i, k) for i in ids])


def _upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return tile
    h, w = tile.shape[:2]
    return np.asarray(Image.fromarray(tile).resize((w * factor, h * factor), Image.Resampling.NEAREST))


def preview_grid(
    images: Sequence[np.ndarray],
    layouts: Sequence[np.ndarray],
    segs: Sequence[np.ndarray | None] | None = None,
    num_classes: int = 0,
    min_tile: int = 128,
    proxy: bool = False,
) -> np.ndarray:
    """A grid with one row per image: input | layout (first 3 components) [| seg, when given].

    With ``proxy`` the layouts are k-means proxy masks, shown as the colour of each pixel's cluster.

    Args:
        images: (H, W, 3) uint8 inputs.
        layouts: (N, H', W') float layouts in [0, 1] (resized to the image size for display).
        segs: optional (H, W) class-id maps, shown with the project's palette as a reference.
        num_classes: number of seg classes (for the palette).
        min_tile: tiles are enlarged by an integer factor (nearest neighbour) to at least this height.

    Returns:
        (H_grid, W_grid, 3) uint8.
    """
    if len(images) != len(layouts) or not images:
        raise ValueError(
            f"need as many layouts as images (and at least one), got {len(images)} and {len(layouts)}"
        )
    h, w = images[0].shape[:2]
    factor = max(1, -(-min_tile // h))
    stacked = np.stack([np.asarray(x, dtype=np.float32) for x in layouts])
    colour = proxy_to_rgb(stacked) if proxy else layout_to_rgb(stacked)
    show_seg = segs is not None and any(s is not None for s in segs)
    rows = []
    for i, image in enumerate(images):
        resample = Image.Resampling.NEAREST if proxy else Image.Resampling.BILINEAR
        tiles = [image, np.asarray(Image.fromarray(colour[i]).resize((w, h), resample))]
        if show_seg and segs is not None:
            seg = segs[i]
            tiles.append(
                colorize_seg(seg, max(num_classes, int(seg.max()) + 1))
                if seg is not None
                else np.zeros_like(image)
            )
        rows.append([_upscale(t, factor) for t in tiles])
    n = layouts[0].shape[0]
    title = f"proxy mask (K={n})" if proxy else f"layout PC1-{min(n, 3)} of {n}"
    headers = ["input", title] + (["seg"] if show_seg else [])
    return image_grid(rows, headers=headers)


def save_preview(
    path: str | os.PathLike[str],
    images: Sequence[np.ndarray],
    layouts: Sequence[np.ndarray],
    segs: Sequence[np.ndarray | None] | None = None,
    num_classes: int = 0,
    min_tile: int = 128,
    proxy: bool = False,
) -> Path:
    """Write :func:`preview_grid` as a PNG, atomically; returns the path."""
    save_png(path, preview_grid(images, layouts, segs, num_classes, min_tile, proxy=proxy))
    return Path(path)
