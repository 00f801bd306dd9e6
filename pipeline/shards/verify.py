"""Check a shard set against its manifest and the schema; summarise what it holds.

:func:`verify_shard_set` reads every byte: it checks each shard's size and sha256 against
``manifest.json``, its member names, decodes every sample, checks the schema, label sizes and
ranges, and that keys are unique across the set. :func:`shard_info` only reads the ``json`` members.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from pipeline.io import sha256_file
from pipeline.shards.schema import (
    MAX_MEMBER_BYTES,
    SCHEMA_VERSION,
    Provenance,
    ShardFormatError,
    decode_sample,
    iter_tar_samples,
)
from pipeline.shards.writer import MANIFEST_FORMAT, MANIFEST_NAME, ShardSetError, check_shard_name

__all__ = ["VerifyReport", "shard_info", "verify_shard_set"]

logger = logging.getLogger(__name__)

_WRITER_KEYS = frozenset({"schema_version", "key", "caption", "meta", "config_hash", "package_version"})
_NORMAL_TOLERANCE = 0.05  # |norm - 1| allowed for non-zero normals (8-bit quantised normals pass)


@dataclass
class VerifyReport:
    """What :func:`verify_shard_set` found. ``ok`` is true when ``problems`` is empty."""

    directory: Path
    num_shards: int = 0
    num_samples: int = 0
    num_bytes: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, max_problems: int = 50) -> str:
        """Human-readable summary: totals, then the first ``max_problems`` problems."""
        lines = [
            f"{self.directory}: {self.num_shards} shards, {self.num_samples} samples, "
            f"{self.num_bytes / 1e6:.1f} MB checked"
        ]
        lines += [f"  PROBLEM: {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _load_manifest(directory: Path) -> dict[str, Any]:
    """The manifest as a dict; raises ShardSetError when it is missing or unreadable."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ShardSetError(f"{path} is missing: the writer never started here or is still running")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ShardSetError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardSetError(f"{path} is not a shard-set manifest (no 'shards' list)")
    return manifest


def _check_manifest(manifest: dict[str, Any], report: VerifyReport) -> None:
    """Header fields and totals of the manifest."""
    if manifest.get("format") != MANIFEST_FORMAT:
        report.problems.append(f"manifest format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        report.problems.append(
            f"manifest schema_version {manifest.get('schema_version')!r} != {SCHEMA_VERSION}"
        )
    if manifest.get("complete") is not True:
        report.problems.append("manifest says complete=false: the writer did not finish; rerun it to resume")
    shards = manifest["shards"]
    totals = {
        "num_shards": len(shards),
        "num_samples": sum(int(s.get("samples", 0)) for s in shards),
        "num_bytes": sum(int(s.get("bytes", 0)) for s in shards),
    }
    for name, value in totals.items():
        if manifest.get(name) != value:
            report.problems.append(f"manifest {name} is {manifest.get(name)!r}, its shards add up to {value}")


