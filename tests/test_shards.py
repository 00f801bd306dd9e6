"""WebDataset shards: schema round trip, reproducible and resumable writer, reader, verify, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

import lumen_cli.shards as shards_cli
from pipeline.config import ShardConfig
from pipeline.data import Sample
from pipeline.data.toyscenes import ToyScenes
from pipeline.shards import (
    SCHEMA_VERSION,
    ShardFormatError,
    ShardSetError,
    ShardSetWriter,
    decode_sample,
    iter_samples,
    read_shards,
    shard_info,
    shard_urls,
    verify_shard_set,
    wds_decoder,
)
from pipeline.shards.schema import encode_sample

REPO = Path(__file__).resolve().parents[1]
CARD = ToyScenes(num_images=1).info.card()


@functools.cache
def _toy(num: int = 8) -> tuple[Sample, ...]:
    ds = ToyScenes(num_images=num, image_size=(32, 32))
    return tuple(ds.load(k) for k in ds.keys())


def toy(num: int = 8) -> list[Sample]:
    return [dataclasses.replace(s) for s in _toy(num)]


def prov(sample: Sample, **extra: Any) -> dict[str, Any]:
    return {"source_dataset": "toyscenes", "source_key": sample.key, "split": "train", **extra}


def write_set(out: Path, samples: list[Sample], **kw: Any) -> Path:
    kw.setdefault("max_samples", 3)
    kw.setdefault("dataset_card", CARD)
    kw.setdefault("config_hash", "test")
    with ShardSetWriter(out, **kw) as writer:
        for s in samples:
            writer.write(s, prov(s))
    return out


def tiny(key: str, value: int = 0) -> Sample:
    """A 4x4 sample for tests that need many samples fast."""
    return Sample(key=key, image=np.full((4, 4, 3), value, np.uint8), seg=np.zeros((4, 4), np.uint8))


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


def test_round_trip_every_field_is_bit_exact(tmp_path: Path) -> None:
    """Every field comes back with its dtype and bits: image, seg (uint8 and uint16), depth, normal,
    layout, caption, meta and provenance."""
    samples = toy(4)
    samples[1].seg = samples[1].seg.astype(np.uint16) + 300  # 16-bit class ids need our seg decoder
    rng = np.random.default_rng(0)
    layouts = {s.key: rng.standard_normal((4, 8, 8)).astype(np.float16) for s in samples}
    synthetic = {
        "synthetic": True,
        "variant": 2,
        "seed": 1234,
        "prompt": "a red sphere",
        "guidance": 3.0,
        "steps": 20,
        "scheduler": "ddim",
        "models": {"base": {"id": "tiny", "sha256": "a" * 64}},
        "layout": {"backbone": "sd", "num_components": 4},
        "timestamp": "2026-01-01T00:00:00Z",
        "quality": {"alignment": 0.75},
    }
    with ShardSetWriter(tmp_path, max_samples=3, dataset_card=CARD, config_hash="h1") as writer:
        for s in samples:
            writer.write(s, prov(s, **synthetic), layout=layouts[s.key])

    decoded = {d["__key__"]: d for d in read_shards(tmp_path)}
    assert list(decoded) == [s.key for s in samples]
    for s in samples:
        d = decoded[s.key]
        for name in ("image", "seg", "depth", "normal"):
            assert d[name].dtype == getattr(s, name).dtype, name
            assert np.array_equal(d[name], getattr(s, name)), name
        assert d["layout"].dtype == np.float16 and np.array_equal(d["layout"], layouts[s.key])
        record = d["json"]
        assert record["caption"] == s.caption and record["meta"] == s.meta
        assert {k: record[k] for k in synthetic} == synthetic
        assert record["schema_version"] == SCHEMA_VERSION and record["config_hash"] == "h1"
        assert record["source_key"] == s.key and record["key"] == s.key
    assert decoded[samples[1].key]["seg"].dtype == np.uint16


def test_iter_samples_gives_equal_samples(tmp_path: Path) -> None:
    """iter_samples returns Sample objects equal to what was written."""
    samples = toy(4)
    write_set(tmp_path, samples)
    back = list(iter_samples(tmp_path))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert np.array_equal(a.normal, b.normal) and a.caption == b.caption and a.meta == b.meta


def test_float16_and_lossy_image_formats_decode_to_contract_dtypes(tmp_path: Path) -> None:
    """float16 depth/normals decode to float32 equal to the float16 values; jpg/webp images decode to
    (H, W, 3) uint8 close to the original."""
    s = toy(1)[0]
    for fmt in ("jpg", "webp"):
        raw = encode_sample(
            s, prov(s), config_hash="h", image_format=fmt, depth_dtype="float16", normal_dtype="float16"
        )
        d = decode_sample({"__key__": s.key, **raw})
        assert f"image.{fmt}" in raw
        assert d["image"].shape == s.image.shape and d["image"].dtype == np.uint8
        assert np.abs(d["image"].astype(int) - s.image).mean() < 8
        assert d["depth"].dtype == np.float32
        assert np.array_equal(d["depth"], s.depth.astype(np.float16).astype(np.float32))
        assert np.array_equal(d["normal"], s.normal.astype(np.float16).astype(np.float32))


def test_writer_rejects_invalid_samples(tmp_path: Path) -> None:
    """Bad labels and incomplete provenance raise with a message naming the key."""
    s = toy(1)[0]
    bad_depth = dataclasses.replace(s, depth=np.where(s.depth > 0, np.nan, 0).astype(np.float32))
    with pytest.raises(ShardFormatError, match="NaN"):
        encode_sample(bad_depth, prov(s), config_hash="h")
    with pytest.raises(ShardFormatError, match="seg must be"):
        encode_sample(dataclasses.replace(s, seg=s.seg[:-1]), prov(s), config_hash="h")
    with pytest.raises(ShardFormatError, match="variant"):
        encode_sample(s, prov(s, synthetic=True), config_hash="h")
    with pytest.raises(ShardFormatError, match="provenance"):
        encode_sample(s, {"source_key": s.key}, config_hash="h")


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def test_rerun_gives_byte_identical_shards(tmp_path: Path) -> None:
    """Writing the same samples twice gives byte-identical shards and manifest."""
    a = write_set(tmp_path / "a", toy())
    b = write_set(tmp_path / "b", toy())
    assert files(a) == files(b)
    assert sorted(files(a)) == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_max_bytes_starts_a_new_shard(tmp_path: Path) -> None:
    """max_bytes caps a shard's size (up to the tar end padding) and every sample lands once."""
    write_set(tmp_path, toy(), max_samples=100, max_bytes=40_000)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_shards"] > 1 and manifest["num_samples"] == 8
    assert all(s["bytes"] <= 40_000 + 10_240 for s in manifest["shards"])
    assert verify_shard_set(tmp_path).ok


