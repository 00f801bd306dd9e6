"""Dataset expansion: real samples and K synthetic variants each, into two WebDataset shard sets.

The work is split into **chunks** of ``generate.chunk_size`` source images, in key order:

1. :func:`prepare_expand` loads the models once, fits (or reads) the layout PCA and plans the chunks;
2. :func:`generate_chunk` makes the K variants of one chunk (the expensive, device-bound part; chunks
   are independent, so a task runner may run them in parallel, on other processes or machines) and
   stores them, with what made them, as ``work/expand/chunk-NNNNNN.{npz,json}`` in the run folder.
   The JSON records the chunk's **cache key** (the sha256 of the stage's config, the model weights and
   the chunk's keys) and the npz's sha256: a chunk whose files exist and match is not redone;
3. :func:`write_chunk` appends a chunk's real samples and kept variants to the two shard writers, in
   chunk order, on one thread. Both writers resume: a sample already in a finished shard is skipped, a
   partial shard is discarded and redone.

A run killed at any point and started again therefore ends with exactly the expected keys and the
same bytes as an uninterrupted run, whichever task runner made the chunks. :func:`run_expand` is the
stage's one loop; the flow passes it a ``submit`` hook that makes each chunk a Prefect task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.conditions import sharpen_schedule
from pipeline.config import LumenConfig
from pipeline.data import Quarantine, build_dataset, iter_valid, resize_sample
from pipeline.data.sample import Sample
from pipeline.execution import Deferred, Future, TrackerFactory, tqdm_tracker
from pipeline.faults import kill_point
from pipeline.io import atomic_open, atomic_write_json, atomic_write_text, sha256_file
from pipeline.lumen.expand_context import (
    ExpandContext,
    GenerationWorker,
    expand_context,
    expand_slots,
    stage_hash,
)
from pipeline.lumen.generate import VariantSpec, best_of_candidates, plan_variants, variant_seed
from pipeline.runs import RunPaths, stage_key
from pipeline.shards.writer import MANIFEST_NAME, ShardSetWriter
from pipeline.synthesis.judging import JudgeFactory

if TYPE_CHECKING:
    from pipeline.synthesis.filter import QualityResult

__all__ = [
    "ChunkResult",
    "ExpandResult",
    "SubmitChunk",
    "chunk_files",
    "chunk_written",
    "expand_context",
    "expand_slots",
    "finish_expand",
    "generate_chunk",
    "prepare_expand",
    "run_expand",
    "shard_writers",
    "stage_hash",
    "write_chunk",
]

log = logging.getLogger(__name__)


@dataclass
class ExpandResult:
    """What the expand stage did (the ``summaries/expand.json`` of a run is :meth:`as_dict`).

    Totals are of the shard sets (this call's and earlier ones'); ``written_this_run`` counts what this
    call appended (``real``, ``synthetic`` and ``filtered``, the variants the quality filter dropped).
    """

    source_images: int
    real_samples: int
    synthetic_samples: int
    variants_planned: int
    written_this_run: dict[str, int]
    quarantined: int
    quarantine_reasons: dict[str, int]
    chunks: int
    chunks_generated: int
    chunks_reused: int
    seconds: float
    generation_images_per_s: float | None
    shards: dict[str, str]
    quality_filter: dict[str, Any] | None

    @property
    def real(self) -> int:
        """Real samples written by this call."""
        return self.written_this_run["real"]

    @property
    def synthetic(self) -> int:
        """Synthetic samples written by this call."""
        return self.written_this_run["synthetic"]

    @property
    def filtered(self) -> int:
        """Variants the quality filter dropped in this call."""
        return self.written_this_run["filtered"]

    def as_dict(self) -> dict[str, Any]:
        return {"stage": "expand", **asdict(self)}

    def markdown(self, run_name: str, cfg: LumenConfig) -> str:
        md = (
            f"# Expand: {run_name}\n\n"
            f"- source images: {self.source_images} ({self.quarantined} quarantined)\n"
            f"- real samples: {self.real_samples}, synthetic samples: {self.synthetic_samples} "
            f"({cfg.generate.variants} variants per image; {self.filtered} dropped by the quality filter)\n"
            f"- chunks: {self.chunks} ({self.chunks_generated} generated now, {self.chunks_reused} already done)\n"
            f"- time: {self.seconds:.0f} s\n"
            f"- shards: `{self.shards['real']}` and `{self.shards['synthetic']}`\n"
        )
        if (q := self.quality_filter) is not None:
            md += (
                f"- quality filter ({cfg.generate.quality_mode} mode): {q['scored']} variants scored, "
                f"{q['dropped']} dropped; mean agreement {q['mean_agreement']}, "
                f"mean share of pixels set to ignore {q['mean_ignored_share']}\n"
            )
            if q.get("regenerated"):
                md += (f"- regenerated by `generate.quality_retries`: {q['regenerated']} images, of which "
                       f"{q['kept_after_retry']} variants kept\n")  # fmt: skip
            if q.get("segments_checked") is not None:
                md += (f"- source objects checked: {q['segments_checked']}, lost (in dropped variants): "
                       f"{q['segments_lost']}\n")  # fmt: skip
            if q.get("outlines_checked") is not None:
                md += (f"- variants whose sources have outlines inside their objects: {q['outlines_checked']}, "
                       f"of which merged (under half the outlines kept): {q['outlines_merged']}\n")  # fmt: skip
        return md


@dataclass
class ChunkResult:
    """A generated chunk on disk (small and picklable: it travels between task-runner workers)."""

    index: int
    json_path: Path
    reused: bool
    seconds: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)


def _run_timestamp(run_dir: Path) -> str:
    """The run's start time, fixed on first use, so a resumed run writes the same provenance bytes."""
    path = RunPaths(run_dir).started_at
    if not path.is_file():
        atomic_write_text(path, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    return path.read_text().strip()


def prepare_expand(
    cfg: LumenConfig, run_dir: Path, progress: bool = True, judge_factory: JudgeFactory | None = None
) -> list[list[str]]:
    """Load the models (fitting the layout PCA if the run has none) and split the keys into chunks."""
    ctx = expand_context(cfg, run_dir, progress=progress, judge_factory=judge_factory)
    _run_timestamp(run_dir)
    keys = ctx.source.keys()
    size = cfg.generate.chunk_size
    return [list(keys[i : i + size]) for i in range(0, len(keys), size)]


def chunk_files(run_dir: Path, index: int) -> tuple[Path, Path]:
    """The (npz, json) files of chunk ``index``."""
    return RunPaths(run_dir).chunk_files(index)


def _cache_key(ctx: ExpandContext, keys: Sequence[str]) -> str:
    text = json.dumps([ctx.stage_hash, ctx.models, list(keys)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _finished_chunk(npz: Path, meta: Path, cache_key: str) -> dict[str, Any] | None:
    """The chunk's record if its files are complete, made from the same inputs, and intact."""
    if not (npz.is_file() and meta.is_file()):
        return None
    try:
        record: dict[str, Any] = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("cache_key") != cache_key or record.get("npz_sha256") != sha256_file(npz):
        return None
    return record


def chunk_written(
    ctx: ExpandContext, index: int, keys: Sequence[str], real_w: ShardSetWriter, syn_w: ShardSetWriter
) -> bool:
    """Whether chunk ``index`` was made from these inputs and all its samples are in finished or open
    shards of the writers (then it needs neither generating nor writing)."""
    _, meta = chunk_files(ctx.run_dir, index)
    if not meta.is_file():
        return False
    try:
        record = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    if record.get("cache_key") != _cache_key(ctx, keys):
        return False
    kept = [v["out_key"] for v in record["variants"] if v.get("keep", True)]
    real_done = ctx.cfg.generate.source == "labels" or set(record["valid"]) <= real_w.done_keys
    return real_done and set(kept) <= syn_w.done_keys


def generate_chunk(
    cfg: LumenConfig,
    run_dir: Path,
    index: int,
    keys: Sequence[str],
    judge_factory: JudgeFactory | None = None,
) -> ChunkResult:
    """Make the variants of one chunk of source keys (or reuse the chunk's finished files)."""
    t0 = time.time()
    run_dir = Path(run_dir)
    ctx = expand_context(cfg, run_dir, judge_factory=judge_factory)
    npz, meta = chunk_files(run_dir, index)
    cache_key = _cache_key(ctx, keys)
    if (record := _finished_chunk(npz, meta, cache_key)) is not None:
        return ChunkResult(index, meta, reused=True, record=record)
    g = cfg.generate
    bad = Quarantine(None)  # the writer step records these in the run's quarantine, on one thread
    samples = [resize_sample(s, ctx.size) for s in iter_valid(ctx.source, bad, keys=keys, stage="expand")]
    specs = plan_variants([s.key for s in samples], [s.caption for s in samples], g.variants, cfg.seed,
                          g.prompt_template, g.variation_prompts)  # fmt: skip
    images = np.zeros((0, *ctx.size, 3), np.uint8)
    by_key = {s.key: s for s in samples}
    plans = _class_edit_plans(ctx, [by_key[sp.key] for sp in specs], [sp.seed for sp in specs])
    seeds = [sp.seed for sp in specs]
    attempts = [1] * len(specs)
    picked: dict[int, dict[str, Any]] = {}  # generate.candidates: the chosen candidate of each variant
    results: list[QualityResult] = []
    if specs:
        with ctx.worker() as worker:  # up to expand_slots(cfg) chunks at once, each on its own models
            # steepen the boundaries between touching objects, for every step or the first ones (docs/models.md)
            plain = np.asarray(worker.make_conditions(samples))
            made, early = sharpen_schedule(plain, g.layout_sharpen, g.layout_sharpen_radius,
                                           g.layout_sharpen_until)  # fmt: skip
            fraction = g.layout_sharpen_until
            if worker.make_fine is not None:  # generate.layout_supersample: finer layouts for the later steps
                made, early = np.asarray(worker.make_fine(samples)), plain
                fraction = g.layout_supersample_after
                if fraction == 0:
                    early = None
            conds = dict(zip((s.key for s in samples), made, strict=True))
            sharp = {} if early is None else dict(zip((s.key for s in samples), early, strict=True))

            def make(idx: list[int], seeds_: list[int]) -> np.ndarray:
                chosen = [specs[i] for i in idx]
                sources = [by_key[sp.key] for sp in chosen]
                edit = _feature_edit(ctx, worker.generator, [plans[i] for i in idx], sources)
                return worker.generator.generate(
                    np.stack([conds[sp.key] for sp in chosen]).astype(np.float32), [sp.prompt for sp in chosen],
                    seeds_, steps=g.steps, guidance_scale=g.guidance_scale, batch_size=g.batch_size,
                    conditioning_scale=g.conditioning_scale, feature_edit=edit, strength=g.strength,
                    condition_guidance=g.condition_guidance,
                    init_images=np.stack([s.image for s in sources]) if g.strength < 1 else None,
                    early_conditions=np.stack([sharp[sp.key] for sp in chosen]).astype(np.float32) if sharp else None,
                    early_fraction=fraction if sharp else 0.0, layout_guidance=g.layout_guidance,
                    output_size=ctx.size,  # lumen.supersample: generated larger, downsampled to the labels' size
                )  # fmt: skip

            everything = list(range(len(specs)))
            images = make(everything, seeds)
            if g.candidates > 1:  # keep the candidate whose own layout agrees best with its condition
                layouts = dict(zip((s.key for s in samples), plain, strict=True))
                reference = np.stack([layouts[sp.key] for sp in specs]).astype(np.float32)
                images, seeds, picked = _best_candidates(cfg, worker, specs, by_key, reference, make, images)
            if ctx.quality is not None:
                results = _score_quality(ctx, [by_key[sp.key] for sp in specs], images)
                for attempt in range(2, g.quality_retries + 2):  # regenerate what the filter drops
                    redo = [i for i, r in enumerate(results) if not r.keep]
                    if not redo:
                        break
                    new_seeds = [variant_seed(cfg.seed, f"{specs[i].key}#attempt{attempt}", specs[i].variant)
                                 for i in redo]  # fmt: skip
                    again = make(redo, new_seeds)
                    scored = _score_quality(ctx, [by_key[specs[i].key] for i in redo], again)
                    for j, i in enumerate(redo):
                        images[i], results[i] = again[j], scored[j]
                        seeds[i], attempts[i] = new_seeds[j], attempt
                        picked.pop(i, None)  # a retry is one generation, not a choice among candidates
    variants = [
        {"out_key": sp.out_key, "key": sp.key, "variant": sp.variant, "seed": seed, "prompt": sp.prompt,
         **({"attempt": attempt} if g.quality_retries else {}), **picked.get(i, {}),
         **({"class_edit": {k: v for k, v in plan.items() if k != "class_id"}} if plan else {})}
        for i, (sp, plan, seed, attempt) in enumerate(zip(specs, plans, seeds, attempts, strict=True))
    ]  # fmt: skip
    arrays: dict[str, np.ndarray] = {"images": images}
    if results:
        for v, r in zip(variants, results, strict=True):
            v["quality"], v["keep"] = r.provenance(), bool(r.keep)
        if g.quality_mode == "pixel":
            arrays["ignore_masks"] = np.stack(
                [r.mask if r.mask is not None else np.zeros(ctx.size, bool) for r in results]
            )
    npz.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(npz, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    kill_point("chunk-saved", index)  # images on disk, record not yet: the chunk must be redone
    record = {
        "cache_key": cache_key,
        "index": index,
        "keys": list(keys),
        "valid": [s.key for s in samples],
        "quarantined": [
            {"key": r["key"], "reason": r["reason"], "detail": r["detail"], "file": r["file"]}
            for r in bad.records
        ],
        "variants": variants,
        "npz_sha256": sha256_file(npz),
        "seconds": round(time.time() - t0, 3),
    }
    atomic_write_json(meta, record)
    return ChunkResult(index, meta, reused=False, seconds=time.time() - t0, record=record)


def _best_candidates(
    cfg: LumenConfig,
    worker: GenerationWorker,
    specs: Sequence[VariantSpec],
    sources: dict[str, Sample],
    reference: np.ndarray,
    make: Callable[[list[int], list[int]], np.ndarray],
    first: np.ndarray,
) -> tuple[np.ndarray, list[int], dict[int, dict[str, Any]]]:
    """``generate.candidates``: candidate 0 of each variant is its image in ``first`` (its own seed); each
    further one is generated under ``variant_seed(seed, f"{key}#candidate{c}", variant)``. Every candidate's layout
    is read back from its image by the run's extractor and compared with its condition ``reference``
    (``layout_agreement``, ``generate.candidate_score``); the best one is kept, ties to the earlier.
    Returns the kept images, their seeds (so each can be remade) and, per variant, its provenance:
    ``{"candidate": c, "layout_agreement": score}``."""
    from pipeline.synthesis.metrics import layout_agreement

    g = cfg.generate
    if worker.read_layouts is None:
        raise RuntimeError("generate.candidates > 1 needs a worker built with read_layouts")
    read = worker.read_layouts

    def agreement(images: np.ndarray) -> np.ndarray:
        back = read([replace(sources[sp.key], image=im) for sp, im in zip(specs, images, strict=True)])
        return layout_agreement(reference, np.asarray(back, dtype=np.float32), g.candidate_score)

    everything = list(range(len(specs)))
    best, seeds, chosen, best_score = best_of_candidates(
        first, [sp.seed for sp in specs], g.candidates,
        lambda c: [variant_seed(cfg.seed, f"{sp.key}#candidate{c}", sp.variant) for sp in specs],
        lambda seeds_c: make(everything, seeds_c), agreement,
    )  # fmt: skip
    picked = {i: {"candidate": int(chosen[i]), "layout_agreement": round(float(best_score[i]), 6)}
              for i in range(len(specs))}  # fmt: skip
    return best, seeds, picked


def _class_edit_plans(
    ctx: ExpandContext, sources: list[Sample], seeds: list[int]
) -> list[dict[str, Any] | None]:
    """The class-specific appearance edit of each variant (``generate.class_edits``), or None each."""
    if ctx.controls is None:
        return [None] * len(seeds)
    from pipeline.lumen.controls import plan_class_edits

    e = ctx.cfg.generate.class_edits
    ids = [ctx.source.info.classes.index(c) for c in e.classes]
    segs = [np.asarray(s.seg) if s.seg is not None else np.zeros(ctx.size, np.int64) for s in sources]
    plans = plan_class_edits(ctx.controls, segs, seeds, ids, e.directions, e.strengths, e.share,
                             ctx.cfg.controls.min_pixels, weights=ctx.class_weights)  # fmt: skip
    if ctx.class_weights is not None:
        for plan in plans:
            if plan is not None:
                plan["class_weight"] = round(ctx.class_weights[plan["class_id"]], 4)
    return plans


def _feature_edit(
    ctx: ExpandContext, generator: Any, plans: list[dict[str, Any] | None], sources: list[Sample]
) -> Any:
    """The FeatureEdit that applies ``plans`` on ``generator``'s UNet (None when nothing is edited)."""
    if ctx.controls is None or not any(plans):
        return None
    from pipeline.lumen.controls import FeatureEdit, edit_tensors

    segs = [np.asarray(s.seg) for s in sources]
    vecs, masks = edit_tensors(ctx.controls, plans, segs)
    return FeatureEdit(generator.base.unet, ctx.controls.layer, vecs, masks, ctx.controls.t_range)


def _score_quality(ctx: ExpandContext, sources: list[Sample], images: np.ndarray) -> list[QualityResult]:
    """The quality filter's verdict on each variant (``images[i]`` made from ``sources[i]``)."""
    if ctx.quality is None:
        raise ValueError("_score_quality needs a quality filter (generate.quality_filter)")
    segs = np.stack([np.asarray(s.seg) for s in sources])
    reals = np.stack([s.image for s in sources]) if ctx.quality.mode == "objects" else None
    results: list[QualityResult] = ctx.quality.score(images, segs, reals)
    return results


def shard_writers(cfg: LumenConfig, run_dir: Path) -> tuple[ShardSetWriter, ShardSetWriter]:
    """The (real, synthetic) shard writers of a run; an existing set is resumed."""
    info = build_dataset(cfg.data, "train").info
    if cfg.generate.quality_filter and cfg.generate.quality_mode == "pixel":
        from pipeline.synthesis.filter import info_with_ignore

        info = info_with_ignore(info)  # masked pixels need an ignore index in the card
    card, hash_ = info.card(), stage_key(cfg, "expand")  # valid while data..generate are unchanged
    real = ShardSetWriter.from_config(
        RunPaths(run_dir).shards("real"), cfg.shards, dataset_card=card, config_hash=hash_, prefix="real"
    )
    syn = ShardSetWriter.from_config(
        RunPaths(run_dir).shards("synthetic"),
        cfg.shards,
        dataset_card=card,
        config_hash=hash_,
        prefix="synthetic",
    )
    return real, syn


def write_chunk(
    ctx: ExpandContext,
    result: ChunkResult,
    real_w: ShardSetWriter,
    syn_w: ShardSetWriter,
    quarantine: Quarantine,
) -> tuple[int, int, int]:
    """Append one generated chunk to the shard writers; returns (real, synthetic, filtered) written."""
    g = ctx.cfg.generate
    record = result.record or json.loads(result.json_path.read_text())
    for q in record["quarantined"]:
        quarantine.add(q["key"], q["reason"], q["detail"], q["file"], stage="expand")
    npz, _ = chunk_files(ctx.run_dir, record["index"])
    with np.load(npz, allow_pickle=False) as data:
        images = data["images"]
        masks = data["ignore_masks"] if "ignore_masks" in data.files else None
    samples = {
        s.key: resize_sample(s, ctx.size)
        for s in iter_valid(ctx.source, Quarantine(None), keys=record["valid"], stage="expand")
    }
    common = {
        "source_dataset": ctx.source.info.name,
        "split": "train",
        "timestamp": _run_timestamp(ctx.run_dir),
    }
    n_real = n_syn = n_filtered = 0
    for key in _real_keys(ctx, [samples[k] for k in record["valid"]]):
        if key not in real_w.done_keys:
            real = samples.get(key) if key in samples and "label_source" not in samples[key].meta else None
            if real is None and ctx.real_source is not None:  # the real image behind a label map
                real = resize_sample(ctx.real_source.load(key), ctx.size)
            if real is not None:
                real_w.write(real, {**common, "source_key": key, "synthetic": False})
                n_real += 1
    for i, v in enumerate(record["variants"]):
        if not v.get("keep", True):
            n_filtered += 1
            continue
        if v["out_key"] in syn_w.done_keys:
            continue
        src = samples[v["key"]]
        seg = src.seg
        if masks is not None and seg is not None:
            from pipeline.synthesis.filter import apply_pixel_mask, ignore_value

            seg = apply_pixel_mask(seg, masks[i], ignore_value(ctx.source.info))
        syn = Sample(v["out_key"], images[i], seg=seg, depth=src.depth, normal=src.normal,
                     caption=v["prompt"], meta={"source_key": src.key})  # fmt: skip
        prov = {**common, "source_key": src.key, "synthetic": True, "variant": v["variant"], "seed": v["seed"],
                "prompt": v["prompt"], "guidance": g.guidance_scale, "conditioning_scale": g.conditioning_scale, "steps": g.steps, "scheduler": g.scheduler,
                **({"strength": g.strength} if g.strength < 1 else {}),
                **({"condition_guidance": True} if g.condition_guidance else {}),
                **({"layout_sharpen": [g.layout_sharpen, g.layout_sharpen_radius]} if g.layout_sharpen else {}),
                **({"layout_sharpen_until": g.layout_sharpen_until} if g.layout_sharpen and g.layout_sharpen_until < 1 else {}),
                **({"layout_supersample": [g.layout_supersample, g.layout_supersample_after]} if g.layout_supersample else {}),
                **({"layout_guidance": g.layout_guidance} if g.layout_guidance is not None else {}), "models": ctx.models, "layout": ctx.layout_meta}  # fmt: skip
        if "quality" in v:
            prov["quality"] = v["quality"]
        if "class_edit" in v:
            prov["class_edit"] = v["class_edit"]
        if "candidate" in v:  # generate.candidates: which one was kept, and why
            prov["selection"] = {"candidates": g.candidates, "score": g.candidate_score,
                                 "chosen": v["candidate"], "layout_agreement": v["layout_agreement"]}  # fmt: skip
        if "label_source" in src.meta:  # made from a label map (edited, or as it is)
            prov["source_key"] = src.meta.get("source_key", src.key)
            prov["label_source"], prov["edits"] = src.meta.get("label_source"), src.meta.get("edits", [])
            syn.meta = {"source_key": prov["source_key"], "label_map": src.key}
        syn_w.write(syn, prov)
        n_syn += 1
        if i == 0:
            kill_point("chunk-writing", record["index"])  # mid-chunk, inside an open shard
    kill_point("chunk-written", record["index"])
    return n_real, n_syn, n_filtered


def _real_keys(ctx: ExpandContext, samples: Sequence[Sample]) -> list[str]:
    """The real samples a chunk brings into the real shards, in order, once each: the real images
    themselves, and for maps taken from the dataset's seg (``source: labels``) the images they come from.
    A folder of label maps (``generate.label_dir``) brings none."""
    out: list[str] = []
    for s in samples:
        origin = s.meta.get("label_source")
        key = s.key if origin is None else (s.meta.get("source_key") if origin == "dataset-seg" else None)
        if isinstance(key, str) and key not in out:
            out.append(key)
    return out


SubmitChunk = Callable[[LumenConfig, Path, int, list[str]], Future[ChunkResult]]
"""Submits :func:`generate_chunk` with these arguments (config, run folder, chunk index, its keys), e.g.
as a Prefect task; returns its future."""


def run_expand(
    cfg: LumenConfig,
    run_dir: Path,
    progress: bool = True,
    submit: SubmitChunk | None = None,
    tracker: TrackerFactory | None = None,
    judge_factory: JudgeFactory | None = None,
) -> ExpandResult:
    """Shard the real training samples and ``generate.variants`` synthetic variants of each.

    Writes ``run_dir/shards/real`` and ``run_dir/shards/synthetic`` (each with ``manifest.json``); bad
    inputs go to ``run_dir/quarantine.jsonl``; the chunk images are deleted once both sets are complete.
    Chunks are generated by ``submit`` (default: serially, in this process, when their turn comes) and
    written in chunk order on this thread, so every executor gives the same bytes. ``judge_factory``
    trains the quality filter's segmenter when ``generate.quality_filter`` is on (a ``submit`` hook
    passes its own to :func:`generate_chunk`).
    """
    t0 = time.time()
    chunks = prepare_expand(cfg, run_dir, progress=progress, judge_factory=judge_factory)
    ctx = expand_context(cfg, run_dir, judge_factory=judge_factory)
    quarantine = Quarantine(RunPaths(run_dir).quarantine)
    real_w, syn_w = shard_writers(cfg, run_dir)
    if submit is None:

        def submit(c: LumenConfig, r: Path, i: int, k: list[str]) -> Future[ChunkResult]:
            return Deferred(lambda: generate_chunk(c, r, i, k, judge_factory=judge_factory))

    todo = [i for i, keys in enumerate(chunks) if not chunk_written(ctx, i, keys, real_w, syn_w)]
    log.info("expand: %d chunks, %d to do", len(chunks), len(todo))
    futures = {i: submit(cfg, run_dir, i, chunks[i]) for i in todo}
    written = {"real": 0, "synthetic": 0, "filtered": 0}
    generated = reused = 0
    gen_seconds = 0.0
    bar = (tracker or tqdm_tracker(progress))(sum(map(len, chunks)), "expand", "img")
    with real_w, syn_w:
        for i, keys in enumerate(chunks):
            if i in futures:
                chunk = futures.pop(i).result()
                reused += chunk.reused
                generated += not chunk.reused
                gen_seconds += chunk.seconds
                for name, n in zip(written, write_chunk(ctx, chunk, real_w, syn_w, quarantine), strict=True):
                    written[name] += n
            else:
                reused += 1
            bar.update(len(keys))
    bar.close()
    finish_expand(run_dir)
    out = ExpandResult(
        source_images=sum(map(len, chunks)), real_samples=real_w.num_samples, synthetic_samples=syn_w.num_samples,
        variants_planned=real_w.num_samples * cfg.generate.variants, written_this_run=written,
        quarantined=len(quarantine), quarantine_reasons=quarantine.counts(), chunks=len(chunks),
        chunks_generated=generated, chunks_reused=reused, seconds=round(time.time() - t0, 1),
        generation_images_per_s=round(written["synthetic"] / gen_seconds, 2) if gen_seconds else None,
        shards={"real": str(real_w.out_dir), "synthetic": str(syn_w.out_dir)},
        quality_filter=quality_summary(run_dir, len(chunks)),
    )  # fmt: skip
    log.info("expand: %d real, %d synthetic samples written this run (%.0f s)", out.real, out.synthetic,
             out.seconds)  # fmt: skip
    return out


def quality_summary(run_dir: Path, num_chunks: int) -> dict[str, Any] | None:
    """What the quality filter did over all chunks (from their records, so resumed runs count every
    chunk): :func:`pipeline.synthesis.filter.summarize` of the recorded verdicts; None if it was off."""
    from pipeline.synthesis.filter import QualityResult, summarize

    results, attempts = [], []
    for index in range(num_chunks):
        _, meta = chunk_files(run_dir, index)
        if meta.is_file():
            for v in json.loads(meta.read_text())["variants"]:
                if "quality" in v:
                    q = v["quality"]  # NaN values were left out of the provenance
                    checked = "segments" in q
                    results.append(QualityResult(
                        q.get("agreement", math.nan), q.get("miou", math.nan), bool(v.get("keep", True)),
                        ignored_share=q.get("ignored_share", 0.0),
                        segments=int(q["segments"]) if checked else None,
                        lost=int(q.get("segments_lost", 0)) if checked else None,
                        outline_recall=q.get("outline_recall"),
                    ))  # fmt: skip
                    attempts.append((int(v.get("attempt", 1)), bool(v.get("keep", True))))
    if not results:
        return None
    out: dict[str, Any] = {
        k: round(v, 4) if math.isfinite(v) else None for k, v in summarize(results).items()
    }
    for k in (
        "scored",
        "kept",
        "dropped",
        "segments_checked",
        "segments_lost",
        "outlines_checked",
        "outlines_merged",
    ):
        if out.get(k) is not None:
            out[k] = int(out[k])
    out["regenerated"] = sum(a - 1 for a, _ in attempts)  # extra generations made by generate.quality_retries
    out["kept_after_retry"] = sum(a > 1 and keep for a, keep in attempts)
    return out


def finish_expand(run_dir: Path) -> None:
    """Delete the chunks' images once both shard sets are complete; their small JSON records stay, so a
    rerun knows every chunk is written without generating anything."""
    for name in ("real", "synthetic"):
        manifest = RunPaths(run_dir).shards(name) / MANIFEST_NAME
        if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
            return
    for npz in RunPaths(run_dir).expand_work.glob("chunk-*.npz"):
        npz.unlink(missing_ok=True)
