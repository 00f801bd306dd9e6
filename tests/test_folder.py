from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, build_config
from pipeline.data import (
    CamVid,
    FolderDataset,
    Quarantine,
    Sample,
    build_dataset,
    iter_valid,
    resize_sample,
)
from pipeline.data.folder import CAMVID_CLASSES


def test_camvid_adapter_reads_the_shared_dataset(camvid_root: Path) -> None:
    ds = CamVid(camvid_root, split="train", num_images=3)
    assert len(ds) == 3 and ds.info.ignore_index == 11 and ds.info.classes == CAMVID_CLASSES
    s = ds.load(ds.keys()[0])
    assert s.key == "camvid-0001TP_006690"
    assert s.image.shape == (360, 480, 3) and s.image.dtype == np.uint8
    assert s.seg.shape == (360, 480) and s.seg.max() <= 11
    assert len(CamVid(camvid_root, split="val")) == 101


def test_camvid_from_config_resizes_without_distortion(camvid_root: Path) -> None:
    cfg = build_config({"data": {"adapter": "camvid", "root": str(camvid_root), "image_size": [96, 128]}})
    ds = build_dataset(cfg.data)
    assert len(ds) == 256  # data.num_images caps the split
    s = ds.load(ds.keys()[0])
    assert s.image.shape == (96, 128, 3) and s.seg.shape == (96, 128)
    assert set(np.unique(s.seg)) <= set(range(12))


def test_folder_adapter_reads_camvid_files(camvid_root: Path) -> None:
    ds = FolderDataset(
        camvid_root, image_dir="val", seg_dir="valannot", depth_dir=None, normal_dir=None,
        classes=CAMVID_CLASSES, ignore_index=11, num_images=4, name="cv",
    )  # fmt: skip
    q = Quarantine(None)
    samples = list(iter_valid(ds, q))
    assert len(samples) == 4 and len(q) == 0
    assert samples[0].labels == ("seg",)


def _write_folder(root: Path, n: int = 7) -> None:
    rng = np.random.default_rng(0)
    for sub in ("images", "seg", "depth", "normal"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        stem = f"img{i}"
        Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}.png"
        )
        Image.fromarray(rng.integers(0, 3, (16, 20), dtype=np.uint8)).save(root / "seg" / f"{stem}.png")
        np.save(root / "depth" / f"{stem}.npy", rng.uniform(0.5, 5, (16, 20)).astype(np.float32))
        n_ = rng.normal(size=(16, 20, 3)).astype(np.float32)
        np.save(root / "normal" / f"{stem}.npy", n_ / np.linalg.norm(n_, axis=-1, keepdims=True))


def test_corrupted_inputs_are_quarantined_with_the_right_reason(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write_folder(root)
    png = (root / "images" / "img1.png").read_bytes()
    (root / "images" / "img1.png").write_bytes(png[: len(png) // 2])  # truncated PNG
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "seg" / "img2.png")  # wrong size
    Image.fromarray(np.full((16, 20), 9, np.uint8)).save(root / "seg" / "img3.png")  # class id 9 >= 3
    depth = np.ones((16, 20), np.float32)
    depth[3, 4] = np.nan
    np.save(root / "depth" / "img4.npy", depth)  # NaN depth
    np.save(root / "normal" / "img5.npy", np.full((16, 20, 3), 0.9, np.float32))  # not unit length
    ds = FolderDataset(root, classes=["a", "b", "c"])
    q = Quarantine(tmp_path / "quarantine.jsonl")
    good = [s.key for s in iter_valid(ds, q)]
    assert good == ["folder-img0", "folder-img6"]
    reasons = {r["key"]: r["reason"] for r in Quarantine.read(tmp_path / "quarantine.jsonl")}
    assert reasons == {
        "folder-img1": "image_unreadable",
        "folder-img2": "seg_size_mismatch",
        "folder-img3": "seg_class_out_of_range",
        "folder-img4": "depth_not_finite",
        "folder-img5": "normal_not_unit",
    }
    records = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert all(r["stage"] == "load" and r["file"] for r in records)


def test_quarantine_does_not_duplicate_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    assert Quarantine(path).add("k1", "bad_image", stage="load")
    again = Quarantine(path)
    assert not again.add("k1", "bad_image", stage="load")
    assert again.add("k1", "bad_image", stage="generate")
    assert len(Quarantine.read(path)) == 2


def test_missing_label_file_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write_folder(root, n=2)
    (root / "depth" / "img0.npy").unlink()
    q = Quarantine(None)
    assert [s.key for s in iter_valid(FolderDataset(root, classes=["a", "b", "c"]), q)] == ["folder-img1"]
    assert q.counts() == {"depth_missing": 1}


def test_missing_dataset_folder_fails_fast_naming_the_key(tmp_path: Path) -> None:
    cfg = build_config({"data": {"adapter": "folder", "root": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_dataset(cfg.data)


def test_seg_without_classes_is_a_config_error(tmp_path: Path) -> None:
    _write_folder(tmp_path / "ds", n=1)
    cfg = build_config({"data": {"adapter": "folder", "root": str(tmp_path / "ds")}})
    with pytest.raises(ConfigError, match=r"data\.classes"):
        build_dataset(cfg.data)


def test_resize_keeps_labels_exact_values() -> None:
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    depth = rng.uniform(1, 2, (30, 40)).astype(np.float32)
    normal = np.dstack([np.zeros((30, 40)), np.zeros((30, 40)), -np.ones((30, 40))]).astype(np.float32)
    s = Sample("k", rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), seg=seg, depth=depth, normal=normal)
    r = resize_sample(s, (12, 12))
    assert r.image.shape == (12, 12, 3) and r.seg.shape == (12, 12)
    assert set(np.unique(r.seg)) <= set(np.unique(seg))
    assert np.isin(r.depth, depth).all()
    np.testing.assert_allclose(np.linalg.norm(r.normal, axis=-1), 1.0, atol=1e-6)
