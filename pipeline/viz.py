"""Turning samples and labels into pictures: seg palettes, depth and normal colour maps, PNG grids."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from pipeline.io import atomic_open

__all__ = ["colorize_depth", "colorize_normal", "colorize_seg", "image_grid", "save_png", "seg_palette"]


def seg_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: distinct, deterministic (tab20 then golden-angle hues)."""
    tab = (np.asarray(colormaps["tab20"](np.arange(20)))[:, :3] * 255).astype(np.uint8)
    if num_classes <= len(tab):
        return tab[:num_classes].copy()
    hues = (np.arange(num_classes - len(tab)) * 0.618033988749895) % 1.0
    extra = (np.asarray(colormaps["hsv"](hues))[:, :3] * 255).astype(np.uint8)
    return np.concatenate([tab, extra])


def colorize_seg(seg: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ignored and out-of-range ids are black."""
    pal = np.concatenate([seg_palette(num_classes), np.zeros((1, 3), np.uint8)])
    ids = seg.astype(np.int64)
    ids = np.where((ids < 0) | (ids >= num_classes), num_classes, ids)
    if ignore_index is not None:
        ids = np.where(seg == ignore_index, num_classes, ids)
    return pal[ids]


def colorize_depth(depth: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 with the turbo map on inverse depth (near = warm); invalid (0) black."""
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros((*depth.shape, 3), np.uint8)
    if not valid.any():
        return out
    inv = np.zeros_like(depth, dtype=np.float64)
    inv[valid] = 1.0 / depth[valid]
    lo = 1.0 / (vmax if vmax else depth[valid].max())
    hi = inv[valid].max()
    t = np.clip((inv - lo) / max(hi - lo, 1e-9), 0, 1)
    out[valid] = (colormaps["turbo"](t[valid])[:, :3] * 255).astype(np.uint8)
    return out


def colorize_normal(normal: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit normals -> (H, W, 3) uint8 as (n + 1) / 2; invalid (zero) normals black."""
    valid = np.linalg.norm(normal, axis=-1) > 0
    rgb = ((normal + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    headers: Sequence[str] | None = None,
    pad: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 tiles into a grid, with an optional header line per column."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one row with one tile")
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    top = 14 if headers else 0
    grid = np.full((top + len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                tile = np.asarray(Image.fromarray(tile).resize((w, h), Image.Resampling.NEAREST))
            y, x = top + pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = tile if tile.ndim == 3 else tile[..., None]
    if headers:
        img = Image.fromarray(grid)
        draw = ImageDraw.Draw(img)
        for j, text in enumerate(headers[:ncol]):
            draw.text((pad + j * (w + pad) + 2, 1), text, fill=(0, 0, 0))
        grid = np.asarray(img)
    return grid


def save_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save an (H, W, 3) or (H, W) uint8 array as PNG, atomically."""
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
