"""What ``evaluate_synthesis`` compares: the rows (run folders, or the base model alone), their base
models and ControlNets, the evaluation settings, and the real images of a split."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import LumenConfig, load_config
from pipeline.data import build_dataset, resize_sample
from pipeline.data.memory import InMemoryDataset
from pipeline.data.sample import Sample, SampleError
from pipeline.io import sha256_file
from pipeline.layouts.fit import reducer_file
from pipeline.lumen.base import BaseComponents, load_base
from pipeline.runs import RunPaths

__all__ = [
    "BaseModels",
    "EvalSettings",
    "OpenedRun",
    "RunSpec",
    "default_base",
    "evaluation_config",
    "first_run_dir",
    "load_split",
    "open_run",
    "parse_run",
]

log = logging.getLogger(__name__)


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

    def generation_steps(self, cfg: LumenConfig) -> int:
        """Denoising steps: these settings', else the config's ``generate.steps``."""
        return self.steps or cfg.generate.steps

    def guidance_scale(self, cfg: LumenConfig) -> float:
        """Guidance scale: these settings', else the config's ``generate.guidance_scale``."""
        return cfg.generate.guidance_scale if self.guidance is None else self.guidance


@dataclass
class OpenedRun:
    """A row ready to generate: its condition, base model, ControlNet and condition maker.

    Attributes:
        spec: the row.
        condition: the ControlNet's condition (``none`` for the base model alone).
        n: layout components (None for other conditions).
        base, base_id: the base model and its identity.
        controlnet: the ControlNet (None for ``none``).
        make: sources -> (B, C, H, W) conditions (None for ``none``).
        make_fine: ``generate.layout_supersample``: sources -> the finer layouts the later steps see
            (None when off or not a layout ControlNet).
        card: the ControlNet's ``lumen.json``.
        weights_sha256: sha256 of the ControlNet's weights file.
    """

    spec: RunSpec
    condition: str
    n: int | None
    base: BaseComponents
    base_id: str
    controlnet: Any | None = None
    make: Callable[[Sequence[Sample]], np.ndarray] | None = None
    card: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    make_fine: Callable[[Sequence[Sample]], np.ndarray] | None = None


class BaseModels:
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


def first_run_dir(runs: Sequence[RunSpec]) -> Path | None:
    """The folder of the first row that has one."""
    return next((r.run_dir for r in runs if r.run_dir is not None), None)


def evaluation_config(runs: Sequence[RunSpec], config: LumenConfig | None) -> LumenConfig:
    """``config``, else the first run's ``config.yaml``."""
    if not runs:
        raise ValueError("nothing to evaluate: give at least one --run")
    if config is not None:
        return config
    first = first_run_dir(runs)
    if first is None:
        raise ValueError("with only 'none' rows, pass the config (--config) naming the data")
    return load_config(RunPaths(first).config)


def default_base(
    cfg: LumenConfig, runs: Sequence[RunSpec], base_dir: Path | None, bases: BaseModels
) -> tuple[BaseComponents, str]:
    """The base model of ``none`` rows and of the latent space, and its identity: ``base_dir``, else the
    first run's base. It is added to ``bases``."""
    from pipeline.lumen.stages import load_run_base

    first = first_run_dir(runs)
    if base_dir is not None:
        default = (load_base(base_dir).to(bases.device), str(base_dir))
    elif first is not None:
        components, base_id = load_run_base(cfg, first)
        default = (components.to(bases.device), base_id)
    else:
        raise ValueError("with only 'none' rows, pass the base model folder (--base)")
    bases.add(default[1], default[0])
    return default


def open_run(spec: RunSpec, cfg: LumenConfig, bases: BaseModels, default: tuple[BaseComponents, str],
             val: InMemoryDataset, base_dir: Path | None) -> OpenedRun:  # fmt: skip
    """Load a run's ControlNet, its base model and its condition maker (``none``: ``default`` alone)."""
    from diffusers import ControlNetModel

    from pipeline.lumen.stages import condition_maker, fine_condition_maker, lumen_folder

    if spec.run_dir is None:
        return OpenedRun(spec, "none", None, *default)
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
    # 'layout' needs the PCA (or k-means) it was trained with; nothing is written into the run folder.
    name = reducer_file(run_cfg.layouts)
    pca = next((p for p in (run_dir / name, lumen_dir / name) if p.is_file()), None)
    if run_cfg.lumen.condition == "layout" and pca is None:
        raise FileNotFoundError(f"{run_dir} has no {name}: the layouts cannot be reproduced")
    no_cache = run_cfg.model_copy(update={"layouts": run_cfg.layouts.model_copy(update={"cache": False})})
    if cfg.generate.supersample is not None:  # conditions at the size the variants are generated at
        no_cache = no_cache.model_copy(
            update={"lumen": no_cache.lumen.model_copy(update={"supersample": cfg.generate.supersample})}
        )
    make, _ = condition_maker(no_cache, base, base_id, val, run_dir, reducer_path=pca)
    make_fine = None
    if cfg.generate.layout_supersample is not None and run_cfg.lumen.condition == "layout":
        # as expand: the later steps see layouts made at layout_supersample x, resized to the generation size
        factor = cfg.generate.supersample or int(card.get("supersample", run_cfg.lumen.supersample))
        gen_cfg = no_cache.model_copy(update={
            "generate": cfg.generate, "lumen": no_cache.lumen.model_copy(update={"supersample": factor})})  # fmt: skip
        make_fine = fine_condition_maker(gen_cfg, base, base_id, val, run_dir, reducer_path=pca)
    controlnet = ControlNetModel.from_pretrained(lumen_dir).to(bases.device).eval()
    n = run_cfg.layouts.channels if run_cfg.lumen.condition == "layout" else None
    weights = sha256_file(lumen_dir / "diffusion_pytorch_model.safetensors")
    return OpenedRun(
        spec, run_cfg.lumen.condition, n, base, base_id, controlnet, make, card, weights, make_fine
    )


def load_split(cfg: LumenConfig, split: str, count: int, size: tuple[int, int]) -> list[Sample]:
    """The first ``count`` valid samples of a split, resized to ``size`` (invalid ones are logged, skipped)."""
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
