"""The gains report: statistics (checked by hand and against scipy), aggregation, files and figures."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sample import DatasetInfo, Sample
from pipeline.report import (
    ARMS,
    aggregate,
    make_report,
    paired_test,
    plot_gallery,
    render_markdown,
    sign_flip_p,
    summarize,
    t_quantile,
    t_two_sided_p,
)

REPORT_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "report"


def run(setting: str, arm: str, seed: int, **metrics: dict[str, float]) -> dict[str, object]:
    return {"setting": setting, "arm": arm, "seed": seed, "metrics": metrics, "tasks": list(metrics)}


def runs_fixture() -> list[dict[str, object]]:
    """Three seeds of seg (miou) and depth (abs_rel), low-label and full."""
    real = [0.50, 0.60, 0.70]
    synth = [0.55, 0.66, 0.74]
    out = []
    for seed in range(3):
        out.append(run("low-label", "real", seed, seg={"miou": real[seed]}, depth={"abs_rel": 0.3}))
        out.append(
            run("low-label", "real+synthetic", seed, seg={"miou": synth[seed]}, depth={"abs_rel": 0.3})
        )
        out.append(run("full", "real", seed, seg={"miou": 0.8 + seed / 100}, depth={"abs_rel": 0.2}))
        out.append(
            run("full", "real+synthetic", seed, seg={"miou": 0.8}, depth={"abs_rel": 0.2 - seed / 100})
        )
    return out


def test_summarize_gives_mean_and_sample_std() -> None:
    """std uses ddof = 1; non-finite values are left out; one value has std 0."""
    s = summarize([1.0, 2.0, 4.0, math.nan])
    assert s["mean"] == pytest.approx(7 / 3) and s["n"] == 3
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert summarize([5.0])["std"] == 0.0 and summarize([])["mean"] is None


@pytest.mark.parametrize(
    ("t", "df", "p"), [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (0.0, 3, 1.0)]
)
def test_student_t_matches_table_values(t: float, df: int, p: float) -> None:
    """Two-sided p-values and critical values of Student's t agree with the textbook table."""
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    if p < 1:
        assert t_quantile(p, df) == pytest.approx(t, abs=2e-3)


def test_student_t_matches_scipy() -> None:
    """Across df and t, the p-values equal scipy's (when scipy is installed)."""
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30):
        for t in (0.1, 1.0, 2.5, 7.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)


def test_paired_t_test_hand_example() -> None:
    """d = (0.05, 0.06, 0.04): mean 0.05, sd 0.01, t = 5 sqrt(3), df 2; a gain if higher is better."""
    out = paired_test([0.50, 0.60, 0.70], [0.55, 0.66, 0.74], higher_is_better=True)
    assert out["mean_diff"] == pytest.approx(0.05) and out["std_diff"] == pytest.approx(0.01)
    assert out["t"] == pytest.approx(5 * math.sqrt(3))
    expected_p = t_two_sided_p(5 * math.sqrt(3), 2)
    assert out["p_value"] == pytest.approx(expected_p) and 0.01 < expected_p < 0.02
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert out["ci"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-5)
    assert out["significant"] and out["verdict"] == "gain"
    assert out["sign_flip_p"] == pytest.approx(0.25)  # 3 pairs: 2/8 at best
    assert paired_test([0.50, 0.60, 0.70], [0.55, 0.66, 0.74], higher_is_better=False)["verdict"] == "loss"


def test_paired_test_edge_cases() -> None:
    """Identical arms are noise; a constant non-zero difference is significant; one pair is undefined."""
    assert paired_test([1.0, 2.0], [1.0, 2.0], higher_is_better=True)["p_value"] == 1.0
    constant = paired_test([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], higher_is_better=True)
    assert constant["p_value"] == 0.0 and constant["verdict"] == "gain"
    single = paired_test([1.0], [2.0], higher_is_better=True)
    assert single["p_value"] is None and not single["significant"] and single["improved"]


