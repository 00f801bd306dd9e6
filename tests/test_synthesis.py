"""Synthesis evaluation: metrics on hand-made cases, the quality filter, and an evaluate-synthesis smoke run."""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from perception.judges import fit_judge
from pipeline.config import build_config, config_dict
from pipeline.data import ToyScenes
from pipeline.data.sample import DatasetInfo
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.controlnet import build_controlnet
from pipeline.lumen.tokenizer import build_tokenizer
from pipeline.synthesis.filter import (
    FILTER_DIR,
    QualityFilter,
    apply_pixel_mask,
    info_with_ignore,
    label_outlines,
    pixel_losses,
    pixel_mask,
    segment_share,
    segments,
    summarize,
)
from pipeline.synthesis.metrics import (
    LatentEncoder,
    depth_agreement,
    diversity,
    instance_boundaries,
    l1_distance,
    label_edge_contrast,
    layout_agreement,
    normal_agreement,
    object_placement,
    object_separation,
    rms_distance,
    seg_alignment,
)
from tests.test_lumen import PRESET, RES  # the tiny seeded model sizes every test uses

TINY_PERCEPTION = {"encoder_depth": 3, "decoder_channels": [16, 8, 8], "batch_size": 4, "steps": 3}


def tiny_base():
    captions = [s.caption for s in ToyScenes(num_images=8, image_size=(RES, RES))]
    return build_tiny_components(build_tokenizer(captions, max_length=16), RES, seed=0, preset=PRESET)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_perfect_prediction_gives_miou_one() -> None:
    seg = np.random.default_rng(0).integers(0, 4, (3, 8, 8))
    res = seg_alignment(seg, seg, num_classes=4)
    assert res.miou == 1.0 and res.pixel_acc == 1.0
    assert all(p == {"miou": 1.0, "pixel_acc": 1.0} for p in res.per_image)


