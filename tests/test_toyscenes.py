from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import DatasetInfo, ToyScenes, validate_sample
from pipeline.data.toyscenes import CLASSES, render_scene


@pytest.fixture(scope="module")
def scenes() -> ToyScenes:
    return ToyScenes(num_images=6, image_size=(64, 80), seed=7)


def test_same_seed_gives_identical_arrays(scenes: ToyScenes) -> None:
    again = ToyScenes(num_images=6, image_size=(64, 80), seed=7)
    for key in scenes.keys():
        a, b = scenes.load(key), again.load(key)
        for field in ("image", "seg", "depth", "normal"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.caption == b.caption


def test_other_seed_index_and_split_differ(scenes: ToyScenes) -> None:
    k0, k1 = scenes.keys()[:2]
    assert not np.array_equal(scenes.load(k0).image, scenes.load(k1).image)
    other = ToyScenes(num_images=6, image_size=(64, 80), seed=8)
    assert not np.array_equal(scenes.load(k0).image, other.load(k0).image)
    val = ToyScenes(num_images=6, image_size=(64, 80), seed=7, split="val")
    assert not np.array_equal(scenes.load(k0).image, val.load(val.keys()[0]).image)


def test_outputs_are_valid_samples(scenes: ToyScenes) -> None:
    for s in scenes:
        validate_sample(s, scenes.info)
        assert s.size == (64, 80)
        sky = s.seg == CLASSES.index("sky")
        assert np.all(s.depth[sky] == 0) and np.all(s.depth[~sky] > 0)
        norms = np.linalg.norm(s.normal, axis=-1)
        np.testing.assert_allclose(norms[~sky], 1.0, atol=1e-5)
        assert np.all(norms[sky] == 0)


def test_seg_ids_match_the_objects_hit(scenes: ToyScenes) -> None:
    for i in range(len(scenes)):
        scene = scenes.scene(i)
        out = render_scene(scene, 64, 80)
        n_walls = len(scene.walls)
        for p, obj in enumerate(scene.objects, start=1 + n_walls):
            mask = out["instance"] == p
            assert np.all(out["seg"][mask] == CLASSES.index(obj.shape))
        assert np.all(out["seg"][out["instance"] == 0] == CLASSES.index("floor"))
        walls = (out["instance"] >= 1) & (out["instance"] <= n_walls)
        assert np.all(out["seg"][walls] == CLASSES.index("wall"))


def test_normals_face_the_camera(scenes: ToyScenes) -> None:
    s = scenes.load(scenes.keys()[0])
    fx, fy, cx, cy = s.meta["intrinsics"]
    v, u = np.mgrid[0:64, 0:80]
    rays = np.stack([(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, np.ones_like(u, dtype=float)], -1)
    valid = s.depth > 0
    assert np.all(np.einsum("hwc,hwc->hw", s.normal, rays)[valid] < 1e-6)


def _normals_from_depth(depth: np.ndarray, intrinsics: list[float]) -> np.ndarray:
    """Camera-frame normals from a z-depth map by central finite differences of back-projected points."""
    fx, fy, cx, cy = intrinsics
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w]
    pts = np.stack([(u + 0.5 - cx) / fx * depth, (v + 0.5 - cy) / fy * depth, depth], -1)
    du = np.zeros_like(pts)
    dv = np.zeros_like(pts)
    du[:, 1:-1] = pts[:, 2:] - pts[:, :-2]
    dv[1:-1] = pts[2:] - pts[:-2]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    flip = np.einsum("hwc,hwc->hw", n, pts) > 0
    n[flip] *= -1
    return n


def test_depth_and_normals_agree_on_planar_regions() -> None:
    ds = ToyScenes(num_images=4, image_size=(96, 96), seed=3)
    errors = []
    for i in range(len(ds)):
        scene = ds.scene(i)
        out = render_scene(scene, 96, 96)
        fx, fy, cx, cy = scene.camera.intrinsics(96, 96)
        fd = _normals_from_depth(out["depth"].astype(np.float64), [fx, fy, cx, cy])
        n, inst = out["normal"], out["instance"]
        # planar: the 3x3 neighbourhood is one primitive with one rendered normal
        planar = np.zeros(inst.shape, bool)
        planar[1:-1, 1:-1] = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted_i = np.roll(np.roll(inst, dy, 0), dx, 1)
                shifted_n = np.roll(np.roll(n, dy, 0), dx, 1)
                planar &= (shifted_i == inst) & (np.abs(shifted_n - n).max(-1) < 1e-4)
        planar &= inst >= 0
        cos = np.clip(np.einsum("hwc,hwc->hw", fd, n)[planar], -1, 1)
        errors.append(np.degrees(np.arccos(cos)))
    err = np.concatenate(errors)
    assert err.size > 5000
    assert np.median(err) < 0.5
    assert np.percentile(err, 99) < 3.0


def test_caption_names_every_object_and_the_light() -> None:
    ds = ToyScenes(num_images=5, image_size=(32, 32), seed=1)
    for i, key in enumerate(ds.keys()):
        s, scene = ds.load(key), ds.scene(i)
        for obj in scene.objects:
            assert obj.shape in s.caption and obj.color_name in s.caption
        assert s.caption.endswith(scene.light_words)
        assert f"{scene.floor_name} floor" in s.caption


def test_domains_are_selectable_and_validated() -> None:
    ev = ToyScenes(num_images=4, image_size=(32, 32), domains=["evening"])
    assert all(ev.load(k).meta["domain"] == "evening" for k in ev.keys())
    with pytest.raises(ValueError, match="unknown toy-scene domains"):
        ToyScenes(domains=["mars"])


def test_info_lists_classes() -> None:
    info: DatasetInfo = ToyScenes(num_images=1).info
    assert info.classes == CLASSES and info.labels == ("seg", "depth", "normal")


def test_oracle_rerender_has_identical_labels_and_a_different_image(scenes: ToyScenes) -> None:
    """A re-render keeps the geometry (seg, depth, normals bit for bit) and changes the appearance."""
    for key in scenes.keys()[:3]:
        source = scenes.load(key)
        for variant, domains in ((0, None), (1, ["night"])):
            oracle = scenes.oracle(key, variant, domains)
            for field in ("seg", "depth", "normal"):
                np.testing.assert_array_equal(getattr(oracle, field), getattr(source, field))
            assert np.abs(oracle.image.astype(int) - source.image.astype(int)).mean() > 5
            assert oracle.key == f"{key}-o{variant:02d}" and oracle.meta["source_key"] == key
            validate_sample(oracle, scenes.info)
        assert scenes.oracle(key, 1, ["night"]).meta["domain"] == "night"
        np.testing.assert_array_equal(scenes.oracle(key, 0).image, scenes.oracle(key, 0).image)
    with pytest.raises(ValueError, match="unknown toy-scene domains"):
        scenes.oracle(scenes.keys()[0], 0, ["mars"])


def test_test_split_is_a_third_disjoint_stream() -> None:
    """train, val and test scenes differ; keys name their split."""
    images = {}
    for split in ("train", "val", "test"):
        ds = ToyScenes(num_images=1, image_size=(32, 32), split=split)
        assert ds.keys() == [f"toy-{split}-000000"]
        images[split] = ds.load(ds.keys()[0]).image
    assert not np.array_equal(images["train"], images["test"])
    assert not np.array_equal(images["val"], images["test"])


def test_object_map_covers_exactly_the_object_pixels_with_their_classes(scenes: ToyScenes) -> None:
    for key in scenes.keys():
        sample = scenes.load(key)
        inst, classes = scenes.objects(key)
        assert inst.shape == sample.seg.shape and len(classes) == len(sample.meta["objects"])
        objects = np.asarray(sample.seg) >= CLASSES.index("sphere")
        np.testing.assert_array_equal(inst >= 0, objects)
        for k, cls in enumerate(classes):  # every visible pixel of object k carries its class
            assert set(np.unique(sample.seg[inst == k]).tolist()) <= {cls}
        assert set(np.unique(inst).tolist()) <= {-1, *range(len(classes))}
    small, _ = scenes.objects(scenes.keys()[0], size=(32, 40))
    assert small.shape == (32, 40)
