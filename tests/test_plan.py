"""``lumen plan``: the dry run's counts follow the config, its shard math follows the writer, its bytes
follow real shards, and the command prints, exits 0, and exits 2 on a bad config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lumen_cli.main import main
from pipeline.config import LumenConfig, ShardConfig, load_config
from pipeline.data import Sample, build_dataset, resize_sample
from pipeline.lumen.plan import RunPlan, analytic_sample_bytes, plan_run, shard_layout
from pipeline.shards import ShardSetWriter
from pipeline.shards.writer import _tar_size

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SD15 = REPO / "configs" / "sd15-dinov2.yaml"
CITYSCAPES = REPO / "configs" / "cityscapes-folder.yaml"


@pytest.fixture(scope="module")
def demo() -> tuple[LumenConfig, RunPlan]:
    cfg = load_config(DEMO)
    return cfg, plan_run(cfg)


def _write_real(cfg: LumenConfig, out: Path, n: int) -> int:
    """Write the first ``n`` real samples as ``expand`` does; the shard set's bytes on disk."""
    source = build_dataset(cfg.data, "train")
    size = cfg.data.image_size or (cfg.base.resolution, cfg.base.resolution)
    card: dict[str, object] = {"classes": list(source.info.classes), "ignore_index": None, "depth_units": "m"}
    with ShardSetWriter.from_config(out, cfg.shards, dataset_card=card, config_hash="0" * 16) as w:
        for key in source.keys()[:n]:
            prov = {"source_dataset": "toyscenes", "source_key": key, "split": "train", "synthetic": False}
            w.write(resize_sample(source.load(key), size), prov)
    return sum(p.stat().st_size for p in out.glob("*.tar"))


def test_plan_counts_are_what_the_demo_config_implies(demo: tuple[LumenConfig, RunPlan]) -> None:
    cfg, plan = demo
    g, n = cfg.generate, 128  # data.num_images of the demo
    assert (plan.dataset.train_images, plan.dataset.val_images) == (n, cfg.data.num_val_images) == (n, 64)
    assert plan.generation.source_images == n
    assert plan.generation.synthetic_samples == n * g.variants == 256
    assert plan.generation.passes_per_step == 2  # guidance 3 > 1
    assert plan.generation.evaluations == 256 * g.steps * 2
    # condition guidance: the unconditional row runs without the ControlNet; 128 px at 2x over a 4x VAE
    assert g.condition_guidance and plan.generation.controlnet_passes_per_step == 1
    assert plan.generation.latent_size == (32, 32)
    assert plan.generation.chunks == math.ceil(n / g.chunk_size)
    assert plan.generation.size == cfg.data.image_size == (64, 64)
    real, syn = plan.shards
    assert (real.samples, syn.samples) == (n, 256)
    for s in (real, syn):
        assert s.samples_per_shard <= cfg.shards.max_samples
        assert s.shards == math.ceil((s.samples or 0) / s.samples_per_shard)


def test_plan_counts_a_third_row_for_layout_guidance_and_the_latents_of_a_larger_grid() -> None:
    cfg = load_config(
        DEMO, ["generate.layout_guidance=5", "generate.supersample=3", "generate.layout_supersample=4"]
    )
    g = plan_run(cfg).generation
    assert (g.passes_per_step, g.controlnet_passes_per_step) == (3, 1)
    assert g.evaluations == 256 * cfg.generate.steps * 3
    assert g.latent_size == (48, 48)  # 192 px over the 4x VAE
    stock = plan_run(load_config(DEMO, ["generate.condition_guidance=false"])).generation
    assert (stock.passes_per_step, stock.controlnet_passes_per_step) == (2, 2)


def test_demo_trains_only_perception_with_the_shipped_generator(demo: tuple[LumenConfig, RunPlan]) -> None:
    """The shipped tiny base and ControlNet fit the demo: only the perception arms train."""
    cfg, plan = demo
    p = cfg.perception
    assert [t.model for t in plan.training] == [f"perception {a}" for a in p.arms]
    runs = len(p.seeds)  # one setting (low-label only), one multi-task model
    for t in plan.training:
        batch = p.batch_size if t.model == "perception real" else p.batch_size * 2  # additive, ratio 1
        assert (t.steps, t.batch, t.runs, t.images_seen) == (p.steps, batch, runs, p.steps * batch * runs)
    assert any("tiny-lumen-layout" in r for r in plan.reused)


