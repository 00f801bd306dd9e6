"""Input validation and quarantine: a bad sample is recorded with a reason and skipped, never lost silently."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sample import KEY_PATTERN, DatasetInfo, Sample, SampleError, SampleSource

__all__ = ["Quarantine", "iter_valid", "scan_dataset", "validate_sample"]

log = logging.getLogger(__name__)

NORMAL_TOLERANCE = 0.02  # |‖n‖ - 1| allowed for valid normals (PNG-quantised normals are within ~0.01)


def validate_sample(sample: Sample, info: DatasetInfo) -> None:
    """Raise :class:`SampleError` if the sample is unusable; return None if it is fine.

    Checks: key pattern; image (H, W, 3) uint8; each label the same size as the image; class ids in
    ``[0, num_classes)`` or equal to the ignore index; depth finite and non-negative (0 = invalid);
    normals finite and of unit length where non-zero.
    """
    file = sample.meta.get("file")
    if not KEY_PATTERN.match(sample.key):
        raise SampleError(
            "bad_key", f"key {sample.key!r} has characters other than letters, digits, _ and -", file
        )
    img = sample.image
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        raise SampleError(
            "bad_image", f"expected (H, W, 3) uint8, got {shape} {getattr(img, 'dtype', None)}", file
        )
    h, w = img.shape[:2]
    if min(h, w) < 8:
        raise SampleError("bad_image", f"image is too small: {(h, w)}", file)
    for label in sample.labels:
        arr = getattr(sample, label)
        if arr.shape[:2] != (h, w):
            raise SampleError(
                f"{label}_size_mismatch", f"{label} is {arr.shape[:2]}, image is {(h, w)}", file
            )
    if sample.seg is not None:
        _check_seg(sample.seg, info, file)
    if sample.depth is not None:
        _check_depth(sample.depth, file)
    if sample.normal is not None:
        _check_normal(sample.normal, file)


def _check_seg(seg: np.ndarray, info: DatasetInfo, file: str | None) -> None:
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise SampleError("seg_bad_format", f"seg must be (H, W) integers, got {seg.shape} {seg.dtype}", file)
    if info.num_classes:
        ids = np.unique(seg)
        bad = ids[
            (ids >= info.num_classes) & (ids != (info.ignore_index if info.ignore_index is not None else -1))
        ]
        bad = np.concatenate([bad, ids[ids < 0]])
        if bad.size:
            raise SampleError(
                "seg_class_out_of_range",
                f"class ids {bad.tolist()[:5]} outside [0, {info.num_classes}) (ignore index {info.ignore_index})",
                file,
            )


def _check_depth(depth: np.ndarray, file: str | None) -> None:
    if depth.ndim != 2:
        raise SampleError("depth_bad_format", f"depth must be (H, W), got {depth.shape}", file)
    if not np.isfinite(depth).all():
        raise SampleError(
            "depth_not_finite", f"{int((~np.isfinite(depth)).sum())} NaN/inf depth values", file
        )
    if (depth < 0).any():
        raise SampleError("depth_negative", f"{int((depth < 0).sum())} negative depth values", file)


def _check_normal(normal: np.ndarray, file: str | None) -> None:
    if normal.ndim != 3 or normal.shape[2] != 3:
        raise SampleError("normal_bad_format", f"normals must be (H, W, 3), got {normal.shape}", file)
    if not np.isfinite(normal).all():
        raise SampleError("normal_not_finite", "NaN/inf normal components", file)
    norm = np.linalg.norm(normal.astype(np.float32), axis=-1)
    valid = norm > 0
    off = np.abs(norm[valid] - 1.0) > NORMAL_TOLERANCE
    if off.any():
        raise SampleError(
            "normal_not_unit", f"{int(off.sum())} normals with |norm - 1| > {NORMAL_TOLERANCE}", file
        )


class Quarantine:
    """Append-only ``quarantine.jsonl``: one JSON line per bad sample (key, file, reason, detail, stage).

    Records are de-duplicated by (key, stage), so a resumed run does not record the same sample twice.
    Each line is written with a single ``write`` + ``fsync``; a torn last line (a crash mid-write) is
    ignored when the file is read back. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._seen: set[tuple[str, str]] = set()
        if self.path is not None and self.path.exists():
            for rec in self.read(self.path):
                self._records.append(rec)
                self._seen.add((rec["key"], rec["stage"]))

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Records of a quarantine file (skipping a torn last line)."""
        out = []
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("ignoring a torn line in %s", path)
        return out

    def add(
        self, key: str, reason: str, detail: str = "", file: str | None = None, stage: str = "load"
    ) -> bool:
        """Record a bad sample; returns False if (key, stage) was already recorded."""
        rec = {
            "key": key,
            "file": file,
            "reason": reason,
            "detail": detail,
            "stage": stage,
            "time": time.time(),
        }
        with self._lock:
            if (key, stage) in self._seen:
                return False
            self._seen.add((key, stage))
            self._records.append(rec)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        log.warning("quarantined %s at %s: %s %s", key, stage, reason, detail)
        return True

    def add_error(self, key: str, err: SampleError, stage: str) -> bool:
        return self.add(key, err.reason, err.detail, err.file, stage)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records so far (key, file, reason, detail, stage, time)."""
        return list(self._records)

    @property
    def keys(self) -> set[str]:
        return {r["key"] for r in self._records}

    def __len__(self) -> int:
        return len(self._records)

    def counts(self) -> dict[str, int]:
        """Number of quarantined samples per reason."""
        return dict(Counter(r["reason"] for r in self._records))


def iter_valid(
    source: SampleSource,
    quarantine: Quarantine,
    keys: Iterable[str] | None = None,
    stage: str = "load",
) -> Iterator[Sample]:
    """Load and validate samples lazily; bad ones go to ``quarantine`` and the stream goes on."""
    for key in source.keys() if keys is None else keys:
        try:
            sample = source.load(key)
            validate_sample(sample, source.info)
        except SampleError as err:
            quarantine.add_error(key, err, stage)
            continue
        yield sample


def scan_dataset(
    source: SampleSource, quarantine: Quarantine, stage: str = "validate", progress: bool = False
) -> dict[str, Any]:
    """Validate every sample (streaming) and return a summary: counts of valid and quarantined samples."""
    from pipeline.execution import progress_bar

    before = len(quarantine)
    valid = 0
    labels: Counter[str] = Counter()
    for sample in progress_bar(
        iter_valid(source, quarantine, stage=stage),
        total=len(source),
        enabled=progress,
        desc=f"validate {source.info.name}",
        unit="img",
    ):
        valid += 1
        labels.update(sample.labels)
    summary: dict[str, Any] = {
        "dataset": source.info.name,
        "samples": len(source),
        "valid": valid,
        "quarantined": len(quarantine) - before,
        "labels": dict(labels),
    }
    split = getattr(source, "split_description", None)
    if split:
        summary["split"] = split
    return summary
