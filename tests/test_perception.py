"""Perception: joint transforms, the DataModule (mixing, low-label, shards), metrics, heads, train, protocol.

Tiny data (toy scenes at 32x32, random samples at 16x16) and a ~0.4M-parameter U-Net; CPU only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torchmetrics.regression import MeanAbsolutePercentageError, MeanSquaredError

from perception.data import (
    AdditiveSampler,
    MixedSampler,
    PerceptionDataModule,
    RankSlice,
    ShardSamples,
    dataset_info_from_shards,
    pair_variants,
    select_labelled,
    source_key,
)
from perception.metrics import (
    METRIC_NAMES,
    DepthMetrics,
    NormalMetrics,
    SegMetrics,
    depth_scores,
    normal_scores,
    seg_confusion,
    seg_scores,
)
from perception.models import PerceptionModule, build_head
from perception.protocol import plan_runs, run_protocol
from perception.train import train
from perception.transforms import IGNORE, Augment, JointTransform, build_train_transform, to_tensors
from pipeline.config import PerceptionConfig, ShardConfig
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.data.toyscenes import ToyScenes
from pipeline.report.gains import ARMS, METRICS, make_report
from pipeline.shards import ShardSetWriter

TINY = {"encoder": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": (32, 16, 8)}
TINY_CFG = PerceptionConfig(encoder_depth=3, decoder_channels=[32, 16, 8], batch_size=4, steps=3)
INFO = DatasetInfo("random", classes=tuple(f"c{i}" for i in range(4)), ignore_index=None)


@pytest.fixture(scope="module")
def toy() -> tuple[list[Sample], list[Sample], DatasetInfo]:
    train_ds = ToyScenes(num_images=8, image_size=(32, 32))
    val_ds = ToyScenes(num_images=4, image_size=(32, 32), split="val")
    return [train_ds.load(k) for k in train_ds.keys()], [val_ds.load(k) for k in val_ds.keys()], train_ds.info


@pytest.fixture(scope="module")
def toy96() -> Sample:
    ds = ToyScenes(num_images=1, image_size=(96, 96), seed=3)
    return ds.load(ds.keys()[0])


def fake(key: str, size: int = 16, seed: int = 0, **meta: str) -> Sample:
    """A random sample with all labels (4 classes, depth 1..5 m, unit normals facing the camera)."""
    rng = np.random.default_rng([seed, *key.encode()])
    normal = rng.normal(size=(size, size, 3)).astype(np.float32)
    normal[..., 2] = -np.abs(normal[..., 2])
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return Sample(
        key=key,
        image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        seg=rng.integers(0, 4, (size, size)).astype(np.uint8),
        depth=rng.uniform(1, 5, (size, size)).astype(np.float32),
        normal=normal,
        meta=dict(meta),
    )


def variants_of(samples: list[Sample], k: int) -> list[Sample]:
    """k synthetic variants per sample: new images, the source's labels, keys ``<source>-vNN``."""
    return [
        dataclasses.replace(s, key=f"{s.key}-v{v:02d}", image=np.roll(s.image, v + 1, axis=2))
        for s in samples
        for v in range(k)
    ]


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def normals_from_depth(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Camera-frame unit normals (facing the camera) from z-depth by central differences; 0 at borders."""
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    points = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], axis=-1)
    du = np.zeros_like(points)
    dv = np.zeros_like(points)
    du[:, 1:-1] = points[:, 2:] - points[:, :-2]
    dv[1:-1] = points[2:] - points[:-2]
    n = np.cross(du, dv)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return np.where((n * points).sum(-1, keepdims=True) > 0, -n, n)


def smooth_mask(sample: Sample) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is one class with valid depth and nearly the same normal."""
    seg, depth, normal = sample.seg, sample.depth, sample.normal
    assert seg is not None and depth is not None and normal is not None
    ok = np.zeros(seg.shape, bool)
    ok[1:-1, 1:-1] = True
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = (slice(1 + dy, seg.shape[0] - 1 + dy), slice(1 + dx, seg.shape[1] - 1 + dx))
            inner = ok[1:-1, 1:-1]
            inner &= seg[shifted] == seg[1:-1, 1:-1]
            inner &= depth[shifted] > 0
            inner &= (normal[shifted] * normal[1:-1, 1:-1]).sum(-1) > 0.99
    return ok


def agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean cosine between two normal maps over a mask."""
    return float((a * b).sum(-1)[mask].mean())


def test_hflip_keeps_normals_consistent_with_the_flipped_depth(toy96: Sample) -> None:
    """After a horizontal flip, the normals match those implied by the flipped depth (x negated)."""
    fx, fy, cx, cy = toy96.meta["intrinsics"]
    assert toy96.normal is not None and toy96.depth is not None
    mask = smooth_mask(toy96)
    assert mask.sum() > 1000
    assert (
        agreement(toy96.normal, normals_from_depth(toy96.depth, fx, fy, cx, cy), mask) > 0.99
    )  # estimator ok

    out = JointTransform([A.HorizontalFlip(p=1.0)])(toy96)
    assert out.normal is not None and out.depth is not None and out.seg is not None
    np.testing.assert_array_equal(out.depth, toy96.depth[:, ::-1])
    np.testing.assert_array_equal(out.seg, toy96.seg[:, ::-1])  # type: ignore[index]
    from_depth = normals_from_depth(out.depth, fx, fy, 96 - cx, cy)
    flipped_mask = mask[:, ::-1]
    assert agreement(out.normal, from_depth, flipped_mask) > 0.99
    slanted = flipped_mask & (np.abs(out.normal[..., 0]) > 0.3)  # surfaces facing left or right
    assert slanted.sum() > 50
    assert agreement(out.normal, from_depth, slanted) > 0.99
    assert agreement(toy96.normal[:, ::-1], from_depth, slanted) < 0.5  # mirroring without negating x fails
    np.testing.assert_allclose(out.normal[..., 0], -toy96.normal[:, ::-1, 0])


def test_crop_and_scale_leave_normals_unchanged(toy96: Sample) -> None:
    """Crop + downscale + flip: normals still match the depth under the crop's new intrinsics."""
    fx, fy, cx, cy = toy96.meta["intrinsics"]
    x0, y0, x1, y1, size = 10, 6, 86, 82, 48
    transform = JointTransform(
        [A.Crop(x_min=x0, y_min=y0, x_max=x1, y_max=y1), A.Resize(size, size), A.HorizontalFlip(p=1.0)]
    )
    out = transform(toy96)
    assert out.normal is not None and out.depth is not None and out.seg is not None
    s = size / (x1 - x0)
    from_depth = normals_from_depth(out.depth, fx * s, fy * s, size - (cx - x0) * s, (cy - y0) * s)
    mask = smooth_mask(out)
    assert mask.sum() > 300
    assert agreement(out.normal, from_depth, mask) > 0.99
    norms = np.linalg.norm(out.normal, axis=-1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))  # nearest neighbour keeps unit vectors
    assert set(np.unique(out.seg)) <= set(np.unique(toy96.seg))  # type: ignore[arg-type]


