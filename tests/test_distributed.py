"""Data-parallel training on CPU: 2 gloo processes spawned by pipeline.distributed.launch (Fabric).

The jobs are small (a 16x16 seeded ControlNet, a few steps) but real: separate processes, a process
group, DDP's gradient all-reduce, rank-0 checkpoints read back by every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import (
    FreezeBatchNorm,
    initial_controlnet_state,
    read_shard_keys,
    train_controlnet,
    train_tiny_base,
)
from safetensors.numpy import load_file

from perception.train import _seeded_data_and_model, train
from pipeline.config import PerceptionConfig, load_config
from pipeline.data import ToyScenes
from pipeline.distributed import SINGLE, DataParallel, ParallelSettings, launch
from pipeline.shards import ShardSetWriter

TWO_CPU = ParallelSettings(devices=2, accelerator="cpu")
GLOBAL_BATCH, STEPS = 4, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One process x batch 4; 2 processes x batch 2 uninterrupted; 2 x 2 stopped after the step-3
    checkpoint ("killed") and then resumed by a new job."""
    root = tmp_path_factory.mktemp("ddp")
    out = {name: root / name for name in ("single", "ddp", "killed")}
    for p in out.values():
        p.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels the one-thread ranks run
    try:
        single = load_file(train_controlnet(SINGLE, out["single"], GLOBAL_BATCH, STEPS))
    finally:
        torch.set_num_threads(threads)
    ddp = load_file(launch(TWO_CPU, train_controlnet, out["ddp"], GLOBAL_BATCH, STEPS))
    launch(TWO_CPU, train_controlnet, out["killed"], GLOBAL_BATCH, STEPS, 3)
    stopped = json.loads((out["killed"] / "steps-rank1.json").read_text())["step"]
    resumed = load_file(launch(TWO_CPU, train_controlnet, out["killed"], GLOBAL_BATCH, STEPS))
    return {"dirs": out, "single": single, "ddp": ddp, "resumed": resumed, "stopped": stopped}


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(runs) -> None:
    single, ddp = runs["single"], runs["ddp"]
    assert single.keys() == ddp.keys()
    for k in single:
        np.testing.assert_allclose(ddp[k], single[k], rtol=1e-4, atol=1e-5)
    init = initial_controlnet_state()  # the weights did train: this compares two trained models
    assert max(float(np.abs(single[k] - init[k].numpy()).max()) for k in single) > 1e-3


