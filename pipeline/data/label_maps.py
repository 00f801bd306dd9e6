"""A dataset of label maps without images: the source of generate-from-labels (``generate.source: labels``),
and of the edited maps added to a run's real images (``generate.edited_per_map`` with ``source: images``).

The maps are a folder of PNG class-id maps (``generate.label_dir``) or the seg maps of the run's training
data. Each map gives its key as it is (``generate.keep_unedited``) and ``generate.edited_per_map`` edited
copies ``<key>-eNN``, each made by one layout edit drawn from ``generate.edits``
(:mod:`pipeline.data.edits`), seeded by the run seed and the key, so a rerun makes the same maps. The
samples carry the map as ``seg``, a flat grey placeholder image (their image is what is generated), the
source's caption (empty for a folder of maps) and the edits in ``meta["edits"]``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.data.edits import EditMap, apply_random_edit
from pipeline.data.folder import MAX_IMAGE_PIXELS, _load_seg, _sanitise, resize_sample
from pipeline.data.sample import DatasetInfo, Sample, SampleError, SampleSource

__all__ = ["PLACEHOLDER_GREY", "LabelMapSource"]

PLACEHOLDER_GREY = 127
"""The value of every pixel of a label-map sample's placeholder image (it is never written to shards)."""


class LabelMapSource:
    """Label maps (and their edited copies) as samples at a fixed size.

    Args:
        size: (H, W) every map is resized to (nearest neighbour, cover + centre crop) before editing.
        info: the dataset card of the classes the maps use (the run's training data).
        base: the run's training data (its seg maps are the maps when ``label_dir`` is None).
        label_dir: a folder of PNG class-id maps, or None.
        edits: edit names (see :data:`pipeline.data.edits.EDITS`); one is drawn per edited copy.
        edited_per_map: edited copies per map.
        keep_unedited: also give each map unedited.
        edit_classes: class ids whose objects are edited (None = any small component).
        seed: the run seed.
    """

    def __init__(
        self,
        size: tuple[int, int],
        info: DatasetInfo,
        base: SampleSource | None = None,
        label_dir: str | os.PathLike[str] | None = None,
        edits: list[str] | None = None,
        edited_per_map: int = 0,
        keep_unedited: bool = True,
        edit_classes: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        if label_dir is None and base is None:
            raise ValueError("label maps need label_dir or a base dataset with seg labels")
        if edited_per_map and not edits:
            raise ValueError("edited copies need at least one edit")
        self.size, self.base, self.seed = (int(size[0]), int(size[1])), base, seed
        self.edits, self.edited_per_map, self.edit_classes = list(edits or []), edited_per_map, edit_classes
        self.info = DatasetInfo(
            name=info.name, classes=info.classes, ignore_index=info.ignore_index, labels=("seg",)
        )
        self.files: dict[str, Path] = {}
        if label_dir is not None:
            folder = Path(label_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"generate.label_dir={folder} is not a folder")
            for path in sorted(folder.glob("*.png")):
                self.files.setdefault(_sanitise(path.stem), path)
            if not self.files:
                raise FileNotFoundError(f"generate.label_dir={folder} holds no .png label maps")
            self.origin = f"label_dir:{folder.name}"
            base_keys = list(self.files)
        else:
            if base is None or "seg" not in base.info.labels:
                raise ValueError("generate.source=labels without label_dir needs a dataset with seg labels")
            self.origin = "dataset-seg"
            base_keys = base.keys()
        self.base_keys = base_keys
        self._index: dict[str, tuple[str, int]] = {}
        for key in base_keys:
            if keep_unedited:
                self._index[key] = (key, -1)
            for j in range(edited_per_map):
                self._index[f"{key}-e{j:02d}"] = (key, j)

    def keys(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[Sample]:
        for key in self.keys():
            yield self.load(key)

    def _base_map(self, key: str) -> tuple[np.ndarray, str]:
        """(seg at ``size``, caption) of an unedited map."""
        if key in self.files:
            seg = _load_seg(self.files[key], MAX_IMAGE_PIXELS)
            blank = np.full((*seg.shape, 3), PLACEHOLDER_GREY, np.uint8)
            sample = Sample(key, blank, seg=seg, caption="")
        else:
            if self.base is None:  # checked in __init__
                raise KeyError(key)
            loaded = self.base.load(key)
            if loaded.seg is None:
                raise SampleError("missing_label", f"{key} has no seg map")
            sample = Sample(key, loaded.image, seg=loaded.seg, caption=loaded.caption)
        sample = resize_sample(sample, self.size)
        if sample.seg is None:  # for mypy: resize keeps seg
            raise SampleError("missing_label", f"{key} has no seg map")
        return sample.seg, sample.caption

    def load(self, key: str) -> Sample:
        if key not in self._index:
            raise KeyError(f"{key!r} is not a label-map key")
        base_key, j = self._index[key]
        seg, caption = self._base_map(base_key)
        records = []
        if j >= 0:
            digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng([self.seed, digest])
            op = self.edits[int(rng.integers(len(self.edits)))]

            def donor(r: np.random.Generator) -> tuple[str, EditMap]:
                other = self.base_keys[int(r.integers(len(self.base_keys)))]
                return other, EditMap(self._base_map(other)[0])

            edited, record = apply_random_edit(op, EditMap(seg), rng, donor=donor, classes=self.edit_classes)
            seg, records = edited.seg, [record]
        blank = np.full((*self.size, 3), PLACEHOLDER_GREY, np.uint8)
        meta = {"source_key": base_key, "label_source": self.origin, "edits": records}
        return Sample(key, blank, seg=seg, caption=caption, meta=meta)


class MixedSource:
    """Two sources as one: the keys of ``first`` then those of ``second`` (keys must not clash); ``load``
    asks the source that owns the key. Used to add edited label maps to the real images of a run."""

    def __init__(self, first: SampleSource, second: SampleSource) -> None:
        self.first, self.second, self.info = first, second, first.info
        self._first = set(first.keys())
        clash = self._first.intersection(second.keys())
        if clash:
            raise ValueError(f"the sources share keys, e.g. {sorted(clash)[:3]}")

    def owns_first(self, key: str) -> bool:
        return key in self._first

    def keys(self) -> list[str]:
        return [*self.first.keys(), *self.second.keys()]

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __iter__(self) -> Iterator[Sample]:
        for key in self.keys():
            yield self.load(key)

    def load(self, key: str) -> Sample:
        return self.first.load(key) if key in self._first else self.second.load(key)