def test_shard_layout_splits_as_the_writer_does(tmp_path: Path) -> None:
    """Equal-size samples: the writer's shard count and bytes on disk are exactly the plan's."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # incompressible: ~3 kB per sample
    cfg = ShardConfig(max_samples=5, max_bytes=16 * 1024)  # the byte limit closes shards at 4 samples
    card: dict[str, object] = {"classes": [], "ignore_index": None, "depth_units": "m"}
    samples = [Sample(f"s{i:04d}", image) for i in range(23)]
    prov = {"source_dataset": "t", "source_key": "s", "synthetic": False}
    with ShardSetWriter.from_config(tmp_path, cfg, dataset_card=card, config_hash="0" * 16) as w:
        size = _tar_size("s0000", w.encode(samples[0], prov))
        for s in samples:
            w.write(s, prov)
    per, shards, total = shard_layout(len(samples), size, cfg)
    files = sorted(tmp_path.glob("*.tar"))
    assert per < cfg.max_samples  # the byte limit, not the count, closed the shards
    assert shards == len(files)
    assert total == sum(p.stat().st_size for p in files)


def test_planned_bytes_are_within_2x_of_written_shards(tmp_path: Path) -> None:
    cfg = load_config(DEMO, ["data.num_images=8"])
    plan = plan_run(cfg)
    written = _write_real(cfg, tmp_path / "real", 8)
    planned = plan.shards[0].bytes
    assert planned is not None and written / 2 <= planned <= written * 2
    assert plan.shards[0].bytes_from.startswith("measured")
    # the analytic estimate (no samples read) of the same sample is within 2x of the measured one too
    analytic = analytic_sample_bytes((64, 64), ("seg", "depth", "normal"), cfg.shards)
    assert written / 8 / 2 <= analytic <= written / 8 * 2


def test_plan_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(DEMO), "data.num_images=64"]) == 0
    out = capsys.readouterr().out
    assert "train images  64" in out
    assert "synthetic samples   128" in out  # 64 images x 2 variants
    assert "20 steps x 2" in out and "real+synthetic" in out
    assert main(["plan", str(DEMO), "generate.supersample=3", "generate.layout_supersample=null"]) == 0
    assert "generated at 192x192, supersample 3" in capsys.readouterr().out  # the 2x ControlNet at 3x


def test_plan_json_is_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(DEMO), "--json", "generate.variants=3", "data.num_images=32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["generation"]["synthetic_samples"] == 96
    assert [s["name"] for s in data["shards"]] == ["real", "synthetic"]
    assert data["parallel"]["world_size"] == 1


def test_plan_rejects_a_bad_key_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(DEMO), "data.num_imgs=3"]) == 2
    assert "unknown config key 'data.num_imgs'" in capsys.readouterr().err


def test_plan_without_the_dataset_takes_counts_from_images(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/sd15-dinov2.yaml: no dataset and no weights here; counts unknown, or from --images."""
    assert main(["plan", str(SD15)]) == 0
    out = capsys.readouterr().out
    assert "not found" in out and "synthetic samples   unknown" in out
    assert main(["plan", str(SD15), "--images", "1000", "data.num_images=null", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dataset"]["train_images"] == 900  # data.val_fraction 0.1 held out as val
    assert data["generation"]["synthetic_samples"] == 900 * 4
    assert data["generation"]["evaluations"] == 900 * 4 * 30 * 2
    real = data["shards"][0]
    assert real["bytes_from"].startswith("analytic")
    assert real["bytes_per_sample"] > 512 * 512 * 3 // 2  # the image PNG at raw/2, plus seg and record
    assert data["training"][0]["model"] == "ControlNet"


def test_cityscapes_plan_splits_batches_over_eight_devices() -> None:
    cfg = load_config(CITYSCAPES)
    plan = plan_run(cfg, images=2975)
    assert plan.parallel.world_size == 8
    controlnet = next(t for t in plan.training if t.model == "ControlNet")
    assert controlnet.per_device_batch == cfg.lumen.batch_size // 8
    assert plan.dataset.train_images == 2975  # a val folder: every image trains


def test_perception_batches_split_over_the_devices_too() -> None:
    """Perception runs are data-parallel: the plan gives each arm's batch per device, and flags one
    that does not divide over the processes."""
    two = plan_run(load_config(DEMO, ["runner.devices=2"]))
    for t in (t for t in two.training if t.model.startswith("perception")):
        assert t.data_parallel and t.per_device_batch == t.micro_batch // 2
    three = plan_run(load_config(DEMO, ["runner.devices=3"]))  # demo batches 8 and 16
    assert any("PROBLEM" in n and "perception real" in n for n in three.notes)


def test_gains_plan_has_a_plan_per_setting_and_their_totals(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.config import gains_setting_configs
    from pipeline.lumen.plan import plan_gains

    path = REPO / "configs" / "gains-toy.yaml"
    configs = gains_setting_configs(path)
    assert set(configs) == set(load_config(path).gains.settings) and len(configs) == 2
    assert all(not c.gains.settings for c in configs.values())
    plan = plan_gains(configs)
    totals = plan.totals()
    parts = list(plan.settings.values())
    assert totals["synthetic_samples"] == sum(p.generation.synthetic_samples or 0 for p in parts)
    assert totals["training_runs"] == sum(t.runs for p in parts for t in p.training)
    assert totals["bytes"] == sum(s.bytes or 0 for p in parts for s in p.shards)
    assert main(["plan", str(path), "--gains", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["settings"]) == set(configs) and data["totals"] == totals
    assert main(["plan", str(path)]) == 0  # without --gains: one run, and a pointer to --gains
    assert "`lumen plan --gains`" in capsys.readouterr().out
