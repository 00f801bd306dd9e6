"""Prefect flows end to end on tiny seeded models: files written, kill -9 and resume, Dask = threads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import build_config, config_dict
from pipeline.data import Quarantine
from pipeline.lumen.base import build_tiny_components
from pipeline.lumen.stages import collect_samples, run_train_lumen
from pipeline.lumen.tokenizer import build_tokenizer
from pipeline.runs import prepare_run_dir
from pipeline.shards.verify import verify_shard_set
from tests.test_lumen import PRESET, RES

REPO = Path(__file__).resolve().parents[1]

RAW = {
    "name": "flowtest",
    "data": {"num_images": 5, "num_val_images": 3, "image_size": [RES, RES]},
    "base": {"resolution": RES},
    "layouts": {"num_components": 4, "pca_images": 5, "pca_vectors_per_image": 32, "batch_size": 2},
    "lumen": {"train_steps": 1, "batch_size": 2, "validate_every": 100},
    "generate": {"variants": 2, "steps": 2, "chunk_size": 2},
    "shards": {"max_samples": 3},
    "perception": {
        "tasks": ["seg", "depth"],
        "steps": 2,
        "seeds": [0, 1],
        "batch_size": 2,
        "low_label_fraction": None,
        "num_test_images": 3,
        "arms": ["real", "real+synthetic"],
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 8],
    },
}
KEYS = [f"toy-train-{i:06d}" for i in range(5)]
VARIANT_KEYS = sorted(f"{k}-v{v:02d}" for k in KEYS for v in range(2))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, run folder with a tiny base model and a 1-step LUMEN ControlNet)."""
    root = tmp_path_factory.mktemp("flows")
    cfg_path = root / "flowtest.yaml"
    cfg_path.write_text(yaml.safe_dump(RAW))
    cfg = build_config(RAW)
    run = prepare_run_dir(cfg, root / "template")
    data = collect_samples(cfg, (RES, RES), Quarantine(None), progress=False)
    tok = build_tokenizer([s.caption for s in data], max_length=16)
    build_tiny_components(tok, RES, preset=PRESET).save(run / "base")
    run_train_lumen(cfg, run, progress=False)
    return cfg_path, run


def _copy_run(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("lumen_train"))
    return dest


def _verify(run: Path) -> tuple[list[str], list[str]]:
    real, syn = verify_shard_set(run / "shards" / "real"), verify_shard_set(run / "shards" / "synthetic")
    assert real.ok and syn.ok, real.problems + syn.problems
    return sorted(real.keys), sorted(syn.keys)


def test_run_flow_writes_shards_report_and_summaries(template, tmp_path: Path, harness, capsys) -> None:
    from flows import call_flow
    from flows.stages import read_summary
    from lumen_cli.main import main

    cfg_path, tpl = template
    run = _copy_run(tpl, tmp_path / "run")
    assert main(["run", str(cfg_path), "--out", str(run)]) == 0  # the README's main command, on tiny data
    out = capsys.readouterr().out
    assert f"report: {run / 'report' / 'report.md'}" in out and "5 real + 10 synthetic samples" in out
    summary = read_summary(run, "run")

    assert summary["trained"] == {"base": False, "lumen": False}  # the run folder has its models
    assert summary["expand"]["real_samples"] == 5 and summary["expand"]["synthetic_samples"] == 10
    assert _verify(run) == (KEYS, VARIANT_KEYS)
    report = json.loads((run / "report" / "report.json").read_text())
    assert set(report["tasks"]) == {"seg", "depth"}
    assert {"real", "real+synthetic", "gain"} <= set(report["tasks"]["seg"]["settings"]["full"])
    assert (run / "report" / "figures" / "gains.png").is_file()
    for stage in ("expand", "evaluate", "run"):
        assert (run / "summaries" / f"{stage}.md").is_file()
    rows = json.loads((run / "summaries" / "gains.table.json").read_text())
    assert {(r["task"], r["metric"]) for r in rows} >= {("seg", "miou"), ("depth", "abs_rel")}
    text = (run / "summary.md").read_text()
    assert "5 real + 10 synthetic" in text and "Gains" in text
    assert set(summary["timings_s"]) >= {"validate", "expand", "evaluate", "total"}
    assert not list((run / "work" / "expand").glob("*.npz"))  # images dropped once the sets are complete

    # A second run of the same flow finds everything done: nothing is generated or trained again.
    again = call_flow("expand", str(cfg_path), [], out=str(run), progress=False)
    assert again["chunks_generated"] == 0 and again["written_this_run"] == {
        "real": 0,
        "synthetic": 0,
        "filtered": 0,
    }

    # Changing only perception.* on the finished run redoes only the evaluate stage: the shards and
    # models are reused, the old perception runs move aside, and nothing stale is mixed in.
    old_runs = sorted(p.relative_to(run) for p in (run / "perception").rglob("run.json"))
    assert old_runs
    assert main(["run", str(cfg_path), "--out", str(run), "perception.steps=3"]) == 0
    summary = read_summary(run, "run")
    assert summary["trained"] == {"base": False, "lumen": False}
    assert read_summary(run, "expand")["chunks_generated"] == 0 and _verify(run) == (KEYS, VARIANT_KEYS)
    (entry,) = json.loads((run / "stages.json").read_text())["superseded"]
    assert entry["stages"] == ["evaluate"] and "perception" in entry["moved"]
    moved = run / entry["moved_to"]
    assert sorted(p.relative_to(moved) for p in (moved / "perception").rglob("run.json")) == old_runs
    assert sorted(p.relative_to(run) for p in (run / "perception").rglob("run.json")) == old_runs  # redone
    assert json.loads((run / "report" / "report.json").read_text())["config"]["perception"]["steps"] == 3


