"""Stage functions that turn a config into artefacts in a run folder (called by the CLI and the flows)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.config import LumenConfig, config_hash
from pipeline.data import Quarantine, build_dataset, iter_valid, resize_sample
from pipeline.data.memory import InMemoryDataset
from pipeline.data.sample import DatasetInfo, Sample, SampleSource
from pipeline.device import resolve_device
from pipeline.distributed import DataParallel, ParallelSettings, accelerator_of, launch
from pipeline.execution import progress_bar
from pipeline.io import sha256_file
from pipeline.lumen.base import BaseComponents, load_base
from pipeline.runs import RunPaths

if TYPE_CHECKING:
    from pipeline.lumen.train_base import BaseTrainSettings

__all__ = [
    "base_folder",
    "collect_samples",
    "fine_condition_maker",
    "generation_config",
    "generation_size",
    "load_run_base",
    "lumen_folder",
    "model_size",
    "parallel_settings",
    "run_distill",
    "run_reducer_path",
    "run_train_base",
    "run_train_lumen",
    "shipped_base",
    "shipped_reducer",
    "student_folder",
]

log = logging.getLogger(__name__)

RUN_BASE = "run/base"
"""Identity prefix of a base model trained in the run folder (``run/base@<unet sha256[:16]>``)."""


def collect_samples(
    cfg: LumenConfig,
    size: tuple[int, int],
    quarantine: Quarantine,
    split: str = "train",
    progress: bool = True,
    workers: int = 1,
) -> InMemoryDataset:
    """All valid samples of a split, resized to ``size`` = (H, W) (cover + centre crop), in memory.

    Memory is about ``N * size^2 * 20`` bytes with every label (image, seg, depth, normals). With
    ``workers > 1`` samples are loaded (rendered, for toy scenes) by that many processes, in chunks; the
    result and the quarantine are the same as a serial load's.
    """
    source = build_dataset(cfg.data, split)
    keys = list(source.keys())
    bar = progress_bar(total=len(keys), desc=f"load {source.info.name}", unit="img", enabled=progress)
    samples: list[Sample] = []
    if workers <= 1:
        for s in iter_valid(source, quarantine, stage=f"collect-{split}"):
            samples.append(resize_sample(s, size))
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        step = max(1, min(256, len(keys) // (4 * workers) or 1))
        chunks = [keys[i : i + step] for i in range(0, len(keys), step)]
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            jobs = [pool.submit(_load_chunk, cfg.data, split, chunk, size) for chunk in chunks]
            for job in jobs:
                loaded, bad = job.result()
                samples.extend(loaded)
                for rec in bad:
                    quarantine.add(**rec, stage=f"collect-{split}")
                bar.update(len(loaded) + len(bad))
    bar.close()
    if not samples:
        raise RuntimeError(f"no valid {split} images in {source.info.name}; see {quarantine.path}")
    return InMemoryDataset(samples, source.info)


def _load_chunk(
    data_cfg: Any, split: str, keys: list[str], size: tuple[int, int]
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Worker of :func:`collect_samples`: load, validate and resize ``keys``; bad ones as records."""
    from pipeline.data.sample import SampleError
    from pipeline.data.validate import validate_sample

    source = build_dataset(data_cfg, split)
    loaded, bad = [], []
    for key in keys:
        try:
            sample = source.load(key)
            validate_sample(sample, source.info)
        except SampleError as err:
            bad.append({"key": key, "reason": err.reason, "detail": err.detail, "file": err.file})
            continue
        loaded.append(resize_sample(sample, size))
    return loaded, bad


