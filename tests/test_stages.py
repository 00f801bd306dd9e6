"""Stage functions end to end on tiny data: files written where the run folder layout says."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from pipeline.config import build_config
from pipeline.data import Quarantine
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.expand import chunk_files
from pipeline.lumen.generate import variant_seed
from pipeline.lumen.stages import collect_samples, run_train_lumen
from pipeline.lumen.tokenizer import build_tokenizer
from tests.test_lumen import PRESET, RES


def _cfg(condition: str, kind: str = "pca"):
    return build_config(
        {
            "data": {"num_images": 4, "num_val_images": 2, "image_size": [RES, RES]},
            "base": {"resolution": RES},
            "layouts": {
                "kind": kind,
                "num_components": 4,
                "num_clusters": 5,
                "pca_images": 4,
                "pca_vectors_per_image": 32,
                "batch_size": 2,
            },
            "lumen": {
                "condition": condition,
                "train_steps": 2,
                "batch_size": 2,
                "checkpoint_every": 1,
                "validate_every": 100,
            },
        }
    )


@pytest.mark.parametrize(
    "condition,kind,channels", [("layout", "pca", 4), ("layout", "clustered", 5), ("seg_sparse", "pca", 6)]
)
def test_train_lumen_writes_a_loadable_controlnet(
    tmp_path: Path, condition: str, kind: str, channels: int
) -> None:
    cfg = _cfg(condition, kind)
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    assert len(data) == 4 and data.load(data.keys()[0]).image.shape == (RES, RES, 3)
    tok = build_tokenizer([s.caption for s in data], max_length=16)
    build_tiny_components(tok, RES, preset=PRESET).save(tmp_path / "base")

    out = run_train_lumen(cfg, tmp_path, progress=False)
    cn = ControlNetModel.from_pretrained(out)
    assert cn.config.conditioning_channels == channels
    card = json.loads((out / "lumen.json").read_text())
    assert card["condition"] == condition and card["channels"] == channels and card["trained_steps"] == 2
    assert (out / "README.md").is_file()
    assert (tmp_path / "lumen_train" / "validation" / "step-000002.png").is_file()
    assert (tmp_path / "lumen_train" / "checkpoints" / "step-000002" / "controlnet.safetensors").is_file()
    if kind == "clustered":  # proxy masks: one-hot over K clusters, the k-means saved like the PCA
        assert (tmp_path / "kmeans.safetensors").is_file() and not (tmp_path / "pca.safetensors").exists()
        assert card["layout"]["kind"] == "clustered" and len(card["kmeans_sha256"]) == 64
        cached = [np.load(f).astype(np.float32) for f in sorted((tmp_path / "layouts").glob("*/*.npy"))]
        assert len(cached) == 4 and all(c.shape == (5, RES, RES) for c in cached)
        assert all(
            np.array_equal(c.sum(0), np.ones((RES, RES))) and set(np.unique(c)) <= {0.0, 1.0} for c in cached
        )
    elif condition == "layout":
        assert (tmp_path / "pca.safetensors").is_file()
        assert card["layout"]["num_components"] == 4 and len(card["pca_sha256"]) == 64
        cached = list((tmp_path / "layouts").glob("*/*.npy"))
        assert len(cached) == 4 and np.load(cached[0]).dtype == np.float16


def test_supersampled_model_trains_larger_and_writes_variants_at_the_labels_size(tmp_path: Path) -> None:
    """lumen.supersample=2: the ControlNet trains on 2x upsampled images and their 2x layouts, and the
    variants are generated at 2x and downsampled to the labels' size in the shards."""
    from pipeline.lumen.expand import run_expand
    from pipeline.lumen.stages import model_size
    from pipeline.shards.reader import iter_samples

    cfg = build_config(
        {
            "data": {"num_images": 3, "image_size": [RES, RES]},
            "base": {"resolution": 2 * RES},
            "layouts": {"num_components": 4, "pca_images": 3, "pca_vectors_per_image": 32, "batch_size": 2},
            "lumen": {"train_steps": 1, "batch_size": 2, "validate_every": 100, "supersample": 2},
            "generate": {"variants": 1, "steps": 2, "chunk_size": 3},
        }
    )
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    base = build_tiny_components(
        build_tokenizer([s.caption for s in data], max_length=16), 2 * RES, preset=PRESET
    )
    base.save(tmp_path / "base")
    assert model_size(cfg, base) == (2 * RES, 2 * RES)
    odd = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": (RES + 2, RES)})})
    with pytest.raises(ValueError, match="must be a multiple"):
        model_size(odd, base)

    card = json.loads((run_train_lumen(cfg, tmp_path, progress=False) / "lumen.json").read_text())
    assert card["size"] == [2 * RES, 2 * RES] and card["supersample"] == 2
    assert card["layout"]["size"] == [2 * RES, 2 * RES]
    cached = [np.load(f) for f in (tmp_path / "layouts").glob("*/*.npy")]
    assert len(cached) == 3 and all(c.shape == (4, 2 * RES, 2 * RES) for c in cached)

    assert run_expand(cfg, tmp_path, progress=False).synthetic == 3
    sources = {s.key: s for s in data}
    variants = list(iter_samples(tmp_path / "shards" / "synthetic"))
    assert len(variants) == 3
    for v in variants:
        src = sources[v.key.rsplit("-v", 1)[0]]
        assert v.image.shape == (RES, RES, 3) and np.array_equal(v.seg, src.seg)

    # generate.layout_supersample=3: layouts made at 3x with the run's PCA, resized to the 2x model size
    from pipeline.lumen.generate import resize_tensor
    from pipeline.lumen.stages import condition_maker, fine_condition_maker, load_run_base

    base, base_id = load_run_base(cfg, tmp_path)
    usual = condition_maker(cfg, base, base_id, data, tmp_path)[0](list(data)).astype(np.float32)
    fine_cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"layout_supersample": 3})})
    assert fine_condition_maker(cfg, base, base_id, data, tmp_path) is None  # off
    finer = fine_condition_maker(fine_cfg, base, base_id, data, tmp_path)
    assert finer is not None
    made = finer(list(data))
    assert made.shape == usual.shape and made.dtype == np.float32
    assert not np.allclose(made, usual)
    at3 = fine_cfg.model_copy(update={"lumen": cfg.lumen.model_copy(update={"supersample": 3})})
    big = condition_maker(at3, base, base_id, data, tmp_path)[0](list(data))
    assert big.shape[-2:] == (3 * RES, 3 * RES)  # the 3x layouts, resized (antialiased) to the model size:
    expected = resize_tensor(torch.from_numpy(big.astype(np.float32)), (2 * RES, 2 * RES)).numpy()
    np.testing.assert_allclose(made, expected, atol=1e-6)
    # lumen evaluate-synthesis mirrors it: the opened run makes the same finer layouts (without a cache)
    import yaml

    from pipeline.config import config_dict
    from pipeline.synthesis.inputs import BaseModels, RunSpec, open_run

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
    bases = BaseModels(torch.device("cpu"))
    opened = open_run(RunSpec("x", tmp_path), fine_cfg, bases, (base, base_id), data, None)
    assert opened.make_fine is not None
    np.testing.assert_allclose(opened.make_fine(list(data)), made, atol=2e-3)
    assert open_run(RunSpec("x", tmp_path), cfg, bases, (base, base_id), data, None).make_fine is None
    with pytest.raises(ValueError, match="nothing to refine"):
        two = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"layout_supersample": 2})})
        fine_condition_maker(two, base, base_id, data, tmp_path)

    one = cfg.model_copy(update={"lumen": cfg.lumen.model_copy(update={"supersample": 1})})
    with pytest.raises(ValueError, match="differ from those the ControlNet was trained on"):
        run_expand(one, tmp_path, progress=False)  # a 2x ControlNet is not used at 1x

    # generate.supersample=3: the same 2x ControlNet generates at 3x from layouts made at 3x, and the
    # variants are still written at the labels' size; the provenance records the layouts' size
    from pipeline.shards.reader import read_shards

    at3 = tmp_path / "at3x"
    for name in ("base", "lumen"):
        shutil.copytree(tmp_path / name, at3 / name)
    shutil.copy(tmp_path / "pca.safetensors", at3 / "pca.safetensors")
    cfg3 = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"supersample": 3})})
    assert run_expand(cfg3, at3, progress=False).synthetic == 3
    larger = {s.key: s for s in iter_samples(at3 / "shards" / "synthetic")}
    for v in variants:
        assert larger[v.key].image.shape == (RES, RES, 3) and np.array_equal(larger[v.key].seg, v.seg)
        assert not np.array_equal(larger[v.key].image, v.image)
    records = [d["json"] for d in read_shards(at3 / "shards" / "synthetic")]
    assert all(r["layout"]["layout"]["size"] == [3 * RES, 3 * RES] for r in records)
    assert all(r["layout"]["supersample"] == 3 for r in records)