def test_colour_jitter_changes_the_image_only(toy: tuple[list[Sample], list[Sample], DatasetInfo]) -> None:
    """Colour jitter alters the image but leaves seg, depth and normals bit-identical."""
    sample = toy[0][0]
    out = JointTransform([A.ColorJitter(brightness=(1.5, 1.5), p=1.0)], seed=0)(sample)
    assert not np.array_equal(out.image, sample.image)
    for name in ("seg", "depth", "normal"):
        np.testing.assert_array_equal(getattr(out, name), getattr(sample, name))


def test_train_transform_is_reproducible_from_its_seed(
    toy: tuple[list[Sample], list[Sample], DatasetInfo],
) -> None:
    """Reseeding gives the same augmentation; the crops have the requested size."""
    transform = build_train_transform((24, 24), seed=0)
    transform.set_seed(7)
    a = transform(toy[0][1])
    transform.set_seed(7)
    b = transform(toy[0][1])
    assert a.image.shape == (24, 24, 3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.normal, b.normal)  # type: ignore[arg-type]


def test_transforms_with_unknown_effect_on_normals_are_rejected() -> None:
    """Rotations and vertical flips would corrupt normals: JointTransform refuses them."""
    for t in (A.Rotate(limit=10), A.VerticalFlip()):
        with pytest.raises(ValueError, match="normals"):
            JointTransform([t])


def test_to_tensors_pads_with_invalid_labels_and_maps_the_ignore_index() -> None:
    """Padding is ignored in seg (-1), invalid in depth/normals; the ignore index becomes -1."""
    sample = fake("a", size=12)
    assert sample.seg is not None
    sample.seg[0, 0] = 3
    out = to_tensors(sample, ["seg", "depth", "normal"], ignore_index=3, pad_multiple=8)
    assert out["image"].shape == (3, 16, 16) and out["seg"].shape == (16, 16)
    assert out["depth"].shape == (1, 16, 16) and out["normal"].shape == (3, 16, 16)
    assert (
        out["seg"][0, 0] == IGNORE
        and (out["seg"][12:] == IGNORE).all()
        and (out["seg"][:, 12:] == IGNORE).all()
    )
    assert (out["depth"][:, 12:] == 0).all() and (out["normal"][:, :, 12:] == 0).all()
    with pytest.raises(ValueError, match="no seg"):
        to_tensors(dataclasses.replace(sample, seg=None), ["seg"])


