"""The outputs of ``evaluate_synthesis``: the ``table.json`` document, its Markdown table, the
diversity-fidelity figure, one sample grid per row, and the downstream gains read from perception
reports."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from pipeline.config import LumenConfig, config_hash
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.synthesis.inputs import EvalSettings
from pipeline.synthesis.judging import Judge
from pipeline.synthesis.scoring import REAL, EvalPaths, clean

__all__ = [
    "METRICS",
    "MetricSpec",
    "add_downstream",
    "plot_tradeoff",
    "read_downstream",
    "render_table",
    "save_grid",
    "table_doc",
    "write_outputs",
]


@dataclass(frozen=True)
class MetricSpec:
    label: str
    higher_is_better: bool | None  # None: neither (distance to the source)
    digits: int = 3


METRICS: dict[str, MetricSpec] = {
    "seg_miou": MetricSpec("seg mIoU", True),
    "seg_pixel_acc": MetricSpec("seg acc", True),
    "depth_abs_rel": MetricSpec("depth AbsRel", False),
    "depth_delta1": MetricSpec("depth δ<1.25", True),
    "normal_mean_angle": MetricSpec("normal mean°", False, 1),
    "normal_within_11_25": MetricSpec("normal <11.25°", True),
    "normal_within_22_5": MetricSpec("normal <22.5°", True),
    "normal_within_30": MetricSpec("normal <30°", True),
    "div_pixel_pairwise": MetricSpec("div pixel", True),
    "div_pixel_source": MetricSpec("pixel to src", None),
    "div_latent_pairwise": MetricSpec("div latent", True),
    "div_latent_source": MetricSpec("latent to src", None),
}
"""Metric key -> column label, direction and digits (keys of ``table.json`` rows)."""


# --------------------------------------------------------------------------------------------------
# Downstream gains
# --------------------------------------------------------------------------------------------------


def read_downstream(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Gains from a perception ``report.json``: ``{"task/setting": {"<metric>_gain", "<metric>_p"}}``
    for each task's main metric (seg mIoU, depth AbsRel, normal mean angle)."""
    main = {"seg": "miou", "depth": "abs_rel", "normal": "mean_angle"}
    report = json.loads(Path(path).read_text())
    out: dict[str, dict[str, float]] = {}
    for task, body in (report.get("tasks") or {}).items():
        metric = main.get(task)
        for setting, res in (body.get("settings") or {}).items():
            gain = (res.get("gain") or {}).get(metric)
            if metric is None or gain is None:
                continue
            p = ((res.get("significance") or {}).get(metric) or {}).get("p_value")
            out[f"{task}/{setting}"] = {
                f"{metric}_gain": float(gain),
                f"{metric}_p": math.nan if p is None else p,
            }
    return out


def add_downstream(rows: Sequence[dict[str, Any]], downstream: Mapping[str, str | os.PathLike[str]]) -> None:
    """Add the gains of each ``report.json`` to the row of that name (``downstream``: name -> path)."""
    for name, path in downstream.items():
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            raise ValueError(f"--downstream {name}=...: no row named {name!r}")
        row["downstream"] = read_downstream(path)


# --------------------------------------------------------------------------------------------------
# table.json, table.md
# --------------------------------------------------------------------------------------------------


def table_doc(cfg: LumenConfig, settings: EvalSettings, info: DatasetInfo, size: tuple[int, int],
              judges: Mapping[str, Judge], latent_base: str, rows: list[dict[str, Any]], seconds: float,
              device: torch.device) -> dict[str, Any]:  # fmt: skip
    """The ``table.json`` document (strict JSON: NaN -> None)."""
    doc = {
        "benchmark": "evaluate-synthesis",
        "dataset": info.card(),
        "config_hash": config_hash(cfg),
        "settings": {**asdict(settings), "seeds": list(settings.seeds), "steps": settings.generation_steps(cfg),
                     "guidance": settings.guidance_scale(cfg)},
        "generation_size": list(size),
        "judges": {t: {k: j.meta.get(k) for k in ("steps", "seed", "num_train", "model_sha256", "fit_metrics")}
                   for t, j in judges.items()},
        "judges_train_images": max((j.meta.get("num_train", 0) for j in judges.values()), default=0),
        "latent_space": {"base_model": latent_base, "distance": "rms of VAE posterior means x scaling_factor"},
        "metrics": {k: asdict(v) for k, v in METRICS.items()},
        "rows": rows,
        "seconds": seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {device}",
    }  # fmt: skip
    cleaned: dict[str, Any] = clean(doc)
    return cleaned


def write_outputs(paths: EvalPaths, doc: Mapping[str, Any]) -> None:
    """``table.json``, ``table.md`` and ``tradeoff.png`` of a ``table.json`` document."""
    atomic_write_json(paths.table_json, doc)
    atomic_write_text(paths.table_md, render_table(doc))
    plot_tradeoff(doc, paths.tradeoff)


