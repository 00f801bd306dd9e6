"""The semantic mapper stage (``lumen train-mapper``) and the conditions of generate-from-labels.

:func:`run_train_mapper` trains a :class:`~pipeline.layouts.mapper.SemanticMapper` from the run's
training data: its inputs are made from the seg maps (``mapper.input``: the label map, its sketch or
scribbles), its targets are the layouts of the images, computed exactly as for the ControlNet it will
feed (same backbone, same PCA or k-means), so no extra labels are needed. ``mapper.shots`` limits the
pairs it learns from. The mapper is saved to ``<run>/mapper/<input>/`` with a card that records the
layout spec it maps to; :func:`mapper_condition_maker` refuses a mapper whose layouts differ from those
the ControlNet was trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import ConfigError, LumenConfig, config_hash
from pipeline.data import Quarantine, resize_sample
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.execution import progress_bar
from pipeline.io import sha256_file
from pipeline.layouts.mapper import (
    fit_mapper,
    load_mapper,
    mapper_input,
    outputs_to_condition,
    predict,
    save_mapper,
)
from pipeline.layouts.project import layout_spec_hash
from pipeline.lumen.stages import (
    ConditionFn,
    collect_samples,
    condition_maker,
    load_run_base,
    lumen_folder,
    model_size,
    shipped_reducer,
)
from pipeline.runs import RunPaths

__all__ = ["SCRIBBLE_DRAWS", "mapper_condition_maker", "mapper_folder", "mapper_identity", "run_train_mapper"]

log = logging.getLogger(__name__)

SCRIBBLE_DRAWS = 4
"""Scribble inputs drawn per training map (random strokes: more draws, less overfitting to one set)."""


def _key_rng(seed: int, key: str, draw: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:8], 16), draw])


def mapper_folder(cfg: LumenConfig, run_dir: Path) -> Path:
    """``generate.mapper`` if set, else the run's mapper for ``mapper.input``."""
    if cfg.generate.mapper is not None:
        return Path(cfg.generate.mapper)
    return RunPaths(run_dir).mapper / cfg.mapper.input


def _check_config(cfg: LumenConfig) -> None:
    if cfg.lumen.condition != "layout":
        raise ConfigError(
            f"the semantic mapper maps to neural layouts or proxy masks; lumen.condition={cfg.lumen.condition!r} "
            "is a label condition already (use lumen.condition=layout)"
        )


def _inputs(cfg: LumenConfig, samples: Sequence[Sample], info: DatasetInfo, draw: int) -> np.ndarray:
    out = []
    for s in samples:
        if s.seg is None:
            raise ValueError(f"{s.key}: the mapper needs seg labels")
        out.append(
            mapper_input(
                cfg.mapper.input, s.seg, info.num_classes, _key_rng(cfg.seed, s.key, draw), info.ignore_index
            )
        )
    return np.stack(out)


