"""benchmarks/compare_gains.py: one arm of two gains reports, compared seed by seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _bench import load_benchmark


@pytest.fixture(scope="module")
def compare_gains():
    return load_benchmark("compare_gains")


def _report(miou: dict[str, list[float]]) -> dict[str, Any]:
    runs = [
        {"arm": arm, "seed": seed, "setting": "s", "metrics": {"seg": {"miou": v}}}
        for arm, values in miou.items()
        for seed, v in enumerate(values)
    ]
    return {"runs": runs}


def test_compare_pairs_seeds_and_reads_direction(compare_gains, tmp_path: Path) -> None:
    a = _report({"real": [0.2, 0.3, 0.4], "real+synthetic": [0.30, 0.35, 0.50]})
    b = _report({"real": [0.2, 0.3, 0.4], "real+synthetic": [0.32, 0.38, 0.52]})
    (row,) = compare_gains.compare(a, b, "real+synthetic")
    assert row["seeds"] == [0, 1, 2]
    assert row["mean_diff"] == pytest.approx((0.02 + 0.03 + 0.02) / 3)
    assert row["verdict"] == "gain"  # three consistent improvements of a higher-is-better metric
    (ref,) = compare_gains.compare(a, b, "real")
    assert ref["mean_diff"] == 0
    # the CLI writes JSON with both arms
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert compare_gains.main([str(pa), str(pb), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["real+synthetic"][0]["b"] == pytest.approx((0.32 + 0.38 + 0.52) / 3)


def test_compare_uses_only_shared_seeds_and_rejects_missing_arms(compare_gains) -> None:
    a = _report({"real+synthetic": [0.3, 0.4, 0.5]})
    b = _report({"real+synthetic": [0.3, 0.3]})
    (row,) = compare_gains.compare(a, b, "real+synthetic")
    assert row["seeds"] == [0, 1]
    assert row["mean_diff"] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="no runs of arm 'real\\+oracle'"):
        compare_gains.compare(a, b, "real+oracle")
