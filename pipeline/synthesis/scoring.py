"""Scoring the rows of ``evaluate_synthesis``: the judges on the real images (the ceiling), and for every
run and generation seed, K variants per image made exactly as ``expand`` makes them, scored for
alignment and diversity (:mod:`.metrics`), aggregated over seeds and cached per (run, seed)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import LumenConfig, config_dict
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.io import atomic_write_json
from pipeline.synthesis.inputs import EvalSettings, OpenedRun
from pipeline.synthesis.judging import Judge
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
    "REAL",
    "EvalPaths",
    "Scorer",
    "clean",
    "generate_variants",
    "score",
    "score_key",
    "stats",
    "unclean",
]

log = logging.getLogger(__name__)

REAL = "real (ceiling)"
"""Name of the row of the judges on the real validation images."""


@dataclass(frozen=True)
class EvalPaths:
    """The files of an evaluation's output folder (not a run folder)."""

    root: Path

    @property
    def judges(self) -> Path:
        """One sub-folder per judge task."""
        return self.root / "judges"

    def scores(self, name: str, seed: int) -> Path:
        """The cached scores of one row and generation seed."""
        return self.root / "scores" / f"{name}-seed{seed}.json"

    def grid(self, name: str) -> Path:
        """One row's sample grid (source | condition | variants)."""
        return self.root / f"grid_{name}.png"

    @property
    def table_json(self) -> Path:
        return self.root / "table.json"

    @property
    def table_md(self) -> Path:
        return self.root / "table.md"

    @property
    def tradeoff(self) -> Path:
        return self.root / "tradeoff.png"


# --------------------------------------------------------------------------------------------------
# Scores of one set of variants
# --------------------------------------------------------------------------------------------------


def score(images: np.ndarray, sources: Sequence[Sample], k: int, judges: Mapping[str, Judge],
          encoder: LatentEncoder, info: DatasetInfo) -> dict[str, float]:  # fmt: skip
    """Alignment and diversity of ``images`` = K consecutive variants of each source (source-major)."""
    out = _alignment(images, sources, k, judges, info)
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


def _alignment(images: np.ndarray, sources: Sequence[Sample], k: int, judges: Mapping[str, Judge],
               info: DatasetInfo) -> dict[str, float]:  # fmt: skip
    """Each judge's agreement on ``images`` with the labels of their sources."""
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
    return out