def run_train_mapper(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> Path:
    """Train the semantic mapper on the run's training data; returns its folder (``<run>/mapper/<input>``)."""
    _check_config(cfg)
    m = cfg.mapper
    base, base_id = load_run_base(cfg, run_dir)
    data = collect_samples(  # at the model's working size (lumen.supersample)
        cfg, model_size(cfg, base), Quarantine(RunPaths(run_dir).quarantine), progress=progress,
        workers=cfg.data.load_workers,
    )  # fmt: skip
    if "seg" not in data.info.labels:
        raise ConfigError(
            f"the mapper learns from seg maps; {data.info.name} has labels {list(data.info.labels)}"
        )
    keys = data.keys()
    if m.shots is not None and m.shots < len(keys):
        rng = np.random.default_rng(m.seed)
        keys = [keys[i] for i in sorted(rng.choice(len(keys), size=m.shots, replace=False).tolist())]
    samples = [data.load(k) for k in keys]
    cn = lumen_folder(cfg, run_dir)
    make, cond_meta = condition_maker(
        cfg, base, base_id, data, run_dir, reducer_path=shipped_reducer(cfg, cn)
    )
    layouts = make(samples).astype(np.float32)
    draws = SCRIBBLE_DRAWS if m.input == "scribble" else 1
    inputs = np.concatenate([_inputs(cfg, samples, data.info, d) for d in range(draws)])
    targets = np.concatenate([layouts] * draws)
    target: Literal["layout", "proxy"] = "proxy" if cfg.layouts.kind == "clustered" else "layout"
    bar = progress_bar(total=m.train_steps, desc=f"mapper ({m.input})", unit="step", enabled=progress)

    def step(i: int, loss: float) -> None:
        bar.update(1)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    model, losses = fit_mapper(
        inputs, targets, target, steps=m.train_steps, lr=m.learning_rate, batch_size=m.batch_size, width=m.width,
        seed=m.seed, depth=m.depth, out_classes=layouts.shape[1] if target == "proxy" else None, on_step=step,
        downsample=m.downsample,
    )  # fmt: skip
    bar.close()
    card = {
        "input": m.input,
        "target": target,
        "num_classes": data.info.num_classes,
        "ignore_index": data.info.ignore_index,
        "classes": list(data.info.classes),
        "shots": len(samples),
        "keys": [s.key for s in samples][:64],
        "layout": cond_meta["layout"],
        "layout_hash": layout_spec_hash(cond_meta["layout"]),
        "controlnet": str(cn),
        "train_steps": m.train_steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "config_hash": config_hash(cfg),
    }
    out = save_mapper(model, RunPaths(run_dir).mapper / m.input, card)
    log.info("semantic mapper (%s -> %s, %d pairs) saved to %s", m.input, target, len(samples), out)
    return out


def mapper_condition_maker(
    cfg: LumenConfig, folder: Path, info: DatasetInfo, layout_spec: dict[str, Any]
) -> tuple[ConditionFn, dict[str, Any]]:
    """Conditions of label-map samples: their mapper input (from ``seg``) through the mapper at
    ``folder``. ``layout_spec`` is what the ControlNet was trained on; a mapper trained for other
    layouts, or for other classes, is refused."""
    _check_config(cfg)
    model, card = load_mapper(folder)
    if card.get("layout_hash") != layout_spec_hash(layout_spec):
        raise ValueError(
            f"the mapper in {folder} maps to other layouts than the ControlNet was trained on "
            f"({card.get('layout_hash')} vs {layout_spec_hash(layout_spec)}); retrain it with `lumen train-mapper`"
        )
    if card.get("num_classes") != info.num_classes:
        raise ValueError(
            f"the mapper in {folder} knows {card.get('num_classes')} classes, the data {info.num_classes}"
        )
    kind, target = str(card["input"]), str(card["target"])

    def conditions(samples: Sequence[Sample]) -> np.ndarray:
        out = []
        k = cfg.lumen.supersample
        for start in range(0, len(samples), 16):
            batch = [resize_sample(s, (k * s.size[0], k * s.size[1])) for s in samples[start : start + 16]]
            x = np.stack([
                mapper_input(kind, s.seg if s.seg is not None else np.zeros(s.size, np.uint8), info.num_classes,
                             _key_rng(cfg.seed, s.key), info.ignore_index)
                for s in batch
            ])  # fmt: skip
            out.append(outputs_to_condition(predict(model, x), target, cfg.layouts.soft_temperature))
        return np.concatenate(out).astype(np.float16)

    meta = {"mapper": {"input": kind, "target": target, "shots": card.get("shots"), "folder": str(folder)}}
    return conditions, meta


def mapper_identity(folder: Path, run_dir: Path) -> dict[str, str | None]:
    """``{"id", "sha256"}`` of a mapper for provenance (``run/mapper/<input>`` for the run's own)."""
    folder = Path(folder)
    try:
        ident = f"run/{folder.resolve().relative_to(Path(run_dir).resolve()).as_posix()}"
    except ValueError:
        ident = str(folder)
    weights = folder / "mapper.safetensors"
    return {"id": ident, "sha256": sha256_file(weights) if weights.is_file() else None}