def _fmt(stat: Mapping[str, Any] | None, digits: int) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    std = stat.get("std")
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and math.isfinite(v)


def render_table(doc: Mapping[str, Any]) -> str:
    """The Markdown table of a ``table.json`` document (metrics with any value, ± sample std over seeds)."""
    rows = doc["rows"]
    keys = [k for k in METRICS if any(_finite((r["metrics"].get(k) or {}).get("mean")) for r in rows)]
    down = sorted({d for r in rows for d in (r.get("downstream") or {})})
    arrows = {True: " ↑", False: " ↓", None: ""}
    head = ["condition", "N"] + [METRICS[k].label + arrows[METRICS[k].higher_is_better] for k in keys]
    head += [f"gain {d}" for d in down]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], "" if r.get("n") is None else str(r["n"])]
        cells += [_fmt(r["metrics"].get(k), METRICS[k].digits) for k in keys]
        for d in down:
            g = (r.get("downstream") or {}).get(d) or {}
            gain = next((v for name, v in g.items() if name.endswith("_gain")), None)
            p = next((v for name, v in g.items() if name.endswith("_p")), None)
            cells.append("–" if gain is None else f"{gain:+.3f}" + (f" (p={p:.2f})" if _finite(p) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    s = doc["settings"]
    lines.append("")
    lines.append(
        f"{doc['dataset']['name']}: {s['images']} val images x {s['variants']} variants, generation seeds "
        f"{list(s['seeds'])} (mean ± sample std over seeds), judges trained on {doc['judges_train_images']} real "
        f"images for {s['judge_steps']} steps. Diversity: pixel = mean |ΔRGB| in [0, 1]; latent = RMS "
        "distance of VAE posterior means (units of latent std)."
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _mean_std(row: Mapping[str, Any], key: str) -> tuple[float, float]:
    """A row's mean (NaN if missing) and std (0 if missing) of one metric."""
    st = row["metrics"].get(key) or {}
    m, s = st.get("mean"), st.get("std")
    return (float(m) if _finite(m) else math.nan), (float(s) if _finite(s) else 0.0)


def _colour(row: Mapping[str, Any]) -> str:
    if row.get("condition") == "layout":
        return "tab:blue"
    return "tab:grey" if row["condition"] == "none" else "tab:orange"


def plot_tradeoff(doc: Mapping[str, Any], path: str | os.PathLike[str],
                  x_key: str = "div_latent_pairwise", y_key: str = "seg_miou") -> Path | None:  # fmt: skip
    """Diversity (x) vs fidelity (y) per row, with seed std as error bars; layout rows joined in order of N.

    Returns None (and writes nothing) when no row has both metrics.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in doc["rows"] if r["name"] != REAL]
    points = [(r, *_mean_std(r, x_key), *_mean_std(r, y_key)) for r in rows]
    points = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[3])]
    if not points:
        return None
    fig = Figure(figsize=(6.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    layout = sorted(
        (p for p in points if p[0].get("condition") == "layout"), key=lambda p: p[0].get("n") or 0
    )
    if len(layout) > 1:
        ax.plot([p[1] for p in layout], [p[3] for p in layout], "-", color="tab:blue", alpha=0.6, zorder=1)
    for r, x, xs, y, ys in points:
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o", color=_colour(r), capsize=3, zorder=2)
        label = f"N={r['n']}" if r.get("condition") == "layout" and r.get("n") else r["name"]
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    real = next((r for r in doc["rows"] if r["name"] == REAL), None)
    if real is not None and math.isfinite(_mean_std(real, y_key)[0]):
        ax.axhline(_mean_std(real, y_key)[0], color="black", linestyle="--", linewidth=1, label="real images")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"diversity: {METRICS[x_key].label} (pairwise, higher = more diverse)")
    ax.set_ylabel(f"fidelity: {METRICS[y_key].label} vs source labels")
    ax.set_title("diversity–fidelity trade-off", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def save_grid(path: Path, sources: Sequence[Sample], images: np.ndarray, conditions: np.ndarray | None,
              k: int, count: int) -> None:  # fmt: skip
    """The first ``count`` sources, one row each: source | condition preview | its K variants."""
    from pipeline.lumen.generate import condition_preview, resize_images
    from pipeline.viz import image_grid, save_png

    rows = []
    for i, s in enumerate(sources[:count]):
        preview = condition_preview(conditions[i]) if conditions is not None else np.zeros_like(s.image)
        if preview.shape != s.image.shape:  # a supersampled model's condition
            preview = resize_images(preview[None], s.image.shape[:2])[0]
        rows.append([s.image, preview, *images[i * k : (i + 1) * k]])
    save_png(path, image_grid(rows))
