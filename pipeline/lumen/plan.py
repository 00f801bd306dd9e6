"""What a run will do, before it runs: the models it trains, what it generates, the shards it writes.

:func:`models_to_train` is the asset policy of ``lumen run``. :func:`plan_run` is the dry run behind
``lumen plan``: the dataset's counts (the adapter's key listing), the optimisation steps and images seen
of every model the run trains, the generation work, the shard files and their bytes (a few real samples
encoded exactly as the shard writer encodes them, scaled), and the data-parallel layout. It reads the
config and at most :data:`MEASURED_SAMPLES` samples; it loads no model weights and trains nothing.

Example::

    plan = plan_run(load_config("configs/demo.yaml"))
    print(plan.table())          # or json.dumps(plan.as_dict())
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TASKS, ConfigError, LumenConfig, ShardConfig, config_hash
from pipeline.runs import RunPaths

__all__ = [
    "MEASURED_SAMPLES",
    "PNG_RATIO",
    "SEG_RATIO",
    "DatasetPlan",
    "GainsPlan",
    "GenerationPlan",
    "ParallelPlan",
    "RunPlan",
    "ShardSetPlan",
    "TrainingPlan",
    "analytic_sample_bytes",
    "generation_size",
    "models_to_train",
    "plan_gains",
    "plan_run",
    "shard_layout",
]

log = logging.getLogger(__name__)

MEASURED_SAMPLES = 4
"""Real samples loaded and encoded to measure the bytes of a shard sample."""

_TAR_END = 2 * tarfile.BLOCKSIZE
"""The end-of-archive blocks the writer reserves in every shard (``pipeline.shards.writer``)."""

PNG_RATIO = 2
"""Analytic bytes: an image PNG holds about raw/2 (8-bit RGB photographs, zlib level 3)."""
SEG_RATIO = 8
"""Analytic bytes: a label-map PNG holds about raw/8 (flat regions; CamVid at 512x512 measures raw/32)."""
LOSSY_RATIO = 8
"""Analytic bytes: a jpg (or lossy webp) at quality 95 holds about raw/8."""
JSON_BYTES = {"real": 1024, "synthetic": 2048}
"""Analytic bytes of a sample's provenance record (a synthetic one adds prompt, models, layout spec)."""
KEY_CHARS = 32
"""Analytic key length (``folder-<stem>``); a key longer than about 90 characters adds PAX headers."""


def models_to_train(cfg: LumenConfig, run_dir: Path) -> tuple[bool, bool]:
    """Whether the run has to train its base model and its ControlNet: not when the run folder holds
    them or a shipped one fits the config; a newly trained base model always needs its own ControlNet."""
    from pipeline.lumen.stages import lumen_folder, shipped_base

    base = cfg.base.source == "tiny" and not RunPaths(run_dir).has_base() and shipped_base(cfg) is None
    try:
        lumen_folder(cfg, run_dir)
        lumen = base
    except FileNotFoundError:
        lumen = True
    return base, lumen


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetPlan:
    """The data a run reads. Counts are None when the dataset cannot be listed here."""

    adapter: str
    root: str | None
    train_images: int | None
    val_images: int | None
    image_size: tuple[int, int] | None  # data.image_size (None: each image's own size)
    labels: tuple[str, ...]  # seg, depth, normal: listed by the adapter, or assumed
    counted: str  # where the counts come from: the adapter, --images, or why they are unknown


@dataclass(frozen=True)
class TrainingPlan:
    """One model the run trains (or ``runs`` identical training runs of one, e.g. a perception arm)."""

    model: str
    steps: int  # optimisation steps per run
    batch: int  # images per optimisation step, every process together (x gradient accumulation)
    micro_batch: int  # images per forward pass, every process together
    runs: int
    images_seen: int  # steps x batch x runs
    data_parallel: bool  # split over runner.devices x runner.num_nodes processes (RunnerConfig.devices)
    per_device_batch: int | None  # micro_batch / world size; None: it does not divide
    note: str = ""


