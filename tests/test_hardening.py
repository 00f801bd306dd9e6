"""Hostile and broken inputs (issue #15): untrusted manifests, shards, images, labels and configs."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import Sample
from pipeline.shards import ShardSetError, ShardSetWriter, iter_samples, read_shards, verify_shard_set
from pipeline.shards.schema import encode_sample

CARD = {"classes": ["a", "b"], "ignore_index": None, "depth_units": "m"}


def tiny(key: str, value: int = 0) -> Sample:
    return Sample(key=key, image=np.full((8, 8, 3), value, np.uint8), seg=np.zeros((8, 8), np.uint8))


def write_set(out: Path, samples: list[Sample]) -> Path:
    with ShardSetWriter(out, max_samples=2, dataset_card=CARD, config_hash="h") as writer:
        for s in samples:
            writer.write(s, {"source_dataset": "x", "source_key": s.key})
    return out


def set_manifest_names(directory: Path, *names: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry, name in zip(manifest["shards"], names, strict=False):
        entry["name"] = name
    (directory / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------------
# 1. Shard names from a manifest
# --------------------------------------------------------------------------------------------------


def test_manifest_pipe_name_is_refused_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``pipe:`` shard name in manifest.json is refused before anything opens it; no command runs."""
    write_set(tmp_path, [tiny("k-0"), tiny("k-1")])
    set_manifest_names(tmp_path, "pipe:touch PWNED;cat shard-000000.tar")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardSetError, match="invalid shard name"):
        list(iter_samples("."))
    assert not (tmp_path / "PWNED").exists()
    assert not Path("PWNED").exists()


def test_manifest_name_outside_the_set_is_refused(tmp_path: Path) -> None:
    """``../other/shard-000000.tar`` in a manifest does not read a shard of another set."""
    write_set(tmp_path / "other", [tiny("other-0")])
    target = write_set(tmp_path / "set", [tiny("k-0")])
    set_manifest_names(target, "../other/shard-000000.tar")
    with pytest.raises(ShardSetError, match="invalid shard name"):
        read_shards(target)
    assert any("invalid shard name" in p for p in verify_shard_set(target).problems)


def test_writer_refuses_to_resume_a_manifest_with_a_bad_name(tmp_path: Path) -> None:
    write_set(tmp_path / "other", [tiny("other-0")])
    target = write_set(tmp_path / "set", [tiny("k-0")])
    set_manifest_names(target, "../other/shard-000000.tar")
    with pytest.raises(ShardSetError, match="invalid shard name"):
        ShardSetWriter(target, max_samples=2, dataset_card=CARD, config_hash="h")


# --------------------------------------------------------------------------------------------------
# 8. Tar members: size cap, non-regular members
# --------------------------------------------------------------------------------------------------


def _shard_with(path: Path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """A shard holding sample ok-0 and the given extra members (sample big-1 gets a json too)."""
    good = encode_sample(tiny("ok-0"), {"source_dataset": "x", "source_key": "ok-0"}, config_hash="h")
    with tarfile.open(path, "w") as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(f"ok-0.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data else None)


def _member(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, b"\0" * size


def test_oversized_member_is_skipped_unread_by_reader_and_flagged_by_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A member over ``max_member_bytes`` drops its sample with a warning; verify reports it."""
    write_set(tmp_path, [tiny("k-0")])
    shard = tmp_path / "shard-000000.tar"
    _shard_with(shard, [_member("big-1.depth.npy", 64 * 1024), _member("big-1.json", 2)])
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        keys = [d["__key__"] for d in read_shards(shard, max_member_bytes=16 * 1024)]
    assert keys == ["ok-0"]
    assert "over the cap" in caplog.text
    problems = verify_shard_set(tmp_path, max_member_bytes=16 * 1024).problems
    assert any("over the cap" in p for p in problems)


def test_symlink_member_is_reported_not_skipped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = tarfile.TarInfo("ln-1.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    shard = tmp_path / "s.tar"
    _shard_with(shard, [(link, b"")])
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        keys = [d["__key__"] for d in read_shards(shard)]
    assert keys == ["ok-0"]
    assert "ln-1" in caplog.text and "not a regular file" in caplog.text
