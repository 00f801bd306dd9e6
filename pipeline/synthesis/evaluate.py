"""Compare trained ControlNets (conditions, N, backbones) by the alignment and diversity of their variants.

``evaluate_synthesis`` (behind ``lumen evaluate-synthesis``):

1. opens every run folder (``config.yaml``, ``lumen/lumen.json``, the base model its ControlNet was
   trained on, its PCA for layouts); ``none`` is the base model alone;
2. loads M held-out validation images and trains (or reloads) one *judge* per label the dataset has
   (seg; for toy scenes also depth and normals) on real training images (:mod:`.judges`);
3. scores the real validation images with the judges: the ceiling row;
4. for every run and generation seed, makes K variants of each validation image exactly as ``expand``
   does (same condition maker, prompts, per-variant seeds) and scores them: seg / depth / normal
   agreement with the source labels and pixel / VAE-latent diversity (:mod:`.metrics`);
5. aggregates over seeds (mean ± sample std), adds downstream gains read from ``report.json`` files,
   and writes ``table.json``, ``table.md``, ``tradeoff.png`` and one sample grid per run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from pipeline.config import LumenConfig, config_dict, config_hash, load_config
from pipeline.data import build_dataset, resize_sample
from pipeline.data.memory import InMemoryDataset
from pipeline.data.sample import DatasetInfo, Sample, SampleError
from pipeline.device import resolve_device
from pipeline.io import atomic_write_json, atomic_write_text, sha256_file
from pipeline.lumen.base import BaseComponents, load_base
from pipeline.runs import RunPaths
from pipeline.synthesis.judges import Judge, fit_judge
from pipeline.synthesis.metrics import (
    LatentEncoder,
    depth_agreement,
    diversity,
    l1_distance,
    normal_agreement,
    rms_distance,
    seg_alignment,
)

__all__ = [
    "METRICS",
    "EvalSettings",
    "RunSpec",
    "evaluate_synthesis",
    "parse_run",
    "plot_tradeoff",
    "read_downstream",
    "render_table",
]

log = logging.getLogger(__name__)

REAL = "real (ceiling)"


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


@dataclass(frozen=True)
class RunSpec:
    """A row of the comparison: a name and a run folder with ``lumen/`` (None: the base model alone)."""

    name: str
    run_dir: Path | None


def parse_run(text: str) -> RunSpec:
    """``NAME=RUN_DIR`` -> RunSpec; ``none`` (or ``NAME=none``) -> the base model alone."""
    if "=" not in text:
        if text == "none":
            return RunSpec("none", None)
        raise ValueError(f"--run {text!r}: use NAME=RUN_DIR (e.g. layout-N8=runs/tiny-lumen) or 'none'")
    name, path = text.split("=", 1)
    if not name:
        raise ValueError(f"--run {text!r}: the name before '=' is empty")
    return RunSpec(name, None if path in ("", "none") else Path(path))


@dataclass
class EvalSettings:
    """How many images, variants and seeds; generation and judge settings.

    Attributes:
        images: M held-out validation images.
        variants: K variants per image.
        seeds: generation seeds (the run seed of :func:`~pipeline.lumen.generate.variant_seed`).
        steps, guidance: denoising steps and guidance scale (None: the config's ``generate``).
        batch_size: images per generation call.
        train_images: real training images the judges learn from.
        judge_steps: optimizer steps of each judge.
        judge_seed: the judges' seed.
        device: ``auto``, ``cpu``, ``cuda``...
        grid_images: sources shown in each run's sample grid.
    """

    images: int = 32
    variants: int = 4
    seeds: Sequence[int] = (0,)
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 16
    train_images: int = 512
    judge_steps: int = 400
    judge_seed: int = 0
    device: str = "auto"
    grid_images: int = 6


@dataclass
class _Run:
    spec: RunSpec
    condition: str
    n: int | None
    base: BaseComponents
    base_id: str
    controlnet: Any | None = None
    make: Callable[[Sequence[Sample]], np.ndarray] | None = None
    card: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""


# --------------------------------------------------------------------------------------------------
# 1. Runs, data, judges
# --------------------------------------------------------------------------------------------------


class _Bases:
    """Base models by identity, each loaded once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loaded: dict[str, BaseComponents] = {}

    def add(self, base_id: str, components: BaseComponents) -> None:
        self._loaded[base_id] = components

    def get(self, base_id: str, run_dir: Path | None = None, fallback: Path | None = None) -> BaseComponents:
        """The base model behind an identity from a ``lumen.json`` (a run's own ``base/`` needs
        ``run_dir``); ``fallback`` is used when it is not on this machine."""
        from pipeline.lumen.base import BaseModelNotFoundError
        from pipeline.lumen.stages import base_folder

        if base_id not in self._loaded:
            try:
                source: Path | str = base_folder(base_id, run_dir)
            except ValueError:
                source = base_id
            try:
                components = load_base(source)
            except BaseModelNotFoundError:
                if fallback is None:
                    raise
                log.warning("base model %s not found, using %s", base_id, fallback)
                components = load_base(fallback)
            self._loaded[base_id] = components.to(self.device)
        return self._loaded[base_id]


def _open_run(spec: RunSpec, cfg: LumenConfig, bases: _Bases, default: tuple[BaseComponents, str],
              val: InMemoryDataset, base_dir: Path | None) -> _Run:  # fmt: skip
    """Load a run's ControlNet, its base model and its condition maker."""
    from diffusers import ControlNetModel

    from pipeline.lumen.stages import condition_maker, lumen_folder

    if spec.run_dir is None:
        return _Run(spec, "none", None, *default)
    run_dir = spec.run_dir
    run_cfg = load_config(RunPaths(run_dir).config)
    if (run_cfg.data.adapter, run_cfg.data.image_size) != (cfg.data.adapter, cfg.data.image_size):
        raise ValueError(
            f"{run_dir} was trained on {run_cfg.data.adapter} at {run_cfg.data.image_size}, the evaluation "
            f"uses {cfg.data.adapter} at {cfg.data.image_size}: compare runs on the same data"
        )
    lumen_dir = lumen_folder(run_cfg, run_dir)
    card = json.loads((lumen_dir / "lumen.json").read_text())
    base_id = str(card.get("base_model") or default[1])
    base = bases.get(base_id, run_dir, fallback=base_dir)
    # 'layout' needs the PCA it was trained with; nothing is written into the run folder.
    pca = next((p for p in (RunPaths(run_dir).pca, lumen_dir / "pca.safetensors") if p.is_file()), None)
    if run_cfg.lumen.condition == "layout" and pca is None:
        raise FileNotFoundError(f"{run_dir} has no pca.safetensors: the layouts cannot be reproduced")
    no_cache = run_cfg.model_copy(update={"layouts": run_cfg.layouts.model_copy(update={"cache": False})})
    make, _ = condition_maker(no_cache, base, base_id, val, run_dir, pca_path=pca)
    controlnet = ControlNetModel.from_pretrained(lumen_dir).to(bases.device).eval()
    n = run_cfg.layouts.num_components if run_cfg.lumen.condition == "layout" else None
    weights = sha256_file(lumen_dir / "diffusion_pytorch_model.safetensors")
    return _Run(spec, run_cfg.lumen.condition, n, base, base_id, controlnet, make, card, weights)


def _load_split(cfg: LumenConfig, split: str, count: int, size: tuple[int, int]) -> list[Sample]:
    """The first ``count`` valid samples of a split, resized to ``size``."""
    source = build_dataset(cfg.data, split)
    out: list[Sample] = []
    for key in source.keys():
        if len(out) == count:
            break
        try:
            out.append(resize_sample(source.load(key), size))
        except SampleError as err:
            log.warning("skipping %s: %s", key, err)
    if not out:
        raise RuntimeError(f"no valid {split} images in {source.info.name}")
    return out


def _fit_judges(cfg: LumenConfig, info: DatasetInfo, size: tuple[int, int], settings: EvalSettings,
                folder: Path, device: torch.device) -> dict[str, Judge]:  # fmt: skip
    tasks = [
        t for t in ("seg", "depth", "normal") if t in info.labels and (t != "seg" or info.num_classes > 1)
    ]
    if not tasks:
        return {}
    train = _load_split(cfg, "train", settings.train_images, size)
    return {
        t: fit_judge(t, train, info, folder / t, config=cfg.perception, steps=settings.judge_steps,
                     seed=settings.judge_seed, device=device)
        for t in tasks
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# 2. Scoring
# --------------------------------------------------------------------------------------------------


def _score(images: np.ndarray, sources: Sequence[Sample], k: int, judges: Mapping[str, Judge],
           encoder: LatentEncoder, info: DatasetInfo) -> dict[str, float]:  # fmt: skip
    """Alignment and diversity of ``images`` = K consecutive variants of each source (source-major)."""
    out: dict[str, float] = {}

    def repeat(name: str) -> np.ndarray:
        return np.repeat(np.stack([getattr(s, name) for s in sources]), k, axis=0)

    if "seg" in judges:
        seg = seg_alignment(judges["seg"].predict(images), repeat("seg"), info.num_classes, info.ignore_index)
        out |= {"seg_miou": seg.miou, "seg_pixel_acc": seg.pixel_acc}
    if "depth" in judges:
        d = depth_agreement(judges["depth"].predict(images), repeat("depth"))
        out |= {"depth_abs_rel": d["abs_rel"], "depth_delta1": d["delta1"]}
    if "normal" in judges:
        n = normal_agreement(judges["normal"].predict(images), repeat("normal"))
        out |= {f"normal_{m}": n[m] for m in ("mean_angle", "within_11_25", "within_22_5", "within_30")}
    latents = encoder.encode(images)
    sources_latents = encoder.encode(np.stack([s.image for s in sources]))
    pix, lat = [], []
    for i, s in enumerate(sources):
        group = slice(i * k, (i + 1) * k)
        pix.append(diversity(images[group], s.image, l1_distance))
        lat.append(diversity(latents[group], sources_latents[i], rms_distance))
    for name, values in (("pixel", pix), ("latent", lat)):
        out[f"div_{name}_pairwise"] = float(np.mean([v["pairwise"] for v in values])) if k > 1 else math.nan
        out[f"div_{name}_source"] = float(np.mean([v["to_source"] for v in values]))
    return out


def _score_key(run: _Run, seed: int, settings: EvalSettings, cfg: LumenConfig, judges: Mapping[str, Judge],
               latent_base: str, val: Sequence[Sample]) -> str:  # fmt: skip
    """sha256 of everything a (run, seed) score depends on."""
    g = config_dict(cfg.generate)
    doc = {
        "version": 1, "condition": run.condition, "controlnet": run.weights_sha256, "base": run.base_id,
        "seed": seed, "keys": [s.key for s in val], "size": list(val[0].image.shape), "variants": settings.variants,
        "steps": settings.steps or cfg.generate.steps,
        "guidance": cfg.generate.guidance_scale if settings.guidance is None else settings.guidance,
        "generate": {k: g[k] for k in ("scheduler", "prompt_template", "variation_prompts")},
        "judges": {t: j.meta.get("key") for t, j in judges.items()}, "latent_base": latent_base,
        "data": config_dict(cfg.data),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _generate(run: _Run, sources: Sequence[Sample], cfg: LumenConfig, settings: EvalSettings, seed: int,
              device: torch.device, conditions: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """K variants of each source, source-major, with expand's prompts and per-variant seeds."""
    from pipeline.lumen.generate import LumenGenerator, plan_variants

    g = cfg.generate
    specs = plan_variants(
        [s.key for s in sources], [s.caption for s in sources], settings.variants, seed,
        g.prompt_template, g.variation_prompts,
    )  # fmt: skip
    gen = LumenGenerator(run.base, run.controlnet, scheduler=g.scheduler, device=device)
    conds = None if conditions is None else np.repeat(conditions.astype(np.float32), settings.variants, 0)
    return gen.generate(
        conds, [s.prompt for s in specs], [s.seed for s in specs], steps=settings.steps or g.steps,
        guidance_scale=g.guidance_scale if settings.guidance is None else settings.guidance,
        batch_size=settings.batch_size, size=sources[0].image.shape[:2],
    )  # fmt: skip


def _save_grid(path: Path, sources: Sequence[Sample], images: np.ndarray, conditions: np.ndarray | None,
               k: int, count: int) -> None:  # fmt: skip
    from pipeline.lumen.generate import condition_preview
    from pipeline.viz import image_grid, save_png

    rows = []
    for i, s in enumerate(sources[:count]):
        preview = condition_preview(conditions[i]) if conditions is not None else np.zeros_like(s.image)
        rows.append([s.image, preview, *images[i * k : (i + 1) * k]])
    save_png(path, image_grid(rows))


# --------------------------------------------------------------------------------------------------
# 3. Aggregation and output
# --------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    finite = [float(v) for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(finite), "values": [float(v) for v in values]}


def _clean(obj: Any) -> Any:
    """NaN and inf -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _unclean(scores: Mapping[str, Any]) -> dict[str, float]:
    """None -> NaN (the inverse of :func:`_clean` for a flat dict of scores)."""
    return {k: math.nan if v is None else float(v) for k, v in scores.items()}


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


def _fmt(stat: Mapping[str, Any] | None, digits: int) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    std = stat.get("std")
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


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


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_tradeoff(doc: Mapping[str, Any], path: str | os.PathLike[str],
                  x_key: str = "div_latent_pairwise", y_key: str = "seg_miou") -> Path | None:  # fmt: skip
    """Diversity (x) vs fidelity (y) per row, with seed std as error bars; layout rows joined in order of N.

    Returns None (and writes nothing) when no row has both metrics.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def get(r: Mapping[str, Any], key: str) -> tuple[float, float]:
        st = r["metrics"].get(key) or {}
        m, s = st.get("mean"), st.get("std")
        return (float(m) if _finite(m) else math.nan), (float(s) if _finite(s) else 0.0)

    rows = [r for r in doc["rows"] if r["name"] != REAL]
    points = [(r, *get(r, x_key), *get(r, y_key)) for r in rows]
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
        colour = (
            "tab:blue"
            if r.get("condition") == "layout"
            else "tab:grey"
            if r["condition"] == "none"
            else "tab:orange"
        )
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt="o", color=colour, capsize=3, zorder=2)
        label = f"N={r['n']}" if r.get("condition") == "layout" and r.get("n") else r["name"]
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    real = next((r for r in doc["rows"] if r["name"] == REAL), None)
    if real is not None and math.isfinite(get(real, y_key)[0]):
        ax.axhline(get(real, y_key)[0], color="black", linestyle="--", linewidth=1, label="real images")
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


# --------------------------------------------------------------------------------------------------
# 4. The whole evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_synthesis(
    runs: Sequence[RunSpec],
    out_dir: str | os.PathLike[str],
    settings: EvalSettings | None = None,
    *,
    config: LumenConfig | None = None,
    base: str | os.PathLike[str] | None = None,
    downstream: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Score every run's variants and write ``table.json``, ``table.md``, ``tradeoff.png``, ``grid_<name>.png``.

    Args:
        runs: the rows to compare (run folders, and/or ``RunSpec("none", None)`` for the base model).
        out_dir: output folder (judges are cached in ``out_dir/judges``).
        settings: images, variants, seeds, generation and judge settings.
        config: data, generation and perception settings (default: the first run's ``config.yaml``).
        base: base model folder for ``none`` and the latent space (default: the first run's base).
        downstream: row name -> perception ``report.json`` whose gains are added to the row.

    Returns:
        The ``table.json`` document.
    """
    from pipeline.lumen.stages import generation_size, load_run_base

    # 1. Settings, base model, data.
    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not runs:
        raise ValueError("nothing to evaluate: give at least one --run")
    first = next((r.run_dir for r in runs if r.run_dir is not None), None)
    if config is None:
        if first is None:
            raise ValueError("with only 'none' rows, pass the config (--config) naming the data")
        config = load_config(RunPaths(first).config)
    cfg = config
    device = resolve_device(settings.device)
    bases = _Bases(device)
    base_dir = Path(base) if base is not None else None
    if base_dir is not None:
        default = (load_base(base_dir).to(device), str(base_dir))
    elif first is not None:
        components, base_id = load_run_base(cfg, first)
        default = (components.to(device), base_id)
    else:
        raise ValueError("with only 'none' rows, pass the base model folder (--base)")
    bases.add(default[1], default[0])
    size = generation_size(cfg, default[0])
    info = build_dataset(cfg.data, "val").info
    val = _load_split(cfg, "val", settings.images, size)
    val_ds = InMemoryDataset(val, info)

    # 2. Judges trained on real data; the latent space of the base model's VAE.
    judges = _fit_judges(cfg, info, size, settings, out / "judges", device)
    encoder = LatentEncoder(default[0].vae, device)

    # 3. The ceiling: the judges on the real validation images.
    rows: list[dict[str, Any]] = [
        {"name": REAL, "condition": "real", "n": None, "run_dir": None,
         "metrics": {k: _stats([v]) for k, v in _score(np.stack([s.image for s in val]), val, 1, judges,
                                                        encoder, info).items()}}
    ]  # fmt: skip

    # 4. Every run x seed (scores cached in out/scores, so adding a run to the table costs that run only).
    for spec in runs:
        run = _open_run(spec, cfg, bases, default, val_ds, base_dir)
        conditions: np.ndarray | None = None
        per_seed: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for i, seed in enumerate(settings.seeds):
            cache = out / "scores" / f"{spec.name}-seed{seed}.json"
            key = _score_key(run, seed, settings, cfg, judges, default[1], val)
            grid = out / f"grid_{spec.name}.png"
            if cache.is_file() and json.loads(cache.read_text()).get("key") == key and (i or grid.is_file()):
                per_seed.append(_unclean(json.loads(cache.read_text())["scores"]))
                continue
            if conditions is None and run.make is not None:
                conditions = run.make(val)
            log.info("%s: generating %d x %d variants, seed %d", spec.name, len(val), settings.variants, seed)
            images = _generate(run, val, cfg, settings, seed, device, conditions)
            per_seed.append(_score(images, val, settings.variants, judges, encoder, info))
            atomic_write_json(cache, _clean({"key": key, "scores": per_seed[-1]}))
            if i == 0:
                _save_grid(grid, val, images, conditions, settings.variants, settings.grid_images)
            encoder.clear()
        keys = sorted({k for m in per_seed for k in m})
        rows.append({
            "name": spec.name, "condition": run.condition, "n": run.n,
            "run_dir": None if spec.run_dir is None else str(spec.run_dir), "base_model": run.base_id,
            "controlnet_config_hash": run.card.get("config_hash"), "trained_steps": run.card.get("trained_steps"),
            "metrics": {k: _stats([m.get(k, math.nan) for m in per_seed]) for k in keys},
            "per_seed": per_seed, "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        log.info("%s: %s", spec.name, {k: round(v["mean"], 4) for k, v in rows[-1]["metrics"].items()})
    for name, path in (downstream or {}).items():
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            raise ValueError(f"--downstream {name}=...: no row named {name!r}")
        row["downstream"] = read_downstream(path)

    # 5. Files.
    doc = {
        "benchmark": "evaluate-synthesis",
        "dataset": info.card(),
        "config_hash": config_hash(cfg),
        "settings": {**asdict(settings), "seeds": list(settings.seeds),
                     "steps": settings.steps or cfg.generate.steps,
                     "guidance": cfg.generate.guidance_scale if settings.guidance is None else settings.guidance},
        "generation_size": list(size),
        "judges": {t: {k: j.meta.get(k) for k in ("steps", "seed", "num_train", "model_sha256", "fit_metrics")}
                   for t, j in judges.items()},
        "judges_train_images": max((j.meta.get("num_train", 0) for j in judges.values()), default=0),
        "latent_space": {"base_model": default[1], "distance": "rms of VAE posterior means x scaling_factor"},
        "metrics": {k: asdict(v) for k, v in METRICS.items()},
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {device}",
    }  # fmt: skip
    doc = _clean(doc)
    atomic_write_json(out / "table.json", doc)
    atomic_write_text(out / "table.md", render_table(doc))
    plot_tradeoff(doc, out / "tradeoff.png")
    return doc