@dataclass(frozen=True)
class GenerationPlan:
    """The synthetic variants ``expand`` generates."""

    model: str  # generate.model: lumen (base + ControlNet), student, or a student folder
    source: str  # generate.source: images or labels
    source_images: int | None  # images (or label maps) variants are made from
    variants: int  # per source image
    synthetic_samples: int | None  # source_images x variants (before any quality filter)
    size: tuple[int, int]  # (H, W) of generation and of both shard sets
    size_multiple: int  # the base model's total downsampling; size must be a multiple of it
    sampler: str
    steps: int
    passes_per_step: int  # UNet evaluations per step: 2 with classifier-free guidance, 3 with layout_guidance
    evaluations: int | None  # synthetic_samples x candidates x steps x passes_per_step
    chunk_size: int
    chunks: int | None  # resumable units of work (generate.chunk_size source images each)
    supersample: int = 1  # generated at supersample x size, then downsampled (generate. or lumen.supersample)
    candidates: int = 1  # generate.candidates: generated per variant, the best kept by layout agreement
    controlnet_passes_per_step: int = 0  # of passes_per_step, those that run the ControlNet too
    latent_size: tuple[int, int] | None = None  # (h, w) of the latents every evaluation works on


@dataclass(frozen=True)
class ShardSetPlan:
    """One WebDataset shard set (``shards/real`` or ``shards/synthetic``)."""

    name: str
    samples: int | None
    bytes_per_sample: int  # tar bytes of one sample (headers and padding included)
    bytes_from: str  # measured (on how many samples) or analytic (under which assumptions)
    samples_per_shard: int
    shards: int | None
    bytes: int | None  # every shard file, end-of-archive padding included


@dataclass(frozen=True)
class ParallelPlan:
    """Where the work runs: the data-parallel training layout and the Prefect task runner."""

    devices: int  # runner.devices: processes (accelerators) per node
    num_nodes: int  # runner.num_nodes
    strategy: str  # runner.strategy: auto | ddp | ddp_spawn
    world_size: int  # devices x num_nodes
    runner: str  # runner.kind: thread | dask
    max_workers: int
    gpu_concurrency: int


@dataclass(frozen=True)
class RunPlan:
    """What ``lumen run`` of a config will do and produce (:func:`plan_run`)."""

    name: str
    config_hash: str
    run_dir: str | None  # None: a new run folder
    dataset: DatasetPlan
    training: tuple[TrainingPlan, ...]
    reused: tuple[str, ...]  # the generator models the run does not train, and where they come from
    generation: GenerationPlan
    shards: tuple[ShardSetPlan, ...]
    parallel: ParallelPlan
    notes: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        data: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return data

    def table(self) -> str:
        """The plan as aligned text tables, for a terminal."""
        return _render(self)


def plan_run(cfg: LumenConfig, run_dir: Path | None = None, images: int | None = None) -> RunPlan:
    """What ``lumen run`` of ``cfg`` in ``run_dir`` (None: a new run folder) will do and produce.

    Args:
        cfg: the run's config.
        run_dir: an existing run folder (the models it holds are not trained again), or None.
        images: the number of images the dataset holds, when it cannot be listed here (or to plan for
            another size); ``data.num_images`` still caps it, as in a run.

    Raises:
        ConfigError: the dataset cannot be opened for a reason other than a missing ``data.root``.
    """
    notes: list[str] = []
    # 1. The dataset: counts from the adapter's key listing (or --images), a few samples for the bytes.
    dataset, source = _plan_dataset(cfg, images, notes)
    cfg = _resolved(cfg, dataset, notes)
    # 2. The generator's size and the generation work.
    size, multiple = generation_size(cfg, notes)
    generation = _plan_generation(cfg, dataset, size, multiple)
    # 3. The models to train, and how their batches split over the processes.
    parallel = _plan_parallel(cfg)
    folder = run_dir if run_dir is not None else Path(tempfile.gettempdir(), f"lumen-plan-{uuid.uuid4().hex}")
    training = _plan_training(cfg, folder, parallel.world_size, notes)
    reused = _reused(cfg, folder, training)
    # 4. Shards: per-sample bytes measured on a few real samples (else analytic), scaled by the counts.
    shards = _plan_shards(cfg, dataset, generation, source, notes)
    return RunPlan(
        name=cfg.name,
        config_hash=config_hash(cfg),
        run_dir=str(run_dir) if run_dir is not None else None,
        dataset=dataset,
        training=training,
        reused=reused,
        generation=generation,
        shards=shards,
        parallel=parallel,
        notes=tuple(notes),
    )


def _total(values: list[int | None]) -> int | None:
    """The sum, or None when any part is unknown."""
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