def score_key(run: OpenedRun, seed: int, settings: EvalSettings, cfg: LumenConfig,
              judges: Mapping[str, Judge], latent_base: str, val: Sequence[Sample]) -> str:  # fmt: skip
    """sha256 of everything a (run, seed) score depends on."""
    g = config_dict(cfg.generate)
    doc = {
        "version": 1, "condition": run.condition, "controlnet": run.weights_sha256, "base": run.base_id,
        "seed": seed, "keys": [s.key for s in val], "size": list(val[0].image.shape), "variants": settings.variants,
        "steps": settings.generation_steps(cfg), "guidance": settings.guidance_scale(cfg),
        "supersample": supersample(run, cfg),
        "generate": {k: g[k] for k in ("scheduler", "prompt_template", "variation_prompts", *CONDITIONING)},
        "judges": {t: j.meta.get("key") for t, j in judges.items()}, "latent_base": latent_base,
        "data": config_dict(cfg.data),
    }  # fmt: skip
    # generate.layout_supersample and candidates, only where they apply: older keys and caches stay valid
    if run.make_fine is not None:
        doc["layout_supersample"] = [g["layout_supersample"], g["layout_supersample_after"]]
    if selects_candidates(run, cfg):
        doc["candidates"] = [g["candidates"], g["candidate_score"]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def supersample(run: OpenedRun, cfg: LumenConfig) -> int:
    """The factor a run's model generates above the labels' size: ``generate.supersample`` when set, else
    its ControlNet card's ``lumen.supersample``, else the config's (the base model alone)."""
    if cfg.generate.supersample is not None:
        return int(cfg.generate.supersample)
    if run.controlnet is not None and "supersample" in run.card:
        return int(run.card["supersample"])
    return int(cfg.lumen.supersample)


def model_sources(run: OpenedRun, cfg: LumenConfig, sources: Sequence[Sample]) -> list[Sample]:
    """``sources`` at the size the run's model works at (its conditions are made from these)."""
    from pipeline.data import resize_sample

    k = supersample(run, cfg)
    h, w = sources[0].image.shape[:2]
    return list(sources) if k == 1 else [resize_sample(s, (k * h, k * w)) for s in sources]


# the generate settings that change how a variant follows its condition; variants use them as expand does
CONDITIONING = ("conditioning_scale", "condition_guidance", "strength", "layout_sharpen", "layout_sharpen_radius",
                "layout_sharpen_until", "layout_guidance")  # fmt: skip


def generate_variants(run: OpenedRun, sources: Sequence[Sample], cfg: LumenConfig, settings: EvalSettings,
                      seed: int, device: torch.device, conditions: np.ndarray | None,
                      fine: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """K variants of each source, source-major, with expand's prompts, per-variant seeds and conditioning
    settings (``generate.conditioning_scale``, ``condition_guidance``, ``strength``, ``layout_sharpen*``).
    ``fine`` (``generate.layout_supersample``, from ``run.make_fine``): the layouts the steps after the
    first ``layout_supersample_after`` see, the usual ``conditions`` before them, as in expand.
    ``generate.candidates`` > 1 (layout runs, :func:`selects_candidates`): each variant is the best of K
    candidates by the agreement of the layout read back from it (``run.make``) with its condition, as in
    expand, the others made under ``variant_seed(seed, f"{key}#candidate{c}", variant)``.

    A supersampled model generates at its own size (``conditions`` are made from
    :func:`model_sources`) and the variants are area-downsampled to the sources' size, as in expand."""
    from dataclasses import replace

    from pipeline.conditions import sharpen_schedule
    from pipeline.lumen.generate import LumenGenerator, best_of_candidates, plan_variants, variant_seed
    from pipeline.synthesis.metrics import layout_agreement

    g = cfg.generate
    specs = plan_variants(
        [s.key for s in sources], [s.caption for s in sources], settings.variants, seed,
        g.prompt_template, g.variation_prompts,
    )  # fmt: skip
    gen = LumenGenerator(run.base, run.controlnet, scheduler=g.scheduler, device=device)
    conds = None if conditions is None else np.repeat(conditions.astype(np.float32), settings.variants, 0)
    reference = conds  # the usual layouts: what generate.candidates compares each candidate with
    early, fraction = None, g.layout_sharpen_until
    if conds is not None:
        conds, early = sharpen_schedule(
            conds, g.layout_sharpen, g.layout_sharpen_radius, g.layout_sharpen_until
        )
    if conds is not None and fine is not None:  # the config rules out layout_sharpen with it
        fraction = g.layout_supersample_after
        conds, early = (
            np.repeat(fine.astype(np.float32), settings.variants, 0),
            (conds if fraction > 0 else None),
        )
    init = np.repeat(np.stack([s.image for s in sources]), settings.variants, 0) if g.strength < 1 else None
    k = supersample(run, cfg)

    def make(seeds: list[int]) -> np.ndarray:
        return gen.generate(
            conds, [s.prompt for s in specs], seeds, steps=settings.generation_steps(cfg),
            guidance_scale=settings.guidance_scale(cfg), batch_size=settings.batch_size,
            size=tuple(k * d for d in sources[0].image.shape[:2]), output_size=sources[0].image.shape[:2],
            conditioning_scale=g.conditioning_scale,
            condition_guidance=g.condition_guidance and run.controlnet is not None, strength=g.strength,
            layout_guidance=g.layout_guidance if g.condition_guidance and run.controlnet is not None else None,
            init_images=init, early_conditions=early, early_fraction=fraction if early is not None else 0.0,
        )  # fmt: skip

    seeds = [s.seed for s in specs]
    images = make(seeds)
    if not selects_candidates(run, cfg) or reference is None or run.make is None:
        return images
    by_key = {s.key: s for s in sources}
    read = run.make

    def agreement(candidates: np.ndarray) -> np.ndarray:
        again = [replace(by_key[sp.key], image=im) for sp, im in zip(specs, candidates, strict=True)]
        back = np.asarray(read(model_sources(run, cfg, again)), dtype=np.float32)
        return layout_agreement(reference, back, g.candidate_score)

    return best_of_candidates(
        images, seeds, g.candidates,
        lambda c: [variant_seed(seed, f"{sp.key}#candidate{c}", sp.variant) for sp in specs], make, agreement,
    )[0]  # fmt: skip


def selects_candidates(run: OpenedRun, cfg: LumenConfig) -> bool:
    """Whether ``generate.candidates`` applies to a row: K > 1 and a layout ControlNet (the selection
    compares layouts read back from the candidates)."""
    return cfg.generate.candidates > 1 and run.condition == "layout" and run.controlnet is not None


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds; strict JSON
# --------------------------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample std of the finite values, their count, and every value."""
    finite = [float(v) for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(finite), "values": [float(v) for v in values]}


def clean(obj: Any) -> Any:
    """NaN and inf -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def unclean(scores: Mapping[str, Any]) -> dict[str, float]:
    """None -> NaN (the inverse of :func:`clean` for a flat dict of scores)."""
    return {k: math.nan if v is None else float(v) for k, v in scores.items()}


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """Scores rows against one set of validation images, judges and latent space.

    Attributes:
        cfg, settings: generation and evaluation settings.
        val, info: the validation images and their dataset.
        judges: task -> judge trained on real images.
        encoder: the latent space (the default base model's VAE); ``latent_base`` names that base.
        device: where variants are generated.
        paths: the output folder (per-seed score cache, sample grids).
    """

    cfg: LumenConfig
    settings: EvalSettings
    val: list[Sample]
    info: DatasetInfo
    judges: Mapping[str, Judge]
    encoder: LatentEncoder
    latent_base: str
    device: torch.device
    paths: EvalPaths

    def ceiling_row(self) -> dict[str, Any]:
        """The judges on the real validation images (one variant each: the image itself)."""
        real = np.stack([s.image for s in self.val])
        scores = score(real, self.val, 1, self.judges, self.encoder, self.info)
        metrics = {k: stats([v]) for k, v in scores.items()}
        return {"name": REAL, "condition": "real", "n": None, "run_dir": None, "metrics": metrics}

    def run_row(self, run: OpenedRun) -> dict[str, Any]:
        """Every generation seed of one run, read from the cache or generated and scored."""
        spec = run.spec
        if (
            self.cfg.generate.candidates > 1
            and run.controlnet is not None
            and not selects_candidates(run, self.cfg)
        ):
            log.warning(
                "%s: generate.candidates=%d applies to layout ControlNets only: each variant of this %s row "
                "is one candidate", spec.name, self.cfg.generate.candidates, run.condition,
            )  # fmt: skip
        if (
            self.cfg.generate.layout_supersample is not None
            and run.controlnet is not None
            and run.make_fine is None
        ):
            log.warning(
                "%s: generate.layout_supersample=%d applies to layout ControlNets only: every step of this "
                "%s row sees its usual condition", spec.name, self.cfg.generate.layout_supersample, run.condition,
            )  # fmt: skip
        conditions: np.ndarray | None = None
        fine: np.ndarray | None = None
        per_seed: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for i, seed in enumerate(self.settings.seeds):
            cache, grid = self.paths.scores(spec.name, seed), self.paths.grid(spec.name)
            key = score_key(run, seed, self.settings, self.cfg, self.judges, self.latent_base, self.val)
            if cache.is_file() and json.loads(cache.read_text()).get("key") == key and (i or grid.is_file()):
                per_seed.append(unclean(json.loads(cache.read_text())["scores"]))
                continue
            if conditions is None and run.make is not None:
                conditions = run.make(model_sources(run, self.cfg, self.val))
            if fine is None and run.make_fine is not None:
                fine = run.make_fine(model_sources(run, self.cfg, self.val))
            per_seed.append(
                self._generate_and_score(run, seed, conditions, cache, key, grid if i == 0 else None, fine)
            )
        row = self._row(run, per_seed, time.perf_counter() - t0)
        log.info("%s: %s", spec.name, {k: round(v["mean"], 4) for k, v in row["metrics"].items()})
        return row

    def _generate_and_score(self, run: OpenedRun, seed: int, conditions: np.ndarray | None, cache: Path,
                            key: str, grid: Path | None, fine: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
        """One seed's variants, scored and cached under ``key``; the sample grid is saved when ``grid`` is given."""
        from pipeline.synthesis.render import save_grid

        s = self.settings
        log.info("%s: generating %d x %d variants, seed %d", run.spec.name, len(self.val), s.variants, seed)
        images = generate_variants(run, self.val, self.cfg, s, seed, self.device, conditions, fine)
        scores = score(images, self.val, s.variants, self.judges, self.encoder, self.info)
        atomic_write_json(cache, clean({"key": key, "scores": scores}))
        if grid is not None:
            save_grid(grid, self.val, images, conditions, s.variants, s.grid_images)
        self.encoder.clear()
        return scores

    @staticmethod
    def _row(run: OpenedRun, per_seed: list[dict[str, float]], seconds: float) -> dict[str, Any]:
        keys = sorted({k for m in per_seed for k in m})
        spec = run.spec
        return {
            "name": spec.name, "condition": run.condition, "n": run.n,
            "run_dir": None if spec.run_dir is None else str(spec.run_dir), "base_model": run.base_id,
            "controlnet_config_hash": run.card.get("config_hash"), "trained_steps": run.card.get("trained_steps"),
            "metrics": {k: stats([m.get(k, math.nan) for m in per_seed]) for k in keys},
            "per_seed": per_seed, "seconds": seconds,
        }  # fmt: skip