def test_partial_seg_alignment_matches_hand_computed_values_and_skips_ignored_pixels() -> None:
    target = np.array([[[0, 0], [1, 1]], [[255, 255], [255, 1]]])
    pred = np.array([[[0, 1], [1, 1]], [[0, 0], [0, 0]]])
    res = seg_alignment(pred, target, num_classes=2, ignore_index=255)
    # image 0: acc 3/4; IoU0 = 1/2, IoU1 = 2/3
    assert res.per_image[0]["pixel_acc"] == pytest.approx(0.75)
    assert res.per_image[0]["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # image 1: one labelled pixel (class 1), predicted 0: acc 0, IoU0 = 0/1, IoU1 = 0/1
    assert res.per_image[1] == {"pixel_acc": 0.0, "miou": 0.0}
    # pooled over 5 labelled pixels: 3 right; IoU0 = 1/3, IoU1 = 2/4
    assert res.pixel_acc == pytest.approx(3 / 5)
    assert res.miou == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_object_placement_counts_found_moved_and_too_small_objects() -> None:
    inst = np.full((1, 8, 8), -1)
    inst[0, :4, :4] = 0  # object 0 (class 3): 16 px
    inst[0, 4:, 4:] = 1  # object 1 (class 4): 16 px
    inst[0, 0, 7] = 2  # object 2 (class 5): 1 px, too small to count
    pred = np.zeros((1, 8, 8), np.int64)
    pred[0, :4, :2] = 3  # half of object 0 as its class: in place at threshold 0.5
    pred[0, 4:, 4:] = 3  # object 1 drawn, but as the wrong class
    r = object_placement(pred, inst, [[3, 4, 5]])
    assert r.objects == 2 and r.recall == [[0.5, 0.0]]
    assert r.in_place == 0.5 and r.images_all_in_place == 0.0
    any_object = object_placement(pred, inst, [[3, 4, 5]], accept=(3, 4, 5))
    assert any_object.in_place == 1.0 and any_object.images_all_in_place == 1.0
    assert object_placement(pred, inst, [[3, 4, 5]], threshold=0.6, accept=(3, 4, 5)).in_place == 0.5
    assert object_placement(pred, inst, [[3, 4, 5]], min_pixels=1).objects == 3
    with pytest.raises(ValueError, match="one shape"):
        object_placement(pred[:, :4], inst, [[3, 4, 5]])


def test_instance_boundaries_mark_both_sides_of_object_edges_only() -> None:
    inst = np.full((6, 6), -1)
    inst[1:5, 1:3] = 0
    inst[1:5, 3:5] = 1
    edges = instance_boundaries(inst)
    assert edges[2, 2] and edges[2, 3]  # the two columns where objects 0 and 1 meet
    assert edges[0, 1] and edges[1, 1]  # background above the object and the object's top row
    assert not edges[0, 0] and not edges[5, 5]  # background next to background only
    assert instance_boundaries(inst[None]).shape == (1, 6, 6)
    assert not instance_boundaries(np.full((4, 4), -1)).any()


def test_layout_agreement_prefers_the_candidate_that_keeps_its_conditions_boundary() -> None:
    ref = np.full((1, 2, 8, 8), 0.5)
    ref[0, 0, :, :4], ref[0, 0, :, 4:] = 0.9, 0.2  # two regions, a vertical boundary between columns 3 | 4
    ref[0, 1, :, :4], ref[0, 1, :, 4:] = 0.3, 0.8
    merged = ref.copy()
    merged[:, :, :, 4:6] = ref[:, :, :, :1]  # the left region grew over the boundary: it moved to 5 | 6
    for score in ("cosine", "edges", "mse"):
        same = layout_agreement(ref, ref, score)
        worse = layout_agreement(ref, merged, score)
        assert same.shape == (1,) and same[0] > worse[0], score
    assert layout_agreement(ref, ref, "cosine")[0] == pytest.approx(1.0)
    assert layout_agreement(ref, ref, "edges")[0] == pytest.approx(1.0)
    assert layout_agreement(ref, ref, "mse")[0] == 0.0
    assert layout_agreement(ref, 1 - ref, "cosine")[0] == pytest.approx(-1.0)  # every vector reversed
    flat = np.full((1, 2, 8, 8), 0.5)
    assert layout_agreement(flat, ref, "edges")[0] == 0.0  # no boundary to compare: no information
    with pytest.raises(ValueError, match="unknown layout agreement"):
        layout_agreement(ref, ref, "psnr")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layout_agreement(ref[0], ref[0])


def test_label_edge_contrast_prefers_the_variant_that_keeps_touching_objects_apart() -> None:
    seg = np.zeros((1, 8, 8), np.int64)
    seg[0, 2:6, 1:4], seg[0, 2:6, 4:7] = 3, 4  # two touching objects (classes 3, 4) on background 0
    depth = np.full((1, 8, 8), 10.0)
    depth[seg > 0] = 5.0
    apart = np.zeros((1, 8, 8, 3), np.uint8)
    apart[0][seg[0] == 3], apart[0][seg[0] == 4] = (200, 0, 0), (0, 0, 200)
    merged = apart.copy()
    merged[0][seg[0] > 0] = (200, 0, 0)  # one blob: the outer outline is kept, the inner one is gone
    for which in ("all", "inner"):
        keep, lose = (
            label_edge_contrast(im, seg, depth, which, object_classes=(3, 4))[0] for im in (apart, merged)
        )
        assert keep > lose >= 0, which
    assert label_edge_contrast(merged, seg, depth, "all")[0] > 0  # its outer outline is still there
    # inner scores only the boundary between the objects: the blob has no edge there
    assert label_edge_contrast(merged, seg, depth, "inner", object_classes=(3, 4))[0] == 0.0
    # the score is a ratio to the image's colour spread: a darker copy scores the same
    assert label_edge_contrast(apart // 2, seg, None, "all")[0] == pytest.approx(
        label_edge_contrast(apart, seg, None, "all")[0]
    )
    # fewer than min_pairs inner pairs: scored on all outlines
    assert label_edge_contrast(merged, seg, depth, "inner", object_classes=(3, 4), min_pairs=100)[
        0
    ] == pytest.approx(label_edge_contrast(merged, seg, depth, "all")[0])
    # a depth step alone is an outline: one class, two depths
    one = np.where(seg > 0, 3, 0)
    no_step = label_edge_contrast(apart, one, depth, "inner", object_classes=(3,), min_pairs=1)[0]
    assert no_step == pytest.approx(label_edge_contrast(apart, one, depth, "all")[0])  # no inner outline
    near = depth.copy()
    near[0, 2:6, 4:7] = 3.0
    assert label_edge_contrast(apart, one, near, "inner", object_classes=(3,), min_pairs=1)[0] > 1.0
    assert label_edge_contrast(merged, one, near, "inner", object_classes=(3,), min_pairs=1)[0] == 0.0
    flat = np.zeros_like(apart)
    assert label_edge_contrast(flat, seg, depth)[0] == 0.0  # no edges anywhere
    with pytest.raises(ValueError, match="unknown label edge score"):
        label_edge_contrast(apart, seg, depth, "outer")
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        label_edge_contrast(apart[0], seg, depth)


def test_object_separation_counts_a_merged_pair_and_skips_small_objects() -> None:
    inst = np.full((2, 10, 10), -1)
    inst[:, 0:5, 0:5] = 0  # 25 px
    inst[:, 0:5, 5:10] = 1  # 25 px, touches object 0 along columns 4 | 5
    inst[:, 9, 0] = 2  # 1 px, touches nothing
    inst[1, 5, 0:4] = 3  # 4 px, touches object 0: too small to count
    truth = instance_boundaries(inst)
    merged = truth.copy()
    merged[:, :, 4:6] = False  # every outline but the one between objects 0 and 1
    r = object_separation(np.stack([truth[0], merged[1]]), inst, min_pixels=16, tolerance=0)
    assert r.pairs == 2 and r.recall == [[1.0], [0.0]]
    assert r.separated == 0.5
    shifted = np.zeros_like(truth)
    shifted[:, :, 3] = True  # one and two pixels off the two boundary columns 4 and 5
    assert object_separation(shifted, inst, tolerance=0).recall == [[0.0], [0.0]]
    assert object_separation(shifted, inst, tolerance=1).recall == [[0.5], [0.5]]
    assert object_separation(shifted, inst, tolerance=2).recall == [[1.0], [1.0]]
    assert object_separation(shifted, inst, min_pixels=1).pairs == 3
    assert np.isnan(object_separation(np.zeros((1, 4, 4)), np.full((1, 4, 4), -1)).separated)
    with pytest.raises(ValueError, match="one shape"):
        object_separation(truth[:, :4], inst)


def test_depth_agreement_uses_valid_source_pixels_only() -> None:
    target = np.array([[[1.0, 2.0], [4.0, 0.0]]])
    close = target * 1.1
    close[0, 1, 1] = 100.0  # invalid source pixel: ignored
    d = depth_agreement(close, target)
    assert d["abs_rel"] == pytest.approx(0.1) and d["delta1"] == 1.0
    assert depth_agreement(target * 2 + (target == 0), target)["delta1"] == 0.0


def test_normal_agreement_angles() -> None:
    z = np.zeros((1, 2, 2, 3), np.float32)
    z[..., 2] = 1.0
    same = normal_agreement(z, z)
    assert same["mean_angle"] == pytest.approx(0.0, abs=1e-3) and same["within_11_25"] == 1.0
    x = np.zeros_like(z)
    x[..., 0] = 1.0
    target = z.copy()
    target[0, 0, 0] = 0.0  # invalid pixel
    ortho = normal_agreement(x, target)
    assert ortho["mean_angle"] == pytest.approx(90.0, abs=1e-3) and ortho["within_30"] == 0.0


def test_identical_images_have_exactly_zero_diversity() -> None:
    img = np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    variants = np.stack([img, img, img])
    assert diversity(variants, img, l1_distance) == {"pairwise": 0.0, "to_source": 0.0}
    encoder = LatentEncoder(tiny_base().vae, batch_size=2)  # identical images in different batches
    other = np.random.default_rng(1).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    latents = encoder.encode(np.stack([img, other, img, img]))
    assert latents.shape == (4, 4, RES // 2, RES // 2)
    src = encoder.encode(img[None])[0]
    assert diversity(latents[[0, 2, 3]], src, rms_distance) == {"pairwise": 0.0, "to_source": 0.0}
    assert rms_distance(latents[0], latents[1]) > 0


def test_diversity_of_known_pixel_differences() -> None:
    black, white = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)
    d = diversity(np.stack([black, white]), black, l1_distance)
    assert d == {"pairwise": 1.0, "to_source": 0.5}
    assert math.isnan(diversity(black[None], black)["pairwise"])  # one variant: no pairs


# --------------------------------------------------------------------------------------------------
# Quality filter
# --------------------------------------------------------------------------------------------------


def test_pixel_mask_on_a_hand_made_loss_map() -> None:
    seg = np.array([[0, 0, 1], [1, 2, 9]])
    losses = np.array([[1.5, 2.5, 0.9], [1.1, 50.0, 50.0]], np.float32)
    medians = np.array([1.0, 0.5, np.nan])  # class 2 unseen on real data: never masked
    mask = pixel_mask(losses, seg, medians, factor=2.0, ignore_index=9)  # 9 = ignored: never masked
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    losses[0, 1] = np.nan
    assert not pixel_mask(losses, seg, medians, factor=2.0, ignore_index=9)[0, 1]


def test_apply_pixel_mask_sets_ignore_and_copies() -> None:
    seg = np.array([[0, 1], [2, 3]], np.uint8)
    mask = np.array([[True, False], [False, True]])
    out = apply_pixel_mask(seg, mask, 255)
    assert out.tolist() == [[255, 1], [2, 255]] and seg[0, 0] == 0
    assert apply_pixel_mask(seg, mask, 300).dtype == np.uint16
    assert apply_pixel_mask(seg, None, 255) is seg


def test_datasets_without_ignore_index_get_255() -> None:
    toy = ToyScenes(num_images=1).info
    assert toy.ignore_index is None and info_with_ignore(toy).ignore_index == 255
    assert info_with_ignore(DatasetInfo("camvid", tuple("abcdefghijk"), 11)).ignore_index == 11


def test_perception_skips_masked_pixels_once_the_ignore_index_is_declared() -> None:
    from perception.models import seg_loss
    from perception.transforms import IGNORE, to_tensors
    from pipeline.data.sample import Sample

    info = info_with_ignore(ToyScenes(num_images=1).info)
    seg = apply_pixel_mask(
        np.array([[0, 1], [2, 3]], np.uint8), np.array([[False, True], [False, False]]), 255
    )
    target = to_tensors(
        Sample("v", np.zeros((2, 2, 3), np.uint8), seg=seg), ["seg"], ignore_index=info.ignore_index
    )
    assert target["seg"].tolist() == [[0, IGNORE], [2, 3]]
    logits = torch.zeros(1, info.num_classes, 2, 2)
    logits[0, 5, 0, 1] = 100.0  # a huge error on the masked pixel does not count
    assert seg_loss(logits, target["seg"][None]).item() == pytest.approx(math.log(info.num_classes))


class FixedLogits:
    """A stand-in segmenter returning hand-made logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def raw(self, images: np.ndarray) -> torch.Tensor:
        return self.logits[: len(images)]


def _logits(pred: np.ndarray, confidence: float = 5.0, num_classes: int = 2) -> torch.Tensor:
    return (
        torch.nn.functional.one_hot(torch.as_tensor(pred), num_classes).permute(0, 3, 1, 2).float()
        * confidence
    )


def test_image_mode_keeps_variants_at_or_above_the_threshold() -> None:
    segs = np.array([[[0, 0], [1, 1]], [[0, 0], [1, 1]], [[0, 0], [1, 1]]])
    pred = np.array([[[0, 0], [1, 1]], [[0, 1], [1, 1]], [[1, 1], [0, 1]]])  # agreement 1, 0.75, 0.25
    qf = QualityFilter(FixedLogits(_logits(pred)), 2, np.array([1.0, 1.0]), mode="image", threshold=0.75)
    results = qf.score(np.zeros((3, 2, 2, 3), np.uint8), segs)
    assert [r.keep for r in results] == [True, True, False]
    assert [r.agreement for r in results] == [1.0, 0.75, 0.25]
    assert all(r.mask is None for r in results)
    assert results[1].provenance() == {"agreement": 0.75, "miou": pytest.approx((1 / 2 + 2 / 3) / 2),
                                       "ignored_share": 0.0}  # fmt: skip
    assert summarize(results)["dropped"] == 1.0


def test_segments_are_connected_regions_of_one_class_above_the_minimum_size() -> None:
    seg = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 2],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1],
            [1, 0, 0, 1, 1],
        ]
    )
    index, classes = segments(seg, num_classes=3, min_pixels=2)
    assert sorted(classes) == [0, 1, 1]  # two class-1 blocks; the lone 2 and the lone 1 are too small
    assert index[1, 4] == -1 and index[4, 0] == -1
    assert index[0, 0] != index[3, 3] and classes[index[0, 0]] == classes[index[3, 3]] == 1
    index, classes = segments(seg, num_classes=3, ignore_index=0, min_pixels=1)
    assert sorted(classes) == [1, 1, 1, 2] and (index[seg == 0] == -1).all()
    pred = seg.copy()
    pred[0, 0] = 0  # 3 of the first block's 4 pixels still read as class 1
    pred[3:, 3:] = 0  # the second block is gone
    hits = pred == np.asarray(classes)[np.clip(index, 0, None)]  # each pixel read as its segment's class
    recall = segment_share(hits, index, len(classes))
    assert recall[index[0, 0]] == 0.75 and recall[index[3, 3]] == 0.0 and recall[index[1, 4]] == 1.0


def test_objects_mode_drops_a_variant_that_loses_an_object_the_object_judge_finds_on_the_source() -> None:
    seg = np.zeros((1, 6, 6), np.int64)
    seg[0, :2, :2] = 1  # object A
    seg[0, 4:, 4:] = 1  # object B (apart from A)
    segs = np.repeat(seg, 3, 0)
    on_source = seg[0].copy()
    on_source[4:, 4:] = 0  # the object judge misses B on the real image: B is not the generator's to keep
    lost_a = seg[0].copy()
    lost_a[:2, :2] = 0
    lost_b = on_source
    objects = _logits(np.stack([on_source] * 3 + [seg[0], lost_a, lost_b]))

    class Calls(FixedLogits):  # first call: the 3 sources; second: the 3 variants
        def __init__(self) -> None:
            self.calls = 0

        def raw(self, images: np.ndarray) -> torch.Tensor:
            self.calls += 1
            return objects[:3] if self.calls == 1 else objects[3:]

    with pytest.raises(ValueError, match="object_judge"):
        QualityFilter(FixedLogits(_logits(segs)), 2, np.array([1.0, 1.0]), mode="objects")
    qf = QualityFilter(FixedLogits(_logits(segs)), 2, np.array([1.0, 1.0]), mode="objects", threshold=0.0,
                       min_pixels=4, object_judge=Calls(), object_classes=[1])  # fmt: skip
    with pytest.raises(ValueError, match="real source images"):
        qf.score(np.zeros((3, 6, 6, 3), np.uint8), segs)
    results = qf.score(np.zeros((3, 6, 6, 3), np.uint8), segs, np.zeros((3, 6, 6, 3), np.uint8))
    assert [r.keep for r in results] == [True, False, True]
    assert [(r.segments, r.lost) for r in results] == [(1, 0), (1, 1), (1, 0)]  # only A is checked
    assert results[1].provenance()["segments_lost"] == 1.0
    summary = summarize(results)
    assert summary["segments_checked"] == 3 and summary["segments_lost"] == 1 and summary["dropped"] == 1


def test_label_outlines_mark_class_changes_and_depth_steps_on_both_sides() -> None:
    seg = np.zeros((4, 6), np.int64)
    seg[:, 3:] = 1  # a class change between columns 2 and 3
    depth = np.full((4, 6), 10.0)
    depth[:, 1:] = 12.0  # a 20% step between columns 0 and 1 (inside class 0)
    depth[:, 4:] = 12.5  # a 4% step between columns 3 and 4: not an outline at jump 0.1
    depth[3, 5] = 0.0  # no depth there: no step counted
    edges = label_outlines(seg, depth, depth_jump=0.1)
    assert edges[:, [0, 1, 2, 3]].all() and not edges[:3, 4:].any()
    assert not label_outlines(seg, None)[:, :2].any() and label_outlines(seg, None)[:, 2:4].all()
    assert label_outlines(seg, depth, depth_jump=0.01)[:3, 4].all()
    with pytest.raises(ValueError, match="depth shape"):
        label_outlines(seg, depth[:2])


def test_objects_mode_with_outlines_drops_a_variant_that_merges_touching_objects() -> None:
    seg = np.zeros((1, 12, 12), np.int64)
    seg[0, 1:11, 1:11] = 1  # two touching objects of one class: one connected region
    outline = np.zeros((12, 12), np.int64)
    outline[1:11, 1] = outline[1:11, 10] = outline[1, 1:11] = outline[10, 1:11] = 1  # the region's border
    outline[3:9, 5:7] = 1  # the outline between the two objects, inside the region
    merged = outline.copy()
    merged[3:9, 5:7] = 0
    shifted = merged.copy()
    shifted[3:9, 4:6] = 1  # one pixel off: still found
    no_inner = merged  # a source whose outline judge finds nothing inside the objects: nothing to check
    segs = np.repeat(seg, 4, 0)
    objects_logits = _logits(np.repeat(seg, 4, 0))

    class Calls(FixedLogits):  # first call: the 4 sources; second: the 4 variants
        def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
            self.calls, self.first, self.second = 0, first, second

        def raw(self, images: np.ndarray) -> torch.Tensor:
            self.calls += 1
            return self.first if self.calls == 1 else self.second

    outlines = Calls(_logits(np.stack([outline, outline, outline, no_inner])),
                     _logits(np.stack([outline, merged, shifted, merged])))  # fmt: skip
    with pytest.raises(ValueError, match="objects mode only"):
        QualityFilter(FixedLogits(_logits(segs)), 2, np.array([1.0, 1.0]), outline_judge=outlines)
    qf = QualityFilter(FixedLogits(_logits(segs)), 2, np.array([1.0, 1.0]), mode="objects", threshold=0.0,
                       min_pixels=4, object_judge=Calls(objects_logits, objects_logits), object_classes=[1],
                       outline_judge=outlines)  # fmt: skip
    images = np.zeros((4, 12, 12, 3), np.uint8)
    results = qf.score(images, segs, images)
    assert [r.keep for r in results] == [True, False, True, True]
    assert [r.outline_recall for r in results] == [1.0, 0.0, 1.0, None]
    assert results[1].provenance()["outline_recall"] == 0.0 and results[1].lost == 0  # no object lost
    summary = summarize(results)
    assert summary["outlines_checked"] == 3 and summary["outlines_merged"] == 1


def test_quality_outlines_needs_objects_mode() -> None:
    with pytest.raises(ValueError, match="quality_outlines"):
        build_config(
            {"generate": {"quality_filter": True, "quality_mode": "image", "quality_outlines": True}}
        )


def test_pixel_mode_masks_pixels_far_above_their_class_median_and_keeps_the_variant() -> None:
    segs = np.array([[[0, 0], [1, 1]]])
    pred = np.array([[[0, 0], [1, 0]]])  # pixel (1, 1) confidently wrong
    logits = _logits(pred)
    losses = pixel_losses(logits, segs)
    assert losses[0, 1, 1] > 4.0 and losses[0, 0, 0] < 0.01
    medians = np.array([0.01, 0.01])
    qf = QualityFilter(FixedLogits(logits), 2, medians, mode="pixel", factor=3.0, mask_value=255)
    (r,) = qf.score(np.zeros((1, 2, 2, 3), np.uint8), segs)
    assert r.keep and r.mask is not None
    assert r.mask.tolist() == [[False, False], [False, True]] and r.ignored_share == 0.25
    assert apply_pixel_mask(segs[0], r.mask, qf.mask_value).tolist() == [[0, 0], [1, 255]]


def test_quality_filter_fit_trains_once_then_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = ToyScenes(num_images=8, image_size=(RES, RES))
    samples = [ds.load(k) for k in ds.keys()]
    cfg = build_config({"device": "cpu", "perception": TINY_PERCEPTION,
                        "generate": {"quality_filter": True, "quality_mode": "pixel"}})  # fmt: skip
    qf = QualityFilter.fit(cfg, tmp_path, samples, ds.info, progress=False, judge_factory=fit_judge)
    folder = tmp_path / FILTER_DIR
    assert (folder / "model.safetensors").is_file() and (folder / "judge.json").is_file()
    stored = json.loads((folder / "filter.json").read_text())
    assert stored["key"] == qf.meta["key"] and len(stored["class_medians"]) == ds.info.num_classes
    images = np.stack([s.image for s in samples[:2]])
    segs = np.stack([s.seg for s in samples[:2]])
    first = qf.score(images, segs)
    assert qf.mode == "pixel" and qf.mask_value == 255 and all(r.mask is not None for r in first)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the filter was retrained instead of reloaded")

    monkeypatch.setattr(importlib.import_module("perception.judges"), "train", no_training)
    again = QualityFilter.fit(cfg, tmp_path, samples, ds.info, progress=False, judge_factory=fit_judge)
    assert again.meta["model_sha256"] == qf.meta["model_sha256"]
    np.testing.assert_array_equal(again.class_medians, qf.class_medians)
    assert [r.agreement for r in again.score(images, segs)] == [r.agreement for r in first]


def test_quality_filter_fit_trains_the_outline_judge_on_label_outlines(tmp_path: Path) -> None:
    ds = ToyScenes(num_images=8, image_size=(RES, RES))
    samples = [ds.load(k) for k in ds.keys()]
    cfg = build_config({"device": "cpu", "perception": TINY_PERCEPTION,
                        "generate": {"quality_filter": True, "quality_mode": "objects", "quality_outlines": True,
                                     "quality_object_classes": ["sphere", "box", "cylinder"]}})  # fmt: skip
    qf = QualityFilter.fit(cfg, tmp_path, samples, ds.info, progress=False, judge_factory=fit_judge)
    assert (
        qf.outline_judge is not None and (tmp_path / FILTER_DIR / "outlines" / "model.safetensors").is_file()
    )
    assert qf.meta["outlines"]["images_with_depth"] == 8 and qf.meta["outlines"]["depth_jump"] == 0.1
    images = np.stack([s.image for s in samples[:2]])
    results = qf.score(images, np.stack([s.seg for s in samples[:2]]), images)
    assert all(r.outline_recall is None or 0.0 <= r.outline_recall <= 1.0 for r in results)


def test_quality_filter_fit_without_a_judge_factory_says_what_to_pass(tmp_path: Path) -> None:
    ds = ToyScenes(num_images=2, image_size=(RES, RES))
    cfg = build_config({"device": "cpu", "perception": TINY_PERCEPTION})
    with pytest.raises(ValueError, match=r"perception\.judges\.fit_judge"):
        QualityFilter.fit(cfg, tmp_path, [ds.load(k) for k in ds.keys()], ds.info, progress=False)


# --------------------------------------------------------------------------------------------------
# lumen evaluate-synthesis
# --------------------------------------------------------------------------------------------------


def test_evaluate_synthesis_writes_table_json_and_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumen_cli.main import main

    base = tiny_base()
    base.save(tmp_path / "base")
    run = tmp_path / "run-seg"
    cfg = build_config({
        "name": "tiny-seg", "device": "cpu",
        "data": {"adapter": "toyscenes", "image_size": [RES, RES], "num_images": 8, "num_val_images": 4},
        "base": {"resolution": RES}, "lumen": {"condition": "seg"},
        "perception": TINY_PERCEPTION, "generate": {"steps": 2},
    })  # fmt: skip
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
    classes = len(ToyScenes(num_images=1).info.classes)
    build_controlnet(base, classes, seed=1).save_pretrained(run / "lumen")
    card = {"base_model": str(tmp_path / "base"), "condition": "seg", "channels": classes, "trained_steps": 0}
    (run / "lumen" / "lumen.json").write_text(json.dumps(card))

    out = tmp_path / "eval"
    argv = ["evaluate-synthesis", "--run", f"seg={run}", "--run", "none", "--base", str(tmp_path / "base"),
            "--images", "2", "--variants", "2", "--seeds", "0", "1", "--train-images", "4",
            "--judge-steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0

    doc = json.loads((out / "table.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["real (ceiling)", "seg", "none"]
    seg_row = doc["rows"][1]
    assert seg_row["metrics"]["seg_miou"]["n"] == 2 and len(seg_row["per_seed"]) == 2
    for key in ("depth_abs_rel", "normal_mean_angle", "div_pixel_pairwise", "div_latent_pairwise"):
        assert 0 <= seg_row["metrics"][key]["mean"] < math.inf
    real = doc["rows"][0]["metrics"]
    assert real["div_pixel_source"]["mean"] == 0.0 and real["div_latent_source"]["mean"] == 0.0
    table = (out / "table.md").read_text()
    assert "| seg |" in table and "seg mIoU" in table and "div latent" in table
    assert (out / "tradeoff.png").stat().st_size > 0
    assert (out / "grid_seg.png").is_file() and (out / "grid_none.png").is_file()
    assert {p.name for p in (out / "judges").iterdir()} == {"seg", "depth", "normal"}

    # a rerun reuses the judges and the per-seed scores: nothing is generated again
    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("variants were generated again instead of read from out/scores")

    monkeypatch.setattr(
        importlib.import_module("pipeline.synthesis.scoring"), "generate_variants", no_generation
    )
    assert main(argv) == 0
    assert json.loads((out / "table.json").read_text())["rows"] == doc["rows"][:1] + [
        {**r, "seconds": pytest.approx(0, abs=1)} for r in doc["rows"][1:]
    ]


def test_quality_settings_that_cannot_work_fail_before_any_work() -> None:
    from pipeline.config import ConfigError
    from pipeline.preflight import check_quality_filter

    with pytest.raises(ConfigError, match=r"needs generate\.quality_filter=true"):
        build_config({"generate": {"quality_retries": 2}})
    with pytest.raises(ConfigError, match="pixel mode"):
        build_config({"generate": {"quality_filter": True, "quality_mode": "pixel", "quality_retries": 1}})
    with pytest.raises(ConfigError, match="quality_object_classes"):
        build_config({"generate": {"quality_filter": True, "quality_mode": "objects"}})
    info = ToyScenes(num_images=2, image_size=(RES, RES)).info
    objects = {"quality_filter": True, "quality_mode": "objects", "quality_retries": 2}
    bad = build_config({"generate": {**objects, "quality_object_classes": ["sphere", "car"]}})
    with pytest.raises(ConfigError, match=r"\['car'\] are not classes of toyscenes"):
        check_quality_filter(bad, info)
    good = build_config({"generate": {**objects, "quality_object_classes": ["sphere", "box"]}})
    assert (
        check_quality_filter(good, info) == "quality filter: objects mode over ['sphere', 'box'], 2 retries"
    )


def test_evaluate_synthesis_warns_what_it_does_not_mirror(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """generate.candidates and generate.layout_supersample leave a label-conditioned row at one candidate
    and its usual condition, and say so; a layout row has both mirrored, with no warning."""
    from pipeline.synthesis.inputs import EvalSettings, OpenedRun, RunSpec
    from pipeline.synthesis.scoring import EvalPaths, Scorer

    def fine(samples: object) -> np.ndarray:
        raise AssertionError("no seed: nothing is made")

    layout = OpenedRun(
        RunSpec("x", None), "layout", 3, base=None, base_id="b", controlnet=object(), make_fine=fine
    )  # type: ignore[arg-type]
    seg = OpenedRun(RunSpec("x", None), "seg", None, base=None, base_id="b", controlnet=object())  # type: ignore[arg-type]
    unused: Any = None  # the dataset info and the latent encoder: no seed, nothing generated or scored
    paths = EvalPaths(tmp_path)
    for generate, run, warned in (
        ({}, layout, ""),
        ({"candidates": 4}, layout, ""),
        ({"candidates": 4}, seg, "generate.candidates=4 applies to layout ControlNets only"),
        ({"layout_supersample": 3}, layout, ""),
        ({"layout_supersample": 3}, seg, "generate.layout_supersample=3 applies to layout ControlNets only"),
    ):
        cfg = build_config({"generate": generate})
        scorer = Scorer(cfg, EvalSettings(seeds=()), [], unused, {}, unused, "b", torch.device("cpu"), paths)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.synthesis.scoring"):
            row = scorer.run_row(run)
        assert row["name"] == "x" and row["per_seed"] == []
        assert (caplog.text != "") is bool(warned)
        assert warned in caplog.text


def test_evaluate_synthesis_keeps_the_best_of_k_candidates_as_expand(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate.candidates: candidate c of each variant is made under expand's candidate seed, its layout
    is read back with the run's condition maker, and the one agreeing best with the condition is kept."""
    from pipeline.lumen.generate import LumenGenerator, variant_seed
    from pipeline.synthesis.inputs import EvalSettings, OpenedRun, RunSpec
    from pipeline.synthesis.scoring import generate_variants, score_key

    cfg = build_config({"generate": {"candidates": 3, "candidate_score": "mse"}})
    scenes = ToyScenes(num_images=2, image_size=(RES, RES))
    sources = [scenes.load(k) for k in scenes.keys()]
    calls: list[list[int]] = []

    def fake_generate(self, conditions, prompts, seeds, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(seeds))  # an image of one grey level per seed
        return np.stack([np.full((RES, RES, 3), s % 251, np.uint8) for s in seeds])

    def read(samples):  # type: ignore[no-untyped-def]  # the read-back "layout": the image's grey level
        return np.stack([np.full((1, RES, RES), s.image.mean() / 255, np.float32) for s in samples])

    monkeypatch.setattr(LumenGenerator, "generate", fake_generate)
    monkeypatch.setattr(LumenGenerator, "__init__", lambda self, *a, **k: None)
    run = OpenedRun(RunSpec("x", None), "layout", 1, base=None, base_id="b", controlnet=object(), make=read)  # type: ignore[arg-type]
    conds = np.zeros((2, 1, RES, RES), np.float32)  # mse against 0: the darkest candidate agrees best
    out = generate_variants(run, sources, cfg, EvalSettings(variants=2), 7, torch.device("cpu"), conds)
    assert len(calls) == 3
    keys = [k for k in scenes.keys() for _ in range(2)]
    for c in (1, 2):
        assert calls[c] == [
            variant_seed(7, f"{k}#candidate{c}", v) for k, v in zip(keys, [0, 1, 0, 1], strict=True)
        ]
    np.testing.assert_array_equal(out[:, 0, 0, 0], (np.array(calls) % 251).min(axis=0))
    # the selection is part of a layout run's score key; a label-conditioned run generates one candidate
    one = build_config({})
    assert score_key(run, 0, EvalSettings(), cfg, {}, "b", sources) != score_key(
        run, 0, EvalSettings(), one, {}, "b", sources
    )
    seg = OpenedRun(RunSpec("x", None), "seg", None, base=None, base_id="b", controlnet=object(), make=read)  # type: ignore[arg-type]
    assert score_key(seg, 0, EvalSettings(), cfg, {}, "b", sources) == score_key(
        seg, 0, EvalSettings(), one, {}, "b", sources
    )
    calls.clear()
    generate_variants(seg, sources, cfg, EvalSettings(variants=2), 7, torch.device("cpu"), conds)
    assert len(calls) == 1


@pytest.mark.parametrize("until", [1.0, 0.5])
def test_evaluate_synthesis_generates_with_the_configs_conditioning_settings(
    monkeypatch: pytest.MonkeyPatch, until: float
) -> None:
    """Variants are made as expand makes them: conditioning scale, condition guidance, SDEdit strength
    and layout sharpening come from ``generate``, and they are part of the score cache key."""
    from pipeline.conditions import sharpen
    from pipeline.lumen.generate import LumenGenerator
    from pipeline.synthesis.inputs import EvalSettings, OpenedRun, RunSpec
    from pipeline.synthesis.scoring import generate_variants, score_key

    g = {"conditioning_scale": 1.5, "condition_guidance": True, "strength": 0.6, "layout_sharpen": 2.0,
         "layout_sharpen_radius": 2, "layout_sharpen_until": until, "layout_guidance": 4.0}  # fmt: skip
    cfg = build_config({"generate": g})
    scenes = ToyScenes(num_images=2, image_size=(RES, RES))
    sources = [scenes.load(k) for k in scenes.keys()]
    conds = np.random.default_rng(0).random((2, 3, RES, RES)).astype(np.float32)
    seen: dict = {}

    def fake_generate(self, conditions, prompts, seeds, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs, conditions=conditions)
        return np.zeros((len(prompts), RES, RES, 3), np.uint8)

    monkeypatch.setattr(LumenGenerator, "generate", fake_generate)
    monkeypatch.setattr(LumenGenerator, "__init__", lambda self, *a, **k: None)
    run = OpenedRun(RunSpec("x", None), "layout", 3, base=None, base_id="b", controlnet=object())  # type: ignore[arg-type]
    settings = EvalSettings(variants=2)
    generate_variants(run, sources, cfg, settings, 0, torch.device("cpu"), conds)
    assert (seen["conditioning_scale"], seen["condition_guidance"], seen["strength"]) == (1.5, True, 0.6)
    assert seen["layout_guidance"] == 4.0
    assert seen["init_images"].shape == (4, RES, RES, 3)
    np.testing.assert_array_equal(seen["init_images"][1], sources[0].image)
    sharp = sharpen(np.repeat(conds, 2, 0), 2.0, 2)
    if until == 1.0:
        np.testing.assert_allclose(seen["conditions"], sharp)
        assert seen["early_conditions"] is None
    else:
        np.testing.assert_allclose(seen["conditions"], np.repeat(conds, 2, 0))
        np.testing.assert_allclose(seen["early_conditions"], sharp)
        assert seen["early_fraction"] == 0.5
    assert (seen["size"], seen["output_size"]) == ((RES, RES), (RES, RES))
    # a supersampled ControlNet (its card says so) gets conditions at its size and generates there
    from pipeline.synthesis.scoring import model_sources

    big = OpenedRun(RunSpec("x", None), "layout", 3, base=None, base_id="b", controlnet=object(),  # type: ignore[arg-type]
                    card={"supersample": 2})  # fmt: skip
    assert model_sources(big, cfg, sources)[0].image.shape == (2 * RES, 2 * RES, 3)
    generate_variants(
        big, sources, cfg, settings, 0, torch.device("cpu"), np.repeat(np.repeat(conds, 2, 2), 2, 3)
    )
    assert (seen["size"], seen["output_size"]) == ((2 * RES, 2 * RES), (RES, RES))
    assert score_key(big, 0, settings, cfg, {}, "b", sources) != score_key(
        run, 0, settings, cfg, {}, "b", sources
    )
    # generate.supersample overrides the card's factor: conditions, generation size and cache key follow
    at3 = build_config({"generate": {**g, "supersample": 3}})
    assert model_sources(big, at3, sources)[0].image.shape == (3 * RES, 3 * RES, 3)
    generate_variants(
        big, sources, at3, settings, 0, torch.device("cpu"), np.repeat(np.repeat(conds, 3, 2), 3, 3)
    )
    assert (seen["size"], seen["output_size"]) == ((3 * RES, 3 * RES), (RES, RES))
    assert score_key(big, 0, settings, at3, {}, "b", sources) != score_key(
        big, 0, settings, cfg, {}, "b", sources
    )
    # a different conditioning setting is a different cached score
    keys = {score_key(run, 0, settings, c, {}, "b", sources)
            for c in (cfg, build_config({"generate": {**g, "conditioning_scale": 1.0}}))}  # fmt: skip
    assert len(keys) == 2
    # generate.layout_supersample, as expand: the finer layouts after the first half, the usual ones before
    plain_g = {k: v for k, v in g.items() if not k.startswith("layout_sharpen")}
    for after in (0.5, 0.0):
        fine_cfg = build_config(
            {"generate": {**plain_g, "layout_supersample": 3, "layout_supersample_after": after}}
        )
        finer = conds[:, :, ::-1].copy()
        generate_variants(run, sources, fine_cfg, settings, 0, torch.device("cpu"), conds, finer)
        np.testing.assert_allclose(seen["conditions"], np.repeat(finer, 2, 0))
        if after:
            np.testing.assert_allclose(seen["early_conditions"], np.repeat(conds, 2, 0))
            assert seen["early_fraction"] == 0.5
        else:
            assert seen["early_conditions"] is None
    with_fine = OpenedRun(RunSpec("x", None), "layout", 3, base=None, base_id="b", controlnet=object(),  # type: ignore[arg-type]
                          make_fine=lambda samples: conds)  # fmt: skip
    assert score_key(with_fine, 0, settings, fine_cfg, {}, "b", sources) != score_key(
        run, 0, settings, fine_cfg, {}, "b", sources
    )