@dataclass(frozen=True)
class GainsPlan:
    """What ``lumen gains`` of a config will do: one :class:`RunPlan` per setting (each setting is a run
    of its own in ``<out>/<setting>``), and their totals."""

    settings: dict[str, RunPlan]

    def totals(self) -> dict[str, int | None]:
        """Synthetic samples, generation evaluations, images seen in training, shard files and bytes,
        over every setting (None where a count is unknown)."""
        plans = list(self.settings.values())
        shards = [s for p in plans for s in p.shards]
        return {
            "settings": len(plans),
            "synthetic_samples": _total([p.generation.synthetic_samples for p in plans]),
            "evaluations": _total([p.generation.evaluations for p in plans]),
            "training_runs": sum(t.runs for p in plans for t in p.training),
            "images_seen": sum(t.images_seen for p in plans for t in p.training),
            "shards": _total([s.shards for s in shards]),
            "bytes": _total([s.bytes for s in shards]),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"settings": {name: p.as_dict() for name, p in self.settings.items()}, "totals": self.totals()}

    def table(self) -> str:
        parts = [f"=== setting {name} ===\n{p.table()}" for name, p in self.settings.items()]
        t = self.totals()
        total = (
            f"=== all {t['settings']} setting(s) of `lumen gains` ===\n"
            f"  synthetic samples   {_n(t['synthetic_samples'])}\n"
            f"  evaluations         {_n(t['evaluations'])}\n"
            f"  training runs       {_n(t['training_runs'])} (images seen {_n(t['images_seen'])})\n"
            f"  shard files         {_n(t['shards'])} ({_bytes(t['bytes'])})"
        )
        return "\n\n".join([*parts, total])


def plan_gains(
    settings: Mapping[str, LumenConfig], out: Path | None = None, images: int | None = None
) -> GainsPlan:
    """:func:`plan_run` of every setting of a gains study (:func:`pipeline.config.gains_setting_configs`);
    ``out`` is the study's folder, whose ``<setting>`` run folders are reused when they exist."""
    plans = {}
    for name, cfg in settings.items():
        folder = out / name if out is not None and (out / name).is_dir() else None
        plans[name] = plan_run(cfg, folder, images=images)
    return GainsPlan(plans)


# --------------------------------------------------------------------------------------------------
# 1. Dataset
# --------------------------------------------------------------------------------------------------


def _plan_dataset(cfg: LumenConfig, images: int | None, notes: list[str]) -> tuple[DatasetPlan, Any]:
    """The dataset's counts and labels, and its training source (None when it cannot be opened)."""
    from pipeline.data import build_dataset

    d = cfg.data
    root = str(d.root) if d.root is not None else None
    if d.root is not None and not d.root.exists():
        train, why = None, f"root {d.root} not found; --images N plans for N images"
    else:
        train, why = build_dataset(d, "train"), "listed by the adapter"
    val: int | None = None
    if train is not None:
        try:
            val = len(build_dataset(d, "val").keys())
        except ConfigError as err:
            notes.append(f"no val split: {err}")
    n_train = len(train.keys()) if train is not None else None
    if images is not None:
        n_train, n_val = _counts_from_option(cfg, images)
        val = val if train is not None else n_val
        why = f"from --images {images}"
        if d.num_images is not None and images > d.num_images:
            notes.append(
                f"data.num_images={d.num_images} caps the {images} images to {d.num_images}; "
                "pass data.num_images=null to plan for all of them"
            )
    if train is not None:
        labels = tuple(train.info.labels)
    else:
        labels = _assumed_labels(cfg)
        notes.append(
            f"labels assumed {list(labels)} (perception.tasks, else seg when data.classes is set): "
            "the dataset cannot be read here"
        )
    plan = DatasetPlan(d.adapter, root, n_train, val, d.image_size, labels, why)
    return plan, train


def _counts_from_option(cfg: LumenConfig, images: int) -> tuple[int, int | None]:
    """(train, val) of a dataset of ``images`` images, split and capped as the adapter would."""
    d = cfg.data
    train, val = images, None
    if d.adapter == "folder" and d.val_image_dir is None and d.val_fraction is not None:
        val = max(1, round(images * d.val_fraction))  # a hash share: about the fraction
        train = images - val
    if d.num_images is not None:
        train = min(train, d.num_images)
    if val is not None and d.num_val_images is not None:
        val = min(val, d.num_val_images)
    return train, val


def _assumed_labels(cfg: LumenConfig) -> tuple[str, ...]:
    if cfg.perception.tasks is not None:
        return tuple(cfg.perception.tasks)
    return ("seg",) if cfg.data.classes else ()