def _check_record(key: str, record: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Provenance fields of one ``json`` record."""
    problems = []
    prov = {k: v for k, v in record.items() if k not in _WRITER_KEYS}
    try:
        Provenance.model_validate(prov)
    except ValidationError as err:
        problems.append(f"{key}: invalid provenance: {err}".replace("\n", " "))
    if record.get("config_hash") != manifest.get("config_hash"):
        problems.append(
            f"{key}: config_hash {record.get('config_hash')!r} != manifest {manifest.get('config_hash')!r}"
        )
    if not isinstance(record.get("meta"), dict) or not isinstance(record.get("caption"), str):
        problems.append(f"{key}: json needs a 'caption' string and a 'meta' object")
    return problems


def _check_labels(key: str, sample: dict[str, Any], card: dict[str, Any]) -> list[str]:
    """Label values: class ids within the card's classes, finite non-negative depth, unit normals."""
    problems = []
    classes, ignore = card.get("classes") or [], card.get("ignore_index")
    if "seg" in sample and classes:
        ids = np.unique(sample["seg"])
        bad = ids[(ids >= len(classes)) & (ids != (-1 if ignore is None else ignore))]
        if bad.size:
            problems.append(
                f"{key}: seg has class ids {bad[:10].tolist()} outside 0..{len(classes) - 1} (ignore_index={ignore})"
            )
    if "depth" in sample:
        depth = sample["depth"]
        if not np.isfinite(depth).all() or (depth < 0).any():
            problems.append(f"{key}: depth has NaN/inf or negative values (0 marks invalid pixels)")
    if "normal" in sample:
        norm = np.linalg.norm(sample["normal"].astype(np.float64), axis=-1)
        bad_n = int(((norm > 0) & (np.abs(norm - 1) > _NORMAL_TOLERANCE)).sum())
        if not np.isfinite(norm).all() or bad_n:
            problems.append(f"{key}: normal has {bad_n} non-unit vectors (or NaN/inf)")
    return problems


def _verify_shard(
    path: Path,
    entry: dict[str, Any],
    manifest: dict[str, Any],
    seen: set[str],
    report: VerifyReport,
    max_member_bytes: int,
) -> None:
    """Check one shard: size and sha256, member names, every sample decoded and checked."""
    if not path.is_file():
        report.problems.append(f"{path.name}: listed in the manifest but missing")
        return
    size = path.stat().st_size
    report.num_bytes += size
    if size != entry.get("bytes"):
        report.problems.append(f"{path.name}: {size} bytes, manifest says {entry.get('bytes')}")
    if sha256_file(path) != entry.get("sha256"):
        report.problems.append(f"{path.name}: sha256 differs from the manifest (modified or truncated)")
    count = 0
    card = manifest.get("dataset") or {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, fields in iter_tar_samples(tar, max_member_bytes=max_member_bytes):
                count += 1
                report.keys.append(key)
                if key in seen:
                    report.problems.append(f"{path.name}: key {key!r} also appears in an earlier shard")
                seen.add(key)
                try:
                    sample = decode_sample({"__key__": key, **fields})
                except ShardFormatError as err:
                    report.problems.append(f"{path.name}: {err}")
                    continue
                report.problems += [f"{path.name}: {p}" for p in _check_record(key, sample["json"], manifest)]
                report.problems += [f"{path.name}: {p}" for p in _check_labels(key, sample, card)]
    except (tarfile.TarError, EOFError, OSError, ShardFormatError) as err:
        report.problems.append(f"{path.name}: unreadable after {count} samples: {type(err).__name__}: {err}")
    report.num_samples += count
    if count != entry.get("samples"):
        report.problems.append(f"{path.name}: {count} samples, manifest says {entry.get('samples')}")


def verify_shard_set(
    directory: str | os.PathLike[str], max_member_bytes: int = MAX_MEMBER_BYTES
) -> VerifyReport:
    """Check every shard of a shard set against its manifest and the schema.

    Problems found (each a line in ``report.problems``): missing or invalid manifest, an unfinished
    writer, leftover temporary files, shards missing from or absent in the manifest, size/sha256/count
    mismatches, truncated or corrupt tars, invalid member names, duplicate keys, samples that do not
    decode, wrong label sizes, class ids outside the dataset card, invalid provenance, members that
    are not regular files or are larger than ``max_member_bytes`` (not read).
    """
    directory = Path(directory)
    report = VerifyReport(directory)
    if not directory.is_dir():
        report.problems.append(f"{directory} is not a folder")
        return report
    try:
        manifest = _load_manifest(directory)
    except ShardSetError as err:
        report.problems.append(str(err))
        return report
    _check_manifest(manifest, report)
    listed = {str(s.get("name")) for s in manifest["shards"]}
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".tmp"):
            report.problems.append(
                f"{path.name}: temporary file of an interrupted writer; rerun it to resume"
            )
        elif path.suffix == ".tar" and path.name not in listed:
            report.problems.append(f"{path.name}: shard not listed in the manifest")
    seen: set[str] = set()
    for entry in manifest["shards"]:
        name = str(entry.get("name")) if isinstance(entry, dict) else repr(entry)
        try:
            check_shard_name(entry.get("name") if isinstance(entry, dict) else None)
        except ShardSetError:
            report.problems.append(f"manifest lists an invalid shard name {name!r}")
            continue
        report.num_shards += 1
        _verify_shard(directory / name, entry, manifest, seen, report, max_member_bytes)
    logger.info("verified %s: %d problems", directory, len(report.problems))
    return report


def shard_info(directory: str | os.PathLike[str], num_keys: int = 5) -> dict[str, Any]:
    """Summary of a shard set from its manifest and ``json`` records (images are not decoded).

    Returns:
        ``directory``, ``complete``, ``schema_version``, ``config_hash``, ``num_shards``,
        ``num_samples``, ``num_bytes``, ``dataset`` (the card), counts ``by_split``, ``by_source``,
        ``by_kind`` (real/synthetic), and the first ``num_keys`` keys as ``sample_keys``.

    Raises:
        ShardSetError: no readable manifest, or a shard that cannot be read.
    """
    directory = Path(directory)
    manifest = _load_manifest(directory)
    by_split: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    keys: list[str] = []
    for entry in manifest["shards"]:
        path = directory / check_shard_name(entry.get("name") if isinstance(entry, dict) else None)
        try:
            with tarfile.open(path, mode="r:") as tar:
                for key, fields in iter_tar_samples(tar, fields={"json"}):
                    record = json.loads(fields["json"])
                    by_split[str(record.get("split"))] += 1
                    by_source[str(record.get("source_dataset"))] += 1
                    by_kind["synthetic" if record.get("synthetic") else "real"] += 1
                    if len(keys) < num_keys:
                        keys.append(key)
        except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as err:
            raise ShardSetError(f"cannot read {path} ({err}); run `lumen shards verify {directory}`") from err
    return {
        "directory": str(directory),
        "complete": manifest.get("complete"),
        "schema_version": manifest.get("schema_version"),
        "config_hash": manifest.get("config_hash"),
        "num_shards": len(manifest["shards"]),
        "num_samples": sum(by_kind.values()),
        "num_bytes": sum(int(s.get("bytes", 0)) for s in manifest["shards"]),
        "dataset": manifest.get("dataset"),
        "by_split": dict(sorted(by_split.items())),
        "by_source": dict(sorted(by_source.items())),
        "by_kind": dict(sorted(by_kind.items())),
        "sample_keys": keys,
    }
