"""The unit of data that flows through the pipeline, and the description of a dataset."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["KEY_PATTERN", "DatasetInfo", "Sample", "SampleError", "SampleSource", "check_key"]

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (letters, digits, ``_`` and ``-``; no dots), else raise."""
    if not KEY_PATTERN.match(key):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only (no dots)")
    return key


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short machine-readable tag, ``file`` the culprit."""

    def __init__(self, reason: str, detail: str = "", file: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.file = file


@dataclass
class Sample:
    """One image with whatever labels the dataset has.

    Attributes:
        key: unique id within the dataset, letters/digits/``_``/``-`` only (it becomes a WebDataset key).
        image: (H, W, 3) uint8 RGB.
        seg: (H, W) integer class ids (uint8, or uint16 beyond 255 classes), or None.
        depth: (H, W) float32 metric depth (z-depth in the dataset's units); 0 marks invalid pixels.
        normal: (H, W, 3) float32 unit surface normals in the camera frame (x right, y down, z forward,
            pointing towards the camera); all-zero vectors mark invalid pixels.
        caption: a text description (may be empty).
        meta: free-form provenance (source file paths, scene parameters, ...), JSON-serialisable.
    """

    key: str
    image: np.ndarray
    seg: np.ndarray | None = None
    depth: np.ndarray | None = None
    normal: np.ndarray | None = None
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the labels this sample carries, e.g. ``("seg", "depth")``."""
        return tuple(n for n in ("seg", "depth", "normal") if getattr(self, n) is not None)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: its classes, ignore index, and which labels it provides."""

    name: str
    classes: tuple[str, ...] = ()
    ignore_index: int | None = None
    labels: tuple[str, ...] = ()
    depth_units: str = "m"
    normal_frame: str = "camera: x right, y down, z forward; pointing towards the camera"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def card(self) -> dict[str, Any]:
        """Dataset-card fields for manifests and reports."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "ignore_index": self.ignore_index,
            "labels": list(self.labels),
            "depth_units": self.depth_units,
            "normal_frame": self.normal_frame,
        }


@runtime_checkable
class SampleSource(Protocol):
    """A dataset adapter: a lazy, re-iterable collection of samples addressed by key.

    ``keys()`` is cheap (no decoding), ``load(key)`` decodes one sample and raises :class:`SampleError`
    for an unusable one. Work can be split by key into chunks, and a chunk reloaded on a rerun.
    """

    info: DatasetInfo

    def keys(self) -> list[str]: ...

    def load(self, key: str) -> Sample: ...

    def __iter__(self) -> Iterator[Sample]: ...

    def __len__(self) -> int: ...