def _resolved(cfg: LumenConfig, dataset: DatasetPlan, notes: list[str]) -> LumenConfig:
    """``perception.tasks: null`` becomes the dataset's labels, as at the start of a run."""
    if cfg.perception.tasks is not None:
        return cfg
    tasks = [t for t in TASKS if t in dataset.labels]
    if not tasks:
        notes.append("perception.tasks: null and no labels known: perception runs counted for seg")
        tasks = ["seg"]
    return cfg.model_copy(update={"perception": cfg.perception.model_copy(update={"tasks": tasks})})


# --------------------------------------------------------------------------------------------------
# 2. Generation
# --------------------------------------------------------------------------------------------------


def generation_size(cfg: LumenConfig, notes: list[str] | None = None) -> tuple[tuple[int, int], int]:
    """((H, W), multiple) without loading the base model: ``data.image_size`` (or the base resolution),
    and the base model's total downsampling (VAE x UNet), of which the size must be a multiple.

    The analytic twin of :func:`pipeline.lumen.stages.generation_size`: the tiny presets' block counts,
    a pretrained model's ``vae/`` and ``unet/`` ``config.json`` when it is a local folder, else the
    Stable Diffusion 1.x/2.x architecture (8x VAE, 4 UNet levels: 64).
    """
    h, w = cfg.data.image_size or (cfg.base.resolution, cfg.base.resolution)
    vae_levels, unet_levels = _levels(cfg, notes if notes is not None else [])
    multiple = 2 ** (vae_levels - 1) * 2 ** (unet_levels - 1)
    k = cfg.lumen.supersample
    if ((k * h) % multiple or (k * w) % multiple) and notes is not None:
        notes.append(
            f"PROBLEM: data.image_size={[h, w]} x lumen.supersample={k} is not a multiple of {multiple} for "
            "this base model: train-lumen and expand will refuse it"
        )
    return (h, w), multiple


def _levels(cfg: LumenConfig, notes: list[str]) -> tuple[int, int]:
    """Resolution levels of the base model's VAE and UNet (len of their block_out_channels)."""
    if cfg.base.source == "tiny":
        from pipeline.lumen.base import PRESETS

        preset = PRESETS[cfg.base.preset]
        return len(preset["vae"]["block_out_channels"]), len(preset["unet"]["block_out_channels"])
    folder = Path(str(cfg.base.pretrained))
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        return len(vae["block_out_channels"]), len(unet["block_out_channels"])
    except (OSError, ValueError, KeyError):
        notes.append(
            f"base.pretrained={cfg.base.pretrained} is not a local folder here: the Stable Diffusion "
            "1.x/2.x architecture is assumed (8x VAE, 4 UNet levels: sizes in multiples of 64)"
        )
        return 4, 4