def test_writer_refuses_duplicate_keys_and_other_settings(tmp_path: Path) -> None:
    """A key cannot be written twice; resuming with other settings raises instead of mixing them."""
    samples = toy(4)
    write_set(tmp_path, samples)
    with ShardSetWriter(tmp_path, max_samples=3, dataset_card=CARD, config_hash="test") as writer:
        assert writer.done_keys == {s.key for s in samples}
        with pytest.raises(ValueError, match="done_keys"):
            writer.write(samples[0], prov(samples[0]))
    with pytest.raises(ShardSetError, match="config_hash"):
        ShardSetWriter(tmp_path, max_samples=3, dataset_card=CARD, config_hash="other")
    with pytest.raises(ShardSetError, match="max_samples"):
        ShardSetWriter(tmp_path, max_samples=4, dataset_card=CARD, config_hash="test")


def test_writer_from_config_uses_shard_config(tmp_path: Path) -> None:
    """from_config takes every setting from ShardConfig."""
    cfg = ShardConfig(max_samples=2, image_format="webp", image_quality=100, depth_dtype="float16")
    with ShardSetWriter.from_config(tmp_path, cfg, dataset_card=CARD, config_hash="h") as writer:
        for s in toy(3):
            writer.write(s, prov(s))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["writer"]["image_format"] == "webp" and manifest["num_shards"] == 2
    first = next(iter(read_shards(tmp_path)))
    assert np.array_equal(first["image"], toy(1)[0].image)  # webp at quality 100 is lossless


