"""benchmarks/shard_objects.py: a run's shards (and its oracle re-renders) scored by object judges."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from _bench import load_benchmark

from pipeline.config import load_config, save_config
from pipeline.data import build_dataset
from pipeline.shards.writer import ShardSetWriter
from pipeline.synthesis.metrics import instance_boundaries

ROOT = Path(__file__).resolve().parents[1]


class _LookupJudge:
    """A judge that knows the right answer for each image it was told about (and fails on any other)."""

    def __init__(self) -> None:
        self.answers: dict[bytes, np.ndarray] = {}

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self.answers[np.ascontiguousarray(im).tobytes()] for im in images])


def test_score_run_reads_real_synthetic_and_oracle_images_against_their_sources_objects(
    tmp_path: Path,
) -> None:
    bench = load_benchmark("shard_objects")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["data.num_images=4"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    source = build_dataset(cfg.data, "train")
    real = [source.load(k) for k in source.keys()[:3]]
    synthetic = [replace(s, key=f"{s.key}-v0", meta={"source_key": s.key}) for s in real]
    for kind, samples in (("real", real), ("synthetic", synthetic)):
        with ShardSetWriter(
            run / "shards" / kind, max_samples=8, dataset_card=source.info.card(), config_hash="t"
        ) as w:
            for s in samples:
                w.write(
                    s, {"source_dataset": "toyscenes", "source_key": s.key.split("-v")[0], "split": "train"}
                )
    oracle = [source.oracle(s.key, v, ["evening", "night"]) for s in real for v in range(2)]
    found, outline = _LookupJudge(), _LookupJudge()
    for s in real + oracle:
        instances = source.objects(str(s.meta.get("source_key", s.key)))[0]
        found.answers[s.image.tobytes()] = (instances >= 0).astype(np.uint8)
        outline.answers[s.image.tobytes()] = instance_boundaries(instances).astype(np.uint8)
    assert all(not np.array_equal(o.image, r.image) for o, r in zip(oracle[::2], real, strict=True))

    scores = bench.score_run(run, found, outline, ["evening", "night"], 2)
    assert [scores[k]["images"] for k in ("real", "synthetic", "oracle")] == [3, 3, 6]
    for kind in ("real", "synthetic", "oracle"):  # perfect judges: everything in place and apart
        assert scores[kind]["in_place"] == 1.0 and scores[kind]["images_all_in_place"] == 1.0
        assert scores[kind]["objects"] > 0
        assert scores[kind]["separated"] == 1.0 and scores[kind]["touching_pairs"] > 0
    assert scores["oracle"]["objects"] == 2 * scores["real"]["objects"]
    assert "oracle" not in bench.score_run(run, found, outline)

    # a judge that sees nothing finds no object in place
    blind = _LookupJudge()
    blind.answers = {k: np.zeros_like(v) for k, v in found.answers.items()}
    assert bench.score_run(run, blind, blind)["synthetic"]["in_place"] == 0.0
