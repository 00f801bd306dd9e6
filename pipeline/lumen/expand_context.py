"""The expand stage's models, loaded once per process: the base model, the ControlNet (or the distilled
student that ``generate.model`` names), the condition function (layouts or labels) and the quality
filter, shared by the chunks generated in this process (one :class:`GenerationWorker` per chunk
generated at once)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import LumenConfig, config_dict, config_hash
from pipeline.data import Quarantine, build_dataset
from pipeline.data.sample import Sample, SampleSource
from pipeline.device import resolve_device
from pipeline.io import sha256_file
from pipeline.lumen.base import BaseComponents
from pipeline.lumen.distill import load_student
from pipeline.lumen.generate import LumenGenerator
from pipeline.lumen.stages import (
    ConditionFn,
    base_folder,
    collect_samples,
    condition_maker,
    fine_condition_maker,
    generation_config,
    generation_size,
    load_run_base,
    lumen_folder,
    shipped_reducer,
    student_folder,
)
from pipeline.synthesis.judging import JudgeFactory

__all__ = ["ExpandContext", "GenerationWorker", "expand_context", "expand_slots", "stage_hash", "uses_mapper"]

log = logging.getLogger(__name__)


def _weights_sha(folder: Path, sub: str = "") -> str | None:
    files = sorted((folder / sub).glob("*.safetensors")) if (folder / sub).is_dir() else []
    return sha256_file(files[0]) if files else None


def _load_controlnet(folder: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import ControlNetModel

    card = json.loads((folder / "lumen.json").read_text())
    model = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)  # shipped weights are fp16
    return model.to(device).eval(), card


def _controlnet_id(folder: Path, run_dir: Path) -> str:
    """``run/lumen`` for the run's own ControlNet, ``lumen-assets/<name>`` for a shipped one, else the
    path: provenance must not change when a run folder moves."""
    from pipeline.assets import ASSETS_DIR

    folder = folder.resolve()
    if folder.is_relative_to(run_dir.resolve()):
        return f"run/{folder.relative_to(run_dir.resolve()).as_posix()}"
    if folder.is_relative_to(ASSETS_DIR.resolve()):
        return f"lumen-assets/{folder.relative_to(ASSETS_DIR.resolve()).as_posix()}"
    return str(folder)


def stage_hash(cfg: LumenConfig) -> str:
    """Hash of what determines the synthetic images: seed, data, layouts, condition, generation, base
    (and the mapper, when generating from label maps)."""
    d = config_dict(cfg)
    keep = {k: d[k] for k in ("seed", "data", "layouts", "base", "generate")}
    keep["condition"] = d["lumen"]["condition"]
    if uses_mapper(cfg):
        keep["mapper"] = d["mapper"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ExpandContext:
    """Everything a chunk needs, built once per process by :func:`expand_context`."""

    cfg: LumenConfig
    run_dir: Path
    source: SampleSource
    size: tuple[int, int]
    models: dict[str, Any]
    layout_meta: dict[str, Any]
    stage_hash: str
    real_source: SampleSource | None = None  # the real images (source itself unless label maps are in it)
    controls: Any = None  # pipeline.lumen.controls.ClassDirections when generate.class_edits names classes
    class_weights: dict[int, float] | None = None  # hardness-aware class edits: class id -> 1 - IoU
    quality: Any = None  # a pipeline.synthesis.filter.QualityFilter when generate.quality_filter is on
    slots: int = 1
    build_worker: Callable[[], GenerationWorker] | None = None
    _idle: list[GenerationWorker] = field(default_factory=list)
    _built: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @contextmanager
    def worker(self) -> Iterator[GenerationWorker]:
        """Borrow a generation worker; up to ``slots`` exist, built on first need, then reused.

        Each worker loads its own models: the layout extractor hooks its UNet and the fast generator
        swaps a ControlNet submodule during a call, so two threads never share either.
        """
        with self._cond:
            while not self._idle and self._built >= self.slots:
                self._cond.wait()
            got = self._idle.pop() if self._idle else None
            if got is None:
                self._built += 1
        if got is None:
            try:
                if self.build_worker is None:
                    raise RuntimeError("this ExpandContext cannot build generation workers")
                got = self.build_worker()
            except BaseException:
                with self._cond:
                    self._built -= 1
                    self._cond.notify()
                raise
        try:
            yield got
        finally:
            with self._cond:
                self._idle.append(got)
                self._cond.notify()


@dataclass
class GenerationWorker:
    """A condition function and a generator over one private copy of the models; with
    ``generate.candidates`` > 1 also ``read_layouts``, the same layouts without the on-disk cache (it reads
    the layout of a generated candidate, which has its source's key); with ``generate.layout_supersample``
    also ``make_fine``, the layouts of the later steps (:func:`pipeline.lumen.stages.fine_condition_maker`)."""

    make_conditions: ConditionFn
    generator: LumenGenerator
    read_layouts: ConditionFn | None = None
    make_fine: ConditionFn | None = None


def expand_slots(cfg: LumenConfig) -> int:
    """Chunks one process generates at once: ``runner.gpu_concurrency`` under the thread runner (each
    Dask worker process holds one device slot, so 1 there)."""
    return cfg.runner.gpu_concurrency if cfg.runner.kind == "thread" else 1


def _class_directions(
    cfg: LumenConfig, run_dir: Path, classes: Sequence[str]
) -> tuple[Any, dict[str, str | None]]:
    """The class directions ``generate.class_edits`` uses, checked against its classes, and their id."""
    from pipeline.lumen.controls import CONTROLS_FILE, ClassDirections
    from pipeline.runs import RunPaths

    e = cfg.generate.class_edits
    path = Path(e.file) if e.file else RunPaths(run_dir).controls / CONTROLS_FILE
    directions = ClassDirections.load(path)
    missing = [c for c in e.classes if c not in directions.class_names]
    if missing:
        raise ValueError(f"generate.class_edits.classes {missing} have no directions in {path} "
                         f"(trained: {directions.class_names}); add them to controls.classes")  # fmt: skip
    if e.directions != "random" and max(e.directions) >= directions.num_directions:
        raise ValueError(
            f"generate.class_edits.directions {e.directions}: {path} has {directions.num_directions} per class"
        )
    ident = _controlnet_id(path.parent, run_dir) + f"/{path.name}"
    return directions, {"id": ident, "sha256": sha256_file(path)}


HARDNESS_HOLDOUT = 0.2
"""Share of the training images held out (the lowest key hashes) to measure a real-only segmenter's
per-class IoU."""


def _hardness(
    cfg: LumenConfig, run_dir: Path, base: BaseComponents, progress: bool, judge_factory: JudgeFactory | None
) -> dict[int, float]:
    """1 - IoU per edited class of a real-only segmenter trained on 80% of the training images and
    scored on the other 20% (never the val or test split); saved to ``controls/hardness.json``."""
    from pipeline.data.folder import hash_share
    from pipeline.io import atomic_write_json
    from pipeline.lumen.controls import class_hardness
    from pipeline.runs import RunPaths

    if judge_factory is None:
        raise ValueError("generate.class_edits.weights=hardness needs a judge_factory (the flows pass one)")
    train = list(collect_samples(cfg, generation_size(cfg, base), Quarantine(None), progress=progress))
    ordered = sorted(train, key=lambda s: hash_share(s.key))  # stable when images are added
    n_held = max(1, round(HARDNESS_HOLDOUT * len(ordered)))
    held, fit = ordered[:n_held], ordered[n_held:]
    if not fit:
        raise ValueError(f"hardness-aware class edits need more training images (got {len(train)})")
    info = build_dataset(cfg.data, "train").info
    folder = RunPaths(run_dir).controls / "hardness-judge"
    judge = judge_factory("seg", fit, info, folder, config=cfg.perception, steps=cfg.perception.steps,
                          seed=cfg.seed, device=resolve_device(cfg.device))  # fmt: skip
    ids = [info.classes.index(c) for c in cfg.generate.class_edits.classes]
    import numpy as np

    preds = judge.predict(np.stack([s.image for s in held]))
    hardness = class_hardness(
        preds, np.stack([np.asarray(s.seg) for s in held]), info.num_classes, ids, info.ignore_index
    )
    atomic_write_json(RunPaths(run_dir).controls / "hardness.json",
                      {"held_out": len(held), "trained_on": len(fit), "one_minus_iou": {info.classes[c]: v for c, v in hardness.items()}})  # fmt: skip
    return hardness


def uses_mapper(cfg: LumenConfig) -> bool:
    """Whether expansion maps label maps to layouts: ``source: labels``, or edited maps beside the images."""
    return cfg.generate.source == "labels" or cfg.generate.edited_per_map > 0


def _with_maps(
    source: SampleSource, image_conditions: ConditionFn, map_conditions: ConditionFn
) -> ConditionFn:
    """Conditions of a mixed chunk: image layouts for the real images, the mapper for the label maps."""
    from pipeline.data.label_maps import MixedSource

    if not isinstance(source, MixedSource):
        return map_conditions

    def conditions(samples: Sequence[Sample]) -> Any:
        import numpy as np

        real = [i for i, s in enumerate(samples) if source.owns_first(s.key)]
        maps = [i for i, s in enumerate(samples) if not source.owns_first(s.key)]
        parts: dict[int, Any] = {}
        for idx, fn in ((real, image_conditions), (maps, map_conditions)):
            if idx:
                parts.update(zip(idx, fn([samples[i] for i in idx]), strict=True))
        return np.stack([parts[i] for i in range(len(samples))])

    return conditions


def _label_source(
    cfg: LumenConfig,
    run_dir: Path,
    data: SampleSource,
    size: tuple[int, int],
    cond_meta: dict[str, Any],
    image_conditions: ConditionFn,
) -> tuple[SampleSource, ConditionFn, dict[str, Any], dict[str, str | None], ConditionFn]:
    """The label maps of a run: (its source, conditions, their meta, the mapper's id, the mapper's own
    conditions). ``source: labels``: the maps alone; else the real images and their edited maps."""
    from pipeline.data.label_maps import LabelMapSource, MixedSource
    from pipeline.lumen.mapping import mapper_condition_maker, mapper_folder, mapper_identity

    g = cfg.generate
    classes = None
    if g.edit_classes is not None:
        unknown = [c for c in g.edit_classes if c not in data.info.classes]
        if unknown:
            raise ValueError(
                f"generate.edit_classes {unknown} are not classes of {data.info.name}: {data.info.classes}"
            )
        classes = [data.info.classes.index(c) for c in g.edit_classes]
    only_maps = g.source == "labels"
    maps = LabelMapSource(
        size, data.info, base=data, label_dir=g.label_dir if only_maps else None, edits=list(g.edits),
        edited_per_map=g.edited_per_map, keep_unedited=g.keep_unedited and only_maps, edit_classes=classes,
        seed=cfg.seed,
    )  # fmt: skip
    folder = mapper_folder(cfg, run_dir)
    make, meta = mapper_condition_maker(cfg, folder, data.info, cond_meta["layout"])
    source: SampleSource = maps if only_maps else MixedSource(data, maps)
    return (
        source,
        _with_maps(source, image_conditions, make),
        {**meta, "label_source": maps.origin},
        mapper_identity(folder, run_dir),
        make,
    )


_CONTEXTS: dict[tuple[str, str], ExpandContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def _same_layouts(trained: dict[str, Any] | None, made: dict[str, Any] | None, any_size: bool) -> bool:
    """Whether a run makes the layouts its ControlNet was trained on; with ``any_size`` up to their size
    (``generate.supersample`` runs the ControlNet at another multiple of the labels' size on purpose)."""
    if trained is None or made is None or not any_size:
        return trained == made
    return {k: v for k, v in trained.items() if k != "size"} == {k: v for k, v in made.items() if k != "size"}


def expand_context(
    cfg: LumenConfig, run_dir: Path, progress: bool = False, judge_factory: JudgeFactory | None = None
) -> ExpandContext:
    """The models, condition function and generator of a run; cached per process (threads share it).

    ``judge_factory`` trains the quality filter's segmenter (``generate.quality_filter``; e.g.
    :func:`perception.judges.fit_judge`); the core cannot train one itself.
    """
    key = (config_hash(cfg), str(Path(run_dir).resolve()))
    with _CONTEXTS_LOCK:
        if key in _CONTEXTS:
            return _CONTEXTS[key]
        ctx = _build_context(cfg, Path(run_dir), progress, judge_factory)
        _CONTEXTS[key] = ctx
        return ctx


def _build_context(
    cfg: LumenConfig, run_dir: Path, progress: bool, judge_factory: JudgeFactory | None
) -> ExpandContext:
    device = resolve_device(cfg.device)
    base, base_id = load_run_base(cfg, run_dir)
    base.to(device)
    cn_folder = lumen_folder(cfg, run_dir)
    controlnet, card = _load_controlnet(cn_folder, device)
    source: SampleSource = build_dataset(cfg.data, "train")
    reducer = shipped_reducer(cfg, cn_folder)
    gen_cfg = generation_config(cfg)  # generate.supersample: conditions at the generation size
    make_conditions, cond_meta = condition_maker(
        gen_cfg, base, base_id, source, run_dir, reducer_path=reducer
    )
    any_size = cfg.generate.supersample is not None
    if card.get("condition") == "layout" and not _same_layouts(
        card.get("layout"), cond_meta.get("layout"), any_size
    ):
        raise ValueError(
            "the layouts this run would make differ from those the ControlNet was trained on "
            f"({cn_folder / 'lumen.json'}); retrain it or restore the run's pca.safetensors (kmeans.safetensors)"
        )
    models = {
        "base": {"id": base_id, "sha256": _weights_sha(base_folder(base_id, run_dir), "unet")},
        "controlnet": {"id": _controlnet_id(cn_folder, run_dir), "sha256": _weights_sha(cn_folder)},
    }
    from_labels = None
    real_source = source
    if uses_mapper(cfg):  # label maps -> mapper -> layouts (maps only, or edited maps beside the images)
        trained = {
            **cond_meta,
            "layout": card.get("layout") or cond_meta.get("layout"),
        }  # what the mapper maps to
        from_labels = _label_source(
            gen_cfg, run_dir, source, generation_size(cfg, base), trained, make_conditions
        )
        source, make_conditions, mapper_meta, models["mapper"], _ = from_labels
        cond_meta = {**cond_meta, **mapper_meta}
    # A distilled student (generate.model) generates; the teacher's base still makes the layouts.
    student = student_folder(cfg, run_dir)
    if student is not None:
        models["student"] = {"id": _controlnet_id(student, run_dir), "sha256": _weights_sha(student, "unet")}

    def generator(own_base: BaseComponents, own_cn: Any) -> LumenGenerator:
        if student is not None:
            own_base, own_cn, _ = load_student(student, device=device)
        return LumenGenerator(own_base, own_cn, scheduler=cfg.generate.scheduler, device=device)

    def reader(own_base: BaseComponents) -> ConditionFn | None:
        """generate.candidates: an uncached layout maker over ``own_base`` (its extractor hooks the UNet
        only during a call, so it can share the worker's)."""
        if cfg.generate.candidates == 1:
            return None
        uncached = gen_cfg.model_copy(update={"layouts": gen_cfg.layouts.model_copy(update={"cache": False})})
        return condition_maker(uncached, own_base, base_id, real_source, run_dir, reducer_path=reducer)[0]

    def fine(own_base: BaseComponents) -> ConditionFn | None:
        """generate.layout_supersample: the later steps' layouts over ``own_base``."""
        return fine_condition_maker(gen_cfg, own_base, base_id, real_source, run_dir, reducer_path=reducer)

    first = GenerationWorker(make_conditions, generator(base, controlnet), reader(base), fine(base))

    def build_worker() -> GenerationWorker:
        # From the files, not a copy of the first worker's modules: a copy taken while that worker
        # generates would catch its ControlNet with the condition stand-in in place.
        own_base, _ = load_run_base(cfg, run_dir)
        own_base.to(device)
        own_cn, _ = _load_controlnet(cn_folder, device)
        if cfg.generate.source == "labels" and from_labels is not None:  # maps only: the mapper is shared
            return GenerationWorker(from_labels[1], generator(own_base, own_cn))
        make, _ = condition_maker(gen_cfg, own_base, base_id, real_source, run_dir, reducer_path=reducer)
        if from_labels is not None:  # images + edited maps: this worker's own extractor, the shared mapper
            make = _with_maps(source, make, from_labels[4])
        return GenerationWorker(make, generator(own_base, own_cn), reader(own_base), fine(own_base))

    controls = class_weights = None
    if cfg.generate.class_edits.classes:
        controls, models["controls"] = _class_directions(cfg, run_dir, source.info.classes)
        if cfg.generate.class_edits.weights == "hardness":
            class_weights = _hardness(cfg, run_dir, base, progress, judge_factory)
    quality = None
    if cfg.generate.quality_filter:
        from pipeline.synthesis.filter import QualityFilter

        train = collect_samples(cfg, generation_size(cfg, base), Quarantine(None), progress=progress)
        quality = QualityFilter.fit(
            cfg, run_dir, list(train), train.info, progress=progress, judge_factory=judge_factory
        )
    return ExpandContext(
        cfg=cfg,
        run_dir=run_dir,
        source=source,
        size=generation_size(cfg, base),
        models=models,
        layout_meta={"condition": card.get("condition"), **cond_meta},
        stage_hash=stage_hash(cfg),
        real_source=real_source,
        controls=controls,
        class_weights=class_weights,
        quality=quality,
        slots=expand_slots(cfg),
        build_worker=build_worker,
        _idle=[first],
        _built=1,
    )
