"""Dataset expansion: real samples and K synthetic variants each, into two WebDataset shard sets.

Work goes in chunks of ``generate.chunk_size`` source images, in key order. Both shard writers resume:
a sample already in a finished shard is skipped, a partial shard is discarded and redone; variant seeds
come from (run seed, key, variant). A run killed at any point and started again therefore ends with
exactly the expected keys, and the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import LumenConfig, config_hash
from pipeline.data import Quarantine, build_dataset, iter_valid, resize_sample
from pipeline.data.sample import Sample
from pipeline.device import resolve_device
from pipeline.io import atomic_write_text, sha256_file
from pipeline.lumen.generate import LumenGenerator, plan_variants
from pipeline.lumen.stages import base_folder, condition_maker, generation_size, load_run_base, lumen_folder

__all__ = ["ExpandSummary", "run_expand"]

log = logging.getLogger(__name__)


@dataclass
class ExpandSummary:
    """What an expand run produced."""

    real: int
    synthetic: int
    quarantined: int
    seconds: float
    real_dir: Path
    synthetic_dir: Path


def _chunks(keys: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(keys), size):
        yield list(keys[i : i + size])


def _run_timestamp(run_dir: Path) -> str:
    """The run's start time, fixed on first use, so a resumed run writes the same provenance bytes."""
    path = run_dir / "started_at.txt"
    if not path.is_file():
        atomic_write_text(path, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    return path.read_text().strip()


def _weights_sha(folder: Path, sub: str = "") -> str | None:
    files = sorted((folder / sub).glob("*.safetensors")) if (folder / sub).is_dir() else []
    return sha256_file(files[0]) if files else None


def _load_controlnet(folder: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import ControlNetModel

    card = json.loads((folder / "lumen.json").read_text())
    model = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)  # shipped weights are fp16
    return model.to(device).eval(), card


def run_expand(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> ExpandSummary:
    """Shard the real training samples and ``generate.variants`` synthetic variants of each.

    Writes ``run_dir/shards/real`` and ``run_dir/shards/synthetic`` (each with ``manifest.json``);
    bad inputs go to ``run_dir/quarantine.jsonl``.
    """
    from pipeline.shards.writer import ShardSetWriter

    t0 = time.time()
    device = resolve_device(cfg.device)
    base, base_id = load_run_base(cfg, run_dir)
    base.to(device)
    cn_folder = lumen_folder(cfg, run_dir)
    controlnet, card = _load_controlnet(cn_folder, device)
    source = build_dataset(cfg.data, "train")
    quarantine = Quarantine(run_dir / "quarantine.jsonl")
    size = generation_size(cfg, base)
    shipped_pca = cn_folder / "pca.safetensors"
    make_conditions, cond_meta = condition_maker(
        cfg, base, base_id, source, run_dir, pca_path=shipped_pca if shipped_pca.is_file() else None
    )
    if card.get("condition") == "layout" and card.get("layout") != cond_meta.get("layout"):
        raise ValueError(
            "the layouts this run would make differ from those the ControlNet was trained on "
            f"({cn_folder / 'lumen.json'}); retrain it or restore the run's pca.safetensors"
        )
    gen = LumenGenerator(base, controlnet, scheduler=cfg.generate.scheduler, device=device)
    g = cfg.generate
    models = {
        "base": {"id": base_id, "sha256": _weights_sha(base_folder(base_id), "unet")},
        "controlnet": {"id": str(cn_folder), "sha256": _weights_sha(cn_folder)},
    }
    common: dict[str, Any] = {
        "source_dataset": source.info.name,
        "split": "train",
        "timestamp": _run_timestamp(run_dir),
    }
    layout_meta = {"condition": card.get("condition"), **cond_meta}
    hash_ = config_hash(cfg)
    card_fields = source.info.card()
    real_w = ShardSetWriter.from_config(run_dir / "shards" / "real", cfg.shards, dataset_card=card_fields,
                                        config_hash=hash_, prefix="real")  # fmt: skip
    syn_w = ShardSetWriter.from_config(run_dir / "shards" / "synthetic", cfg.shards, dataset_card=card_fields,
                                       config_hash=hash_, prefix="synthetic")  # fmt: skip
    n_real = n_syn = 0
    q_before = len(quarantine)
    keys = source.keys()
    bar = tqdm(total=len(keys), desc="expand", unit="img", disable=not progress)
    with real_w, syn_w:
        for chunk in _chunks(keys, g.chunk_size):
            samples = [
                resize_sample(s, size) for s in iter_valid(source, quarantine, keys=chunk, stage="expand")
            ]
            for s in samples:
                if s.key not in real_w.done_keys:
                    real_w.write(s, {**common, "source_key": s.key, "synthetic": False})
                    n_real += 1
            specs = plan_variants([s.key for s in samples], [s.caption for s in samples], g.variants, cfg.seed,
                                  g.prompt_template, g.variation_prompts)  # fmt: skip
            todo = [sp for sp in specs if sp.out_key not in syn_w.done_keys]
            if todo:
                by_key = {s.key: s for s in samples}
                needed = [by_key[k] for k in dict.fromkeys(sp.key for sp in todo)]
                conds = dict(zip((s.key for s in needed), make_conditions(needed), strict=True))
                images = gen.generate(
                    np.stack([conds[sp.key] for sp in todo]).astype(np.float32), [sp.prompt for sp in todo],
                    [sp.seed for sp in todo], steps=g.steps, guidance_scale=g.guidance_scale, batch_size=g.batch_size,
                )  # fmt: skip
                for sp, image in zip(todo, images, strict=True):
                    src = by_key[sp.key]
                    syn = Sample(sp.out_key, image, seg=src.seg, depth=src.depth, normal=src.normal,
                                 caption=sp.prompt, meta={"source_key": src.key})  # fmt: skip
                    prov = {**common, "source_key": src.key, "synthetic": True, "variant": sp.variant, "seed": sp.seed,
                            "prompt": sp.prompt, "guidance": g.guidance_scale, "steps": g.steps,
                            "scheduler": g.scheduler, "models": models, "layout": layout_meta}  # fmt: skip
                    syn_w.write(syn, prov)
                    n_syn += 1
            bar.update(len(chunk))
    bar.close()
    summary = ExpandSummary(n_real, n_syn, len(quarantine) - q_before, time.time() - t0,
                            run_dir / "shards" / "real", run_dir / "shards" / "synthetic")  # fmt: skip
    log.info(
        "expand: %d real, %d synthetic samples written this run (%.0f s)", n_real, n_syn, summary.seconds
    )
    return summary