def _lumen(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from lumen_cli.main import main; sys.exit(main())", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_expand_killed_at_several_points_resumes_to_exactly_the_expected_keys(
    template, tmp_path: Path, harness
) -> None:
    cfg_path, tpl = template
    run = _copy_run(tpl, tmp_path / "run")
    from prefect.settings import PREFECT_API_URL

    # The subprocesses talk to the harness's server instead of each starting an ephemeral one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}  # fmt: skip
    args = ["expand", str(cfg_path), "--out", str(run)]
    # 3 chunks (2 + 2 + 1 images), shards of 3 samples: kills land in open shards and between chunks.
    for point in ("chunk-saved:0", "chunk-writing:1", "chunk-written:1"):
        proc = _lumen(args, {**env, "LUMEN_KILL_AT": point})
        assert proc.returncode == -9, f"{point}: {proc.returncode}\n{proc.stderr[-2000:]}"
    proc = _lumen(args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 real and 10 synthetic samples" in proc.stdout
    assert _verify(run) == (KEYS, VARIANT_KEYS)
    check = _lumen(["shards", "verify", str(run / "shards" / "synthetic")], env)
    assert check.returncode == 0, check.stdout + check.stderr

    # Same bytes as an uninterrupted run (given the same run start time, which provenance records).
    from flows import call_flow

    clean = _copy_run(tpl, tmp_path / "clean")
    shutil.copy(run / "started_at.txt", clean / "started_at.txt")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the OMP_NUM_THREADS=1 subprocesses: the same float rounding
    try:
        call_flow("expand", str(cfg_path), [], out=str(clean), progress=False)
    finally:
        torch.set_num_threads(threads)
    for name in ("real", "synthetic"):
        got = json.loads((run / "shards" / name / "manifest.json").read_text())["shards"]
        want = json.loads((clean / "shards" / name / "manifest.json").read_text())["shards"]
        assert got == want


def test_dask_runner_gives_the_same_shards_as_the_thread_runner(template, tmp_path: Path, harness) -> None:
    import torch

    from flows import call_flow

    cfg_path, tpl = template
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Dask workers run single-threaded; same arithmetic, same bytes
    try:
        manifests = {}
        for kind in ("thread", "dask"):
            run = _copy_run(tpl, tmp_path / kind)
            (run / "started_at.txt").write_text("2026-01-01T00:00:00Z\n")  # provenance's run start time
            call_flow("expand", str(cfg_path), [f"runner.kind={kind}", "runner.max_workers=2"], out=str(run),
                      progress=False)  # fmt: skip
            assert _verify(run) == (KEYS, VARIANT_KEYS)
            manifests[kind] = [
                json.loads((run / "shards" / n / "manifest.json").read_text())["shards"]
                for n in ("real", "synthetic")
            ]
    finally:
        torch.set_num_threads(threads)
    assert manifests["dask"] == manifests["thread"]


def test_dataloader_workers_exit_cleanly_after_a_flow_ran(harness) -> None:
    """Forked DataLoader workers of a process that ran a flow must not inherit Prefect's exit hooks."""
    import torch
    from prefect import flow, get_run_logger

    import flows  # noqa: F401  (installs the after-fork cleanup)

    @flow
    def chatty() -> int:
        get_run_logger().info("starts Prefect's log and event services")
        return 1

    assert chatty() == 1
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2)
    assert torch.cat(list(loader)).tolist() == list(range(8))


def test_two_generation_slots_make_the_same_chunks_as_one(template, tmp_path: Path) -> None:
    """Chunks generated two at a time (each on its own model copies) equal the sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from pipeline.lumen.expand import chunk_files, expand_context, generate_chunk, prepare_expand

    cfg_path, tpl = template
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = {}
    try:
        for slots in (1, 2):
            cfg = build_config(yaml.safe_load(cfg_path.read_text()), [f"runner.gpu_concurrency={slots}"])
            run = _copy_run(tpl, tmp_path / f"slots{slots}")
            chunks = prepare_expand(cfg, run, progress=False)
            with ThreadPoolExecutor(slots) as pool:
                futures = [pool.submit(generate_chunk, cfg, run, i, keys) for i, keys in enumerate(chunks)]
                [f.result() for f in futures]
            assert 1 <= expand_context(cfg, run)._built <= slots  # copies are built only when needed
            images[slots] = [np.load(chunk_files(run, i)[0])["images"] for i in range(len(chunks))]
    finally:
        torch.set_num_threads(threads)
    assert len(images[1]) == 3
    for a, b in zip(images[1], images[2], strict=True):
        np.testing.assert_array_equal(a, b)


def test_serve_dry_run_builds_a_scheduled_deployment(template, capsys) -> None:
    from lumen_cli.main import main

    cfg_path, _ = template
    assert main(["serve", str(cfg_path), "generate.variants=3", "--cron", "0 2 * * *", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lumen-flowtest" in out and "0 2 * * *" in out and "generate.variants=3" in out


def test_runner_section_does_not_change_the_run_hash() -> None:
    from pipeline.config import config_hash

    a, b = build_config(RAW), build_config(RAW, ["runner.kind=dask", "runner.max_workers=4"])
    assert config_hash(a) == config_hash(b) and config_dict(a)["runner"] != config_dict(b)["runner"]