def run_train_base(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> Path:
    """Train the tiny base model on the run's training images and captions; returns ``run_dir/base``.

    With ``runner.devices`` (x ``runner.num_nodes``) above 1 it trains data-parallel
    (:mod:`pipeline.distributed`): ``base.batch_size`` and ``base.vae_batch_size`` are global batches.
    """
    if cfg.base.source != "tiny":
        raise ValueError(
            "train-base trains the tiny preset (base.source=tiny); a pretrained base needs no training"
        )
    return Path(launch(parallel_settings(cfg), _train_base, cfg, run_dir, progress))


def _train_base(parallel: DataParallel, cfg: LumenConfig, run_dir: Path, progress: bool) -> str:
    """One rank of :func:`run_train_base` (rank 0 loads the data first and records bad samples)."""
    from pipeline.lumen.train_base import train_base

    b = cfg.base
    size = (b.resolution, b.resolution)
    if cfg.data.image_size is not None and cfg.data.image_size[0] == b.resolution:
        size = (b.resolution, max(b.resolution, cfg.data.image_size[1]))  # wide: random square windows
    with parallel.main_first():
        quarantine = Quarantine(RunPaths(run_dir).quarantine if parallel.is_main else None)
        data = collect_samples(
            cfg, size, quarantine, progress=progress and parallel.is_main, workers=cfg.data.load_workers
        )
    images = np.stack([s.image for s in data])
    captions = [s.caption for s in data]
    from pipeline.lumen.base import PRESETS

    out = RunPaths(run_dir).base
    train_base(
        images, captions, out, base_train_settings(cfg), preset=PRESETS[b.preset], progress=progress,
        parallel=parallel,
    )  # fmt: skip
    if parallel.is_main:
        log.info("base model saved to %s", out)
    return str(out)


def base_train_settings(cfg: LumenConfig) -> BaseTrainSettings:
    """The base model's training hyper-parameters from ``cfg.base``."""
    from pipeline.lumen.train_base import BaseTrainSettings

    b = cfg.base
    return BaseTrainSettings(
        resolution=b.resolution,
        vae_steps=b.vae_steps,
        vae_batch_size=b.vae_batch_size,
        vae_crop=b.vae_crop or b.resolution,
        vae_lr=b.vae_learning_rate,
        edge_weight=b.vae_edge_weight,
        unet_steps=b.train_steps,
        batch_size=b.batch_size,
        unet_lr=b.learning_rate,
        ema_decay=b.ema_decay,
        checkpoint_every=b.checkpoint_every,
        seed=cfg.seed,
        device=str(resolve_device(cfg.device)),
        mixed_precision=b.mixed_precision,
    )


def generation_size(cfg: LumenConfig, base: BaseComponents) -> tuple[int, int]:
    """(H, W) at which the ControlNet trains and variants are generated: ``data.image_size`` (or the
    base resolution), which must be a multiple of the model's total downsampling."""
    h, w = cfg.data.image_size or (cfg.base.resolution, cfg.base.resolution)
    factor = base.vae_scale * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if h % factor or w % factor:
        raise ValueError(f"data.image_size={[h, w]} must be a multiple of {factor} for this base model")
    return h, w


def model_size(cfg: LumenConfig, base: BaseComponents) -> tuple[int, int]:
    """(H, W) at which the LUMEN model works (its conditions, ControlNet training and generation):
    ``lumen.supersample`` x :func:`generation_size`, a multiple of the model's total downsampling."""
    h, w = generation_size(cfg, base)
    k = cfg.lumen.supersample
    factor = base.vae_scale * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if (k * h) % factor or (k * w) % factor:
        raise ValueError(
            f"lumen.supersample={k} x {[h, w]} must be a multiple of {factor} for this base model"
        )
    return k * h, k * w


def generation_config(cfg: LumenConfig) -> LumenConfig:
    """The config variants are generated under: ``generate.supersample``, when set, replaces
    ``lumen.supersample`` (the factor the ControlNet was trained at), so that conditions are made and
    variants generated at that multiple of the labels' size. Everything else is ``cfg``."""
    k = cfg.generate.supersample
    if k is None or k == cfg.lumen.supersample:
        return cfg
    return cfg.model_copy(update={"lumen": cfg.lumen.model_copy(update={"supersample": k})})


def to_model_size(samples: Sequence[Sample], size: tuple[int, int]) -> list[Sample]:
    """Samples resized to the model's working size (a no-op for those already there)."""
    return [resize_sample(s, size) for s in samples]


class _Resized:
    """A sample source whose samples are resized to ``size`` (the PCA of a supersampled model is fitted on
    the upsampled images it will see)."""

    def __init__(self, source: SampleSource, size: tuple[int, int]) -> None:
        self.source, self.size, self.info = source, size, source.info

    def keys(self) -> list[str]:
        return self.source.keys()

    def load(self, key: str) -> Sample:
        return resize_sample(self.source.load(key), self.size)

    def __iter__(self) -> Iterator[Sample]:
        return (resize_sample(s, self.size) for s in self.source)

    def __len__(self) -> int:
        return len(self.source)


def load_run_base(cfg: LumenConfig, run_dir: Path) -> tuple[BaseComponents, str]:
    """The run's frozen base model and its identity (recorded in layout specs and provenance).

    ``base.pretrained`` for a pretrained base; for the tiny one ``run_dir/base`` if the run trained its
    own, else the shipped tiny base model when it fits the config (identity ``lumen-assets/tiny-base@<sha>``,
    the same on every machine, so layouts made elsewhere match; a run's own base is ``run/base@<sha>``,
    so a run folder can be moved or copied).
    """
    if cfg.base.source == "pretrained":
        if cfg.base.pretrained is None:  # checked by BaseModelConfig
            raise ValueError("base.pretrained is not set")
        return load_base(cfg.base.pretrained, local_files_only=cfg.base.local_files_only), cfg.base.pretrained
    folder = RunPaths(run_dir).base
    if RunPaths(run_dir).has_base():  # identity by content: the run folder may move
        digest = sha256_file(folder / "unet" / "diffusion_pytorch_model.safetensors")[:16]
        return load_base(folder), f"{RUN_BASE}@{digest}"
    shipped = shipped_base(cfg)
    if shipped is not None:
        log.info("using the shipped tiny base model %s (sha256-verified)", shipped)
        digest = sha256_file(shipped / "unet" / "diffusion_pytorch_model.safetensors")[:16]
        return load_base(shipped), f"lumen-assets/{shipped.name}@{digest}"
    raise FileNotFoundError(
        f"no base model in {folder} and no shipped one fits this config (data.adapter={cfg.data.adapter}, "
        f"base.resolution={cfg.base.resolution}); run `lumen train-base` with this config and --out first"
    )


def _asset_meta(name: str) -> dict[str, Any]:
    import json

    from pipeline.assets import ASSETS_DIR

    return dict(json.loads((ASSETS_DIR / name / "asset.json").read_text()))


def _lumen_asset_fits(cfg: LumenConfig, meta: dict[str, Any], base_name: str) -> bool:
    """Whether a shipped ControlNet was trained for this config: same base, data, condition, layouts."""
    lay = meta.get("config", {}).get("layouts", {})
    fits = (
        meta.get("base") == base_name
        and meta.get("adapter") == cfg.data.adapter
        and meta.get("resolution") == cfg.base.resolution
        and meta.get("condition") == cfg.lumen.condition
        and meta.get("config", {}).get("lumen", {}).get("supersample", 1) == cfg.lumen.supersample
    )
    if fits and cfg.lumen.condition == "layout":
        fits = (
            cfg.layouts.kind == lay.get("kind", "pca")
            and cfg.layouts.backbone == lay.get("backbone", "sd")
            and cfg.layouts.num_components == lay.get("num_components")
            and (cfg.layouts.layer or "up_blocks.1") == lay.get("layer", "up_blocks.1")
            and cfg.layouts.timestep == lay.get("timestep", 261)
        )
    size = meta.get("config", {}).get("data", {}).get("image_size")
    return fits and (size is None or cfg.data.image_size is None or list(cfg.data.image_size) == list(size))


def lumen_folder(cfg: LumenConfig, run_dir: Path) -> Path:
    """The run's trained ControlNet (``run_dir/lumen``), else a shipped one when the run uses the shipped
    base model it was trained over and its data, condition and layout settings match."""
    folder = RunPaths(run_dir).lumen
    if (folder / "lumen.json").is_file():
        return folder
    from pipeline.assets import asset_path, available_assets

    base = shipped_base(cfg) if not RunPaths(run_dir).has_base() else None
    if base is not None:
        for name in available_assets():
            meta = _asset_meta(name)
            if "condition" in meta and _lumen_asset_fits(cfg, meta, base.name):
                log.info("using the shipped LUMEN ControlNet %s (sha256-verified)", name)
                return asset_path(name)
    raise FileNotFoundError(
        f"no LUMEN ControlNet in {folder} and no shipped one fits this config; "
        "run `lumen train-lumen` with this config and --out first"
    )


def base_folder(base_id: str, run_dir: Path | None = None) -> Path:
    """The folder behind a base identity from :func:`load_run_base` (shipped assets and the run's own
    ``base/``, which needs ``run_dir``, included)."""
    if base_id.startswith(f"{RUN_BASE}@"):
        if run_dir is None:
            raise ValueError(f"{base_id!r} names a run's own base model: pass its run_dir")
        return RunPaths(run_dir).base
    if base_id.startswith("lumen-assets/"):
        from pipeline.assets import ASSETS_DIR

        return ASSETS_DIR / base_id.split("/", 1)[1].split("@", 1)[0]
    return Path(base_id)


def shipped_base(cfg: LumenConfig) -> Path | None:
    """A shipped tiny base model trained on this kind of data at this resolution (sha256-verified)."""
    from pipeline.assets import asset_path, available_assets

    if cfg.base.source != "tiny":
        return None
    for name in available_assets():
        meta = _asset_meta(name)
        if "condition" in meta:  # a ControlNet
            continue
        if meta.get("adapter") == cfg.data.adapter and meta.get("resolution") == cfg.base.resolution:
            return asset_path(name)
    return None


ConditionFn = Callable[[Sequence[Sample]], np.ndarray]


def condition_maker(
    cfg: LumenConfig,
    base: BaseComponents,
    base_id: str,
    fit_data: SampleSource,
    run_dir: Path,
    reducer_path: Path | None = None,
    device: torch.device | None = None,
) -> tuple[ConditionFn, dict[str, Any]]:
    """A function from samples to their (B, C, H, W) float16 conditions, and what defines them.

    ``layout``: the backbone is the base model's UNet (or ``layouts.backbone``); the PCA (or, for
    ``layouts.kind: clustered``, the proxy-mask k-means) is read from ``reducer_path`` (default: the
    run's ``pca.safetensors`` / ``kmeans.safetensors``) or fitted on ``fit_data`` and saved there; layouts
    are cached on disk under their spec hash (``RunPaths(run_dir).layouts``). Comparison conditions are
    computed from the labels; the random masks of ``seg_sparse`` are seeded per sample key, so they do not
    depend on how work is chunked.
    """
    from pipeline.conditions import CONDITIONS

    name = cfg.lumen.condition
    if name != "layout" and name not in CONDITIONS:
        raise ValueError(
            f"lumen.condition={name!r} has no ControlNet (valid: layout, {', '.join(CONDITIONS)})"
        )
    size = model_size(cfg, base)
    if name == "layout":
        make, meta = _layout_maker(cfg, base, base_id, fit_data, run_dir, reducer_path, device)
    else:
        make, meta = _label_maker(cfg, fit_data.info)
    if cfg.lumen.supersample == 1:
        return make, meta

    def at_model_size(samples: Sequence[Sample]) -> np.ndarray:  # lumen.supersample: upsampled first
        return make(to_model_size(samples, size))

    return at_model_size, {**meta, "supersample": cfg.lumen.supersample}


def fine_condition_maker(
    gen_cfg: LumenConfig,
    base: BaseComponents,
    base_id: str,
    fit_data: SampleSource,
    run_dir: Path,
    reducer_path: Path | None = None,
) -> ConditionFn | None:
    """``generate.layout_supersample``: a function from samples to the layouts made from them upsampled
    K times (the run's PCA as fitted, its layout cache under their own spec) and resized, antialiased, to
    the generation size of ``gen_cfg`` (:func:`generation_config`); None when it is off. The PCA must
    exist already (the run's usual condition maker fits it)."""
    from pipeline.lumen.generate import resize_tensor

    k = gen_cfg.generate.layout_supersample
    if k is None:
        return None
    if gen_cfg.lumen.condition != "layout":
        raise ValueError(
            f"generate.layout_supersample needs layout conditions, not {gen_cfg.lumen.condition!r}"
        )
    if k == gen_cfg.lumen.supersample:
        raise ValueError(f"generate.layout_supersample={k} is the generation's own factor: nothing to refine")
    fine_cfg = gen_cfg.model_copy(update={"lumen": gen_cfg.lumen.model_copy(update={"supersample": k})})
    reducer = reducer_path or run_reducer_path(gen_cfg, run_dir)
    make, _ = condition_maker(fine_cfg, base, base_id, fit_data, run_dir, reducer_path=reducer)
    size = model_size(gen_cfg, base)

    def at_generation_size(samples: Sequence[Sample]) -> np.ndarray:
        fine = torch.from_numpy(np.asarray(make(samples), dtype=np.float32))
        return resize_tensor(fine, size).numpy()

    return at_generation_size


def run_reducer_path(cfg: LumenConfig, run_dir: Path) -> Path:
    """The run's own PCA (``pca.safetensors``) or, for ``layouts.kind: clustered``, its k-means."""
    paths = RunPaths(run_dir)
    return paths.kmeans if cfg.layouts.kind == "clustered" else paths.pca


def _layout_maker(
    cfg: LumenConfig,
    base: BaseComponents,
    base_id: str,
    fit_data: SampleSource,
    run_dir: Path,
    reducer_path: Path | None,
    device: torch.device | None = None,
) -> tuple[ConditionFn, dict[str, Any]]:
    """:func:`condition_maker` for ``layout``: backbone, the run's PCA or k-means (fitted once),
    extractor, cache."""
    from pipeline.layouts import LayoutCache, build_backbone, build_extractor, fit_or_load_reducer

    device = device or resolve_device(cfg.device)
    backbone = build_backbone(cfg.layouts, device=device, components=base, model_id=base_id)
    reducer_path = reducer_path or run_reducer_path(cfg, run_dir)
    size = model_size(cfg, base)
    fit_on = fit_data if cfg.lumen.supersample == 1 else _Resized(fit_data, size)
    reducer = fit_or_load_reducer(
        reducer_path, backbone, fit_on, cfg.layouts, metadata={"config_hash": config_hash(cfg)}
    )
    extractor = build_extractor(cfg.layouts, backbone, reducer, size=size)
    cache = LayoutCache(RunPaths(run_dir).layouts, extractor.spec()) if cfg.layouts.cache else None

    def layouts(samples: Sequence[Sample]) -> np.ndarray:
        out = extractor.layouts_for(list(samples), cache=cache, batch_size=cfg.layouts.batch_size)
        return np.stack(out).astype(np.float16)

    digest = "kmeans_sha256" if cfg.layouts.kind == "clustered" else "pca_sha256"
    return layouts, {"layout": extractor.spec(), digest: sha256_file(reducer_path)}


def shipped_reducer(cfg: LumenConfig, cn_folder: Path) -> Path | None:
    """The PCA (or k-means) saved beside a ControlNet, as shipped assets carry it; None if absent (then
    the run's own is used)."""
    from pipeline.layouts import reducer_file

    path = cn_folder / reducer_file(cfg.layouts)
    return path if path.is_file() else None


def _label_maker(cfg: LumenConfig, info: DatasetInfo) -> tuple[ConditionFn, dict[str, Any]]:
    """:func:`condition_maker` for a comparison condition computed from the labels (seg, edges, ...)."""
    from pipeline.conditions import CONDITIONS

    name = cfg.lumen.condition
    fn = CONDITIONS[name]
    kw = {"min_share": cfg.lumen.sparse_min_share, "max_share": cfg.lumen.sparse_max_share}

    def labels(samples: Sequence[Sample]) -> np.ndarray:
        rngs = [
            np.random.default_rng([cfg.seed, int(hashlib.sha256(s.key.encode()).hexdigest()[:8], 16)])
            for s in samples
        ]
        return np.stack([fn(s, info, rng, **kw) for s, rng in zip(samples, rngs, strict=True)]).astype(
            np.float16
        )

    return labels, {"condition_params": kw if name == "seg_sparse" else {}}


def parallel_settings(cfg: LumenConfig) -> ParallelSettings:
    """The data-parallel job of the config's ``runner`` (devices, nodes, strategy) on its ``device``."""
    r = cfg.runner
    return ParallelSettings(r.devices, r.num_nodes, r.strategy, accelerator_of(cfg.device))


def run_train_lumen(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> Path:
    """Train the LUMEN ControlNet (or a comparison condition) on the run's images; returns ``run_dir/lumen``.

    With ``runner.devices`` (x ``runner.num_nodes``) above 1 it trains data-parallel
    (:mod:`pipeline.distributed`): ``lumen.batch_size`` is then the global batch.
    """
    return Path(launch(parallel_settings(cfg), _train_lumen, cfg, run_dir, progress))


def _train_lumen(parallel: DataParallel, cfg: LumenConfig, run_dir: Path, progress: bool) -> str:
    """One rank of :func:`run_train_lumen`. Rank 0 loads the data and makes the conditions first (it
    fits the reducer and fills the layout cache, and records bad samples); the other ranks then read
    what it saved."""
    from pipeline.lumen.controlnet import ControlTrainSettings, LumenTrainer, build_controlnet

    main = parallel.is_main
    with parallel.main_first():
        base, base_id = load_run_base(cfg, run_dir)
        quarantine = Quarantine(RunPaths(run_dir).quarantine if main else None)
        data = collect_samples(  # at the model's size: lumen.supersample upsamples them
            cfg, model_size(cfg, base), quarantine, progress=progress and main, workers=cfg.data.load_workers,
        )  # fmt: skip
        make, cond_meta = condition_maker(cfg, base, base_id, data, run_dir, device=parallel.device)
        conds = make(list(data))
    images = np.stack([s.image for s in data])
    captions = [s.caption for s in data]
    lc = cfg.lumen
    settings = ControlTrainSettings(
        steps=lc.train_steps, batch_size=lc.batch_size, grad_accum=lc.grad_accum, lr=lc.learning_rate,
        empty_prompt_prob=lc.empty_prompt_prob, mixed_precision=lc.mixed_precision,
        checkpoint_every=lc.checkpoint_every, validate_every=lc.validate_every, seed=cfg.seed,
    )  # fmt: skip
    trainer = LumenTrainer(
        base, build_controlnet(base, conds.shape[1], seed=cfg.seed), RunPaths(run_dir).lumen_train, settings,
        device=resolve_device(cfg.device), parallel=parallel,
    )  # fmt: skip
    trainer.fit(
        images, conds, captions, validation=(conds[:4].astype(np.float32), captions[:4]), progress=progress
    )
    out = RunPaths(run_dir).lumen
    if not main:
        parallel.barrier()  # rank 0 saves the model
        return str(out)
    card = {
        "condition": lc.condition,
        "channels": int(conds.shape[1]),
        "base_model": base_id,
        "dataset": data.info.card(),
        "config_hash": config_hash(cfg),
        "size": list(model_size(cfg, base)),
        **cond_meta,
    }
    trainer.save(out, card)
    log.info("LUMEN ControlNet saved to %s", out)
    parallel.barrier()
    return str(out)


def _round_name(cfg: LumenConfig, steps: int) -> str:
    return "guidance" if steps == cfg.distill.teacher_steps else f"steps-{steps:03d}"


def student_folder(cfg: LumenConfig, run_dir: Path) -> Path | None:
    """The distilled student ``generate.model`` names (None for ``lumen``): the run's student for
    ``generate.steps`` (``student``) or a saved student's folder. Raises :class:`ConfigError` when it does
    not fit the generation settings, FileNotFoundError when the run's student is not distilled yet."""
    from pipeline.lumen.distill import STUDENT_CARD
    from pipeline.preflight import check_student_settings

    g = cfg.generate
    if g.model == "lumen":
        return None
    check_student_settings(cfg)
    if g.model != "student":
        return Path(g.model)
    folder = RunPaths(run_dir).distill / _round_name(cfg, g.steps) / "student"
    if not (folder / STUDENT_CARD).is_file():
        raise FileNotFoundError(
            f"generate.model=student: no {g.steps}-step student in {folder.parent}; "
            "run `lumen distill CONFIG --out RUN` first"
        )
    return folder


def run_distill(cfg: LumenConfig, run_dir: Path, progress: bool = True) -> dict[int, Path]:
    """Distil the run's generator (base model + LUMEN ControlNet, its own or a shipped one) into few-step
    students on the run's images and conditions; returns {steps: student folder} under ``run_dir/distill``.
    Resumable: a saved round is reused, an interrupted one resumes from its latest checkpoint."""
    from diffusers import ControlNetModel

    from pipeline.lumen.distill import STUDENT_CARD, Distiller, DistillSettings

    saved = {
        n: RunPaths(run_dir).distill / _round_name(cfg, n) / "student" for n in cfg.distill.student_steps()
    }
    if all((folder / STUDENT_CARD).is_file() for folder in saved.values()):
        log.info("every student is already distilled: %s", RunPaths(run_dir).distill)
        return saved
    base, base_id = load_run_base(cfg, run_dir)
    cn_folder = lumen_folder(cfg, run_dir)
    card = json.loads((cn_folder / "lumen.json").read_text())
    controlnet = ControlNetModel.from_pretrained(cn_folder, torch_dtype=torch.float32).eval()
    data = collect_samples(
        cfg, model_size(cfg, base), Quarantine(RunPaths(run_dir).quarantine), progress=progress,
        workers=cfg.data.load_workers,
    )  # fmt: skip
    make, _ = condition_maker(cfg, base, base_id, data, run_dir, reducer_path=shipped_reducer(cfg, cn_folder))
    conds = make(list(data)).astype(np.float32)
    if conds.shape[1] != controlnet.config.conditioning_channels:
        raise ValueError(f"conditions have {conds.shape[1]} channels, the ControlNet takes "
                         f"{controlnet.config.conditioning_channels} ({cn_folder})")  # fmt: skip
    images = np.stack([s.image for s in data])
    captions = [s.caption for s in data]
    d = cfg.distill
    settings = DistillSettings(
        teacher_steps=d.teacher_steps, min_steps=d.min_steps, guidance_range=(d.guidance_min, d.guidance_max),
        guidance_train_steps=d.guidance_train_steps, round_train_steps=d.round_train_steps,
        batch_size=d.batch_size, lr=d.learning_rate, checkpoint_every=d.checkpoint_every, seed=cfg.seed,
    )  # fmt: skip
    distiller = Distiller(
        base, controlnet, RunPaths(run_dir).distill, settings, device=resolve_device(cfg.device)
    )
    lineage = {"teacher": {"base": base_id, "controlnet": str(cn_folder), "condition": card.get("condition")},
               "config_hash": config_hash(cfg)}  # fmt: skip
    students = distiller.fit(
        images, conds, captions, lineage=lineage, validation=(conds[:4], captions[:4]), progress=progress
    )
    log.info("distilled students: %s", {k: str(v) for k, v in students.items()})
    return students
