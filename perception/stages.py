"""The ``evaluate`` stage: perception models of every arm on a run's data, and the gains report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import LumenConfig, config_dict, config_hash
from pipeline.data import Quarantine
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.device import resolve_device
from pipeline.io import sha256_file
from pipeline.lumen.stages import collect_samples
from pipeline.runs import RunPaths

__all__ = [
    "EvalInputs",
    "evaluation_inputs",
    "oracle_samples",
    "run_evaluate",
    "setting_facts",
    "write_report",
]

log = logging.getLogger(__name__)


@dataclass
class EvalInputs:
    """What the perception arms of a run train and are evaluated on.

    Attributes:
        real: the labelled real training data (the run's real shards, or toy scenes rendered directly).
        val: real validation data (learning curves, schedules).
        test: real test data the metrics are reported on, or None to report on ``val``.
        synthetic: the generator's variants (the run's synthetic shards), or None.
        oracle: toy scenes re-rendered with new appearance (``real+oracle``), or None.
        info: the dataset (classes, ignore index, labels).
    """

    real: Any
    val: list[Sample]
    test: list[Sample] | None
    synthetic: Any
    oracle: list[Sample] | None
    info: DatasetInfo


def _asset_card(folder: Path) -> dict[str, Any]:
    path = folder / "asset.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _shard_models(run_dir: Path) -> dict[str, Any] | None:
    """The generator models recorded in the provenance of the run's first synthetic sample, if any."""
    import tarfile

    tars = sorted(RunPaths(run_dir).shards("synthetic").glob("*.tar"))
    if not tars:
        return None
    with tarfile.open(tars[0]) as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.name.endswith(".json") else None
            if handle is not None:
                models = json.loads(handle.read()).get("models")
                return dict(models) if isinstance(models, dict) else None
    return None


def _models(cfg: LumenConfig, run_dir: Path) -> dict[str, Any]:
    """The models that made the synthetic data: ``{role: {"id", "sha256", "trained_on"}}`` for the
    report's provenance. Taken from the synthetic shards' provenance when they exist (the models that
    really made them, even if the shipped ones were replaced since), else the run's own or the shipped
    models that the config would use."""
    from pipeline.lumen.stages import base_folder, lumen_folder

    recorded = _shard_models(run_dir)
    if recorded:
        return recorded

    try:
        folder = lumen_folder(cfg, run_dir)
    except FileNotFoundError:
        return {}
    card = json.loads((folder / "lumen.json").read_text())

    def sha(path: Path) -> str | None:
        return sha256_file(path) if path.is_file() else None

    models: dict[str, Any] = {}
    if base_id := card.get("base_model"):
        base = base_folder(base_id, run_dir)
        models["base"] = {"id": base_id, "sha256": sha(base / "unet" / "diffusion_pytorch_model.safetensors")}
        models["base"]["trained_on"] = _asset_card(base).get("trained_on")
    models["controlnet"] = {
        "id": f"{folder.name} (condition: {card.get('condition')})",
        "sha256": sha(folder / "diffusion_pytorch_model.safetensors"),
        "trained_on": _asset_card(folder).get("trained_on"),
    }
    if card.get("pca_sha256"):
        models["layout PCA"] = {"id": "pca.safetensors", "sha256": card["pca_sha256"]}
    return models


def _toy_split(cfg: LumenConfig, split: str, num: int, domains: Sequence[str]) -> list[Sample]:
    """Toy scenes of ``split`` (train, val or test streams) in ``domains``, rendered in memory."""
    from pipeline.data import build_dataset

    data = cfg.data.model_copy(update={"domains": list(domains), "num_images": num, "num_val_images": num})
    source = build_dataset(data, split)
    return [source.load(k) for k in source.keys()]


def oracle_samples(cfg: LumenConfig, keys: Sequence[str]) -> list[Sample]:
    """``perception.oracle_variants`` re-renders of each toy-scene training key, in
    ``perception.oracle_domains`` (default ``data.domains``): same geometry and labels, new appearance."""
    from pipeline.data import build_dataset
    from pipeline.data.toyscenes import ToyScenes

    source = build_dataset(cfg.data, "train")
    if not isinstance(source, ToyScenes):
        raise ValueError(
            f"the real+oracle arm re-renders toy scenes; data.adapter is {cfg.data.adapter!r}: "
            "remove real+oracle from perception.arms"
        )
    domains = cfg.perception.oracle_domains or cfg.data.domains
    n = cfg.perception.oracle_variants
    return [source.oracle(k, v, domains) for k in keys for v in range(n)]


def _selected_keys(cfg: LumenConfig, keys: Sequence[str]) -> list[str]:
    """The real keys some run of the protocol trains on (the union over seeds and settings)."""
    from perception.data import select_labelled
    from perception.protocol import default_settings

    chosen: set[int] = set()
    for fraction in default_settings(cfg.perception).values():
        for seed in cfg.perception.seeds:
            chosen.update(select_labelled(keys, fraction, seed))
    return [keys[i] for i in sorted(chosen)]