def _plan_generation(
    cfg: LumenConfig, dataset: DatasetPlan, size: tuple[int, int], multiple: int
) -> GenerationPlan:
    g = cfg.generate
    sources = _source_images(cfg, dataset.train_images)
    synthetic = None if sources is None else sources * g.variants
    student = g.model != "lumen"  # guidance-distilled: w is an input, one pass per step
    guided = g.guidance_scale > 1 and not student
    # condition guidance: the unconditional row runs without the ControlNet; layout_guidance adds a row
    # (the prompt, without the ControlNet) to the two
    three = guided and g.condition_guidance and g.layout_guidance is not None
    passes = 3 if three else 2 if guided else 1
    controlnet_passes = 1 if guided and g.condition_guidance else passes
    k = cfg.generate.supersample or cfg.lumen.supersample
    vae_factor = 2 ** (_levels(cfg, [])[0] - 1)
    latent = (k * size[0] // vae_factor, k * size[1] // vae_factor)
    return GenerationPlan(
        model=g.model, source=g.source, source_images=sources, variants=g.variants,
        synthetic_samples=synthetic, size=size, size_multiple=multiple, sampler=g.scheduler,
        steps=g.steps, passes_per_step=passes,
        evaluations=None if synthetic is None else synthetic * g.candidates * g.steps * passes,
        chunk_size=g.chunk_size, chunks=None if sources is None else math.ceil(sources / g.chunk_size),
        supersample=k, candidates=g.candidates, controlnet_passes_per_step=controlnet_passes,
        latent_size=latent,
    )  # fmt: skip


def _source_images(cfg: LumenConfig, train: int | None) -> int | None:
    """Images (or label maps) variants are made from, as ``expand`` lists them (expand_context)."""
    g = cfg.generate
    if g.source == "images":  # the real images, and the edited maps of each when edited_per_map > 0
        return None if train is None else train * (1 + g.edited_per_map)
    if g.label_dir is not None:
        maps: int | None = len(list(Path(g.label_dir).glob("*.png"))) if Path(g.label_dir).is_dir() else None
    else:
        maps = train
    return None if maps is None else maps * (int(g.keep_unedited) + g.edited_per_map)


def _real_samples(cfg: LumenConfig, train: int | None) -> int | None:
    """Samples of the real shard set: the training images (none for a folder of label maps)."""
    return 0 if cfg.generate.source == "labels" and cfg.generate.label_dir is not None else train


# --------------------------------------------------------------------------------------------------
# 3. Training and the data-parallel layout
# --------------------------------------------------------------------------------------------------


def _plan_parallel(cfg: LumenConfig) -> ParallelPlan:
    r = cfg.runner
    devices = int(getattr(r, "devices", 1))
    nodes = int(getattr(r, "num_nodes", 1))
    return ParallelPlan(
        devices=devices, num_nodes=nodes, strategy=str(getattr(r, "strategy", "auto")),
        world_size=devices * nodes, runner=r.kind, max_workers=r.max_workers,
        gpu_concurrency=r.gpu_concurrency,
    )  # fmt: skip


def _training(
    model: str,
    steps: int,
    micro: int,
    world: int,
    *,
    accum: int = 1,
    runs: int = 1,
    parallel: bool = False,
    note: str = "",
) -> TrainingPlan:
    per_device = micro if not parallel else (micro // world if micro % world == 0 else None)
    batch = micro * accum
    return TrainingPlan(model, steps, batch, micro, runs, steps * batch * runs, parallel, per_device, note)


def _plan_training(cfg: LumenConfig, run_dir: Path, world: int, notes: list[str]) -> tuple[TrainingPlan, ...]:
    """Every model ``lumen run`` trains, in the order it trains them (flows/stages.py: ``_run``)."""
    from pipeline.lumen.expand_context import uses_mapper

    out: list[TrainingPlan] = []
    train_base, train_lumen = models_to_train(cfg, run_dir)
    b, ln, g = cfg.base, cfg.lumen, cfg.generate
    if train_base:
        crop = f"{b.vae_crop}px crops" if b.vae_crop else "full images"
        out.append(_training("base VAE", b.vae_steps, b.vae_batch_size, world, parallel=True, note=crop))
        out.append(_training("base UNet + text encoder", b.train_steps, b.batch_size, world, parallel=True))
    if train_lumen:
        out.append(_training("ControlNet", ln.train_steps, ln.batch_size, world, accum=ln.grad_accum,
                             parallel=True, note=f"condition {ln.condition}"))  # fmt: skip
    if g.model == "student":
        d = cfg.distill
        rounds = d.student_steps()
        steps = d.guidance_train_steps + (len(rounds) - 1) * d.round_train_steps
        halvings = " -> ".join(map(str, rounds[1:]))
        note = f"{len(rounds)} rounds: guidance at {rounds[0]} steps, then {halvings}"
        out.append(_training("distilled students", steps, d.batch_size, world, note=note))
    if uses_mapper(cfg) and g.mapper is None:
        out.append(_training("semantic mapper", cfg.mapper.train_steps, cfg.mapper.batch_size, world,
                             note=f"input {cfg.mapper.input}"))  # fmt: skip
    if g.class_edits.classes and g.class_edits.file is None:
        c = cfg.controls
        out.append(_training("class directions", c.train_steps, c.batch_size, world, note="image pairs"))
    out += _perception(cfg, world)
    for t in out:
        if t.data_parallel and t.per_device_batch is None:
            notes.append(
                f"PROBLEM: the {t.model} batch of {t.micro_batch} does not divide over {world} processes "
                "(runner.devices x runner.num_nodes): make it a multiple"
            )
    return tuple(out)


def _reused(cfg: LumenConfig, run_dir: Path, training: tuple[TrainingPlan, ...]) -> tuple[str, ...]:
    """The base model and ControlNet the run uses without training them, and where they come from."""
    from pipeline.lumen.stages import lumen_folder, shipped_base

    trained = {t.model for t in training}
    out = []
    if "base UNet + text encoder" not in trained:
        if cfg.base.source == "pretrained":
            out.append(f"base model: {cfg.base.pretrained} (pretrained)")
        elif RunPaths(run_dir).has_base():
            out.append(f"base model: {RunPaths(run_dir).base} (the run's own)")
        elif (shipped := shipped_base(cfg)) is not None:
            out.append(f"base model: shipped {shipped.name}")
    if "ControlNet" not in trained:
        from pipeline.assets import ASSETS_DIR

        folder = lumen_folder(cfg, run_dir)
        out.append(f"ControlNet: {'shipped ' + folder.name if folder.parent == ASSETS_DIR else folder}")
    return tuple(out)


_ARMS = ("real", "real+augment", "real+oracle", "real+synthetic")
"""Perception arms in the order the protocol trains them (perception/protocol.py: ``plan_runs``)."""


def _perception(cfg: LumenConfig, world: int) -> list[TrainingPlan]:
    """One row per arm: settings x seeds x task groups runs of ``perception.steps`` each."""
    p = cfg.perception
    settings = int(p.low_label_fraction is not None and p.low_label_fraction < 1)
    settings += int(p.full_setting or settings == 0)
    groups = 1 if p.multitask else len(p.tasks or ())
    runs = settings * len(p.seeds) * groups
    extra = round(p.batch_size * p.extra_ratio) if p.mixing == "additive" else 0
    tasks = "+".join(p.tasks or ()) if p.multitask else ", ".join(p.tasks or ())
    arms = [a for a in _ARMS if a == "real" or a in p.arms]
    return [
        _training(
            f"perception {arm}", p.steps, p.batch_size + (extra if arm != "real" else 0), world, runs=runs,
            parallel=True,
            note=f"{settings} setting(s) x {len(p.seeds)} seed(s) x {groups} model(s): {tasks}, {p.encoder}",
        )
        for arm in arms
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# 4. Shards
# --------------------------------------------------------------------------------------------------


def shard_layout(samples: int, bytes_per_sample: int, cfg: ShardConfig) -> tuple[int, int, int]:
    """(samples per shard, shards, bytes) of ``samples`` samples of ``bytes_per_sample`` tar bytes each,
    split as :class:`~pipeline.shards.writer.ShardSetWriter` splits them: a shard closes at
    ``max_samples`` or when the next sample would pass ``max_bytes`` (end-of-archive blocks reserved);
    each file is padded to a whole tar record."""
    per = max(1, min(cfg.max_samples, (cfg.max_bytes - _TAR_END) // max(1, bytes_per_sample)))
    full, rest = divmod(samples, per)

    def file_bytes(n: int) -> int:
        return math.ceil((n * bytes_per_sample + _TAR_END) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    return per, full + int(rest > 0), full * file_bytes(per) + (file_bytes(rest) if rest else 0)


def analytic_sample_bytes(
    size: tuple[int, int], labels: tuple[str, ...], cfg: ShardConfig, kind: str = "real"
) -> int:
    """Tar bytes of one sample without reading any: the image PNG at raw/:data:`PNG_RATIO` (jpg and
    lossy webp at raw/:data:`LOSSY_RATIO`), seg PNG at raw/:data:`SEG_RATIO`, depth and normals as raw
    ``.npy``, a provenance
    record of :data:`JSON_BYTES`, a :data:`KEY_CHARS`-character key."""
    from pipeline.shards.writer import _tar_size

    h, w = size
    lossless = cfg.image_format == "png" or (cfg.image_format == "webp" and cfg.image_quality == 100)
    npy = 128  # header of an .npy v1 file
    sizes = {f"image.{cfg.image_format}": h * w * 3 // (PNG_RATIO if lossless else LOSSY_RATIO)}
    if "seg" in labels:
        sizes["seg.png"] = h * w // SEG_RATIO
    if "depth" in labels:
        sizes["depth.npy"] = npy + h * w * (2 if cfg.depth_dtype == "float16" else 4)
    if "normal" in labels:
        sizes["normal.npy"] = npy + h * w * 3 * (2 if cfg.normal_dtype == "float16" else 4)
    sizes["json"] = JSON_BYTES[kind]
    key = "k" * (KEY_CHARS + (4 if kind == "synthetic" else 0))
    return _tar_size(key, {name: bytes(n) for name, n in sizes.items()})


def _plan_shards(
    cfg: LumenConfig,
    dataset: DatasetPlan,
    generation: GenerationPlan,
    source: Any,
    notes: list[str],
) -> tuple[ShardSetPlan, ...]:
    measured = _measure(cfg, source, generation.size) if source is not None else None
    if measured is not None:
        n, per_sample = measured
        how = f"measured: {n} real sample(s) encoded as the writer does"
    else:
        per_sample = {
            k: analytic_sample_bytes(generation.size, dataset.labels, cfg.shards, k) for k in JSON_BYTES
        }
        how = f"analytic: image PNG ~ raw/{PNG_RATIO}, seg ~ raw/{SEG_RATIO}, depth/normal raw .npy"
        notes.append(
            f"shard bytes are analytic (no sample could be read): image PNG ~ raw/{PNG_RATIO} of the pixels "
            f"(jpg/webp ~ raw/{LOSSY_RATIO}), seg PNG ~ raw/{SEG_RATIO}, depth and normals as raw .npy, "
            "1-2 kB of provenance per sample; synthetic images assumed to compress like real ones"
        )
    out = []
    counts = {"real": _real_samples(cfg, dataset.train_images), "synthetic": generation.synthetic_samples}
    for name, samples in counts.items():
        note = how if name == "real" or measured is None else f"{how}; synthetic ~ real at the same size"
        layout = shard_layout(samples, per_sample[name], cfg.shards) if samples is not None else None
        per_shard = layout[0] if layout else shard_layout(1, per_sample[name], cfg.shards)[0]
        out.append(ShardSetPlan(name, samples, per_sample[name], note, per_shard,
                                layout[1] if layout else None, layout[2] if layout else None))  # fmt: skip
    g = cfg.generate
    if g.quality_filter and g.quality_mode in ("image", "objects"):
        notes.append(
            f"generate.quality_filter ({g.quality_mode} mode) drops variants that fail it: fewer synthetic samples"
            + (f"; each dropped variant is generated again up to {g.quality_retries} times (more generation time)"
               if g.quality_retries else "")
        )  # fmt: skip
    return tuple(out)


def _measure(cfg: LumenConfig, source: Any, size: tuple[int, int]) -> tuple[int, dict[str, int]] | None:
    """(samples read, {real, synthetic: mean tar bytes}) of up to :data:`MEASURED_SAMPLES` training
    samples resized to the generation size and encoded as ``expand`` writes them; None if none load."""
    from pipeline.data import resize_sample
    from pipeline.data.sample import SampleError
    from pipeline.shards.schema import ShardFormatError, encode_sample
    from pipeline.shards.writer import _tar_size

    s, h = cfg.shards, config_hash(cfg)
    totals, n = {"real": 0, "synthetic": 0}, 0
    for key in source.keys()[:MEASURED_SAMPLES]:
        try:
            sample = resize_sample(source.load(key), size)
            real = {"source_dataset": source.info.name, "source_key": key, "split": "train",
                    "timestamp": "2000-01-01T00:00:00Z"}  # fmt: skip
            for kind, prov in (("real", {**real, "synthetic": False}), ("synthetic", _synthetic(cfg, real))):
                fields = encode_sample(
                    sample, prov, config_hash=h, image_format=s.image_format, image_quality=s.image_quality,
                    png_compress_level=s.png_compress_level, depth_dtype=s.depth_dtype,
                    normal_dtype=s.normal_dtype,
                )  # fmt: skip
                totals[kind] += _tar_size(key if kind == "real" else f"{key}-v00", fields)
            n += 1
        except (SampleError, ShardFormatError, OSError) as err:
            log.info("plan: sample %s not measured (%s)", key, err)
    return (n, {k: round(v / n) for k, v in totals.items()}) if n else None


def _synthetic(cfg: LumenConfig, real: dict[str, Any]) -> dict[str, Any]:
    """A synthetic sample's provenance, the size ``expand`` writes (prompt, models, layout spec)."""
    g, sha = cfg.generate, "0" * 64
    prompt = g.prompt_template.format(caption="a caption of about ten words describing the scene",
                                      variation=(g.variation_prompts or [""])[0])  # fmt: skip
    return {**real, "synthetic": True, "variant": 0, "seed": 2**31, "prompt": prompt,
            "guidance": g.guidance_scale, "conditioning_scale": g.conditioning_scale, "steps": g.steps,
            "scheduler": g.scheduler, **({"strength": g.strength} if g.strength < 1 else {}),
            "models": {"base": {"id": f"run/base@{sha[:16]}", "sha256": sha},
                       "controlnet": {"id": "run/lumen", "sha256": sha}},
            "layout": {**cfg.layouts.model_dump(mode="json"), "condition": cfg.lumen.condition,
                       "pca_sha256": sha}}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _n(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "unknown"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _grid(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; text left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0} | {i for i, h in enumerate(header) if h in ("note", "source", "")}

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _render(plan: RunPlan) -> str:
    d, g, p = plan.dataset, plan.generation, plan.parallel
    size = "native" if d.image_size is None else f"{d.image_size[0]}x{d.image_size[1]}"
    where = plan.run_dir or "a new run folder"
    lines = [
        f"plan of `lumen run` for config {plan.name} (hash {plan.config_hash}) in {where}",
        "",
        f"dataset: {d.adapter}" + (f" at {d.root}" if d.root else ""),
        f"  train images  {_n(d.train_images)}  ({d.counted})",
        f"  val images    {_n(d.val_images)}",
        f"  image size    {size}; labels: {', '.join(d.labels) or 'none'}",
        "",
        f"models to train ({p.world_size} process(es): runner.devices={p.devices} x "
        f"runner.num_nodes={p.num_nodes}, strategy {p.strategy}):",
    ]
    if plan.training:
        rows = [[t.model, _n(t.steps), _n(t.batch), _n(t.runs), _n(t.images_seen),
                 _n(t.per_device_batch) if t.per_device_batch is not None else "does not divide", t.note]
                for t in plan.training]  # fmt: skip
        lines += _grid(["model", "steps", "batch", "runs", "images seen", "per device", "note"], rows)
        lines.append(
            "  (batch: images per optimisation step, all processes together; the base model, the ControlNet and "
            "the perception models split each batch over the processes, the others train in one process)"
        )
    else:
        lines.append("  none")
    if plan.reused:
        lines.append(f"  used as they are: {'; '.join(plan.reused)}")
    why = {1: " (1 pass)", 2: " (classifier-free guidance: 2 passes)",
           3: " (condition guidance with generate.layout_guidance: 3 passes)"}  # fmt: skip
    passes = f"{g.steps} steps x {g.passes_per_step}" + why.get(g.passes_per_step, "")
    per_sample = g.steps * g.passes_per_step
    if g.candidates > 1:  # generate.candidates: K generations per kept sample
        passes = f"{g.candidates} candidates x {passes}"
        per_sample *= g.candidates
    controlnet = ""
    if 0 < g.controlnet_passes_per_step < g.passes_per_step and g.model == "lumen":
        controlnet = (
            f", {per_sample * g.controlnet_passes_per_step // g.passes_per_step} of them with the ControlNet"
        )
    latent = "" if g.latent_size is None else f" on {g.latent_size[0]}x{g.latent_size[1]} latents"
    lines += [
        "",
        f"generation ({g.model}, {g.sampler}) at {g.size[0]}x{g.size[1]}"
        + (
            f" (generated at {g.supersample * g.size[0]}x{g.supersample * g.size[1]}, supersample "
            f"{g.supersample}; a multiple of {g.size_multiple}):"
            if g.supersample > 1
            else f" (a multiple of {g.size_multiple}):"
        ),
        f"  source {'images    ' if g.source == 'images' else 'label maps'}   {_n(g.source_images)}",
        f"  variants per image  {g.variants}",
        f"  synthetic samples   {_n(g.synthetic_samples)}",
        f"  per sample          {passes} = {per_sample} UNet evaluations{latent}{controlnet}",
        f"  evaluations         {_n(g.evaluations)}",
        f"  chunks              {_n(g.chunks)} of {g.chunk_size} source images (runner {p.runner}, "
        f"{p.max_workers} workers, {p.gpu_concurrency} device slot(s) each)",
        "",
        "shards:",
    ]
    rows = [[s.name, _n(s.samples), _bytes(s.bytes_per_sample), _n(s.samples_per_shard), _n(s.shards),
             _bytes(s.bytes), s.bytes_from] for s in plan.shards]  # fmt: skip
    lines += _grid(["set", "samples", "bytes/sample", "per shard", "shards", "bytes", "source"], rows)
    if plan.notes:
        lines += ["", "notes:", *(f"  - {n}" for n in plan.notes)]
    return "\n".join(lines)