# --------------------------------------------------------------------------------------------------
# Data module
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_mixing_ratio_holds_over_an_epoch(ratio: float) -> None:
    """The share of synthetic samples over an epoch is the ratio (to 1%), and within one of it per batch."""
    real = [fake(f"r{i}", size=8) for i in range(50)]
    synthetic = variants_of(real, 3)
    dm = PerceptionDataModule(
        real, real[:2], synthetic, tasks=["seg"], mixing="replace", synthetic_ratio=ratio, batch_size=10,
        pad_multiple=8,
    )  # fmt: skip
    flags = [batch["synthetic"] for batch in dm.train_dataloader()]
    share = torch.cat(flags).float().mean().item()
    assert abs(share - ratio) < 0.01
    assert all(abs(f.float().sum().item() - ratio * 10) <= 1 for f in flags)
    assert len(torch.cat(flags)) >= 50 if ratio < 1 else len(torch.cat(flags)) == 150


def test_sampler_draws_each_real_sample_once_per_epoch_and_reshuffles() -> None:
    """With ratio r, an epoch draws every real sample once; the order changes with the epoch."""
    sampler = MixedSampler(num_real=40, num_synthetic=7, synthetic_ratio=0.2, batch_size=5, seed=1)
    draws = list(sampler)
    real = sorted(i for s, i, _ in draws if s == 0)
    assert real == list(range(40))
    assert all(0 <= i < 7 for s, i, _ in draws if s == 1)
    sampler.set_epoch(1)
    assert list(sampler) != draws
    with pytest.raises(ValueError, match="no synthetic"):
        MixedSampler(10, 0, 0.5, 4)


def test_batches_do_not_depend_on_the_number_of_workers() -> None:
    """Each draw carries its augmentation seed: 0 or 2 DataLoader workers give the same batches."""
    real = [fake(f"r{i}", size=8) for i in range(8)]
    batches = []
    for workers in (0, 2):
        dm = PerceptionDataModule(
            real,
            real[:1],
            variants_of(real, 1),
            mixing="replace",
            synthetic_ratio=0.5,
            batch_size=4,
            num_workers=workers,
            pad_multiple=8,
        )
        batches.append([b["image"] for b in dm.train_dataloader()])
    assert len(batches[0]) == 4
    for a, b in zip(*batches, strict=True):
        torch.testing.assert_close(a, b)


def test_low_label_subset_is_chosen_by_key_and_restricts_the_synthetic_data() -> None:
    """The subset depends only on keys and seed, is nested, and only its variants are used."""
    keys = [f"k{i:03d}" for i in range(200)]
    small = select_labelled(keys, 0.1, seed=0)
    assert len(small) == 20
    assert {keys[i] for i in small} == {keys[::-1][i] for i in select_labelled(keys[::-1], 0.1, seed=0)}
    assert set(small) <= set(select_labelled(keys, 0.5, seed=0))
    assert small != select_labelled(keys, 0.1, seed=1)

    real = [fake(f"r{i}", size=8) for i in range(20)]
    dm = PerceptionDataModule(
        real, real[:2], variants_of(real, 2), synthetic_ratio=0.5, low_label_fraction=0.25, pad_multiple=8
    )
    dm.setup()
    assert len(dm.real_train) == 5 and len(dm.synthetic_train) == 10
    assert {source_key(s) for s in dm.synthetic_train} == set(dm.train_real_keys)


def test_validation_uses_real_data_only_without_augmentation() -> None:
    """The validation loader yields exactly the real validation samples, unchanged."""
    real = [fake(f"r{i}", size=8) for i in range(6)]
    val = [fake(f"v{i}", size=8) for i in range(3)]
    dm = PerceptionDataModule(
        real, val, variants_of(real, 1), synthetic_ratio=0.5, batch_size=2, pad_multiple=8
    )
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]] == ["v0", "v1", "v2"]
    expected = default_collate([to_tensors(s, ["seg"], pad_multiple=8) for s in val[:2]])
    torch.testing.assert_close(batches[0]["image"], expected["image"])


def test_samples_without_the_task_labels_are_left_out() -> None:
    """A real sample lacking the task's label is not trained on."""
    real = [fake(f"r{i}", size=8) for i in range(4)]
    real[0] = dataclasses.replace(real[0], depth=None)
    dm = PerceptionDataModule(real, real[1:], tasks=["depth"], pad_multiple=8)
    dm.setup()
    assert dm.train_real_keys == ["r1", "r2", "r3"]


