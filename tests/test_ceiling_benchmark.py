"""The ceiling benchmark's object bookkeeping (benchmarks/ceiling.py): groups and seed means."""

from __future__ import annotations

import numpy as np
import pytest
from _bench import load_benchmark

from pipeline.synthesis.metrics import object_placement


@pytest.fixture(scope="module")
def ceiling():
    return load_benchmark("ceiling")


def test_object_groups_follow_object_placement_order_sizes_and_contact(ceiling) -> None:
    inst = -np.ones((2, 20, 20), np.int16)
    inst[0, 0:5, 0:5] = 0  # 25 px, touches object 1
    inst[0, 0:5, 5:10] = 1  # 25 px
    inst[0, 10:20, 10:20] = 2  # 100 px, alone
    inst[0, 15, 0] = 3  # 1 px: not counted
    inst[1, 0:20, 0:13] = 0  # 260 px, alone
    classes = [[3, 4, 5, 3], [4]]
    groups = ceiling._object_groups(inst, classes)
    placement = object_placement(inst.clip(0, 1), inst, [[1] * len(c) for c in classes], min_pixels=16)
    assert placement.objects == 4 and all(len(m) == 4 for m in groups.values())
    assert groups["area<64"].tolist() == [True, True, False, False]
    assert groups["area64-255"].tolist() == [False, False, True, False]
    assert groups["area>=256"].tolist() == [False, False, False, True]
    assert groups["touching"].tolist() == [True, True, False, False]
    assert (groups["alone"] == ~groups["touching"]).all()


def test_placement_means_average_scores_and_groups_over_seeds(ceiling) -> None:
    seeds = [
        {"in_place": 1.0, "objects": 4, "in_place_by_group": {"alone": 0.5, "touching": 1.0}},
        {"in_place": 0.5, "objects": 4, "in_place_by_group": {"alone": 1.0, "touching": 0.0}},
    ]
    assert ceiling._mean_placement(seeds) == {
        "in_place": 0.75, "objects": 4.0, "in_place_by_group": {"alone": 0.75, "touching": 0.5}
    }  # fmt: skip
    assert ceiling._mean_placement([]) == {}