def test_sign_flip_test_is_exact() -> None:
    """All 2^n sign patterns are enumerated: for (1, -2, 3), |+-1 +-2 +-3| >= 2 in 6 of 8 patterns."""
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert sign_flip_p([1.0, -2.0, 3.0]) == pytest.approx(6 / 8)
    assert sign_flip_p([0.0, 0.0]) == 1.0


def test_aggregate_builds_the_report_shape_with_gains() -> None:
    """tasks -> settings -> arms / gain / significance, gains = difference of the means."""
    tasks = aggregate(runs_fixture())
    low = tasks["seg"]["settings"]["low-label"]
    assert set(low) == {"real", "real+synthetic", "gain", "significance"}
    assert low["real"]["miou"]["mean"] == pytest.approx(0.6) and low["real"]["miou"]["std"] == pytest.approx(
        0.1
    )
    assert low["gain"]["real+synthetic"]["miou"] == pytest.approx(0.05)
    assert low["significance"]["real+synthetic"]["miou"]["verdict"] == "gain"
    full_depth = tasks["depth"]["settings"]["full"]
    assert full_depth["gain"]["real+synthetic"]["abs_rel"] == pytest.approx(-0.01)
    assert full_depth["significance"]["real+synthetic"]["abs_rel"]["improved"]  # lower AbsRel is better
    assert list(tasks["seg"]["settings"]) == ["low-label", "full"]


def test_every_arm_is_compared_with_real_and_the_oracle_share_is_the_ratio_of_gains() -> None:
    """Each arm gets its gain and paired test against real; share = gain(arm) / gain(real+oracle),
    given only where the oracle's gain is significant and good."""
    values = {
        "real": [0.50, 0.60, 0.70, 0.55, 0.65],
        "real+augment": [0.52, 0.61, 0.73, 0.56, 0.67],
        "real+oracle": [0.60, 0.71, 0.80, 0.64, 0.76],
        "real+synthetic": [0.55, 0.64, 0.76, 0.60, 0.69],
    }
    runs = [
        run("low-label", arm, seed, seg={"miou": v[seed]}) for arm, v in values.items() for seed in range(5)
    ]
    entry = aggregate(runs)["seg"]["settings"]["low-label"]
    assert set(ARMS) <= set(entry) and set(entry["gain"]) == set(ARMS) - {"real"}
    assert entry["significance"]["real+oracle"]["miou"]["verdict"] == "gain"
    share = entry["oracle_share"]["real+synthetic"]["miou"]
    assert share == pytest.approx(
        entry["gain"]["real+synthetic"]["miou"] / entry["gain"]["real+oracle"]["miou"]
    )
    assert 0 < share < 1 and "real+oracle" not in entry["oracle_share"]
    noisy = [{**r, "metrics": {"seg": {"miou": 0.6 + (0.01 if r["seed"] % 2 else -0.01)}}} if r["arm"] ==
             "real+oracle" else r for r in runs]  # fmt: skip
    assert aggregate(noisy)["seg"]["settings"]["low-label"]["oracle_share"]["real+synthetic"]["miou"] is None


def test_per_class_iou_gets_a_gain_and_a_directed_test_but_no_figure_panel(tmp_path: Path) -> None:
    """``iou_<class>`` metrics (perception.class_iou) are compared like mIoU, higher being better; a
    class absent from one seed's test images (NaN) leaves that seed out of its paired test."""
    from pipeline.report.figures import _panels
    from pipeline.report.gains import _metric_label, metric_info

    real = [0.20, 0.25, 0.22, 0.18, 0.24]
    synth = [0.26, 0.30, 0.27, 0.25, float("nan")]
    runs = [run("low-label", "real", s, seg={"miou": 0.5, "iou_sign": real[s]}) for s in range(5)]
    runs += [run("low-label", "real+synthetic", s, seg={"miou": 0.5, "iou_sign": synth[s]}) for s in range(5)]
    tasks = aggregate(runs)
    entry = tasks["seg"]["settings"]["low-label"]
    sig = entry["significance"]["real+synthetic"]["iou_sign"]
    assert sig["n"] == 4 and sig["verdict"] == "gain"
    assert entry["gain"]["real+synthetic"]["iou_sign"] == pytest.approx(np.mean(synth[:4]) - np.mean(real))
    assert _panels(tasks) == [("seg", "miou")]
    assert _metric_label("iou_sign") == "IoU sign ↑" and metric_info("iou_sign").higher_is_better


