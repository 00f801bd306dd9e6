"""Class-specific appearance controls: losses, save/load, identity at strength 0, and that optimising the
directions on a tiny seeded model confines their effect better than random masked directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import ToyScenes
from pipeline.data.toyscenes import CLASSES, FLOOR, SPHERE
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.controls import (
    ClassDirections,
    ControlsSettings,
    ControlTrainer,
    FeatureEdit,
    area_loss,
    triplet_loss,
)
from pipeline.lumen.generate import LumenGenerator
from pipeline.lumen.tokenizer import build_tokenizer
from tests.test_lumen import PRESET

RES = 32


@pytest.fixture(scope="module")
def toy() -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = ToyScenes(num_images=12, image_size=(RES, RES), seed=2, min_objects=3, max_objects=5)
    samples = [ds.load(k) for k in ds.keys()]
    return (
        np.stack([s.image for s in samples]),
        np.stack([s.seg for s in samples]),
        [s.caption for s in samples],
    )


def _base(captions: list[str]):
    return build_tiny_components(build_tokenizer(captions, max_length=16), RES, seed=0, preset=PRESET)


def test_area_loss_is_zero_for_an_edit_confined_to_the_mask() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    inside = torch.randn(2, 4, 8, 8) * mask
    assert float(area_loss(inside, mask)) == 0.0
    leaking = inside + 0.1 * torch.randn(2, 4, 8, 8) * (1 - mask)
    assert float(area_loss(leaking, mask)) > 0
    a = torch.tensor([[1.0, 0.0]])
    assert float(triplet_loss(a, a, -a, margin=0.5)) == 0.0  # positive equal, negative opposite
    assert float(triplet_loss(a, -a, a, margin=0.5)) == pytest.approx(4.5)


def test_directions_round_trip_through_save_and_load(tmp_path: Path) -> None:
    d = ClassDirections(
        torch.randn(2, 3, 7), [3, 4], ["sphere", "box"], "up_blocks.0", 2.5, (400, 999), {"steps": 9}
    )
    loaded = ClassDirections.load(d.save(tmp_path / "directions.safetensors"))
    assert torch.equal(loaded.directions, d.directions) and torch.allclose(
        d.directions.norm(dim=2), torch.ones(2, 3)
    )
    assert (loaded.classes, loaded.class_names, loaded.layer, loaded.scale, loaded.t_range) == (
        [3, 4], ["sphere", "box"], "up_blocks.0", 2.5, (400, 999))  # fmt: skip
    assert loaded.metadata["steps"] == 9 and torch.equal(loaded.vector(4, 1), d.directions[1, 1])
    with pytest.raises(FileNotFoundError, match="train-controls"):
        ClassDirections.load(tmp_path / "missing.safetensors")


def test_an_edit_of_strength_zero_is_the_unedited_image_bit_for_bit(toy) -> None:
    _, segs, captions = toy
    base = _base(captions)
    gen = LumenGenerator(base, None, device="cpu")
    masks = torch.from_numpy(segs[:2] == SPHERE).float()[:, None]
    kw = {"steps": 3, "guidance_scale": 2.0, "size": (RES, RES)}
    plain = gen.generate(None, captions[:2], [1, 2], **kw)
    zero = FeatureEdit(base.unet, "up_blocks.0", torch.zeros(2, 16), masks)
    assert np.array_equal(gen.generate(None, captions[:2], [1, 2], feature_edit=zero, **kw), plain)
    strong = FeatureEdit(base.unet, "up_blocks.0", torch.full((2, 16), 5.0), masks)
    assert not np.array_equal(gen.generate(None, captions[:2], [1, 2], feature_edit=strong, **kw), plain)
    late = FeatureEdit(base.unet, "up_blocks.0", torch.full((2, 16), 5.0), masks, t_range=(0, 0))
    assert np.array_equal(
        gen.generate(None, captions[:2], [1, 2], feature_edit=late, **kw), plain
    )  # t out of range


def test_optimised_directions_change_less_outside_the_mask_than_random_ones(toy) -> None:
    images, segs, captions = toy
    torch.manual_seed(0)
    base = _base(captions)
    settings = ControlsSettings(directions_per_class=3, layer="up_blocks.0", feature_layer="up_blocks.1",
                                t_range=(300, 700), steps=60, batch_size=3, lr=0.1, area_weight=5.0,
                                min_pixels=8, seed=0)  # fmt: skip
    trainer = ControlTrainer(base, None, settings)
    learned = trainer.fit(images, segs, captions, None, [SPHERE, FLOOR], list(CLASSES))
    assert learned.classes == [SPHERE, FLOOR] and learned.directions.shape == (2, 3, 16)

    latents, emb = trainer._encode(images), trainer._text(captions)
    rows = torch.tensor([i for i in range(len(segs)) if (segs[i] == SPHERE).sum() >= 8])
    g = torch.Generator().manual_seed(5)
    t = torch.randint(300, 701, (2 * 3,), generator=g)
    noise = torch.randn(latents[rows[:6]].shape, generator=g)
    pick = rows[torch.arange(6) % len(rows)]
    masks = torch.from_numpy(segs[pick.numpy()] == SPHERE).float()[:, None]
    pairs = (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))

    def area(directions: torch.Tensor) -> float:
        with torch.no_grad():
            out = trainer.losses(
                directions, latents[pick], emb[pick], None, masks, pairs, t, noise, learned.scale
            )
        return float(out["area"])

    random = torch.nn.functional.normalize(
        torch.randn(3, 16, generator=torch.Generator().manual_seed(9)), dim=1
    )
    assert area(learned.directions[0]) < 0.75 * area(random), (
        area(learned.directions[0]),
        area(random),
    )  # 0.05 vs 0.10


def test_hardness_weights_draw_the_harder_class_more_often() -> None:
    from pipeline.lumen.controls import class_hardness, plan_class_edits

    labels = np.zeros((2, 8, 8), np.int64)
    labels[:, :4] = 1  # class 1: top half; class 0: bottom half
    preds = labels.copy()
    preds[:, 4:6] = 1  # the segmenter eats half of class 0: IoU(0) = 0.5, IoU(1) = 32/48
    hard = class_hardness(preds, labels, 3, [0, 1, 2])
    assert hard[0] == pytest.approx(0.5) and hard[1] == pytest.approx(1 - 32 / 48)
    assert hard[2] == pytest.approx((hard[0] + hard[1]) / 2)  # absent: the mean of the others

    d = ClassDirections(torch.randn(2, 2, 4), [0, 1], ["a", "b"], "up_blocks.0", 1.0, (0, 999))
    segs = [labels[0]] * 400
    uniform = plan_class_edits(d, segs, list(range(400)), [0, 1], min_pixels=1)
    weighted = plan_class_edits(d, segs, list(range(400)), [0, 1], min_pixels=1, weights={0: 0.9, 1: 0.1})
    share = [np.mean([p["class_id"] == 0 for p in plans if p]) for plans in (uniform, weighted)]
    assert 0.4 < share[0] < 0.6 and share[1] > 0.8, share
    assert (
        plan_class_edits(d, segs[:5], list(range(5)), [0, 1], min_pixels=1) == uniform[:5]
    )  # seeded per variant