def _write_set(path: Path, samples: list[Sample], synthetic: bool) -> None:
    with ShardSetWriter.from_config(
        path, ShardConfig(max_samples=3), dataset_card=INFO.card(), config_hash="test"
    ) as writer:
        for s in samples:
            split = "val" if s.key == "r4" else "train"
            prov = {
                "source_dataset": "random",
                "source_key": source_key(s),
                "synthetic": synthetic,
                "split": split,
            }
            if synthetic:
                prov.update(variant=0, seed=0)
            writer.write(s, prov)


def test_shard_sets_are_read_with_random_access(tmp_path: Path) -> None:
    """Shard sets give the same samples by index; provenance gives the synthetic source keys."""
    real = [fake(f"r{i}", size=8) for i in range(5)]
    synthetic = [
        dataclasses.replace(s, key=f"syn{i}", meta={"source_key": s.key}) for i, s in enumerate(real)
    ]
    _write_set(tmp_path / "real", real, synthetic=False)
    _write_set(tmp_path / "synthetic", synthetic, synthetic=True)

    shards = ShardSamples(tmp_path / "real")
    assert shards.keys == [s.key for s in real] and shards.labels[0] == ("depth", "normal", "seg")
    got = shards[3]
    np.testing.assert_array_equal(got.image, real[3].image)
    np.testing.assert_array_equal(got.normal, real[3].normal)  # type: ignore[arg-type]
    assert ShardSamples(tmp_path / "synthetic").source_keys == [s.key for s in real]
    assert dataset_info_from_shards(tmp_path / "real").num_classes == 4
    assert ShardSamples(tmp_path / "real", split="val").keys == ["r4"]

    dm = PerceptionDataModule(
        tmp_path / "real",
        [tmp_path / "real"],
        tmp_path / "synthetic",
        tasks=["seg", "normal"],
        mixing="replace",
        synthetic_ratio=0.5,
        low_label_fraction=0.4,
        batch_size=2,
        pad_multiple=8,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["normal"].shape == (2, 3, 8, 8)
    assert {source_key(s) for s in dm.synthetic_train} == set(dm.train_real_keys)
    assert len(pair_variants(shards, ShardSamples(tmp_path / "synthetic"), max_sources=2)) == 2


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_seg_metrics_match_hand_computed_values() -> None:
    """mIoU leaves out classes absent from labels and predictions; ignored pixels do not count."""
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    cm = seg_confusion(pred, target, num_classes=5)
    assert cm.sum() == 7
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2;
    # class 3: predicted only on an ignored pixel -> absent; class 4: absent.
    scores = seg_scores(cm)
    assert scores["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_acc"] == pytest.approx(5 / 7)
    assert set(scores) == {"miou", "pixel_acc"}  # per-class IoUs only when asked for
    names = ["sky", "road", "car", "sign", "pole"]
    per_class = seg_scores(cm, names)
    assert per_class["iou_sky"] == pytest.approx(2 / 4) and per_class["iou_road"] == pytest.approx(2 / 3)
    assert per_class["iou_car"] == pytest.approx(1 / 2)
    assert math.isnan(per_class["iou_sign"]) and math.isnan(per_class["iou_pole"])
    with pytest.raises(ValueError, match="class names"):
        seg_scores(cm, names[:3])


def test_depth_metrics_match_hand_computed_values() -> None:
    """AbsRel, RMSE and delta1 over valid pixels; they agree with torchmetrics' MAPE and RMSE."""
    target = torch.tensor([1.0, 2.0, 4.0, 0.0])
    pred = torch.tensor([1.1, 3.0, 4.0, 9.0])
    scores = depth_scores(pred, target)
    assert scores["abs_rel"] == pytest.approx((0.1 + 0.5 + 0.0) / 3)
    assert scores["rmse"] == pytest.approx(math.sqrt((0.01 + 1.0 + 0.0) / 3))
    assert scores["delta1"] == pytest.approx(2 / 3)  # 1.1 and 1.0 pass, 1.5 fails
    valid = target > 0
    assert scores["abs_rel"] == pytest.approx(
        MeanAbsolutePercentageError()(pred[valid], target[valid]).item()
    )
    assert scores["rmse"] == pytest.approx(MeanSquaredError(squared=False)(pred[valid], target[valid]).item())


def test_normal_metrics_match_hand_computed_values() -> None:
    """Angles of 0, 10, 20, 45 and 90 degrees (one invalid pixel ignored)."""
    angles = [0.0, 10.0, 20.0, 45.0, 90.0]
    rad = torch.deg2rad(torch.tensor(angles))
    pred = torch.stack([torch.sin(rad), torch.zeros(5), -torch.cos(rad)]).reshape(1, 3, 1, 5) * 3.0
    target = torch.tensor([0.0, 0.0, -1.0]).reshape(1, 3, 1, 1).repeat(1, 1, 1, 5)
    pred = torch.cat([pred, torch.tensor([1.0, 0, 0]).reshape(1, 3, 1, 1)], dim=3)
    target = torch.cat([target, torch.zeros(1, 3, 1, 1)], dim=3)  # invalid pixel
    scores = normal_scores(pred, target)
    assert scores["mean_angle"] == pytest.approx(sum(angles) / 5, abs=1e-3)
    assert scores["median_angle"] == pytest.approx(20.0, abs=1e-3)
    assert scores["within_11_25"] == pytest.approx(2 / 5)
    assert scores["within_22_5"] == pytest.approx(3 / 5)
    assert scores["within_30"] == pytest.approx(3 / 5)


def test_accumulated_metrics_equal_the_one_shot_values() -> None:
    """Updating the torchmetrics classes batch by batch gives the metric of all pixels together."""
    g = torch.Generator().manual_seed(0)
    seg_t, seg_p = torch.randint(0, 4, (4, 8, 8), generator=g), torch.randn(4, 4, 8, 8, generator=g)
    dep_t, dep_p = torch.rand(4, 1, 8, 8, generator=g) * 5, torch.rand(4, 1, 8, 8, generator=g) * 5 + 0.1
    nor_t, nor_p = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    nor_t = torch.nn.functional.normalize(nor_t, dim=1)
    seg, depth, normal = SegMetrics(4), DepthMetrics(), NormalMetrics()
    for i in (slice(0, 1), slice(1, 4)):
        seg.update(seg_p[i], seg_t[i])
        depth.update(dep_p[i], dep_t[i])
        normal.update(nor_p[i], nor_t[i])
    assert seg.compute() == pytest.approx(seg_scores(seg_confusion(seg_p.argmax(1), seg_t, 4)))
    assert depth.compute() == pytest.approx(depth_scores(dep_p, dep_t))
    assert normal.compute() == pytest.approx(normal_scores(nor_p, nor_t))


def test_metric_names_are_those_the_report_knows() -> None:
    """Every perception metric has a direction in the gains report."""
    assert {m for names in METRIC_NAMES.values() for m in names} == set(METRICS)


# --------------------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["seg", "depth", "normal"])
def test_each_head_overfits_a_tiny_batch(
    task: str, toy: tuple[list[Sample], list[Sample], DatasetInfo]
) -> None:
    """Training on two images drives the head's loss down by 10x."""
    batch = default_collate([to_tensors(s, [task], pad_multiple=8) for s in toy[0][:2]])
    torch.manual_seed(0)
    model = PerceptionModule(task, num_classes=6, **TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.losses(batch)[task].item()
    for _ in range(150):
        loss = model.losses(batch)[task]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, f"{task}: {first:.3f} -> {loss.item():.3f}"


def test_multitask_model_splits_its_outputs_between_heads() -> None:
    """One network, C = classes + 1 + 3 channels; unit normals, positive depth."""
    model = PerceptionModule(["seg", "depth", "normal"], num_classes=5, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert out["seg"].shape == (2, 16, 16) and out["seg"].max() < 5
    assert out["depth"].shape == (2, 1, 16, 16) and (out["depth"] > 0).all()
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 16, 16))


def test_unknown_tasks_and_missing_classes_are_explained() -> None:
    """Heads are chosen by name; errors list the valid names or say what is missing."""
    with pytest.raises(KeyError, match="seg, depth, normal"):
        build_head("edges")
    with pytest.raises(ValueError, match="num_classes"):
        build_head("seg")


def test_train_is_deterministic_and_writes_only_to_out_dir(
    toy: tuple[list[Sample], list[Sample], DatasetInfo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same seed gives the same weights and metrics; nothing lands in the working directory."""
    real, val, info = toy
    monkeypatch.chdir(tmp_path)
    runs = [
        train(
            "seg",
            real,
            val,
            synthetic=variants_of(real, 1),
            config=TINY_CFG,
            info=info,
            seed=0,
            out_dir=tmp_path / "out" if i == 0 else None,
        )
        for i in range(2)
    ]
    assert runs[0].metrics == runs[1].metrics and runs[0].model_sha256 == runs[1].model_sha256
    assert runs[0].steps == 3 and set(runs[0].metrics["seg"]) == {"miou", "pixel_acc"}
    assert runs[0].num_real == 8 and runs[0].num_synthetic == 8 and runs[0].num_val == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["model_sha256"] == runs[0].model_sha256


def test_protocol_pairs_arms_over_seeds_and_settings(
    toy: tuple[list[Sample], list[Sample], DatasetInfo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every (setting, seed) has every arm; the result has the report.json shape; reruns resume."""
    real, val, info = toy
    config = TINY_CFG.model_copy(
        update={
            "tasks": ["depth"],
            "seeds": [0, 1],
            "steps": 2,
            "low_label_fraction": 0.5,
            "arms": ["real+synthetic", "real"],
        }
    )
    specs = plan_runs(config)
    assert [(s.setting, s.seed, s.arm) for s in specs[:2]] == [
        ("low-label", 0, "real"),
        ("low-label", 0, "real+synthetic"),
    ]
    results = run_protocol(real, val, variants_of(real, 2), config=config, info=info, out_dir=tmp_path)
    entry = results["tasks"]["depth"]["settings"]["low-label"]
    assert set(entry) == {"real", "real+synthetic", "gain", "significance"}
    assert entry["real"]["abs_rel"]["n"] == 2
    assert entry["gain"]["real+synthetic"]["rmse"] == pytest.approx(
        entry["real+synthetic"]["rmse"]["mean"] - entry["real"]["rmse"]["mean"]
    )
    low = [r for r in results["runs"] if r["setting"] == "low-label"]
    assert {r["num_real"] for r in low} == {4} and {r["num_synthetic"] for r in low} == {0, 8}
    assert len({r["model_sha256"] for r in results["runs"]}) == len(specs)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr("perception.protocol.train", fail)
    again = run_protocol(real, val, variants_of(real, 2), config=config, info=info, out_dir=tmp_path)
    assert again["tasks"] == results["tasks"]
    more = config.model_copy(update={"arms": ["real", "real+synthetic", "real+augment"], "seeds": [1]})
    with pytest.raises(AssertionError, match="retrained"):  # a new arm trains; the finished ones are reused
        run_protocol(real, val, variants_of(real, 2), config=more, info=info, out_dir=tmp_path)


def test_additive_mixing_shows_every_arm_the_real_samples_of_the_real_arm() -> None:
    """In additive mode the real rows of every batch (keys, order and augmented pixels) are those of
    the real-only arm, so every real key is seen equally often; the extra samples come on top."""
    real = [fake(f"r{i}", size=8) for i in range(10)]
    arms = {
        "real": None,
        "real+synthetic": variants_of(real, 2),
        "real+augment": real,
    }
    batches = {}
    for arm, extra in arms.items():
        dm = PerceptionDataModule(
            real, real[:1], extra, batch_size=4, extra_ratio=0.5, low_label_fraction=0.8, pad_multiple=8,
            extra_photometric=1.0 if arm == "real+augment" else 0.0, seed=3,
        )  # fmt: skip
        loader = dm.train_dataloader()
        epochs = []
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            epochs += list(loader)
        batches[arm] = epochs
    reference = batches["real"]
    assert all(len(b["key"]) == 4 for b in reference) and len(reference) == 3 * 2
    for arm in ("real+synthetic", "real+augment"):
        assert len(batches[arm]) == len(reference)
        for ref, got in zip(reference, batches[arm], strict=True):
            assert len(got["key"]) == 6 and got["synthetic"].tolist() == [False] * 4 + [True] * 2
            assert got["key"][:4] == ref["key"]
            torch.testing.assert_close(got["image"][:4], ref["image"])
            torch.testing.assert_close(got["seg"][:4], ref["seg"])
    counts = {arm: {} for arm in batches}  # type: dict[str, dict[str, int]]
    for arm, epochs in batches.items():
        for b in epochs:
            for key, syn in zip(b["key"], b["synthetic"].tolist(), strict=True):
                if not syn:
                    counts[arm][key] = counts[arm].get(key, 0) + 1
    assert counts["real"] == counts["real+synthetic"] == counts["real+augment"]
    assert len(counts["real"]) == 8


def test_augment_arm_changes_the_extra_images_but_not_their_labels() -> None:
    """The strong photometric augmentation touches the image only; the real samples keep the usual one."""
    real = [fake(f"r{i}", size=16) for i in range(4)]
    dm = PerceptionDataModule(
        real, real[:1], real, tasks=["seg", "normal"], batch_size=4, pad_multiple=8, extra_photometric=1.0,
        augment=Augment(scale=(1.0, 1.0), hflip=False, color_jitter=0.0),
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    by_key: dict[str, list[int]] = {}
    for i, key in enumerate(batch["key"]):
        by_key.setdefault(key, []).append(i)
    pairs = [(i, j) for rows in by_key.values() for i in rows for j in rows if i < 4 <= j]
    assert pairs  # a real sample and its augmented copy in the same batch
    for i, j in pairs:
        torch.testing.assert_close(batch["seg"][i], batch["seg"][j])
        torch.testing.assert_close(batch["normal"][i], batch["normal"][j])
        assert not torch.equal(batch["image"][i], batch["image"][j])
    with pytest.raises(ValueError, match="unknown mixing"):
        PerceptionDataModule(real, real, mixing="both")


def test_reference_arms_appear_in_the_report(
    toy: tuple[list[Sample], list[Sample], DatasetInfo], tmp_path: Path
) -> None:
    """real+augment and real+oracle (toy re-renders) run beside real and real+synthetic; report.json
    has their means, gains with a CI, and the share of the oracle gain; metrics come from the test data."""
    real, val, info = toy
    source = ToyScenes(num_images=8, image_size=(32, 32))
    oracle = [source.oracle(s.key, v) for s in real for v in range(2)]
    test = val[:2]
    config = TINY_CFG.model_copy(
        update={"tasks": ["seg"], "seeds": [0, 1], "steps": 2, "low_label_fraction": None,
                "arms": ["real", "real+augment", "real+oracle", "real+synthetic"]}
    )  # fmt: skip
    results = run_protocol(
        real, val, variants_of(real, 1), config=config, info=info, oracle=oracle, test=test
    )
    runs = results["runs"]
    assert {r["arm"] for r in runs} == set(ARMS) and {r["num_test"] for r in runs} == {2}
    assert {r["num_synthetic"] for r in runs if r["arm"] == "real+oracle"} == {16}
    assert all(r["val_metrics"] is not None and r["eval_split"] == "test" for r in runs)
    make_report(results, tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    entry = doc["tasks"]["seg"]["settings"]["full"]
    assert set(ARMS) <= set(entry) and set(entry["gain"]) == set(ARMS) - {"real"}
    assert len(entry["significance"]["real+oracle"]["miou"]["ci"]) == 2
    assert set(entry["oracle_share"]) == {"real+augment", "real+synthetic"}
    assert set(doc["protocol"]["arms"]) == set(ARMS)
    md = (tmp_path / "report.md").read_text()
    assert "real+oracle" in md and "share of oracle gain" in md


def test_train_logs_a_validation_curve(toy: tuple[list[Sample], list[Sample], DatasetInfo]) -> None:
    """val_every validates during training without changing it: same weights as without."""
    real, val, info = toy
    config = TINY_CFG.model_copy(update={"steps": 4})
    plain = train("seg", real, val, config=config, info=info, seed=0)
    curved = train("seg", real, val, config=config, info=info, seed=0, val_every=2)
    assert [p["step"] for p in curved.curve or []] == [2, 4]
    assert curved.model_sha256 == plain.model_sha256 and curved.metrics == plain.metrics


def test_concurrent_runs_get_the_weights_of_their_own_seed(
    toy: tuple[list[Sample], list[Sample], DatasetInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs on threads (as the flows' runner trains them) equal the same runs done one by one.

    Seeding is slowed down so that, without the lock, the second thread reseeds torch's process-wide
    generator between the first thread's seeding and its weight initialisation.
    """
    import importlib
    import threading
    import time

    train_module = importlib.import_module("perception.train")  # the package exports a function of that name

    real, val, info = toy
    sequential = [train("seg", real, val, config=TINY_CFG, info=info, seed=s).model_sha256 for s in (0, 1)]
    seed_everything = train_module.pl.seed_everything

    def slow_seed(*args: object, **kwargs: object) -> int:
        out = seed_everything(*args, **kwargs)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(train_module.pl, "seed_everything", slow_seed)
    got: dict[int, str] = {}

    def run(seed: int) -> None:
        got[seed] = train("seg", real, val, config=TINY_CFG, info=info, seed=seed).model_sha256

    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert [got[0], got[1]] == sequential


def test_evaluation_inputs_render_toy_streams_and_oracles_without_shards(tmp_path: Path) -> None:
    """Without shards, toy-scene real data is rendered; val and test come from their own streams in
    the test domains; the oracle re-renders exactly the keys some seed labels, into the oracle domains."""
    from perception.stages import evaluation_inputs
    from pipeline.config import build_config

    cfg = build_config(
        {
            "data": {"num_images": 8, "num_val_images": 2, "image_size": [32, 32], "domains": ["day"]},
            "perception": {
                "arms": ["real", "real+oracle"],
                "seeds": [0, 1],
                "low_label_fraction": 0.25,
                "full_setting": False,
                "num_test_images": 3,
                "test_domains": ["night"],
                "oracle_domains": ["evening"],
            },
        }
    )
    inputs = evaluation_inputs(cfg, tmp_path, progress=False)
    assert [s.key for s in inputs.real] == [f"toy-train-{i:06d}" for i in range(8)]
    assert {s.meta["domain"] for s in inputs.real} == {"day"}
    assert [s.key for s in inputs.val] == ["toy-val-000000", "toy-val-000001"]
    assert inputs.test is not None and [s.key for s in inputs.test][-1] == "toy-test-000002"
    assert {s.meta["domain"] for s in [*inputs.val, *inputs.test]} == {"night"}
    keys = [s.key for s in inputs.real]
    chosen = {keys[i] for seed in (0, 1) for i in select_labelled(keys, 0.25, seed)}
    assert inputs.oracle is not None and {source_key(s) for s in inputs.oracle} == chosen
    assert len(inputs.oracle) == 2 * len(chosen) and {s.meta["domain"] for s in inputs.oracle} == {"evening"}
    assert inputs.synthetic is None


def test_class_iou_config_adds_per_class_seg_metrics() -> None:
    """``perception.class_iou`` names the classes to the seg metric; off, the records keep two seg metrics."""
    names = ["sky", "road", "car"]
    on = PerceptionModule.from_config(TINY_CFG.model_copy(update={"class_iou": True}), ["seg"], 3, names)
    off = PerceptionModule.from_config(TINY_CFG, ["seg"], 3, names)
    target = torch.tensor([[[0, 1], [2, 2]]])
    for module in (on, off):
        module.val_metrics["seg"].update(target.clone(), target)
    assert on.val_metrics["seg"].compute() == {"miou": 1.0, "pixel_acc": 1.0, "iou_sky": 1.0, "iou_road": 1.0,
                                               "iou_car": 1.0}  # fmt: skip
    assert set(off.val_metrics["seg"].compute()) == {"miou", "pixel_acc"}


def test_rank_slices_split_every_global_batch_evenly() -> None:
    sampler = AdditiveSampler(10, 6, batch_size=4, extra_per_batch=2, seed=0)
    draws = list(sampler)
    whole = [draws[i : i + 6] for i in range(0, len(draws) - 5, 6)]
    shares = [list(RankSlice(sampler, 6, rank, 2)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(whole) == len(RankSlice(sampler, 6, 0, 2))
    for batch, mine, theirs in zip(whole, *shares, strict=True):
        assert len(mine) == len(theirs) == 3 and sorted(mine + theirs) == sorted(batch)
        assert [d[0] for d in mine] == [d[0] for d in theirs] == [0, 0, 1]  # real and extra on each rank
    sliced = RankSlice(sampler, 6, 0, 2)
    sliced.set_epoch(1)  # the epoch reaches the draws
    assert list(sliced) != shares[0]
    with pytest.raises(ValueError, match="does not divide over 4"):
        RankSlice(sampler, 6, 0, 4)


def test_accumulated_batches_equal_one_large_batch(
    toy: tuple[list[Sample], list[Sample], DatasetInfo], tmp_path: Path
) -> None:
    """grad_accum 2 x batch 2 takes the steps of batch 4 (batch norm frozen: its statistics are per
    batch), and the curve counts optimizer steps."""
    from _ddp_worker import FreezeBatchNorm
    from safetensors.numpy import load_file

    real, val, info = toy
    out = {}
    for name, update in (("large", {"batch_size": 4}), ("accum", {"batch_size": 2, "grad_accum": 2})):
        cfg = TINY_CFG.model_copy(update={"steps": 4, **update})
        result = train("seg", real, val, config=cfg, info=info, val_every=2, out_dir=tmp_path / name,
                       save_model=True, callbacks=[FreezeBatchNorm()])  # fmt: skip
        assert result.steps == 4 and [p["step"] for p in result.curve or []] == [2, 4]
        out[name] = load_file(tmp_path / name / "model.safetensors")
    for k, v in out["large"].items():
        np.testing.assert_allclose(out["accum"][k], v, rtol=1e-3, atol=1e-5, err_msg=k)


def test_bf16_mixed_precision_trains_on_cpu(toy: tuple[list[Sample], list[Sample], DatasetInfo]) -> None:
    real, val, info = toy
    cfg = TINY_CFG.model_copy(update={"precision": "bf16-mixed"})
    result = train("seg", real, val, config=cfg, info=info)
    assert result.steps == cfg.steps and 0 <= result.metrics["seg"]["miou"] <= 1