def test_expand_writes_real_and_synthetic_shards_with_the_expected_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.lumen.expand import run_expand
    from pipeline.shards.reader import iter_samples
    from pipeline.shards.verify import verify_shard_set

    cfg = build_config(
        {
            "data": {"num_images": 3, "image_size": [RES, RES]},
            "base": {"resolution": RES},
            "layouts": {"num_components": 4, "pca_images": 3, "pca_vectors_per_image": 32, "batch_size": 2},
            "lumen": {"train_steps": 1, "batch_size": 2, "validate_every": 100},
            "generate": {"variants": 2, "steps": 2, "chunk_size": 2, "variation_prompts": ["at night"]},
            "perception": {
                "tasks": ["seg", "depth"],
                "steps": 2,
                "seeds": [0, 1],
                "batch_size": 2,
                "low_label_fraction": None,
                "num_test_images": 3,
                "arms": ["real", "real+synthetic"],
                "encoder_depth": 3,
                "decoder_channels": [16, 8, 8],
            },
        }
    )
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    build_tiny_components(build_tokenizer([s.caption for s in data], max_length=16), RES, preset=PRESET).save(
        tmp_path / "base"
    )
    run_train_lumen(cfg, tmp_path, progress=False)
    summary = run_expand(cfg, tmp_path, progress=False)
    assert (summary.real, summary.synthetic, summary.quarantined) == (3, 6, 0)
    real, syn = (
        verify_shard_set(tmp_path / "shards" / "real"),
        verify_shard_set(tmp_path / "shards" / "synthetic"),
    )
    assert real.ok and syn.ok, real.problems + syn.problems
    keys = data.keys()
    assert sorted(real.keys) == sorted(keys)
    assert sorted(syn.keys) == sorted(f"{k}-v{v:02d}" for k in keys for v in range(2))
    by_key = {s.key: s for s in iter_samples(tmp_path / "shards" / "synthetic")}
    src = data.load(keys[0])
    variant = by_key[f"{keys[0]}-v01"]
    assert np.array_equal(variant.seg, src.seg) and np.array_equal(variant.depth, src.depth)
    assert variant.caption.endswith(", at night")
    from pipeline.shards.reader import read_shards

    record = next(
        d["json"] for d in read_shards(tmp_path / "shards" / "synthetic") if d["__key__"] == variant.key
    )
    assert (record["steps"], record["conditioning_scale"]) == (2, cfg.generate.conditioning_scale)
    assert record["condition_guidance"] is None and record["strength"] is None
    record_of_plain = record
    again = run_expand(cfg, tmp_path, progress=False)  # everything is done: nothing is redone
    assert (again.real, again.synthetic) == (0, 0)

    from perception.stages import run_evaluate

    report_dir = Path(run_evaluate(cfg, tmp_path, progress=False).report).parent
    report = json.loads((report_dir / "report.json").read_text())
    for task, metric in (("seg", "miou"), ("depth", "abs_rel")):
        full = report["tasks"][task]["settings"]["full"]
        assert set(full["real"][metric]) >= {"mean", "std"} and metric in full["gain"]["real+synthetic"]
        assert full["gain"]["real+synthetic"][metric] == pytest.approx(
            full["real+synthetic"][metric]["mean"] - full["real"][metric]["mean"], abs=1e-9
        )
    assert (report_dir / "report.md").is_file() and (report_dir / "figures" / "gains.png").is_file()

    # generate.strength < 1 with condition_guidance: the same run's models, variants started from their
    # source images, guidance on the layout too; provenance records both
    import shutil

    sdedit = tmp_path / "sdedit"
    for folder in ("base", "lumen"):
        shutil.copytree(tmp_path / folder, sdedit / folder)
    half = cfg.model_copy(
        update={"generate": cfg.generate.model_copy(
            update={"strength": 0.5, "condition_guidance": True, "layout_sharpen": 2.0, "layout_sharpen_radius": 1,
                    "layout_sharpen_until": 0.5, "layout_guidance": 4.0}
        )}
    )  # fmt: skip
    assert run_expand(half, sdedit, progress=False).synthetic == 6
    started = {s.key: s for s in iter_samples(sdedit / "shards" / "synthetic")}
    assert not np.array_equal(started[variant.key].image, variant.image)
    record = next(
        d["json"] for d in read_shards(sdedit / "shards" / "synthetic") if d["__key__"] == variant.key
    )
    assert (record["strength"], record["condition_guidance"]) == (0.5, True)
    assert record["layout_sharpen"] == [2.0, 1]
    assert record["layout_sharpen_until"] == 0.5
    assert record["layout_guidance"] == 4.0 and record_of_plain["layout_guidance"] is None
    assert record_of_plain["layout_sharpen"] is None and record_of_plain["layout_sharpen_until"] is None

    # generate.layout_supersample: the later half of the steps sees layouts made at 2x, resized back
    fine_dir = tmp_path / "fine"
    for folder in ("base", "lumen"):
        shutil.copytree(tmp_path / folder, fine_dir / folder)
    fine = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"layout_supersample": 2})})
    from pipeline.lumen.generate import LumenGenerator

    calls: list[dict[str, Any]] = []
    plain_generate = LumenGenerator.generate

    def spy(self: LumenGenerator, conditions: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        calls.append({"conditions": np.asarray(conditions), **kwargs})
        return plain_generate(self, conditions, *args, **kwargs)

    monkeypatch.setattr(LumenGenerator, "generate", spy)
    assert run_expand(fine, fine_dir, progress=False).synthetic == 6
    assert calls and all(
        c["early_fraction"] == 0.5 for c in calls
    )  # the usual layouts first, then the 2x ones
    for c in calls:
        assert c["early_conditions"].shape == c["conditions"].shape == (len(c["conditions"]), 4, RES, RES)
        assert not np.allclose(c["early_conditions"], c["conditions"])
    record = next(
        d["json"] for d in read_shards(fine_dir / "shards" / "synthetic") if d["__key__"] == variant.key
    )
    assert record["layout_supersample"] == [2, 0.5] and record_of_plain["layout_supersample"] is None


def _filtered_run(tmp_path: Path, quality: dict) -> Any:
    """A tiny run folder (base + 1-step ControlNet) for expand with the quality filter settings ``quality``."""
    cfg = build_config(
        {
            "data": {"num_images": 3, "image_size": [RES, RES]},
            "base": {"resolution": RES},
            "layouts": {"num_components": 4, "pca_images": 3, "pca_vectors_per_image": 32, "batch_size": 2},
            "lumen": {"train_steps": 1, "batch_size": 2, "validate_every": 100},
            "generate": {"variants": 2, "steps": 2, "chunk_size": 2, "quality_filter": True, **quality},
            "perception": {"steps": 2, "batch_size": 2, "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        }
    )
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    build_tiny_components(build_tokenizer([s.caption for s in data], max_length=16), RES, preset=PRESET).save(
        tmp_path / "base"
    )
    run_train_lumen(cfg, tmp_path, progress=False)
    return cfg


@pytest.mark.parametrize("mode", ["image", "objects", "pixel"])
def test_expand_quality_filter_drops_or_masks_and_records_scores(tmp_path: Path, mode: str) -> None:
    from pipeline.lumen.expand import quality_summary, run_expand
    from pipeline.shards.reader import iter_samples
    from pipeline.shards.verify import verify_shard_set

    cfg = _filtered_run(tmp_path, {"quality_mode": mode, "quality_threshold": 1.0, "quality_pixel_factor": 1.0,
                                   "quality_retries": 1 if mode == "objects" else 0,
                                   "quality_object_classes": ["sphere", "box"]})  # fmt: skip
    from perception.judges import fit_judge

    summary = run_expand(cfg, tmp_path, progress=False, judge_factory=fit_judge)
    assert (tmp_path / "quality_filter").is_dir()  # the real-trained segmenter, reused on rerun
    assert (tmp_path / "quality_filter" / "objects" / "judge.json").is_file() == (mode == "objects")
    syn = verify_shard_set(tmp_path / "shards" / "synthetic")
    assert syn.ok, syn.problems
    q = quality_summary(tmp_path, num_chunks=2)
    assert q is not None and q["scored"] == 6
    if mode != "pixel":  # a 2-step segmenter never agrees perfectly: every variant is dropped
        assert summary.synthetic == 0 and summary.filtered == 6 and summary.real == 3
        assert q["dropped"] == 6 and q["kept_share"] == 0
        if mode == "objects":  # ... after one more try each, under a new seed
            assert q["regenerated"] == 6 and q["kept_after_retry"] == 0 and q["segments_checked"] >= 0
            variants = [
                v for i in range(2) for v in json.loads(chunk_files(tmp_path, i)[1].read_text())["variants"]
            ]
            assert {v["attempt"] for v in variants} == {2} and all(
                "segments" in v["quality"] for v in variants
            )
            assert all(
                v["seed"] == variant_seed(cfg.seed, f"{v['key']}#attempt2", v["variant"]) for v in variants
            )
        return
    assert summary.synthetic == 6 and summary.filtered == 0
    manifest = json.loads((tmp_path / "shards" / "synthetic" / "manifest.json").read_text())
    assert manifest["dataset"]["ignore_index"] == 255  # toy scenes have none: masked pixels need one
    records = {}
    for tar_path in sorted((tmp_path / "shards" / "synthetic").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    records[m.name.rsplit(".", 1)[0]] = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
    masked = {s.key: float(np.mean(s.seg == 255)) for s in iter_samples(tmp_path / "shards" / "synthetic")}
    assert set(records) == set(masked)
    for key, share in masked.items():
        assert records[key]["quality"]["ignored_share"] == pytest.approx(share, abs=1e-6)
    assert max(masked.values()) > 0  # factor 1 x the class median: some pixels are above it
    assert q["dropped"] == 0 and q["mean_ignored_share"] == pytest.approx(
        np.mean(list(masked.values())), abs=1e-3
    )


def test_quality_retries_regenerate_dropped_variants_under_new_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variant the filter drops is made again with a new seed; the kept attempt is written with that seed."""
    from perception.judges import fit_judge
    from pipeline.lumen.expand import quality_summary, run_expand
    from pipeline.shards.reader import read_shards
    from pipeline.synthesis.filter import QualityFilter

    scored: list[int] = []
    real_score = QualityFilter.score

    def first_attempts_fail(self, images, segs, sources=None):  # type: ignore[no-untyped-def]
        results = real_score(self, images, segs, sources)
        scored.append(len(images))
        for r in results:  # every first attempt is dropped, every second kept
            r.keep = len(scored) % 2 == 0
        return results

    monkeypatch.setattr(QualityFilter, "score", first_attempts_fail)
    cfg = _filtered_run(tmp_path, {"quality_mode": "objects", "quality_threshold": 0.0, "quality_retries": 3,
                                   "quality_object_classes": ["sphere"]})  # fmt: skip
    summary = run_expand(cfg, tmp_path, progress=False, judge_factory=fit_judge)
    assert scored == [4, 4, 2, 2]  # chunk 0: all 4 variants, then the 4 dropped; chunk 1: 2 and 2
    assert summary.synthetic == 6 and summary.filtered == 0
    q = quality_summary(tmp_path, num_chunks=2)
    assert q is not None and q["regenerated"] == 6 and q["kept_after_retry"] == 6
    records = {d["__key__"]: d["json"] for d in read_shards(tmp_path / "shards" / "synthetic")}
    assert len(records) == 6
    for r in records.values():
        assert r["seed"] == variant_seed(cfg.seed, f"{r['source_key']}#attempt2", r["variant"])
        assert r["seed"] != variant_seed(cfg.seed, r["source_key"], r["variant"])


def test_distill_then_expand_with_the_student_on_sparse_labels(tmp_path: Path) -> None:
    """``lumen distill`` on a seg_sparse ControlNet, then expansion by the 2-step student: provenance
    names the student and its steps; a step count without a student fails before any work."""
    from pipeline.config import ConfigError
    from pipeline.lumen.distill import STUDENT_CARD
    from pipeline.lumen.expand import run_expand
    from pipeline.lumen.stages import run_distill, student_folder
    from pipeline.preflight import preflight
    from pipeline.shards.reader import read_shards

    cfg = build_config(
        {
            **_cfg("seg_sparse").model_dump(mode="json", include={"data", "base", "layouts", "lumen"}),
            "distill": {
                "teacher_steps": 4,
                "min_steps": 2,
                "guidance_train_steps": 2,
                "round_train_steps": 2,
                "batch_size": 2,
                "checkpoint_every": 1,
            },
            "generate": {"model": "student", "variants": 1, "steps": 2, "chunk_size": 4},
        }
    )
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    build_tiny_components(build_tokenizer([s.caption for s in data], max_length=16), RES, preset=PRESET).save(
        tmp_path / "base"
    )
    run_train_lumen(cfg, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="lumen distill"):
        student_folder(cfg, tmp_path)
    students = run_distill(cfg, tmp_path, progress=False)
    assert sorted(students) == [2, 4]
    assert students[2] == tmp_path / "distill" / "steps-002" / "student"
    card = json.loads((students[2] / STUDENT_CARD).read_text())
    assert card["steps"] == 2 and card["teacher"]["condition"] == "seg_sparse"
    assert (tmp_path / "distill" / "steps-002" / "validation.png").is_file()
    assert run_distill(cfg, tmp_path, progress=False) == students  # done: nothing is redone

    summary = run_expand(cfg, tmp_path, progress=False)
    assert summary.synthetic == 4
    records = [d["json"] for d in read_shards(tmp_path / "shards" / "synthetic")]
    assert {r["models"]["student"]["id"] for r in records} == {"run/distill/steps-002/student"}
    assert {r["steps"] for r in records} == {2}

    with pytest.raises(ConfigError, match=r"generate.steps=3"):
        preflight(cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"steps": 3})}), "expand")


@pytest.mark.parametrize("kind", ["pca", "clustered"])
def test_train_mapper_then_generate_from_label_maps(tmp_path: Path, kind: str) -> None:
    """``lumen train-mapper`` then ``lumen expand`` with generate.source=labels: shards hold only synthetic
    samples whose seg equals the input (or edited) map exactly, with the edits in their provenance; a
    folder of label PNGs works the same; without a mapper the preflight stops before any work."""
    from PIL import Image

    from pipeline.config import ConfigError
    from pipeline.data.label_maps import LabelMapSource
    from pipeline.lumen.expand import run_expand
    from pipeline.lumen.mapping import run_train_mapper
    from pipeline.preflight import preflight
    from pipeline.shards.reader import iter_samples, read_shards
    from pipeline.shards.verify import verify_shard_set

    base_cfg = _cfg("layout", kind).model_dump(mode="json", include={"data", "base", "layouts", "lumen"})
    cfg = build_config(
        {
            **base_cfg,
            "mapper": {
                "input": "scribble",
                "shots": 3,
                "train_steps": 3,
                "batch_size": 2,
                "width": 8,
                "depth": 2,
            },
            "generate": {
                "source": "labels",
                "edits": ["hflip", "shift", "copy_paste"],
                "edited_per_map": 2,
                "variants": 2,
                "steps": 2,
                "chunk_size": 5,
            },
        }
    )
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    build_tiny_components(build_tokenizer([s.caption for s in data], max_length=16), RES, preset=PRESET).save(
        tmp_path / "base"
    )
    run_train_lumen(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="lumen train-mapper"):
        preflight(cfg, "expand", tmp_path)
    folder = run_train_mapper(cfg, tmp_path, progress=False)
    card = json.loads((folder / "mapper.json").read_text())
    assert folder == tmp_path / "mapper" / "scribble"
    assert card["shots"] == 3 and card["target"] == ("proxy" if kind == "clustered" else "layout")
    preflight(cfg, "expand", tmp_path)

    summary = run_expand(cfg, tmp_path, progress=False)
    maps = LabelMapSource((RES, RES), data.info, base=data, edits=list(cfg.generate.edits), edited_per_map=2,
                          seed=cfg.seed)  # fmt: skip
    assert len(maps) == 4 * 3 and (summary.real, summary.synthetic) == (4, 4 * 3 * 2)
    syn = verify_shard_set(tmp_path / "shards" / "synthetic")
    assert syn.ok, syn.problems
    assert sorted(syn.keys) == sorted(f"{k}-v{v:02d}" for k in maps.keys() for v in range(2))
    for sample in iter_samples(tmp_path / "shards" / "synthetic"):
        label_map = maps.load(sample.key.rsplit("-v", 1)[0])
        assert np.array_equal(sample.seg, label_map.seg)  # the label is the input map, edits included
        assert sample.depth is None and sample.image.std() > 0  # a generated image, not the placeholder
    records = {d["__key__"]: d["json"] for d in read_shards(tmp_path / "shards" / "synthetic")}
    edited = [r for k, r in records.items() if "-e" in k]
    assert edited and all(len(r["edits"]) == 1 and r["label_source"] == "dataset-seg" for r in edited)
    assert {r["edits"][0]["op"] for r in edited} <= {"hflip", "shift", "copy_paste"}
    assert all(r["models"]["mapper"]["id"] == "run/mapper/scribble" for r in records.values())
    real = {s.key: s for s in iter_samples(tmp_path / "shards" / "real")}  # the images the maps come from
    assert sorted(real) == sorted(data.keys())
    assert np.array_equal(real[data.keys()[0]].image, data.load(data.keys()[0]).image)

    # A folder of label PNGs: the maps' own ids, no edits.
    label_dir = tmp_path / "maps"
    label_dir.mkdir()
    for i in range(2):
        seg = np.zeros((RES, RES), np.uint8)
        seg[RES // 2 :] = 1
        seg[4 + i : 12, 6:14] = 3
        Image.fromarray(seg).save(label_dir / f"drawn-{i}.png")
    cfg2 = build_config(
        {
            **cfg.model_dump(mode="json", exclude={"generate"}),
            "generate": {"source": "labels", "label_dir": str(label_dir), "variants": 1, "steps": 2},
        }
    )
    run2 = tmp_path / "run2"
    for name in ("base", "lumen", "mapper"):
        shutil.copytree(tmp_path / name, run2 / name)
    for name in ("pca.safetensors", "kmeans.safetensors"):
        if (tmp_path / name).is_file():
            shutil.copy(tmp_path / name, run2 / name)
    result = run_expand(cfg2, run2, progress=False)
    assert (result.real, result.synthetic) == (0, 2)  # drawn maps have no real image
    out = {s.key: s for s in iter_samples(run2 / "shards" / "synthetic")}
    assert sorted(out) == ["drawn-0-v00", "drawn-1-v00"]
    assert np.array_equal(out["drawn-1-v00"].seg, np.asarray(Image.open(label_dir / "drawn-1.png")))

    # Re-rendered images plus edited maps in one expansion (generate.source=images, edited_per_map=1).
    cfg3 = build_config(
        {
            **cfg.model_dump(mode="json", exclude={"generate"}),
            "generate": {"edits": ["scale"], "edited_per_map": 1, "variants": 1, "steps": 2, "chunk_size": 3},
        }
    )
    run3 = tmp_path / "run3"
    shutil.copytree(run2, run3, ignore=shutil.ignore_patterns("shards", "work", "layouts", "summaries"))
    result = run_expand(cfg3, run3, progress=False)
    assert (result.real, result.synthetic) == (4, 8)
    syn3 = {d["__key__"]: d["json"] for d in read_shards(run3 / "shards" / "synthetic")}
    assert sorted(syn3) == sorted([f"{k}-v00" for k in data.keys()] + [f"{k}-e00-v00" for k in data.keys()])
    assert all(bool(r.get("edits")) == ("-e00" in k) for k, r in syn3.items())
    rerendered = next(
        s for s in iter_samples(run3 / "shards" / "synthetic") if s.key == f"{data.keys()[0]}-v00"
    )
    assert np.array_equal(rerendered.seg, data.load(data.keys()[0]).seg) and rerendered.depth is not None


def test_train_controls_then_expand_with_class_edits(tmp_path: Path) -> None:
    """``lumen train-controls`` writes directions + a preview per class; expand with class edits records
    each variant's edit; a variant planned with strength 0 is the unedited image bit for bit."""
    from pipeline.config import ConfigError
    from pipeline.lumen.controls import ClassDirections
    from pipeline.lumen.expand import run_expand
    from pipeline.lumen.expand_context import _CONTEXTS
    from pipeline.preflight import preflight
    from pipeline.shards.reader import iter_samples, read_shards

    cfg = build_config(
        {
            **_cfg("layout").model_dump(mode="json", include={"data", "base", "layouts", "lumen"}),
            "controls": {
                "classes": ["floor", "sky"],
                "directions_per_class": 2,
                "layer": "up_blocks.0",
                "feature_layer": "up_blocks.1",
                "train_steps": 3,
                "batch_size": 2,
                "min_pixels": 4,
                "num_images": 4,
            },
            "generate": {
                "variants": 2,
                "steps": 2,
                "chunk_size": 4,
                "class_edits": {"classes": ["floor"], "strengths": [2.0]},
            },
        }
    )
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    build_tiny_components(build_tokenizer([s.caption for s in data], max_length=16), RES, preset=PRESET).save(
        tmp_path / "base"
    )
    run_train_lumen(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="lumen train-controls"):
        preflight(cfg, "expand", tmp_path)
    from pipeline.lumen.controls import run_train_controls

    path = run_train_controls(cfg, tmp_path, progress=False)
    found = ClassDirections.load(path)
    assert found.class_names == ["floor", "sky"] and found.directions.shape[:2] == (2, 2)
    assert (tmp_path / "controls" / "preview-floor.png").is_file()
    summary = run_expand(cfg, tmp_path, progress=False)
    assert summary.synthetic == 8
    records = {d["__key__"]: d["json"] for d in read_shards(tmp_path / "shards" / "synthetic")}
    edits = [r["class_edit"] for r in records.values() if r.get("class_edit")]
    assert edits and all(
        e["class"] == "floor" and e["strength"] == 2.0 and e["direction"] in (0, 1) for e in edits
    )
    assert all(
        r["models"]["controls"]["id"] == "run/controls/directions.safetensors" for r in records.values()
    )
    edited = {s.key: s.image for s in iter_samples(tmp_path / "shards" / "synthetic")}

    # strength 0: the same variants as without class edits, bit for bit
    zero = cfg.model_copy(update={"generate": cfg.generate.model_copy(
        update={"class_edits": cfg.generate.class_edits.model_copy(update={"strengths": [0.0]})})})  # fmt: skip
    plain = cfg.model_copy(update={"generate": cfg.generate.model_copy(
        update={"class_edits": cfg.generate.class_edits.model_copy(update={"classes": []})})})  # fmt: skip
    images = {}
    for name, c in (("zero", zero), ("plain", plain)):
        run = tmp_path / name
        shutil.copytree(
            tmp_path, run, ignore=shutil.ignore_patterns("shards", "work", "summaries", "zero", "plain")
        )
        _CONTEXTS.clear()
        run_expand(c, run, progress=False)
        images[name] = {s.key: s.image for s in iter_samples(run / "shards" / "synthetic")}
    assert images["zero"].keys() == images["plain"].keys() == edited.keys()
    assert all(np.array_equal(images["zero"][k], images["plain"][k]) for k in edited)
    assert any(not np.array_equal(edited[k], images["plain"][k]) for k in edited)

    # hardness-aware: a real-only segmenter on 80% of the training images, 1 - IoU on the other 20%
    from perception.judges import fit_judge

    hard = build_config({**cfg.model_dump(mode="json", exclude={"generate", "perception"}),
                         "data": {**cfg.data.model_dump(mode="json"), "num_images": 12},
                         "perception": {"steps": 2, "batch_size": 2, "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
                         "generate": {**cfg.generate.model_dump(mode="json"),
                                      "class_edits": {"classes": ["floor"], "weights": "hardness"}}})  # fmt: skip
    run = tmp_path / "hard"
    shutil.copytree(
        tmp_path, run, ignore=shutil.ignore_patterns("shards", "work", "summaries", "zero", "plain")
    )
    _CONTEXTS.clear()
    run_expand(hard, run, progress=False, judge_factory=fit_judge)
    report = json.loads((run / "controls" / "hardness.json").read_text())
    assert set(report["one_minus_iou"]) == {"floor"} and report["held_out"] + report["trained_on"] == 12
    weights = [
        d["json"]["class_edit"]["class_weight"]
        for d in read_shards(run / "shards" / "synthetic")
        if d["json"].get("class_edit")
    ]
    assert weights and all(w == pytest.approx(report["one_minus_iou"]["floor"], abs=1e-4) for w in weights)


def test_candidates_keep_the_variant_whose_layout_agrees_best_and_record_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate.candidates``: each variant is the best of K by layout agreement (ties to the earlier);
    candidate 0 is exactly the variant without selection, the others come from their own seeds; the
    shards record the choice, and the seed remakes the kept image."""
    import hashlib

    import pipeline.synthesis.metrics as metrics
    from pipeline.lumen.expand import run_expand
    from pipeline.shards.reader import iter_samples, read_shards

    cfg = _filtered_run(tmp_path / "one", {"quality_filter": False})
    summary = run_expand(cfg, tmp_path / "one", progress=False)
    assert summary.synthetic == 6
    shutil.copytree(tmp_path / "one", tmp_path / "three", ignore=shutil.ignore_patterns("shards", "expand*"))
    calls: dict[str, list[np.ndarray]] = {}
    real_agreement = metrics.layout_agreement

    def spy(reference, candidates, score="cosine"):  # type: ignore[no-untyped-def]
        out = real_agreement(reference, candidates, score)
        calls.setdefault(hashlib.sha256(np.ascontiguousarray(reference).tobytes()).hexdigest(), []).append(
            out
        )
        return out

    monkeypatch.setattr(metrics, "layout_agreement", spy)
    three = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"candidates": 3})})
    assert run_expand(three, tmp_path / "three", progress=False).synthetic == 6
    assert sorted(len(c) for c in calls.values()) == [3, 3]  # two chunks, three candidates each
    best = {len(c[0]): np.stack(c) for c in calls.values()}  # chunk of 4 variants, chunk of 2
    assert sorted(best) == [2, 4]

    plain = {s.key: s.image for s in iter_samples(tmp_path / "one" / "shards" / "synthetic")}
    chosen = {s.key: s.image for s in iter_samples(tmp_path / "three" / "shards" / "synthetic")}
    records = {d["__key__"]: d["json"] for d in read_shards(tmp_path / "three" / "shards" / "synthetic")}
    assert set(records) == set(plain) == set(chosen)
    for index, n in ((0, 4), (1, 2)):
        meta = json.loads(chunk_files(tmp_path / "three", index)[1].read_text())
        scores = best[n]
        for j, v in enumerate(meta["variants"]):
            c = v["candidate"]
            assert c == int(np.argmax(scores[:, j])) and v["layout_agreement"] == pytest.approx(
                scores[c, j], abs=1e-6
            )
            sel = records[v["out_key"]]["selection"]
            assert sel == {
                "candidates": 3,
                "score": "edges",
                "chosen": c,
                "layout_agreement": v["layout_agreement"],
            }
            own = variant_seed(cfg.seed, v["key"], v["variant"])
            assert records[v["out_key"]]["seed"] == (
                own if c == 0 else variant_seed(cfg.seed, f"{v['key']}#candidate{c}", v["variant"])
            )
            assert np.array_equal(chosen[v["out_key"]], plain[v["out_key"]]) == (c == 0)
    assert len({r["selection"]["chosen"] for r in records.values()}) > 1  # the choice is not always the first