def test_aggregate_rejects_two_runs_of_the_same_seed() -> None:
    """A duplicated (task, setting, arm, seed) is an error, not silently averaged."""
    runs = runs_fixture()
    with pytest.raises(ValueError, match="two runs"):
        aggregate([*runs, runs[0]])


def test_make_report_writes_json_markdown_and_figures(tmp_path: Path) -> None:
    """report.json (strict JSON, the documented keys), report.md, the bar chart and the gallery."""
    results = {
        "tasks": aggregate(runs_fixture()),
        "runs": runs_fixture(),
        "protocol": {"steps": 10, "alpha": 0.05},
    }
    results["tasks"]["seg"]["settings"]["full"]["real"]["miou"]["std"] = math.nan  # NaN must become null
    rng = np.random.default_rng(0)
    source = Sample(
        "s",
        rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
        seg=rng.integers(0, 3, (16, 16)).astype(np.uint8),
        depth=rng.uniform(1, 2, (16, 16)).astype(np.float32),
    )
    gallery = [(source, [Sample("s-v00", 255 - source.image), Sample("s-v01", source.image // 2)])]
    info = DatasetInfo("toy", classes=("a", "b", "c"))
    report = make_report(
        results,
        tmp_path,
        config={"seed": 0},
        config_hash="abc123",
        models={"base": {"id": "tiny", "sha256": None}},
        dataset=info,
        gallery=gallery,
    )
    doc = json.loads(
        (tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    for key in ("tasks", "runs", "protocol", "config", "config_hash", "models", "figures", "test", "dataset"):
        assert key in doc
    assert doc["tasks"]["seg"]["settings"]["full"]["real"]["miou"]["std"] is None
    assert doc["tasks"]["seg"]["settings"]["low-label"]["gain"]["real+synthetic"]["miou"] == pytest.approx(
        0.05
    )
    md = (tmp_path / "report.md").read_text()
    assert "| low-label | mIoU ↑ | 0.60 ± 0.10 (n=3)" in md and "abc123" in md and "figures/gains.png" in md
    assert report["figures"] == {"gains": "figures/gains.png", "gallery": "figures/gallery.png"}
    with Image.open(tmp_path / "figures" / "gains.png") as img:
        assert img.size[0] > 300
    with Image.open(tmp_path / "figures" / "gallery.png") as img:
        assert img.size[0] > 5 * 96  # source, seg, depth, 2 variants, enlarged to 96 px tiles
    assert not list(tmp_path.glob(".*.tmp"))


def test_gallery_fills_missing_labels_and_variants(tmp_path: Path) -> None:
    """Rows with fewer variants or labels get blank tiles; all rows have the same width."""
    img = np.zeros((8, 8, 3), np.uint8)
    rows = [(Sample("a", img, seg=np.zeros((8, 8), np.uint8)), [Sample("a-v0", img)]), (Sample("b", img), [])]
    path = plot_gallery(rows, tmp_path / "g.png", num_classes=2)
    with Image.open(path) as im:
        assert im.size[0] == 2 + 3 * (96 + 2)  # source | seg | variant 1


def test_markdown_renders_without_optional_parts() -> None:
    """A report with only tasks still renders (no protocol, no hashes)."""
    report = {"tasks": aggregate(runs_fixture()), "test": {"description": "paired t-test"}}
    assert "## seg" in render_markdown(report)


def test_report_package_imports_no_torch_lightning_perception_or_prefect() -> None:
    """pipeline.report stays pure numpy/matplotlib (checked on its import statements)."""
    banned = {"torch", "pytorch_lightning", "lightning", "perception", "prefect", "torchmetrics"}
    for path in REPORT_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & banned, f"{path.name} imports {names}"