def test_exception_in_writer_block_discards_the_partial_shard(tmp_path: Path) -> None:
    """An exception inside the with-block keeps finished shards, drops the partial one, and a rerun
    completes the set identically to an uninterrupted run."""
    samples = toy()
    with (
        pytest.raises(RuntimeError),
        ShardSetWriter(tmp_path / "x", max_samples=3, dataset_card=CARD, config_hash="test") as w,
    ):
        for s in samples[:5]:
            w.write(s, prov(s))
        raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["manifest.json", "shard-000000.tar"]
    with ShardSetWriter(tmp_path / "x", max_samples=3, dataset_card=CARD, config_hash="test") as w:
        assert w.done_keys == {s.key for s in samples[:3]}
        for s in samples:
            if s.key not in w.done_keys:
                w.write(s, prov(s))
    assert files(tmp_path / "x") == files(write_set(tmp_path / "ref", samples))


def test_killed_writer_resumes_without_duplicates_or_gaps(tmp_path: Path) -> None:
    """SIGKILL in the middle of a shard, then a rerun (with or without the manifest): verify passes,
    the keys are exactly the expected set and the shards equal an uninterrupted run's."""
    crashed = tmp_path / "crashed"
    cmd = [sys.executable, str(REPO / "tests" / "_shard_writer_proc.py"), str(crashed), "8", "3", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        lines = []
        while (line := proc.stdout.readline().strip()) != "waiting":
            if not line:
                pytest.fail(f"writer process ended early: {proc.stderr.read()}")
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and len(lines) == 4
    names = sorted(p.name for p in crashed.iterdir())
    assert "shard-000000.tar" in names and "shard-000001.tar" not in names
    assert any(n.startswith(".shard-000001.tar.") and n.endswith(".tmp") for n in names)  # the partial shard
    assert not verify_shard_set(crashed).ok

    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(crashed, no_manifest)
    (no_manifest / "manifest.json").unlink()
    samples = toy()
    expected = [s.key for s in samples]
    reference = write_set(tmp_path / "reference", samples)
    for out in (crashed, no_manifest):
        with ShardSetWriter(out, max_samples=3, dataset_card=CARD, config_hash="test") as writer:
            assert writer.done_keys == set(expected[:3])
            for s in samples:
                if s.key not in writer.done_keys:
                    writer.write(s, prov(s))
        report = verify_shard_set(out)
        assert report.ok, report.summary()
        assert report.keys == expected
        assert files(out) == files(reference)


# --------------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------------


def test_verify_detects_truncated_tar(tmp_path: Path) -> None:
    """A shard cut short fails verify (sha256, size and sample count)."""
    write_set(tmp_path, toy())
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:20_000])
    report = verify_shard_set(tmp_path)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "sha256" in text and "shard-000001.tar: 20000 bytes" in text and "samples, manifest says 3" in text


def test_verify_detects_tampered_tar(tmp_path: Path) -> None:
    """A flipped byte is caught by sha256; with the manifest doctored to match, by decoding."""
    write_set(tmp_path, toy())
    shard = tmp_path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = tar.getmember("toy-train-000001.image.png")
    data[member.offset_data + 40] ^= 0xFF  # inside the PNG's compressed pixels
    shard.write_bytes(bytes(data))
    report = verify_shard_set(tmp_path)
    assert any("sha256" in p for p in report.problems)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = __import__("hashlib").sha256(bytes(data)).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shard_set(tmp_path)
    assert report.problems and all("toy-train-000001" in p for p in report.problems), report.problems


def test_verify_checks_labels_and_leftovers(tmp_path: Path) -> None:
    """Class ids outside the dataset card, stray temporary files and unlisted shards are problems."""
    samples = toy(2)
    samples[0].seg = samples[0].seg.copy()
    samples[0].seg[0, 0] = 17  # toy scenes have 6 classes
    write_set(tmp_path, samples)
    (tmp_path / ".shard-000009.tar.abc.tmp").write_bytes(b"x")
    shutil.copy(tmp_path / "shard-000000.tar", tmp_path / "extra.tar")
    problems = "\n".join(verify_shard_set(tmp_path).problems)
    assert "class ids [17]" in problems and ".tmp" in problems and "extra.tar: shard not listed" in problems


