"""Layout edits: label and image stay consistent, checked against the toy-scene renderer (the oracle)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.data.edits import (
    EDITS,
    EditMap,
    apply_random_edit,
    background_class,
    hflip,
    object_masks,
    paste_object,
    scale_object,
    shift_object,
)
from pipeline.data.toyscenes import BOX, FLOOR, SPHERE, ToyScenes, mirror_scene, render_scene

H, W = 48, 64


def _map(out: dict[str, np.ndarray]) -> EditMap:
    return EditMap(out["seg"], out["image"], out["depth"], out["normal"])


def test_hflip_equals_the_render_of_the_mirrored_scene() -> None:
    toy = ToyScenes(num_images=4, image_size=(H, W), seed=3)
    for i in range(4):
        scene = toy.scene(i)
        flipped = hflip(_map(render_scene(scene, H, W)))
        oracle = render_scene(mirror_scene(scene), H, W)
        assert np.array_equal(flipped.seg, oracle["seg"])
        assert np.allclose(flipped.depth, oracle["depth"], atol=1e-9)
        assert np.allclose(flipped.normal, oracle["normal"], atol=1e-9)  # x negated by hflip


def test_depth_aware_copy_paste_equals_the_render_with_the_object_added() -> None:
    """Paste an object rendered alone in scene A's world into A's render: seg and depth must equal the
    render of A with that object added, occlusion by A's own objects included."""
    toy = ToyScenes(num_images=12, image_size=(H, W), seed=5)
    checked = occluded = 0
    for i in range(0, 12, 2):
        a, b = toy.scene(i), toy.scene(i + 1)
        obj = b.objects[0]
        alone = dataclasses.replace(a, objects=[obj])
        added = dataclasses.replace(a, objects=[*a.objects, obj])
        donor = render_scene(alone, H, W)
        mask = donor["instance"] == donor["instance"].max()  # the object: the last primitive
        if donor["seg"][mask].size == 0 or not mask.any():
            continue
        cls = int(donor["seg"][mask][0])
        pasted = paste_object(_map(render_scene(a, H, W)), _map(donor), mask, cls)
        oracle = render_scene(added, H, W)
        assert np.array_equal(pasted.seg, oracle["seg"])
        assert np.allclose(pasted.depth, oracle["depth"], atol=1e-9)
        visible = (oracle["instance"] == oracle["instance"].max()) if a.objects else mask
        assert np.array_equal(pasted.image[visible], donor["image"][visible])  # the object's own pixels
        checked += 1
        occluded += int(
            mask.sum() > (oracle["seg"] == cls).sum() - (render_scene(a, H, W)["seg"] == cls).sum()
        )
    assert checked >= 3
    assert occluded >= 1  # at least one paste was cut by an object in front of it: depth mattered


def _disc_map(shape=(40, 40), centre=(20, 12), r=5, cls=SPHERE, ground=FLOOR) -> tuple[EditMap, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r
    seg = np.full(shape, ground, np.uint8)
    seg[:10] = 0  # a band of sky (25% of the map: not an object)
    seg[mask] = cls
    return EditMap(seg), mask


def test_shift_moves_one_object_and_fills_its_old_place_with_its_background() -> None:
    m, mask = _disc_map()
    out = shift_object(m, mask, SPHERE, 3, 10)
    assert (out.seg == SPHERE).sum() == mask.sum()  # same object, moved in frame
    assert np.array_equal(np.argwhere(out.seg == SPHERE), np.argwhere(mask) + np.array([3, 10]))
    assert (out.seg[mask & ~np.roll(np.roll(mask, 3, 0), 10, 1)] == FLOOR).all()  # hole = floor
    assert np.array_equal(out.seg[:10], m.seg[:10]) and out.image is None and out.depth is None


def test_scale_changes_the_area_by_about_the_square_of_the_factor() -> None:
    m, mask = _disc_map(r=6, centre=(22, 20))
    for factor in (0.6, 1.5):
        out = scale_object(m, mask, SPHERE, factor)
        ratio = (out.seg == SPHERE).sum() / mask.sum()
        assert ratio == pytest.approx(factor**2, rel=0.2)
        assert background_class(m.seg, mask) == FLOOR


def test_object_masks_skip_stuff_classes_and_specks() -> None:
    m, mask = _disc_map()
    seg = m.seg.copy()
    seg[30, 30] = BOX  # a one-pixel speck
    objects = object_masks(seg)
    assert [(c, int(k.sum())) for c, k in objects] == [(SPHERE, int(mask.sum()))]  # floor, sky too big


def test_random_edits_are_seeded_recorded_and_keep_class_ids() -> None:
    toy = ToyScenes(num_images=3, image_size=(H, W), seed=1)
    maps = [_map(render_scene(toy.scene(i), H, W)) for i in range(3)]

    def donor(rng: np.random.Generator) -> tuple[str, EditMap]:
        j = int(rng.integers(1, 3))
        return f"scene-{j}", maps[j]

    for op in EDITS:
        one = apply_random_edit(op, maps[0], np.random.default_rng(7), donor=donor)
        two = apply_random_edit(op, maps[0], np.random.default_rng(7), donor=donor)
        assert np.array_equal(one[0].seg, two[0].seg) and one[1] == two[1]
        assert one[1]["op"] == op and set(np.unique(one[0].seg)) <= set(range(6))
        if op != "hflip" and "skipped" not in one[1]:
            assert not np.array_equal(one[0].seg, maps[0].seg) or one[1].get("offset") == [0, 0]
    with pytest.raises(ValueError, match="unknown layout edit"):
        apply_random_edit("rotate", maps[0], np.random.default_rng(0))
