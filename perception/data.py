"""The perception DataModule: real training data, optionally with extra (synthetic) samples, and real validation.

Data comes either from shard sets (folders written by :class:`pipeline.shards.ShardSetWriter`) or from
in-memory lists of :class:`~pipeline.data.Sample`. Shard sets are read with random access: the tar
headers are indexed once (:class:`ShardSamples`) and a sample's members are read and decoded when it is
drawn, so nothing is held in memory and any number of DataLoader workers can share the index.

Training batches (see docs/perception.md):

1. Real samples that carry every label the tasks need are *labelled*; in the low-label setting a
   fraction of them is kept, chosen deterministically by key (:func:`select_labelled`).
2. Synthetic samples are kept when they have the labels and, in the low-label setting, when their
   source image is one of the kept real ones (a variant reuses its source's labels, so other variants
   would leak labels the setting does not have).
3. **Additive** mixing (the default, :class:`AdditiveSampler`): every batch holds ``batch_size`` real
   samples, drawn exactly as in the real-only arm (same order, same augmentation seeds), plus
   ``round(batch_size * extra_ratio)`` extra samples on top. Extra data adds and never displaces.
   **Replace** mixing (:class:`MixedSampler`): ``round(L * synthetic_ratio)`` of an epoch's ``L`` draws
   are synthetic and the rest real, spread evenly, so the mixed arm sees fewer real samples per step.
4. Each draw carries its own augmentation seed, so batches do not depend on the number of workers. The
   extra samples can get a stronger, photometric augmentation on top (the ``real+augment`` arm, whose
   extra samples are the kept real samples themselves).

Validation always uses the real validation data, without augmentation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from perception.transforms import Augment, JointTransform, to_tensors
from pipeline.config import PerceptionConfig
from pipeline.data.sample import DatasetInfo, Sample
from pipeline.shards import ShardFormatError, decode_sample, shard_urls, to_sample
from pipeline.shards.schema import parse_member_name
from pipeline.shards.writer import MANIFEST_NAME

__all__ = [
    "LABELS",
    "MIXING",
    "AdditiveSampler",
    "MixedSampler",
    "PerceptionDataModule",
    "RankSlice",
    "SampleData",
    "ShardSamples",
    "as_samples",
    "catalog",
    "dataset_info_from_shards",
    "pair_variants",
    "select_labelled",
    "source_key",
]

logger = logging.getLogger(__name__)

LABELS: dict[str, str] = {"seg": "seg", "depth": "depth", "normal": "normal"}
"""Task name -> the :class:`Sample` label it is trained on."""

SampleData: TypeAlias = "Sequence[Sample] | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]"
"""A list of samples (or :class:`ShardSamples`), or one or more shard-set folders / ``.tar`` files."""

_DECODE_LOCK = threading.Lock()
"""Serialises shard decoding across threads (the flows' thread runner trains runs concurrently): numpy
reads .npy headers with ``ast.literal_eval``, and concurrent ``ast`` use can fail in CPython 3.11/3.12
with ``SystemError: AST constructor recursion depth mismatch``."""

MIXING = ("additive", "replace")
"""How extra samples join the real ones: on top of a full real batch, or replacing part of it."""

_FIELD_LABEL = {"seg.png": "seg", "depth.npy": "depth", "normal.npy": "normal"}
_VARIANT_SUFFIX = re.compile(r"^(.+)-v\d+$")


# --------------------------------------------------------------------------------------------------
# Shard sets with random access
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """Where one sample's members lie in a shard: ``fields`` maps field -> (offset, size)."""

    path: str
    key: str
    fields: dict[str, tuple[int, int]]
    labels: tuple[str, ...]
    source_key: str
    split: str | None


def _index_tar(path: str) -> list[_Entry]:
    """Index one local tar: member offsets per key, plus the provenance read from each ``json``."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    records: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                raise ShardFormatError(f"{path}: member {member.name!r} is not a regular file")
            key, field = parse_member_name(member.name)
            groups.setdefault(key, {})[field] = (member.offset_data, member.size)
            if field == "json":
                handle = tar.extractfile(member)
                if handle is None:
                    raise ShardFormatError(f"{path}: cannot read {member.name}")
                records[key] = json.loads(handle.read().decode("utf-8"))
    entries = []
    for key, fields in groups.items():
        record = records.get(key)
        if record is None:
            raise ShardFormatError(f"{path}: sample {key} has no json member")
        labels = tuple(_FIELD_LABEL[f] for f in sorted(fields) if f in _FIELD_LABEL)
        source = str(record.get("source_key") or key)
        entries.append(_Entry(path, key, fields, labels, source, record.get("split")))
    return entries


class ShardSamples(Sequence[Sample]):
    """Random access to the samples of one or more local shard sets, decoded on demand.

    Args:
        sources: shard-set folders (their manifest's shards, in order), ``.tar`` files or local brace
            patterns, as accepted by :func:`pipeline.shards.shard_urls`.
        split: keep only the samples whose provenance ``split`` is this (e.g. ``train`` / ``val`` when
            both live in one shard set); None keeps all.

    Attributes:
        keys: sample keys in shard order (unique across the sources).
        labels: the labels each sample has, e.g. ``("seg", "depth")``, read from the member names.
        source_keys: each sample's ``source_key`` from its provenance (its own key for real samples).

    Raises:
        FileNotFoundError: a source has no shards. ValueError: a shard is not a local file.
        ShardFormatError: a member name breaks the schema, a sample lacks its json, or a key repeats.
    """

    def __init__(
        self, sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], split: str | None = None
    ) -> None:
        source_list = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        self._entries: list[_Entry] = []
        for source in source_list:
            for url in shard_urls(source):
                if not Path(url).is_file():
                    raise ValueError(f"ShardSamples reads local shard files; {url!r} is not one")
                self._entries.extend(e for e in _index_tar(url) if split is None or e.split == split)
        self.keys = [e.key for e in self._entries]
        if len(set(self.keys)) != len(self.keys):
            dupes = sorted({k for k in self.keys if self.keys.count(k) > 1})[:5]
            raise ShardFormatError(f"duplicate sample keys across shards: {', '.join(dupes)}")
        self.labels = [e.labels for e in self._entries]
        self.source_keys = [e.source_key for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        entry = self._entries[index]
        raw: dict[str, Any] = {"__key__": entry.key, "__url__": entry.path}
        with open(entry.path, "rb") as f:
            for field, (offset, size) in entry.fields.items():
                if field == "layout.npy":  # not used by perception
                    continue
                f.seek(offset)
                raw[field] = f.read(size)
        with (
            _DECODE_LOCK
        ):  # np.load parses .npy headers with ast, which is not thread-safe in CPython 3.11/3.12
            return to_sample(decode_sample(raw))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def as_samples(data: SampleData) -> Sequence[Sample]:
    """A sequence of samples (a list, :class:`ShardSamples`, ...) as is; shard folders / tars as
    :class:`ShardSamples`.

    Raises:
        TypeError: ``data`` mixes samples and paths, or holds something else.
    """
    if isinstance(data, (str, os.PathLike)):
        return ShardSamples(data)
    if isinstance(data, ShardSamples) or len(data) == 0:
        return data  # type: ignore[return-value]
    if isinstance(data[0], Sample):
        if isinstance(data, (list, tuple)) and not all(isinstance(s, Sample) for s in data):
            raise TypeError("a list of samples must hold Sample objects only")
        return data  # type: ignore[return-value]
    if all(isinstance(p, (str, os.PathLike)) for p in data):
        return ShardSamples(data)  # type: ignore[arg-type]
    raise TypeError(
        f"expected a list of Sample objects or shard-set paths, got a {type(data).__name__} of "
        f"{type(data[0]).__name__}"
    )


def dataset_info_from_shards(source: str | os.PathLike[str]) -> DatasetInfo:
    """The :class:`DatasetInfo` of a shard set, from the dataset card in its ``manifest.json``."""
    path = Path(source) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the DatasetInfo (classes, ignore_index) yourself")
    card = json.loads(path.read_text())["dataset"]
    return DatasetInfo(
        name=str(card.get("name", "")),
        classes=tuple(card.get("classes") or ()),
        ignore_index=card.get("ignore_index"),
        labels=tuple(card.get("labels") or ()),
        depth_units=str(card.get("depth_units", "m")),
    )


def source_key(sample: Sample) -> str:
    """The key of the real image a sample was made from.

    ``meta["source_key"]`` when present; else a key ending in ``-vNN`` (the generator's variant keys,
    :attr:`pipeline.lumen.generate.VariantSpec.out_key`) without that suffix; else the key itself.
    """
    if isinstance(sample.meta.get("source_key"), str):
        return str(sample.meta["source_key"])
    match = _VARIANT_SUFFIX.match(sample.key)
    return match.group(1) if match else sample.key


def catalog(samples: Sequence[Sample]) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """(keys, labels, source keys) of every sample, without decoding shard samples (read from the index)."""
    if isinstance(samples, ShardSamples):
        return samples.keys, samples.labels, samples.source_keys
    if isinstance(samples, _Subset):
        keys, labels, sources = catalog(samples.samples)
        return (
            [keys[i] for i in samples.indices],
            [labels[i] for i in samples.indices],
            [sources[i] for i in samples.indices],
        )
    return [s.key for s in samples], [s.labels for s in samples], [source_key(s) for s in samples]


# --------------------------------------------------------------------------------------------------
# Selection and mixing
# --------------------------------------------------------------------------------------------------


def select_labelled(keys: Sequence[str], fraction: float | None, seed: int = 0) -> list[int]:
    """Indices of the labelled samples kept for a low-label setting, chosen by key.

    Keys are ranked by ``sha256(f"{seed}/{key}")`` and the first ``max(1, round(fraction * n))`` are
    kept. The choice depends only on the keys and the seed, not on their order or on the shards, and a
    smaller fraction's subset is contained in a larger one's. ``fraction`` None or 1 keeps all.

    Returns:
        The kept indices into ``keys``, in ascending order.
    """
    if fraction is None or fraction >= 1:
        return list(range(len(keys)))
    if not 0 < fraction < 1:
        raise ValueError(f"low_label_fraction must be in (0, 1], got {fraction}")
    n = max(1, round(fraction * len(keys)))
    ranks = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}/{keys[i]}".encode()).digest())
    return sorted(ranks[:n])


def _epoch_length(num_real: int, num_synthetic: int, ratio: float, batch_size: int) -> int:
    """Draws per epoch: each real sample about once (all synthetic once when ratio is 1), whole batches."""
    draws = num_synthetic if ratio >= 1 else math.ceil(num_real / (1 - ratio))
    return math.ceil(max(draws, batch_size) / batch_size) * batch_size


class MixedSampler(Sampler[tuple[int, int, int]]):
    """Draws ``(source, index, augmentation seed)`` with a fixed share of synthetic samples.

    ``source`` is 0 for real and 1 for synthetic. An epoch has :func:`_epoch_length` draws (every real
    sample about once, in whole batches); exactly ``round(L * ratio)`` of them are synthetic, at evenly
    spaced positions, so each batch of ``batch_size`` holds the ratio to within one sample. Each source
    is drawn without replacement (a fresh permutation when it runs out). Everything is reproducible from
    ``seed`` and the epoch (:meth:`set_epoch`, which Lightning calls).
    """

    def __init__(
        self, num_real: int, num_synthetic: int, synthetic_ratio: float, batch_size: int, seed: int = 0
    ) -> None:
        if not 0 <= synthetic_ratio <= 1:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
        if synthetic_ratio > 0 and num_synthetic == 0:
            raise ValueError(
                f"synthetic_ratio is {synthetic_ratio} but there are no synthetic samples "
                "(with their labels, and of the selected real images): add synthetic data or set it to 0"
            )
        if synthetic_ratio < 1 and num_real == 0:
            raise ValueError("no labelled real training samples: check the tasks' labels and the data")
        self.num_real, self.num_synthetic = num_real, num_synthetic
        self.ratio, self.batch_size, self.seed = float(synthetic_ratio), batch_size, seed
        self.epoch = 0
        self.length = _epoch_length(num_real, num_synthetic, self.ratio, batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        length = self.length
        num_syn = round(length * self.ratio)
        source = np.zeros(length, dtype=np.int64)
        if num_syn:
            source[np.floor(np.arange(num_syn) * length / num_syn).astype(np.int64)] = 1
        index = np.empty(length, dtype=np.int64)
        for src, count in ((0, self.num_real), (1, self.num_synthetic)):
            need = int((source == src).sum())
            if need:
                reps = math.ceil(need / count)
                index[source == src] = np.concatenate([rng.permutation(count) for _ in range(reps)])[:need]
        seeds = rng.integers(0, 2**31 - 1, size=length)
        yield from zip(source.tolist(), index.tolist(), seeds.tolist(), strict=True)


def _stream(rng: np.random.Generator, count: int, need: int) -> np.ndarray:
    """``need`` indices into ``count`` items: concatenated fresh permutations (without replacement)."""
    reps = math.ceil(need / count) if need else 0
    if not reps:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([rng.permutation(count) for _ in range(reps)])[:need]


class AdditiveSampler(Sampler[tuple[int, int, int]]):
    """Draws ``(source, index, augmentation seed)`` batch by batch: ``batch_size`` real draws, then
    ``extra_per_batch`` extra (source 1) draws on top. Use it with a DataLoader batch size of
    ``batch_size + extra_per_batch``.

    The real draws come from their own random stream, seeded by ``(seed, epoch)`` only: every real
    sample once per epoch (whole batches, a fresh permutation when it runs out), with the same
    augmentation seeds, whatever the extra data. So an arm with extra data sees exactly the real
    samples of the real-only arm (``extra_per_batch = 0``), in the same order, with the same
    augmentation. The extra draws come from a second stream (without replacement, reshuffled when
    exhausted).
    """

    def __init__(
        self, num_real: int, num_extra: int, batch_size: int, extra_per_batch: int = 0, seed: int = 0
    ) -> None:
        if num_real == 0:
            raise ValueError("no labelled real training samples: check the tasks' labels and the data")
        if extra_per_batch < 0:
            raise ValueError(f"extra_per_batch must be >= 0, got {extra_per_batch}")
        if extra_per_batch > 0 and num_extra == 0:
            raise ValueError(
                "extra samples were asked for but there are none (with their labels, and of the "
                "selected real images): add synthetic data or train the real arm"
            )
        self.num_real, self.num_extra = num_real, num_extra
        self.batch_size, self.extra_per_batch, self.seed = batch_size, extra_per_batch, seed
        self.epoch = 0
        self.batches = math.ceil(num_real / batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches * (self.batch_size + self.extra_per_batch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        b, e = self.batch_size, self.extra_per_batch
        real_rng = np.random.default_rng([self.seed, self.epoch, 0])
        real = _stream(real_rng, self.num_real, self.batches * b)
        real_seeds = real_rng.integers(0, 2**31 - 1, size=len(real))
        extra_rng = np.random.default_rng([self.seed, self.epoch, 1])
        extra = _stream(extra_rng, self.num_extra, self.batches * e)
        extra_seeds = extra_rng.integers(0, 2**31 - 1, size=len(extra))
        for k in range(self.batches):
            for i in range(k * b, (k + 1) * b):
                yield 0, int(real[i]), int(real_seeds[i])
            for i in range(k * e, (k + 1) * e):
                yield 1, int(extra[i]), int(extra_seeds[i])


class RankSlice(Sampler[list[tuple[int, int, int]]]):
    """One rank's share of every global batch of ``sampler`` (a batch sampler for data-parallel runs).

    Every rank runs the same seeded ``sampler``, groups its draws into the global batches one process
    would train on (``global_batch`` each, the last partial one dropped), and keeps every
    ``world_size``-th draw from its ``rank`` on. The ranks' shares of a batch are disjoint, the same
    size, and together exactly the global batch; strided rather than contiguous, so that in additive
    mixing every rank holds real and extra samples in the batch's proportion.
    """

    def __init__(
        self, sampler: AdditiveSampler | MixedSampler, global_batch: int, rank: int, world_size: int
    ) -> None:
        self.check(global_batch, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.sampler, self.global_batch, self.rank, self.world_size = sampler, global_batch, rank, world_size

    @staticmethod
    def check(global_batch: int, world_size: int) -> None:
        """Raise ValueError when ``global_batch`` does not divide over ``world_size`` processes."""
        if global_batch % world_size:
            raise ValueError(
                f"the perception batch of {global_batch} (batch_size plus the extra samples) does not "
                f"divide over {world_size} processes; make it a multiple of runner.devices x runner.num_nodes"
            )

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this on the batch sampler; the draws follow the epoch."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        batch: list[tuple[int, int, int]] = []
        for draw in self.sampler:
            batch.append(draw)
            if len(batch) == self.global_batch:
                yield batch[self.rank :: self.world_size]
                batch = []


# --------------------------------------------------------------------------------------------------
# Datasets and the DataModule
# --------------------------------------------------------------------------------------------------


class _Subset(Sequence[Sample]):
    """A view of some samples of a sequence, by index."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int]) -> None:
        self.samples, self.indices = samples, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.samples[self.indices[i]]


class _TrainDataset(Dataset[dict[str, Any]]):
    """Indexed by sampler draws; augments with the draw's seed (each source with its own transform)."""

    def __init__(
        self,
        sources: tuple[Sequence[Sample], Sequence[Sample]],
        transforms: tuple[JointTransform | None, JointTransform | None],
        labels: Sequence[str],
        ignore_index: int | None,
        pad_multiple: int,
    ) -> None:
        self.sources, self.transforms, self.labels = sources, transforms, list(labels)
        self.ignore_index, self.pad_multiple = ignore_index, pad_multiple

    def __getitem__(self, draw: tuple[int, int, int]) -> dict[str, Any]:
        src, index, aug_seed = draw
        sample = self.sources[src][index]
        transform = self.transforms[src]
        if transform is not None:
            transform.set_seed(aug_seed)
            sample = transform(sample)
        out: dict[str, Any] = to_tensors(
            sample, self.labels, ignore_index=self.ignore_index, pad_multiple=self.pad_multiple
        )
        out["synthetic"] = torch.tensor(bool(src))
        out["key"] = sample.key
        return out


class _EvalDataset(Dataset[dict[str, Any]]):
    """Validation samples as tensors, without augmentation."""

    def __init__(
        self, samples: Sequence[Sample], labels: Sequence[str], ignore_index: int | None, pad_multiple: int
    ) -> None:
        self.samples, self.labels = samples, list(labels)
        self.ignore_index, self.pad_multiple = ignore_index, pad_multiple

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        out: dict[str, Any] = to_tensors(
            sample, self.labels, ignore_index=self.ignore_index, pad_multiple=self.pad_multiple
        )
        out["key"] = sample.key
        return out


def _labelled(samples: Sequence[Sample], labels: Sequence[str], what: str) -> tuple[list[int], list[str]]:
    """Indices and source keys of the samples that have every label in ``labels``."""
    keys, sample_labels, sources = catalog(samples)
    keep = [i for i, have in enumerate(sample_labels) if set(labels) <= set(have)]
    if len(keep) < len(keys):
        logger.info(
            "%s: %d of %d samples lack %s and are not used", what, len(keys) - len(keep), len(keys), labels
        )
    return keep, [sources[i] for i in keep]


class PerceptionDataModule(pl.LightningDataModule):
    """Training data (real, optionally with extra samples) and real validation data for perception.

    Args:
        real: labelled real training data: a list of samples, or shard-set folder(s) (:data:`SampleData`).
        val: real validation data (never synthetic, never augmented).
        synthetic: extra training data (synthetic variants, oracle re-renders, or the real data itself
            for the augment arm), or None for the real-only arm. Only samples made from a kept real
            image (by :func:`source_key`) are used.
        tasks: ``seg``, ``depth`` and/or ``normal``; samples lacking one of their labels are not used.
        mixing: ``additive`` (``batch_size`` real + ``round(batch_size * extra_ratio)`` extra samples
            per batch, :class:`AdditiveSampler`) or ``replace`` (``synthetic_ratio`` of every batch of
            ``batch_size`` is extra data, :class:`MixedSampler`).
        extra_ratio: additive mode: extra samples per real sample in each batch.
        synthetic_ratio: replace mode: share of extra samples in every batch, in [0, 1].
        extra_photometric: strength of the strong photometric augmentation applied to the extra samples
            on top of the usual one (:func:`perception.transforms.photometric_transforms`); 0 = none.
        low_label_fraction: keep this fraction of the labelled real samples (by key, see
            :func:`select_labelled`); None keeps all.
        label_seed: seed of the low-label choice.
        seed: seed of the draws and of the augmentation.
        batch_size: real samples per training batch (additive) or the whole batch (replace).
        val_batch_size: validation batch size (None = ``batch_size``).
        num_workers: DataLoader workers.
        ignore_index: the dataset's seg ignore index (mapped to -1 in the tensors), or None.
        pad_multiple: images and labels are padded at the bottom/right to multiples of this (the
            model's stride, 2^encoder_depth); padding is invalid in every label.
        augment: an :class:`Augment` spec (built at the training image size), a ready
            :class:`JointTransform`, or None for no augmentation.

    Attributes (after :meth:`setup`): ``real_train``, ``synthetic_train``, ``val_samples`` (sequences of
    samples), ``train_real_keys`` (the kept real keys).
    """

    def __init__(
        self,
        real: SampleData,
        val: SampleData,
        synthetic: SampleData | None = None,
        *,
        tasks: Sequence[str] = ("seg",),
        mixing: str = "additive",
        extra_ratio: float = 1.0,
        synthetic_ratio: float = 0.0,
        extra_photometric: float = 0.0,
        low_label_fraction: float | None = None,
        label_seed: int = 0,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        ignore_index: int | None = None,
        pad_multiple: int = 32,
        augment: Augment | JointTransform | None = Augment(),
    ) -> None:
        super().__init__()
        unknown = [t for t in tasks if t not in LABELS]
        if unknown or not tasks:
            raise KeyError(f"unknown perception task(s) {unknown or list(tasks)}; valid: {', '.join(LABELS)}")
        if mixing not in MIXING:
            raise ValueError(f"unknown mixing {mixing!r}; valid: {', '.join(MIXING)}")
        if synthetic is None and mixing == "replace" and synthetic_ratio > 0:
            raise ValueError(f"synthetic_ratio is {synthetic_ratio} but no synthetic data was given")
        self.labels = [LABELS[t] for t in tasks]
        self._real, self._val, self._synthetic = real, val, synthetic
        self.mixing, self.extra_ratio = mixing, float(extra_ratio)
        self.synthetic_ratio, self.low_label_fraction = float(synthetic_ratio), low_label_fraction
        self.extra_photometric = float(extra_photometric)
        self.label_seed, self.seed = label_seed, seed
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.ignore_index, self.pad_multiple = num_workers, ignore_index, pad_multiple
        self.augment = augment
        self.real_train: Sequence[Sample] = []
        self.synthetic_train: Sequence[Sample] = []
        self.val_samples: Sequence[Sample] = []
        self.train_real_keys: list[str] = []
        self.transform: JointTransform | None = None
        self.extra_transform: JointTransform | None = None
        self._ready = False

    @classmethod
    def from_config(
        cls,
        config: PerceptionConfig,
        real: SampleData,
        val: SampleData,
        synthetic: SampleData | None = None,
        *,
        tasks: Sequence[str] | None = None,
        synthetic_ratio: float | None = None,
        extra_photometric: float = 0.0,
        low_label_fraction: float | None = None,
        label_seed: int = 0,
        seed: int = 0,
        ignore_index: int | None = None,
    ) -> PerceptionDataModule:
        """Build from a :class:`PerceptionConfig` (mixing, ``extra_ratio`` and, in replace mode,
        ``synthetic_ratio`` from the config unless given; no extra data = the real-only arm;
        ``low_label_fraction`` None = the full setting)."""
        ratio = synthetic_ratio if synthetic_ratio is not None else config.synthetic_ratio
        chosen = tasks or config.tasks
        if not chosen:
            raise ValueError(
                "perception.tasks is null: pass tasks, or resolve the config first "
                "(pipeline.preflight.resolve_config)"
            )
        return cls(
            real,
            val,
            synthetic,
            tasks=list(chosen),
            mixing=config.mixing,
            extra_ratio=config.extra_ratio,
            synthetic_ratio=ratio if synthetic is not None else 0.0,
            extra_photometric=extra_photometric,
            low_label_fraction=low_label_fraction,
            label_seed=label_seed,
            seed=seed,
            batch_size=config.batch_size,
            val_batch_size=config.val_batch_size,
            num_workers=config.num_workers,
            ignore_index=ignore_index,
            pad_multiple=2**config.encoder_depth,
            augment=Augment.from_config(config),
        )

    def setup(self, stage: str | None = None) -> None:
        """Resolve the data, select the labelled real subset and the extra samples of it (once)."""
        if self._ready:
            return
        # 1. Real: labelled samples, then the low-label subset by key.
        real = as_samples(self._real)
        keep, _ = _labelled(real, self.labels, "real training data")
        keys, _, _ = catalog(real)
        chosen = [
            keep[i]
            for i in select_labelled([keys[i] for i in keep], self.low_label_fraction, self.label_seed)
        ]
        self.real_train = _Subset(real, chosen)
        self.train_real_keys = [keys[i] for i in chosen]
        # 2. Extra: labelled, and made from a kept real image (a variant reuses its source's labels, so
        #    variants of other images would leak labels the setting does not have).
        if self._synthetic is not None:
            synthetic = as_samples(self._synthetic)
            skeep, sources = _labelled(synthetic, self.labels, "synthetic training data")
            allowed = set(self.train_real_keys)
            skeep = [i for i, src in zip(skeep, sources, strict=True) if src in allowed]
            self.synthetic_train = _Subset(synthetic, skeep)
        # 3. Validation: real, labelled.
        val = as_samples(self._val)
        vkeep, _ = _labelled(val, self.labels, "validation data")
        if not vkeep:
            raise ValueError(f"no validation sample has the labels {self.labels}")
        self.val_samples = _Subset(val, vkeep)
        # 4. Augmentation.
        self.transform = self._build_transform()
        self.extra_transform = self._build_transform(self.extra_photometric)
        self._ready = True
        logger.info(
            "perception data: %d real + %d extra training samples (%s), %d validation",
            len(self.real_train),
            len(self.synthetic_train),
            f"additive, {self.extra_per_batch} per batch"
            if self.mixing == "additive"
            else f"replace, ratio {self.synthetic_ratio:.2f}",
            len(self.val_samples),
        )

    @property
    def extra_per_batch(self) -> int:
        """Additive mode: extra samples on top of each batch's ``batch_size`` real ones."""
        if self.mixing != "additive" or self._synthetic is None:
            return 0
        return round(self.batch_size * self.extra_ratio)

    @property
    def train_batch_size(self) -> int:
        """Samples per training batch: real plus extra in additive mode, else ``batch_size``."""
        return self.batch_size + self.extra_per_batch

    def _build_transform(self, photometric: float = 0.0) -> JointTransform | None:
        if self.augment is None or isinstance(self.augment, JointTransform):
            return self.augment
        first = self.real_train[0] if len(self.real_train) else self.synthetic_train[0]
        return self.augment.build(first.size, seed=self.seed, photometric=photometric)

    def train_sampler(self) -> AdditiveSampler | MixedSampler:
        """The sampler of :meth:`train_dataloader` (a fresh one)."""
        self.setup()
        if self.mixing == "additive":
            return AdditiveSampler(
                len(self.real_train), len(self.synthetic_train), self.batch_size, self.extra_per_batch,
                self.seed,
            )  # fmt: skip
        return MixedSampler(
            len(self.real_train), len(self.synthetic_train), self.synthetic_ratio, self.batch_size, self.seed
        )

    def train_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader[dict[str, Any]]:
        """The training batches; in a data-parallel job of ``world_size`` processes, rank ``rank``'s
        share of each (:class:`RankSlice`), so the job together trains on the batches of one process."""
        self.setup()
        dataset = _TrainDataset(
            (self.real_train, self.synthetic_train),
            (self.transform, self.extra_transform),
            self.labels,
            self.ignore_index,
            self.pad_multiple,
        )
        common: dict[str, Any] = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "generator": self._loader_generator(),
        }
        if world_size > 1:
            shares = RankSlice(self.train_sampler(), self.train_batch_size, rank, world_size)
            return DataLoader(dataset, batch_sampler=shares, **common)
        return DataLoader(
            dataset, batch_size=self.train_batch_size, sampler=self.train_sampler(), drop_last=True, **common
        )

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        self.setup()
        return self.eval_dataloader(self.val_samples)

    def eval_dataloader(self, samples: SampleData) -> DataLoader[dict[str, Any]]:
        """A loader over other evaluation data (e.g. the test split), like :meth:`val_dataloader`."""
        data = as_samples(samples)
        keep, _ = _labelled(data, self.labels, "evaluation data")
        if not keep:
            raise ValueError(f"no evaluation sample has the labels {self.labels}")
        dataset = _EvalDataset(_Subset(data, keep), self.labels, self.ignore_index, self.pad_multiple)
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
        )

    def _loader_generator(self) -> torch.Generator:
        """A private generator for the loader's worker base seed: without one, every iterator draws it
        from torch's process-wide generator, which runs trained on other threads share."""
        return torch.Generator().manual_seed(self.seed)


def pair_variants(
    real: Sequence[Sample], synthetic: Sequence[Sample], max_sources: int = 4, max_variants: int = 4
) -> list[tuple[Sample, list[Sample]]]:
    """Real samples with their synthetic variants (by :func:`source_key`), for a gallery.

    Returns up to ``max_sources`` ``(source, variants)`` pairs, in the order of ``real``, for sources
    with at least one variant; variants in the order of ``synthetic``.
    """
    _, _, sources = catalog(synthetic)
    by_source: dict[str, list[int]] = {}
    for i, src in enumerate(sources):
        by_source.setdefault(src, []).append(i)
    keys, _, _ = catalog(real)
    pairs: list[tuple[Sample, list[Sample]]] = []
    for i, key in enumerate(keys):
        if key in by_source and len(pairs) < max_sources:
            pairs.append((real[i], [synthetic[j] for j in by_source[key][:max_variants]]))
    return pairs
