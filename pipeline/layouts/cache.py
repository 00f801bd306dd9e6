"""On-disk cache of neural layouts: ``<root>/<spec hash>/<sample key>.npy``, float16 (N, H, W).

The folder name is the hash of the full layout spec (backbone, weights, layer, timestep, PCA contents,
N, clipping, size, ...), so a different spec looks in a different folder and never sees a stale layout.
``spec.json`` beside the arrays records the spec in readable form. Writes are atomic (``pipeline.io``).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.sample import check_key
from pipeline.io import atomic_open, atomic_write_json
from pipeline.layouts.project import layout_spec_hash

__all__ = ["LayoutCache"]

log = logging.getLogger(__name__)


class LayoutCache:
    """Float16 layouts on disk, keyed by sample key and layout-spec hash.

    Args:
        root: cache root, e.g. ``runs/<name>/layouts``; one subfolder per spec.
        spec: the layout spec (:meth:`LayoutExtractor.spec`); its ``num_components`` (if any) is checked
            on every read and write.
    """

    def __init__(self, root: str | os.PathLike[str], spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.spec_hash = layout_spec_hash(self.spec)
        self.directory = Path(root) / self.spec_hash
        self.num_components: int | None = spec.get("num_components")

    def path(self, key: str) -> Path:
        """Where the layout of sample ``key`` lives."""
        return self.directory / f"{check_key(key)}.npy"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def keys(self) -> list[str]:
        """Sample keys with a cached layout."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.npy") if not p.name.startswith("."))

    def _check(self, key: str, layout: np.ndarray) -> None:
        if layout.ndim != 3:
            raise ValueError(f"layout of {key!r} must be (N, H, W), got shape {layout.shape}")
        if self.num_components is not None and layout.shape[0] != self.num_components:
            raise ValueError(
                f"layout of {key!r} has {layout.shape[0]} channels, the spec says {self.num_components}"
            )

    def get(self, key: str) -> np.ndarray | None:
        """The cached (N, H, W) float16 layout of ``key``, or None if absent (or unreadable: then it is
        logged and treated as absent, so it is recomputed and overwritten)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            layout = np.load(path, allow_pickle=False)
            self._check(key, layout)
        except (OSError, ValueError, EOFError) as err:
            log.warning("ignoring unreadable cached layout %s (%s)", path, err)
            return None
        return layout

    def put(self, key: str, layout: np.ndarray | torch.Tensor) -> Path:
        """Store an (N, H, W) layout as float16, atomically; returns the file path."""
        arr = layout.detach().cpu().numpy() if isinstance(layout, torch.Tensor) else np.asarray(layout)
        self._check(key, arr)
        if not (self.directory / "spec.json").is_file():
            atomic_write_json(self.directory / "spec.json", {"hash": self.spec_hash, "spec": self.spec})
        buf = io.BytesIO()
        np.save(buf, arr.astype(np.float16), allow_pickle=False)
        path = self.path(key)
        with atomic_open(path, "wb") as f:
            f.write(buf.getvalue())
        return path