def evaluation_inputs(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> EvalInputs:
    """The data of a run's evaluation (see :class:`EvalInputs`).

    Real training data comes from ``run_dir/shards/real`` (written by ``lumen expand``); for toy scenes
    without shards it is rendered directly (same keys, same pixels), so the arms that need no generator
    run before any expansion. Toy scenes get val and test from their own streams, in
    ``perception.test_domains`` when set (cross-domain).
    """
    from perception.data import ShardSamples, catalog, dataset_info_from_shards

    real_dir, syn_dir = RunPaths(run_dir).shards("real"), RunPaths(run_dir).shards("synthetic")
    p = cfg.perception
    toy = cfg.data.adapter == "toyscenes"
    # 1. Real training data and the dataset card.
    real: Any
    if (real_dir / "manifest.json").is_file():
        real, info = ShardSamples(real_dir), dataset_info_from_shards(real_dir)
    elif toy:
        real = _toy_split(cfg, "train", cfg.data.num_images or 256, cfg.data.domains)
        from pipeline.data.toyscenes import ToyScenes

        info = ToyScenes().info
    else:
        raise FileNotFoundError(f"no shard set in {real_dir}; run `lumen expand` with this config first")
    missing = [t for t in p.tasks if t not in info.labels]
    if missing:
        raise ValueError(
            f"perception.tasks {missing} need labels the dataset lacks (it has {list(info.labels)})"
        )
    # 2. Synthetic variants (only when the arm is asked for).
    synthetic = None
    if "real+synthetic" in p.arms:
        if not (syn_dir / "manifest.json").is_file():
            raise FileNotFoundError(
                f"no synthetic shard set in {syn_dir}: run `lumen expand` with this config first, "
                "or remove real+synthetic from perception.arms"
            )
        synthetic = ShardSamples(syn_dir)
    # 3. Validation and test data.
    test: list[Sample] | None = None
    if toy:
        domains = p.test_domains or cfg.data.domains
        val = _toy_split(cfg, "val", cfg.data.num_val_images or 64, domains)
        if p.report_split == "test":
            test = _toy_split(cfg, "test", p.num_test_images, domains)
    else:
        if p.report_split == "test":
            raise ValueError(
                f"the {cfg.data.adapter} adapter has no test split here: set perception.report_split=val "
                "(and fix the schedule without looking at the reported numbers)"
            )
        if p.test_domains:
            raise ValueError("perception.test_domains is for toy scenes only")
        size = tuple(cfg.data.image_size) if cfg.data.image_size else None
        quarantine = Quarantine(RunPaths(run_dir).quarantine)
        val = list(collect_samples(cfg, size, quarantine, split="val", progress=progress))  # type: ignore[arg-type]
    # 4. Oracle re-renders of the real images some run trains on.
    oracle = None
    if "real+oracle" in p.arms:
        keys, labels, _ = catalog(real)
        labelled = [k for k, have in zip(keys, labels, strict=True) if set(p.tasks) <= set(have)]
        oracle = oracle_samples(cfg, _selected_keys(cfg, labelled))
    return EvalInputs(real, list(val), test, synthetic, oracle, info)


def setting_facts(
    cfg: LumenConfig, inputs: EvalInputs, models: dict[str, Any], settings: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """The report's description of each setting: its label fraction, sizes (perception saw L labelled
    images per seed, the generator U unlabelled ones), domains and evaluation split sizes."""
    from perception.data import catalog

    n_real = len(catalog(inputs.real)[0])
    common: dict[str, Any] = {
        "real_pool": n_real,
        "num_val": len(inputs.val),
        "num_test": len(inputs.test) if inputs.test is not None else None,
        "generator": {role: m["trained_on"] for role, m in models.items() if m.get("trained_on")},
    }
    if cfg.data.adapter == "toyscenes":
        common["train_domains"] = list(cfg.data.domains)
        common["test_domains"] = list(cfg.perception.test_domains or cfg.data.domains)
        if inputs.oracle is not None:
            common["oracle_domains"] = list(cfg.perception.oracle_domains or cfg.data.domains)
    return {
        name: {
            "label_fraction": fraction,
            "num_labelled": max(1, round(fraction * n_real))
            if fraction is not None and fraction < 1
            else n_real,
            **common,
        }
        for name, fraction in settings.items()
    }


def write_report(
    cfg: LumenConfig,
    run_dir: Path,
    results: dict[str, Any],
    real: Any,
    synthetic: Any,
    info: DatasetInfo,
    report_dir: Path | None = None,
) -> Path:
    """``report_dir`` (default ``run_dir/report``): report.json, report.md, the gains chart, the
    learning curves and the gallery (when there are synthetic variants)."""
    from perception.data import pair_variants
    from pipeline.report import make_report

    report_dir = report_dir or RunPaths(run_dir).report
    gallery = pair_variants(real, synthetic) if synthetic is not None else None
    make_report(results, report_dir, config=config_dict(cfg), config_hash=config_hash(cfg), models=_models(cfg, run_dir),
                dataset=info, gallery=gallery)  # fmt: skip
    log.info("report written to %s", report_dir)
    return report_dir


def run_evaluate(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> Path:
    """Train ``perception.tasks`` models of every arm over the seeds and settings of the protocol,
    evaluate on the real test (or validation) split, and write ``run_dir/report``.

    Per-run logs and results go to ``run_dir/perception`` (an interrupted evaluation resumes there).
    ``flows/stages.py`` does the same with one Prefect task per training run.
    """
    from perception.protocol import default_settings, protocol_summary, run_protocol

    inputs = evaluation_inputs(cfg, run_dir, progress)
    results = run_protocol(inputs.real, inputs.val, inputs.synthetic, config=cfg.perception, info=inputs.info,
                           oracle=inputs.oracle, test=inputs.test, out_dir=RunPaths(run_dir).perception,
                           device=str(resolve_device(cfg.device)))  # fmt: skip
    settings = default_settings(cfg.perception)
    results["protocol"] = protocol_summary(cfg.perception, settings)
    results["protocol"]["settings"] = setting_facts(cfg, inputs, _models(cfg, run_dir), settings)
    return write_report(cfg, run_dir, results, inputs.real, inputs.synthetic, inputs.info)
