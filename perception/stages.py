"""The ``evaluate`` stage: perception models on real vs real+synthetic shards, and the gains report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.config import LumenConfig, config_dict, config_hash
from pipeline.data import Quarantine
from pipeline.data.sample import DatasetInfo
from pipeline.device import resolve_device
from pipeline.io import sha256_file
from pipeline.lumen.stages import collect_samples

__all__ = ["evaluation_inputs", "run_evaluate", "write_report"]

log = logging.getLogger(__name__)


def _models(cfg: LumenConfig, run_dir: Path) -> dict[str, Any]:
    """The models that made the synthetic data (the run's own or the shipped ones): ``{role: {"id",
    "sha256"}}`` for the report's provenance."""
    from pipeline.lumen.stages import base_folder, lumen_folder

    try:
        folder = lumen_folder(cfg, run_dir)
    except FileNotFoundError:
        return {}
    card = json.loads((folder / "lumen.json").read_text())

    def sha(path: Path) -> str | None:
        return sha256_file(path) if path.is_file() else None

    models: dict[str, Any] = {}
    if base_id := card.get("base_model"):
        unet = base_folder(base_id, run_dir) / "unet" / "diffusion_pytorch_model.safetensors"
        models["base"] = {"id": base_id, "sha256": sha(unet)}
    models["controlnet"] = {
        "id": f"{folder.name} (condition: {card.get('condition')})",
        "sha256": sha(folder / "diffusion_pytorch_model.safetensors"),
    }
    if card.get("pca_sha256"):
        models["layout PCA"] = {"id": "pca.safetensors", "sha256": card["pca_sha256"]}
    return models


def evaluation_inputs(
    cfg: LumenConfig, run_dir: Path, progress: bool = True
) -> tuple[Any, list[Any], Any, DatasetInfo]:
    """(real shards, real validation samples, synthetic shards, dataset info) of a run's evaluation."""
    from perception.data import ShardSamples, dataset_info_from_shards

    real_dir, syn_dir = run_dir / "shards" / "real", run_dir / "shards" / "synthetic"
    for d in (real_dir, syn_dir):
        if not (d / "manifest.json").is_file():
            raise FileNotFoundError(f"no shard set in {d}; run `lumen expand` with this config first")
    info = dataset_info_from_shards(real_dir)
    missing = [t for t in cfg.perception.tasks if t not in info.labels]
    if missing:
        raise ValueError(
            f"perception.tasks {missing} need labels the dataset lacks (it has {list(info.labels)})"
        )
    size = tuple(cfg.data.image_size) if cfg.data.image_size else None
    val = collect_samples(cfg, size, Quarantine(run_dir / "quarantine.jsonl"), split="val", progress=progress)  # type: ignore[arg-type]
    return ShardSamples(real_dir), list(val), ShardSamples(syn_dir), info


def write_report(
    cfg: LumenConfig, run_dir: Path, results: dict[str, Any], real: Any, synthetic: Any, info: DatasetInfo
) -> Path:
    """``run_dir/report``: report.json, report.md, the gains chart and the gallery."""
    from perception.data import pair_variants
    from pipeline.report import make_report

    report_dir = run_dir / "report"
    make_report(results, report_dir, config=config_dict(cfg), config_hash=config_hash(cfg), models=_models(cfg, run_dir),
                dataset=info, gallery=pair_variants(real, synthetic))  # fmt: skip
    log.info("report written to %s", report_dir)
    return report_dir


def run_evaluate(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> Path:
    """Train ``perception.tasks`` models on real-only and real+synthetic shards over the seeds and
    settings of the protocol, validate on the real validation split, and write ``run_dir/report``.

    Per-run logs and results go to ``run_dir/perception`` (an interrupted evaluation resumes there).
    ``flows/evaluate.py`` does the same with one Prefect task per training run.
    """
    from perception.protocol import run_protocol

    real, val, synthetic, info = evaluation_inputs(cfg, run_dir, progress)
    results = run_protocol(real, val, synthetic, config=cfg.perception, info=info,
                           out_dir=run_dir / "perception", device=str(resolve_device(cfg.device)))  # fmt: skip
    return write_report(cfg, run_dir, results, real, synthetic, info)