def _hostile_shard(path: Path) -> Path:
    """A shard with a path-traversal member and a pickle that would create a file if unpickled."""
    marker = path.parent / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    good = encode_sample(tiny("ok-0"), {"source_dataset": "x", "source_key": "ok-0"}, config_hash="h")
    with tarfile.open(path, "w") as tar:
        for name, data in [
            *((f"ok-0.{f}", b) for f, b in good.items()),
            ("../evil.json", b"{}"),
            ("/abs.json", b"{}"),
            ("bad-1.pyd", pickle.dumps(Evil())),
            ("bad-1.json", b"{}"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return marker


def test_hostile_members_are_rejected_and_never_unpickled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """verify flags bad member names; the reader and our wds decoder skip them without unpickling."""
    shard_dir = tmp_path / "set"
    shard_dir.mkdir()
    marker = _hostile_shard(shard_dir / "shard-000000.tar")
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        keys = [d["__key__"] for d in read_shards(shard_dir / "shard-000000.tar")]
    assert keys == ["ok-0"]
    assert "invalid member name '../evil.json'" in caplog.text
    url = str(shard_dir / "shard-000000.tar")
    stock = wds.WebDataset(url, shardshuffle=False).decode(wds_decoder, handler=wds.ignore_and_continue)
    assert "bad-1" not in [d["__key__"] for d in stock]  # its .pyd member raised instead of unpickling
    mapped = wds.WebDataset(url, shardshuffle=False).map(decode_sample, handler=wds.ignore_and_continue)
    assert [d["__key__"] for d in mapped] == ["ok-0"]  # decode_sample also rejects the bad keys
    assert not marker.exists()
    (shard_dir / "manifest.json").write_text(
        json.dumps(
            {
                "format": "lumen-shards",
                "schema_version": 1,
                "complete": True,
                "shards": [{"name": "shard-000000.tar", "samples": 1, "bytes": 0, "sha256": ""}],
                "num_shards": 1,
                "num_samples": 1,
                "num_bytes": 0,
            }
        )
    )
    assert any("invalid member name '../evil.json'" in p for p in verify_shard_set(shard_dir).problems)


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


def test_reader_with_two_dataloader_workers(tmp_path: Path) -> None:
    """Two DataLoader workers split the shards: every key exactly once, decoded to tensors."""
    write_set(tmp_path, toy(), max_samples=2)
    ds = read_shards(tmp_path, shuffle=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = list(loader)
    assert sorted(d["__key__"] for d in got) == [s.key for s in toy()]
    assert got[0]["image"].shape == (32, 32, 3)
    batch = torch.utils.data.default_collate([{k: d[k] for k in ("image", "seg", "depth")} for d in got])
    assert batch["image"].dtype == torch.uint8 and batch["depth"].dtype == torch.float32
    assert batch["seg"].shape == (8, 32, 32)
    pickle.dumps(ds)  # spawn-started workers need a picklable pipeline


def test_reader_with_stock_webdataset(tmp_path: Path) -> None:
    """The stock webdataset.WebDataset reads our shards with our decoder (handler or map)."""
    samples = toy()
    write_set(tmp_path, samples)
    urls = shard_urls(tmp_path)
    by_handler = list(wds.WebDataset(urls, shardshuffle=False).decode(wds_decoder))
    by_map = list(wds.WebDataset(urls, shardshuffle=False).map(decode_sample))
    for s, h, m in zip(samples, by_handler, by_map, strict=True):
        assert h["__key__"] == m["__key__"] == s.key
        assert np.array_equal(h["seg.png"], s.seg) and np.array_equal(m["seg"], s.seg)
        assert np.array_equal(h["depth.npy"], s.depth) and np.array_equal(m["normal"], s.normal)
        assert h["json"]["caption"] == s.caption


def test_reader_skips_corrupt_shard_and_sample_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated shard and an undecodable image are skipped with a logged warning, not a crash."""
    samples = toy()
    write_set(tmp_path, samples)
    shard = tmp_path / "shard-000001.tar"  # keys 3, 4, 5
    with tarfile.open(shard) as tar:
        member = tar.getmember("toy-train-000004.image.png")
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + 16] = b"\0" * 16  # breaks the PNG signature
    shard.write_bytes(bytes(data))
    last = tmp_path / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[:3000])  # cut inside the first sample's first member
    with caplog.at_level(logging.WARNING, logger="pipeline.shards.reader"):
        keys = [d["__key__"] for d in read_shards(tmp_path)]
    assert keys == [s.key for s in samples[:4]] + [samples[5].key]
    assert "toy-train-000004" in caplog.text and "skipping corrupt" in caplog.text


def test_reader_shuffle_is_reproducible_per_seed_and_epoch(tmp_path: Path) -> None:
    """shuffle>0 permutes shards and samples; the same seed and epoch give the same order."""
    write_set(tmp_path, [tiny(f"k-{i:03d}") for i in range(40)], max_samples=4)
    plain = [d["__key__"] for d in read_shards(tmp_path)]
    ds = read_shards(tmp_path, shuffle=8, seed=1)
    first, again = [d["__key__"] for d in ds], [d["__key__"] for d in ds]
    ds.set_epoch(1)
    other = [d["__key__"] for d in ds]
    assert sorted(first) == plain and first != plain
    assert first == again and other != first and sorted(other) == plain


def test_reader_splits_by_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With WORLD_SIZE=2 each rank reads a disjoint half of the shards."""
    write_set(tmp_path, [tiny(f"k-{i:03d}") for i in range(12)], max_samples=3)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({d["__key__"] for d in read_shards(tmp_path, shuffle=2)})
    assert len(seen[0]) == len(seen[1]) == 6 and seen[0] | seen[1] == {f"k-{i:03d}" for i in range(12)}


def test_reader_resampled_draws_forever(tmp_path: Path) -> None:
    """resampled=True draws shards with replacement; with_epoch bounds the epoch."""
    write_set(tmp_path, [tiny(f"k-{i:03d}") for i in range(6)], max_samples=2)
    keys = [d["__key__"] for d in read_shards(tmp_path, resampled=True).with_epoch(25)]
    assert len(keys) == 25 and set(keys) <= {f"k-{i:03d}" for i in range(6)}


def test_reader_mixes_sets_with_weights(tmp_path: Path) -> None:
    """weights=[1, 3] draws about a quarter of the samples from the first set."""
    write_set(tmp_path / "real", [tiny(f"r-{i:04d}") for i in range(200)], max_samples=50)
    write_set(tmp_path / "syn", [tiny(f"s-{i:04d}", 255) for i in range(600)], max_samples=50)
    keys = [d["__key__"] for d in read_shards([tmp_path / "real", tmp_path / "syn"], weights=[1, 3], seed=3)]
    real = sum(k.startswith("r-") for k in keys)
    assert len(keys) == len(set(keys)) > 400
    assert 0.2 < real / len(keys) < 0.3


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _lumen(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lumen")
    shards_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_verify_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify exits 0 on a good set and 1 on a broken one; info prints counts and keys."""
    write_set(tmp_path, toy())
    assert _lumen("shards", "verify", str(tmp_path)) == 0
    assert "8 samples" in capsys.readouterr().out
    assert _lumen("shards", "info", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "by split:  train 8" in out and "by source: toyscenes 8" in out and "toy-train-000000" in out
    assert shard_info(tmp_path)["by_kind"] == {"real": 8}
    (tmp_path / "shard-000002.tar").unlink()
    assert _lumen("shards", "verify", str(tmp_path)) == 1
    assert "missing" in capsys.readouterr().out
    assert _lumen("shards", "info", str(tmp_path / "nowhere")) == 1


def test_write_many_with_threads_is_byte_identical_to_a_write_loop(tmp_path: Path) -> None:
    """Threaded encoding keeps input order: same shards, same manifest hashes as ``write``."""
    samples = toy()
    write_set(tmp_path / "loop", samples)
    with ShardSetWriter(tmp_path / "many", max_samples=3, dataset_card=CARD, config_hash="test") as writer:
        assert writer.write_many(((s, prov(s)) for s in samples), workers=3) == len(samples)
    assert files(tmp_path / "many") == files(tmp_path / "loop")
    report = verify_shard_set(tmp_path / "many")  # the sha256 hashed while writing matches the files
    assert report.ok and sorted(report.keys) == sorted(s.key for s in samples)


def test_write_encoded_rejects_duplicates_and_non_bytes(tmp_path: Path) -> None:
    s = toy(1)[0]
    with ShardSetWriter(tmp_path, dataset_card=CARD, config_hash="test") as writer:
        fields = writer.encode(s, prov(s))
        writer.write_encoded(s.key, fields)
        with pytest.raises(ValueError, match="already"):
            writer.write_encoded(s.key, fields)
        with pytest.raises(ShardFormatError, match="bytes"):
            writer.write_encoded("other", {"json": "not bytes"})  # type: ignore[dict-item]
