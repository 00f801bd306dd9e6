"""The semantic mapper: synthesised inputs (seg, sketch, scribble) and overfitting a tiny fixed set."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.layouts.mapper import fit_mapper, label_sketch, mapper_input, predict, scribbles


def _seg(seed: int, size: int = 16) -> np.ndarray:
    """Sky above a horizon, floor below, one square object: 3 classes."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((size, size), np.int64)
    seg[int(rng.integers(4, 8)) :] = 1
    y, x = rng.integers(6, size - 5, 2)
    seg[y : y + 4, x : x + 4] = 2
    return seg


def test_inputs_are_synthesised_from_the_label_map() -> None:
    seg = _seg(0)
    sketch = label_sketch(seg)
    assert sketch.shape == (1, 16, 16) and set(np.unique(sketch)) == {0.0, 1.0}
    assert not sketch[0, 0, :].any()  # the top row is all sky: no boundary there
    strokes = scribbles(seg, 3, np.random.default_rng(0))
    assert strokes.shape == (3, 16, 16)
    for c in range(3):
        on = strokes[c] > 0
        assert on.any() and (seg[on] == c).all()  # every class scribbled, only inside its region
    assert mapper_input("seg", seg, 3, np.random.default_rng(0)).sum(0).min() == 1
    with pytest.raises(ValueError, match="unknown mapper input"):
        mapper_input("photo", seg, 3, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["seg", "sketch", "scribble"])
def test_the_mapper_overfits_a_tiny_fixed_set(kind: str) -> None:
    segs = [_seg(s) for s in range(4)]
    rng = np.random.default_rng(1)
    inputs = np.stack([mapper_input(kind, s, 3, rng) for s in segs])
    # a layout-like target: a fixed random projection of the one-hot labels, 4 components
    proj = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    layouts = np.einsum("nc,bchw->bnhw", proj, np.stack([mapper_input("seg", s, 3, rng) for s in segs]))
    model, losses = fit_mapper(inputs, layouts, "layout", steps=300, batch_size=4, width=32)
    assert np.mean(losses[-10:]) < 0.05 * np.mean(losses[:10]), (losses[:3], losses[-3:])
    assert predict(model, inputs).shape == layouts.shape

    proxy, _ = fit_mapper(inputs, np.stack(segs), "proxy", steps=300, batch_size=4, width=32)
    accuracy = (predict(proxy, inputs).argmax(1) == np.stack(segs)).mean()
    assert accuracy > 0.97, accuracy


def test_a_saved_mapper_loads_with_the_same_outputs_and_conditions_are_valid(tmp_path) -> None:
    from pipeline.layouts.mapper import load_mapper, outputs_to_condition, save_mapper

    segs = np.stack([_seg(s) for s in range(2)])
    inputs = np.stack([mapper_input("seg", s, 3, np.random.default_rng(0)) for s in segs])
    model, _ = fit_mapper(inputs, segs, "proxy", steps=5, batch_size=2, width=16, depth=3, downsample=2)
    save_mapper(model, tmp_path / "m", {"input": "seg", "target": "proxy"})
    loaded, card = load_mapper(tmp_path / "m")
    assert (card["in_channels"], card["out_channels"], card["width"], card["depth"], card["downsample"]) == (
        3,
        3,
        16,
        3,
        2,
    )
    assert np.array_equal(predict(loaded, inputs), predict(model, inputs))
    assert predict(model, inputs).shape == (2, 3, 16, 16)  # downsampled inside, full size out
    one_hot = outputs_to_condition(predict(model, inputs), "proxy")
    assert np.array_equal(one_hot.sum(1), np.ones((2, 16, 16))) and set(np.unique(one_hot)) <= {0.0, 1.0}
    soft = outputs_to_condition(predict(model, inputs), "proxy", temperature=0.5)
    assert np.allclose(soft.sum(1), 1.0, atol=1e-5) and soft.min() > 0
    assert outputs_to_condition(np.array([[[[-1.0, 0.5, 2.0]]]]), "layout").tolist() == [[[[0.0, 0.5, 1.0]]]]
    with pytest.raises(FileNotFoundError, match="train-mapper"):
        load_mapper(tmp_path / "missing")
