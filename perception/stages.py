"""The ``evaluate`` stage: perception models of every arm on a run's data, and the gains report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perception.protocol import RunSpec
from pipeline.config import LumenConfig, config_dict, config_hash
from pipeline.data import Quarantine
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.device import resolve_device
from pipeline.execution import Deferred, Future, TrackerFactory, tqdm_tracker
from pipeline.io import sha256_file
from pipeline.lumen.expand import SubmitChunk
from pipeline.lumen.stages import collect_samples
from pipeline.preflight import check_adapter_settings, resolve_config
from pipeline.report.tables import gains_rows, markdown_table
from pipeline.runs import RunPaths
from pipeline.shards.writer import MANIFEST_NAME

__all__ = [
    "EvalInputs",
    "EvaluateResult",
    "SubmitRun",
    "evaluation_inputs",
    "oracle_samples",
    "perception_runs",
    "run_evaluate",
    "run_gains",
    "setting_facts",
    "train_one",
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
    from perception.data import ShardSamples, catalog

    real, info = _real_data(cfg, run_dir)
    cfg = resolve_config(cfg, info)
    p = cfg.perception
    missing = [t for t in p.tasks or () if t not in info.labels]
    if missing:
        raise ValueError(
            f"perception.tasks {missing} need labels the dataset lacks (it has {list(info.labels)})"
        )
    # Synthetic variants (only when the arm is asked for).
    synthetic = None
    if "real+synthetic" in p.arms:
        syn_dir = RunPaths(run_dir).shards("synthetic")
        if not (syn_dir / MANIFEST_NAME).is_file():
            raise FileNotFoundError(
                f"no synthetic shard set in {syn_dir}: run `lumen expand` with this config first, "
                "or remove real+synthetic from perception.arms"
            )
        synthetic = ShardSamples(syn_dir)
    val, test = _eval_splits(cfg, run_dir, progress)
    # Oracle re-renders of the real images some run trains on.
    oracle = None
    if "real+oracle" in p.arms:
        keys, labels, _ = catalog(real)
        labelled = [k for k, have in zip(keys, labels, strict=True) if set(p.tasks or ()) <= set(have)]
        oracle = oracle_samples(cfg, _selected_keys(cfg, labelled))
    return EvalInputs(real, list(val), test, synthetic, oracle, info)


def _real_data(cfg: LumenConfig, run_dir: Path) -> tuple[Any, DatasetInfo]:
    """The real training data and its dataset card: the run's real shards, or toy scenes rendered
    directly (same keys, same pixels) when there are none yet."""
    from perception.data import ShardSamples, dataset_info_from_shards

    real_dir = RunPaths(run_dir).shards("real")
    if (real_dir / MANIFEST_NAME).is_file():
        return ShardSamples(real_dir), dataset_info_from_shards(real_dir)
    if cfg.data.adapter == "toyscenes":
        from pipeline.data.toyscenes import ToyScenes

        return _toy_split(cfg, "train", cfg.data.num_images or 256, cfg.data.domains), ToyScenes().info
    raise FileNotFoundError(f"no shard set in {real_dir}; run `lumen expand` with this config first")


def _eval_splits(cfg: LumenConfig, run_dir: Path, progress: bool) -> tuple[list[Sample], list[Sample] | None]:
    """Validation data and the test data reported on (None: report on validation)."""
    p = cfg.perception
    if cfg.data.adapter == "toyscenes":
        domains = p.test_domains or cfg.data.domains
        val = _toy_split(cfg, "val", cfg.data.num_val_images or 64, domains)
        test = _toy_split(cfg, "test", p.num_test_images, domains) if p.report_split == "test" else None
        return list(val), test
    check_adapter_settings(cfg)
    size = tuple(cfg.data.image_size) if cfg.data.image_size else None
    quarantine = Quarantine(RunPaths(run_dir).quarantine)
    return list(collect_samples(cfg, size, quarantine, split="val", progress=progress)), None  # type: ignore[arg-type]


def _train_mapper_if_needed(cfg: LumenConfig, run_dir: Path, progress: bool) -> None:
    """A setting that generates from label maps trains its own semantic mapper first (once)."""
    from pipeline.lumen.expand_context import uses_mapper
    from pipeline.lumen.mapping import run_train_mapper

    saved = RunPaths(run_dir).mapper / cfg.mapper.input / "mapper.json"
    if uses_mapper(cfg) and cfg.generate.mapper is None and not saved.is_file():
        run_train_mapper(cfg, run_dir, progress)


def _train_controls_if_needed(cfg: LumenConfig, run_dir: Path, progress: bool) -> None:
    """A setting with class edits (``generate.class_edits``) finds its own class directions first (once;
    also the hardness weights when it uses them), unless it names a directions file."""
    from pipeline.lumen.controls import CONTROLS_FILE, run_train_controls

    edits = cfg.generate.class_edits
    if edits.classes and edits.file is None and not (RunPaths(run_dir).controls / CONTROLS_FILE).is_file():
        run_train_controls(cfg, run_dir, progress)


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


SubmitRun = Callable[[LumenConfig, Path, RunSpec, EvalInputs], Future[dict[str, Any]]]
"""Submits :func:`train_one` with these arguments (config, run folder, run spec, inputs), e.g. as a
Prefect task; returns its future."""


@dataclass
class EvaluateResult:
    """What the evaluate stage (or the gains study) did: ``summaries/<stage>.json`` is :meth:`as_dict`."""

    stage: str
    runs: int
    seconds: float
    report: str
    gains: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self, run_name: str) -> str:
        return (
            f"# {self.stage.capitalize()}: {run_name}\n\n{self.runs} training runs, {self.seconds:.0f} s. "
            f"Report: `{self.report}`\n\n" + markdown_table(self.gains)
        )


def train_one(cfg: LumenConfig, run_dir: Path, spec: RunSpec, inputs: EvalInputs) -> dict[str, Any]:
    """Train and evaluate one perception run of the protocol (or reuse its finished ``run.json``)."""
    from perception.protocol import run_one
    from pipeline.lumen.stages import parallel_settings

    return run_one(spec, inputs.real, inputs.val, inputs.synthetic, config=cfg.perception, info=inputs.info,
                   oracle=inputs.oracle, test=inputs.test, out_dir=RunPaths(run_dir).perception,
                   device=str(resolve_device(cfg.device)), parallel=parallel_settings(cfg))  # fmt: skip


def perception_runs(
    cfg: LumenConfig,
    run_dir: Path,
    progress: bool = True,
    submit: SubmitRun | None = None,
    tracker: TrackerFactory | None = None,
) -> tuple[EvalInputs, dict[str, Any]]:
    """Every perception run of a run folder's protocol: its inputs and ``{"protocol", "tasks", "runs"}``.

    Runs are made by ``submit`` (default: serially, in this process) and collected in plan order.
    """
    from perception.protocol import default_settings, plan_runs, protocol_summary
    from pipeline.report.gains import aggregate

    cfg = resolve_config(cfg)  # perception.tasks / report_split null: from the dataset
    inputs = evaluation_inputs(cfg, run_dir, progress=progress)
    settings = default_settings(cfg.perception)
    specs = plan_runs(cfg.perception, settings)
    submit = submit or (lambda *args: Deferred(lambda: train_one(*args)))
    futures = [submit(cfg, run_dir, spec, inputs) for spec in specs]
    bar = (tracker or tqdm_tracker(progress))(len(specs), "evaluate", "run")
    runs = []
    for fut in futures:
        runs.append(fut.result())
        bar.update()
    bar.close()
    protocol = protocol_summary(cfg.perception, settings)
    protocol["settings"] = setting_facts(cfg, inputs, _models(cfg, run_dir), settings)
    return inputs, {"protocol": protocol, "tasks": aggregate(runs, alpha=cfg.perception.alpha), "runs": runs}


def _result(stage: str, results: dict[str, Any], report_dir: Path, t0: float) -> EvaluateResult:
    return EvaluateResult(stage, len(results["runs"]), round(time.time() - t0, 1), str(report_dir / "report.md"),
                          gains_rows(dict(results["tasks"])))  # fmt: skip


def run_evaluate(
    cfg: LumenConfig,
    run_dir: Path,
    progress: bool = True,
    submit: SubmitRun | None = None,
    tracker: TrackerFactory | None = None,
) -> EvaluateResult:
    """Train ``perception.tasks`` models of every arm over the seeds and settings of the protocol,
    evaluate on the real test (or validation) split, and write ``run_dir/report``.

    Per-run logs and results go to ``run_dir/perception`` (an interrupted evaluation resumes there).
    """
    t0 = time.time()
    inputs, results = perception_runs(cfg, run_dir, progress, submit, tracker)
    report_dir = write_report(cfg, run_dir, results, inputs.real, inputs.synthetic, inputs.info)
    return _result("evaluate", results, report_dir, t0)


def run_gains(
    settings: Mapping[str, LumenConfig],
    cfg: LumenConfig,
    run_dir: Path,
    progress: bool = True,
    submit_chunk: SubmitChunk | None = None,
    submit: SubmitRun | None = None,
    tracker: TrackerFactory | None = None,
) -> EvaluateResult:
    """The gains study: per setting (``{name: its resolved config}``), expand when real+synthetic is an
    arm and run the perception arms in ``run_dir/<name>``; then one report over every setting in
    ``run_dir/report``."""
    from perception.judges import fit_judge
    from pipeline.lumen.expand import run_expand
    from pipeline.report.gains import aggregate
    from pipeline.runs import prepare_run_dir

    if not settings:
        raise ValueError("gains.settings is empty")
    t0 = time.time()
    runs: list[dict[str, Any]] = []
    protocol: dict[str, Any] = {}
    for name, scfg in settings.items():
        sdir = prepare_run_dir(scfg, RunPaths(run_dir).setting(name).root)
        log.info("gains setting %s: %s", name, sdir)
        if "real+synthetic" in scfg.perception.arms:
            _train_mapper_if_needed(scfg, sdir, progress)
            _train_controls_if_needed(scfg, sdir, progress)
            run_expand(scfg, sdir, progress, submit=submit_chunk, tracker=tracker, judge_factory=fit_judge)
        inputs, results = perception_runs(scfg, sdir, progress, submit, tracker)
        write_report(scfg, sdir, results, inputs.real, inputs.synthetic, inputs.info)
        single = len(results["protocol"]["settings"]) == 1
        for run in results["runs"]:
            runs.append({**run, "setting": name if single else f"{name}/{run['setting']}"})
        protocol = protocol or dict(results["protocol"], settings={})
        for sub, facts in results["protocol"]["settings"].items():
            protocol["settings"][name if single else f"{name}/{sub}"] = facts
    results = {"protocol": protocol, "tasks": aggregate(runs, alpha=cfg.perception.alpha), "runs": runs}
    report_dir = write_report(
        cfg, sdir, results, inputs.real, inputs.synthetic, inputs.info, RunPaths(run_dir).report
    )
    return _result("gains", results, report_dir, t0)
