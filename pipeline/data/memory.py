"""An in-memory dataset: a list of samples behind the adapter interface (for resized or generated data)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pipeline.data.sample import DatasetInfo, Sample

__all__ = ["InMemoryDataset"]


class InMemoryDataset:
    """Samples held in memory, addressed by key; ``info`` describes them."""

    def __init__(self, samples: Sequence[Sample], info: DatasetInfo) -> None:
        self._samples = {s.key: s for s in samples}
        if len(self._samples) != len(samples):
            raise ValueError("duplicate sample keys")
        self.info = info

    def __len__(self) -> int:
        return len(self._samples)

    def keys(self) -> list[str]:
        return list(self._samples)

    def load(self, key: str) -> Sample:
        try:
            return self._samples[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in this in-memory dataset") from None

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples.values())
