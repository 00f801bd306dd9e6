"""Report figures: the gains bar chart with error bars, and a gallery of sources with their variants.

Matplotlib is used through ``matplotlib.figure.Figure`` (no pyplot, no global backend state), and every
file is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.data.sample import Sample
from pipeline.io import atomic_write_bytes
from pipeline.report.gains import ARMS, METRICS
from pipeline.viz import colorize_depth, colorize_normal, colorize_seg, image_grid, save_png

__all__ = ["plot_gains", "plot_gallery"]

_COLORS = {"real": "#7f8c9a", "real+synthetic": "#2a7ab9"}


def _panels(tasks: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) pairs in report order."""
    panels: list[tuple[str, str]] = []
    for task, body in tasks.items():
        for entry in body["settings"].values():
            for metric in entry.get(ARMS[0], entry.get(ARMS[1], {})):
                if (task, metric) not in panels:
                    panels.append((task, metric))
    return panels


def plot_gains(tasks: Mapping[str, Any], path: str | os.PathLike[str], ncols: int = 5) -> Path:
    """Bar chart: one panel per task and metric, settings along x, one bar per arm.

    Bars show the mean over seeds, error bars one standard deviation, dots the individual seeds; the
    paired-test p-value is written above each setting (``*`` when significant).

    Args:
        tasks: the ``tasks`` mapping of ``report.json``.
        path: the PNG to write.
        ncols: panels per row.
    """
    panels = _panels(tasks)
    if not panels:
        raise ValueError("no metrics to plot: the report has no task with results")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.9 * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for k, (task, metric) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        settings = tasks[task]["settings"]
        info = METRICS.get(metric)
        for j, arm in enumerate(ARMS):
            for i, entry in enumerate(settings.values()):
                s = entry.get(arm, {}).get(metric)
                if s is None or s["mean"] is None:
                    continue
                x = i + (j - 0.5) * 0.38
                ax.bar(
                    x,
                    s["mean"],
                    0.36,
                    yerr=s["std"],
                    capsize=3,
                    color=_COLORS[arm],
                    label=arm if i == 0 else None,
                )
                ax.plot([x] * len(s["values"]), s["values"], "k.", markersize=3)
        for i, entry in enumerate(settings.values()):
            sig = entry.get("significance", {}).get(metric)
            if sig and sig.get("p_value") is not None:
                star = "*" if sig["significant"] else ""
                p = sig["p_value"]
                ax.annotate(
                    f"p{'<0.001' if p < 0.001 else f'={p:.2g}'}{star}",
                    (i, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        arrow = "" if info is None else (" ↑" if info.higher_is_better else " ↓")
        ax.set_title(f"{task}: {info.label if info else metric}{arrow}", fontsize=9, pad=12)
        ax.set_xticks(range(len(settings)), list(settings), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="lower left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _label_tiles(
    sample: Sample, names: Sequence[str], num_classes: int | None, ignore_index: int | None, blank: np.ndarray
) -> list[np.ndarray]:
    tiles = []
    for name in names:
        if name == "seg" and sample.seg is not None:
            n = num_classes or int(sample.seg.max()) + 1
            tiles.append(colorize_seg(sample.seg, n, ignore_index))
        elif name == "depth" and sample.depth is not None:
            tiles.append(colorize_depth(sample.depth))
        elif name == "normal" and sample.normal is not None:
            tiles.append(colorize_normal(sample.normal))
        else:
            tiles.append(blank)
    return tiles


def plot_gallery(
    rows: Sequence[tuple[Sample, Sequence[Sample]]],
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    min_tile: int = 96,
) -> Path:
    """A PNG grid: per row a source image, its labels (seg, depth, normals: those it has) and its
    synthetic variants (which reuse those labels).

    Args:
        rows: ``(source, variants)`` pairs.
        path: the PNG to write.
        num_classes, ignore_index: for the seg palette (None: from the labels).
        min_tile: tiles are enlarged (nearest neighbour, integer factor) to at least this width.
    """
    if not rows:
        raise ValueError("plot_gallery needs at least one (source, variants) row")
    label_names = [n for n in ("seg", "depth", "normal") if any(getattr(s, n) is not None for s, _ in rows)]
    num_variants = max(len(v) for _, v in rows)
    h, w = rows[0][0].size
    factor = max(1, math.ceil(min_tile / w))
    blank = np.full((h, w, 3), 255, np.uint8)
    grid_rows = []
    for source, variants in rows:
        tiles = [source.image, *_label_tiles(source, label_names, num_classes, ignore_index, blank)]
        tiles += [v.image for v in variants] + [blank] * (num_variants - len(variants))
        grid_rows.append([np.repeat(np.repeat(t, factor, 0), factor, 1) for t in tiles])
    headers = ["source", *label_names, *[f"variant {i + 1}" for i in range(num_variants)]]
    save_png(path, image_grid(grid_rows, headers=headers))
    return Path(path)
