"""Report figures: each arm's gain with its confidence interval, learning curves, and a gallery of
sources with their variants.

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
from pipeline.report.gains import ARMS, CLASS_IOU_PREFIX, METRICS, REFERENCE
from pipeline.viz import colorize_depth, colorize_normal, colorize_seg, image_grid, save_png

__all__ = ["plot_curves", "plot_gains", "plot_gallery"]

_COLORS = {
    "real": "#7f8c9a",
    "real+augment": "#e39b2d",
    "real+oracle": "#3a9d5d",
    "real+synthetic": "#2a7ab9",
}


def _panels(tasks: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) pairs in report order (the per-class IoUs are in the tables, not the figure)."""
    panels: list[tuple[str, str]] = []
    for task, body in tasks.items():
        for entry in body["settings"].values():
            for metric in entry.get(REFERENCE, {}):
                if (task, metric) not in panels and not metric.startswith(CLASS_IOU_PREFIX):
                    panels.append((task, metric))
    return panels


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_gains(tasks: Mapping[str, Any], path: str | os.PathLike[str], ncols: int = 5) -> Path:
    """Gain over ``real`` per arm: one panel per task and metric, settings along x, one bar per arm.

    Bars show the mean paired gain over seeds (in the metric's units, so down is good for errors),
    error bars its confidence interval, dots the per-seed differences; ``*`` marks p < alpha.

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
    arms = [
        a
        for a in ARMS
        if a != REFERENCE and any(a in e for b in tasks.values() for e in b["settings"].values())
    ]
    width = 0.8 / max(1, len(arms))
    for k, (task, metric) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        settings = tasks[task]["settings"]
        info = METRICS.get(metric)
        for j, arm in enumerate(arms):
            for i, entry in enumerate(settings.values()):
                sig = entry.get("significance", {}).get(arm, {}).get(metric)
                gain = entry.get("gain", {}).get(arm, {}).get(metric)
                if sig is None or gain is None:
                    continue
                x = i + (j - (len(arms) - 1) / 2) * width
                ci = sig.get("ci")
                yerr = None if not ci else [[gain - ci[0]], [ci[1] - gain]]
                ax.bar(x, gain, width * 0.9, yerr=yerr, capsize=2, color=_COLORS.get(arm, "#555555"),
                       label=arm if i == 0 else None)  # fmt: skip
                diffs = _diffs(entry, arm, metric)
                ax.plot([x] * len(diffs), diffs, "k.", markersize=2)
                if sig.get("significant"):
                    ax.annotate("*", (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom")
        ax.axhline(0.0, color="black", linewidth=0.6)
        arrow = "" if info is None else (" ↑" if info.higher_is_better else " ↓")
        ax.set_title(f"{task}: gain in {info.label if info else metric}{arrow}", fontsize=9, pad=12)
        ax.set_xticks(range(len(settings)), list(settings), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if k == 0:
            ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def _diffs(entry: Mapping[str, Any], arm: str, metric: str) -> list[float]:
    """Per-seed differences arm - real (seeds in the order both summaries list them)."""
    a, b = entry.get(REFERENCE, {}).get(metric), entry.get(arm, {}).get(metric)
    if not a or not b or len(a["values"]) != len(b["values"]):
        return []
    return [y - x for x, y in zip(a["values"], b["values"], strict=True)]


_CURVE_METRICS = {"seg": "miou", "depth": "abs_rel", "normal": "mean_angle"}


def plot_curves(
    runs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], arm: str = REFERENCE
) -> Path:
    """Validation learning curves of ``arm``: one panel per task (mIoU, AbsRel, mean angle) and setting,
    one line per seed, from the runs' ``curve`` (``perception.val_every``).

    Raises:
        ValueError: no run of ``arm`` has a curve.
    """
    curves = [r for r in runs if r.get("arm") == arm and r.get("curve")]
    if not curves:
        raise ValueError(f"no {arm} run has a learning curve: set perception.val_every")
    settings = list(dict.fromkeys(str(r["setting"]) for r in curves))
    tasks = [t for t in _CURVE_METRICS if any(t in p for r in curves for p in r["curve"])]
    fig = Figure(figsize=(3.4 * len(tasks), 2.6 * len(settings)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for i, setting in enumerate(settings):
        for j, task in enumerate(tasks):
            ax = fig.add_subplot(len(settings), len(tasks), i * len(tasks) + j + 1)
            metric = _CURVE_METRICS[task]
            for r in (r for r in curves if r["setting"] == setting):
                pts = [(p["step"], p[task][metric]) for p in r["curve"] if task in p]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"seed {r['seed']}",
                        color=f"C{int(r['seed']) % 10}")  # fmt: skip
            info = METRICS[metric]
            ax.set_title(f"{setting}: {task} {info.label} (val)", fontsize=9)
            ax.set_xlabel("optimizer step", fontsize=7)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    return _save(fig, path)


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