def test_each_rank_trains_on_its_own_half_of_the_global_batch(runs) -> None:
    d = runs["dirs"]
    whole = np.load(d["single"] / "inputs-rank0.npy")
    halves = [np.load(d["ddp"] / f"inputs-rank{r}.npy") for r in (0, 1)]
    assert whole.shape[0] == GLOBAL_BATCH and all(h.shape[0] == GLOBAL_BATCH // 2 for h in halves)
    np.testing.assert_allclose(np.concatenate(halves), whole, rtol=0, atol=1e-6)
    assert not np.allclose(halves[0], halves[1])


def test_a_killed_and_resumed_ddp_run_equals_an_uninterrupted_one(runs) -> None:
    d = runs["dirs"]
    assert runs["stopped"] == 3
    assert sorted(p.name for p in (d["killed"] / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    for k, v in runs["ddp"].items():
        np.testing.assert_allclose(runs["resumed"][k], v, rtol=1e-6, atol=1e-7)
    log = (d["killed"] / "train_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == [str(i) for i in range(1, STEPS + 1)]  # rank 0 only


def test_each_rank_reads_disjoint_shards(tmp_path: Path) -> None:
    ds = ToyScenes(num_images=12, image_size=(8, 8), seed=0)
    with ShardSetWriter(tmp_path / "set", max_samples=2, dataset_card=ds.info.card(), config_hash="t") as w:
        for key in ds.keys():
            w.write(ds.load(key), {"source_dataset": "toyscenes", "source_key": key, "split": "train"})
    launch(TWO_CPU, read_shard_keys, tmp_path / "set", tmp_path)
    keys = [set(json.loads((tmp_path / f"keys-rank{r}.json").read_text())) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(ds.keys())


def test_base_model_two_processes_equal_one_process(tmp_path: Path) -> None:
    """Both phases (VAE, then UNet + text encoder with EMA) data-parallel; rank 0 saves the model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels the one-thread ranks run
    try:
        single = Path(train_tiny_base(SINGLE, tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    ddp = Path(launch(TWO_CPU, train_tiny_base, tmp_path / "ddp"))
    for part in ("vae", "unet", "text_encoder"):
        (a,) = (single / part).glob("*.safetensors")
        b = ddp / part / a.name
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys()
        for k in ta:
            if k.endswith("to_k.bias"):  # softmax ignores a key bias: its gradient is 0 up to rounding,
                continue  # which Adam turns into steps of +-lr whatever the rounding's size
            np.testing.assert_allclose(tb[k], ta[k], rtol=1e-4, atol=1e-5, err_msg=f"{part}.{k}")
    assert (ddp / "samples.png").is_file() and (ddp / "train_log.csv").is_file()


def test_batches_that_do_not_divide_over_the_ranks_fail_early() -> None:
    class _TwoRanks:
        world_size, global_rank = 2, 1

    parallel = DataParallel(_TwoRanks())
    assert parallel.local(4) == slice(2, 4)
    with pytest.raises(ValueError, match=r"multiple of runner\.devices"):
        parallel.local(5)


def test_runner_config_and_settings(tmp_path: Path) -> None:
    from pipeline.lumen.stages import parallel_settings

    cfg = load_config("configs/demo.yaml", ["runner.devices=2", "device=cpu"])
    assert parallel_settings(cfg) == ParallelSettings(2, 1, "auto", "cpu")
    assert ParallelSettings(2).fabric_strategy() == "ddp_spawn"
    with pytest.raises(RuntimeError, match="torchrun"):
        ParallelSettings(2, num_nodes=2).fabric_strategy()


PERCEPTION = PerceptionConfig(
    encoder_depth=4, decoder_channels=[32, 16, 8, 8], batch_size=4, steps=4
)  # depth 4: unused encoder blocks


def test_perception_two_processes_equal_one_process(tmp_path: Path) -> None:
    """A perception run over 2 processes (each on half of every batch, Lightning's DDP inside the
    job) equals the run in one process; batch norm is frozen, as CPU processes have no SyncBatchNorm."""
    ds = ToyScenes(num_images=20, image_size=(32, 32), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    real, val = samples[:12], samples[12:]
    kw = {"config": PERCEPTION, "info": ds.info, "seed": 0, "val_every": 2, "save_model": True}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels the one-thread ranks run
    try:
        single = train("seg", real, val, out_dir=tmp_path / "single", callbacks=[FreezeBatchNorm()], **kw)
    finally:
        torch.set_num_threads(threads)
    ddp = train(
        "seg", real, val, out_dir=tmp_path / "ddp", callbacks=[FreezeBatchNorm()], parallel=TWO_CPU, **kw
    )

    assert ddp.steps == single.steps == 4 and ddp.num_real == 12
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("single", "ddp"))
    _, model = _seeded_data_and_model(PERCEPTION, ["seg"], ds.info, 0, None, real, val, None)
    init = {k: v.numpy() for k, v in model.net.state_dict().items()}
    weights = [k for k in a if a[k].dtype.kind == "f"]
    moved = np.sqrt(sum(float(((a[k] - init[k]) ** 2).sum()) for k in weights))
    apart = np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in weights))
    assert moved > 0.1 and apart < 1e-3 * moved  # Adam turns near-zero gradients' rounding into +-lr
    close = sum(int(np.isclose(a[k], b[k], rtol=1e-4, atol=1e-6).sum()) for k in weights)
    assert close >= 0.999 * sum(a[k].size for k in weights)
    for name, value in single.metrics["seg"].items():
        assert ddp.metrics["seg"][name] == pytest.approx(value, abs=1e-3), name
    assert [p["step"] for p in ddp.curve or []] == [p["step"] for p in single.curve or []] == [2, 4]
    for p, q in zip(ddp.curve or [], single.curve or [], strict=True):  # validated on every rank, synced
        assert p["seg"]["miou"] == pytest.approx(q["seg"]["miou"], abs=1e-3)
    log = (tmp_path / "ddp" / "logs" / "metrics.csv").read_text()
    assert "train/loss" in log.splitlines()[0]  # rank 0's training log
    assert (tmp_path / "ddp" / "result.json").is_file()


def test_perception_batch_that_does_not_divide_fails_before_spawning() -> None:
    ds = ToyScenes(num_images=6, image_size=(32, 32), seed=0)
    samples = [ds.load(k) for k in ds.keys()]
    odd = PERCEPTION.model_copy(update={"batch_size": 3})
    with pytest.raises(ValueError, match=r"multiple of runner\.devices"):
        train("seg", samples[:4], samples[4:], config=odd, info=ds.info, parallel=TWO_CPU)


def test_the_evaluate_stage_trains_each_perception_run_over_runner_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``runner.devices`` reaches every perception run of the protocol (the run itself is tested above)."""
    from perception import protocol
    from perception.stages import EvalInputs, train_one

    seen: dict[str, object] = {}
    monkeypatch.setattr(protocol, "run_one", lambda *args, **kwargs: seen.update(kwargs) or {})
    spec = protocol.RunSpec(("seg",), "full", None, "real", 0)
    inputs = EvalInputs(real=[], val=[], test=None, synthetic=None, oracle=None, info=ToyScenes(1).info)
    for devices, expected in (
        (2, ParallelSettings(2, 1, "auto", "cpu")),
        (1, ParallelSettings(1, 1, "auto", "cpu")),
    ):
        train_one(
            load_config("configs/demo.yaml", [f"runner.devices={devices}", "device=cpu"]),
            tmp_path,
            spec,
            inputs,
        )
        assert seen["parallel"] == expected
