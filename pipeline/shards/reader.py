"""Read shard sets as a ``webdataset`` pipeline of decoded samples.

:func:`read_shards` returns a :class:`ShardPipeline` (a ``webdataset.DataPipeline``, hence a torch
``IterableDataset``) that yields the dicts of :func:`pipeline.shards.schema.decode_sample`. It splits
shards across nodes and DataLoader workers, shuffles shards and samples reproducibly, mixes several
shard sets with weights (real vs synthetic), and skips a corrupt shard or sample with a logged warning.

Example::

    ds = read_shards(["runs/x/shards/real", "runs/x/shards/synthetic"], weights=[0.5, 0.5], shuffle=1000)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from pipeline.data.sample import Sample
from pipeline.shards.schema import (
    MAX_MEMBER_BYTES,
    ShardFormatError,
    decode_sample,
    parse_member_name,
    to_sample,
)
from pipeline.shards.writer import MANIFEST_NAME, ShardSetError, check_shard_name

__all__ = ["ShardPipeline", "Source", "iter_samples", "read_shards", "shard_urls"]

logger = logging.getLogger(__name__)

Source: TypeAlias = str | os.PathLike[str]
"""A shard-set folder, a ``.tar`` file, or a webdataset URL / brace pattern (``a-{000000..000009}.tar``)."""


def shard_urls(source: Source) -> list[str]:
    """The shard URLs of one source, in manifest order.

    A folder with a ``manifest.json`` gives the manifest's shards (with a warning if the writer did not
    finish); a folder without one gives its ``*.tar`` files sorted by name, with a warning. Shards of a
    folder are absolute paths of plain file names inside it: a manifest naming anything else (a path,
    ``..``, a URL scheme such as ``pipe:``) is refused with :class:`ShardSetError` before any shard is
    opened. A source that is not a folder is taken as the caller wrote it (a file, a URL or a brace
    pattern; webdataset runs ``pipe:`` URLs through a shell, so never build one from untrusted text).
    """
    path = Path(source)
    if path.is_file():
        return [str(path.resolve())]
    if not path.is_dir():
        urls = wds.shardlists.expand_urls(str(source))
        if not urls:
            raise FileNotFoundError(f"no shards match {source!r}")
        return list(urls)
    folder = path.resolve()
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        names = _manifest_names(manifest_path)
    else:
        logger.warning("%s has no %s; reading its *.tar files", path, MANIFEST_NAME)
        names = []
        for p in sorted(folder.glob("*.tar")):
            try:
                names.append(check_shard_name(p.name))
            except ShardSetError as err:
                logger.warning("%s: skipping %s", path, err)
    if not names:
        raise FileNotFoundError(f"{path} holds no shards")
    return [str(folder / name) for name in names]


def _manifest_names(manifest_path: Path) -> list[str]:
    """The checked shard names of a manifest (untrusted input: every name must be a plain file name)."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ShardSetError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardSetError(f"{manifest_path} is not a shard-set manifest (no 'shards' list)")
    if not manifest.get("complete", False):
        logger.warning("%s: the writer has not finished (manifest complete=false)", manifest_path.parent)
    names = []
    for entry in manifest["shards"]:
        name = entry.get("name") if isinstance(entry, dict) else entry
        try:
            names.append(check_shard_name(name))
        except ShardSetError as err:
            raise ShardSetError(
                f"{manifest_path}: {err}; refusing to read this set (check it with `lumen shards verify`)"
            ) from None
    return names


def _log_and_continue(exn: Exception) -> bool:
    """webdataset exception handler: log a warning and skip the shard or sample (never sleeps)."""
    logger.warning("skipping corrupt shard data: %s", exn)
    return True


class _TarSamples:
    """Shard URLs -> raw samples ``{"__key__", "__url__", FIELD: bytes}``, streaming each tar once.

    Unlike ``webdataset.tarfile_to_samples`` it never reads a member over ``max_member_bytes`` into
    memory, and it names what it skips: a member that is not a regular file (symlink, folder, device),
    an invalid member name, or an oversized member drops its whole sample with a warning. A shard that
    cannot be opened or is truncated is skipped from that point, with a warning.
    """

    def __init__(self, max_member_bytes: int) -> None:
        self.max_member_bytes = max_member_bytes

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for item in src:
            url = item["url"]
            try:
                with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                    yield from self._samples(tar, url)
            except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                logger.warning("skipping the rest of shard %s: %s: %s", url, type(err).__name__, err)

    def _samples(self, tar: tarfile.TarFile, url: str) -> Iterator[dict[str, Any]]:
        current: dict[str, Any] | None = None
        bad: set[str] = set()
        for member in tar:
            try:
                key, field = parse_member_name(member.name)
            except ShardFormatError as err:
                logger.warning("%s: skipping tar member: %s", url, err)
                continue
            if current is not None and current["__key__"] != key:
                if current["__key__"] not in bad:
                    yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            problem = self._problem(member)
            if problem or field in current:
                bad.add(key)
                logger.warning("%s: skipping sample %s: %s", url, key, problem or f"{field} appears twice")
                continue
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            if len(data) != member.size:
                raise EOFError(f"member {member.name!r} is truncated")
            current[field] = data
        if current is not None and current["__key__"] not in bad:
            yield current

    def _problem(self, member: tarfile.TarInfo) -> str:
        if not member.isreg():
            return f"member {member.name!r} is not a regular file (symlink, link or device)"
        if member.size > self.max_member_bytes:
            return (
                f"member {member.name!r} has {member.size} bytes, over the cap of {self.max_member_bytes} "
                "(read_shards(max_member_bytes=...))"
            )
        return ""


class _EpochState:
    """The epoch, shared by every stage of one pipeline (copied into DataLoader workers with it)."""

    def __init__(self) -> None:
        self.epoch = 0


def _worker_rng(seed: int, state: _EpochState, stream: int) -> np.random.Generator:
    """A generator distinct per (seed, epoch, node, worker, stream) and reproducible."""
    rank, _, worker, _ = pytorch_worker_info()
    return np.random.default_rng([seed, state.epoch, rank, worker, stream])


class _ShardList(IterableDataset):
    """Yields ``{"url": ...}``; shuffled per epoch with the same order on every node and worker (so
    that the node/worker split that follows neither drops nor repeats a shard)."""

    def __init__(self, urls: list[str], shuffle: bool, seed: int, state: _EpochState) -> None:
        self.urls, self.shuffle, self.seed, self.state = urls, shuffle, seed, state

    def __iter__(self) -> Iterator[dict[str, str]]:
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.state.epoch]).permutation(order)
        for i in order:
            yield {"url": self.urls[i]}


class _Shuffle:
    """Buffer shuffle of samples, seeded per (seed, epoch, node, worker)."""

    def __init__(self, bufsize: int, seed: int, state: _EpochState) -> None:
        self.bufsize, self.seed, self.state = bufsize, seed, state

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        rng = _worker_rng(self.seed, self.state, 1)
        buf: list[Any] = []
        for item in src:
            if len(buf) < self.bufsize:
                buf.append(item)
                continue
            i = int(rng.integers(len(buf)))
            yield buf[i]
            buf[i] = item
        for i in rng.permutation(len(buf)):
            yield buf[i]


class _WarnIfEmpty:
    """Warn when a node/worker got no shard at all (more workers x nodes than shards)."""

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        empty = True
        for item in src:
            empty = False
            yield item
        if empty:
            rank, world, worker, workers = pytorch_worker_info()
            logger.warning(
                "node %d/%d worker %d/%d got no shard: use more shards or fewer workers",
                rank,
                world,
                worker,
                workers,
            )


class _Mix(IterableDataset):
    """Draw each sample from source ``i`` with probability ``weights[i]``; stop when one runs out
    (so the ratio holds over the whole epoch)."""

    def __init__(
        self, sources: list[IterableDataset], weights: list[float], seed: int, state: _EpochState
    ) -> None:
        self.sources, self.seed, self.state = sources, seed, state
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))

    def __iter__(self) -> Iterator[Any]:
        rng = _worker_rng(self.seed, self.state, 2)
        iterators = [iter(s) for s in self.sources]
        while True:
            i = int(rng.choice(len(iterators), p=self.probs))
            try:
                yield next(iterators[i])
            except StopIteration:
                return


class ShardPipeline(wds.DataPipeline):
    """A ``webdataset.DataPipeline`` with :meth:`set_epoch` for reproducible per-epoch shuffling."""

    def __init__(self, *stages: Any, state: _EpochState) -> None:
        super().__init__(*stages)
        self.state = state

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``. Call before iterating (DataLoader workers copy the pipeline when an
        epoch's iterator is created, so this does not reach persistent workers)."""
        self.state.epoch = int(epoch)


def _source_stages(
    urls: list[str],
    *,
    shuffle: int,
    seed: int,
    split_by_node: bool,
    split_by_worker: bool,
    resampled: bool,
    max_member_bytes: int,
    state: _EpochState,
) -> list[Any]:
    """The stages from a shard list to decoded samples for one source."""
    stages: list[Any]
    if resampled:  # infinite; ResampledShards draws independently per node and worker
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [_ShardList(urls, shuffle > 0, seed, state)]
        if split_by_node:
            stages.append(wds.split_by_node)
        if split_by_worker:
            stages.append(wds.split_by_worker)
        stages.append(_WarnIfEmpty())
    stages.append(_TarSamples(max_member_bytes))
    if shuffle > 0:
        stages.append(_Shuffle(shuffle, seed, state))
    stages.append(wds.map(decode_sample, handler=_log_and_continue))
    return stages


# 64 lines, 25 of them the docstring of this public API; the code is 36 lines.
def read_shards(
    sources: Source | Sequence[Source],
    weights: Sequence[float] | None = None,
    *,
    shuffle: int = 0,
    seed: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    resampled: bool = False,
    as_sample: bool = False,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> ShardPipeline:
    """A pipeline of decoded samples from one or more shard sets.

    Args:
        sources: a shard-set folder, a ``.tar`` file or a webdataset URL pattern, or a list of them.
        weights: one weight per source to mix them at random in that ratio (e.g. real vs synthetic);
            the epoch ends when any source runs out. None chains all sources' shards into one list.
        shuffle: 0 reads in manifest order; N > 0 shuffles the shard order and samples with an
            N-sample buffer, reproducibly from ``seed`` and the epoch (:meth:`ShardPipeline.set_epoch`).
        seed: seed of every random choice (shard order, buffer, mixing, resampling).
        split_by_node: give each distributed rank a disjoint subset of the shards.
        split_by_worker: give each DataLoader worker a disjoint subset of its node's shards.
        resampled: draw shards with replacement forever (pair with ``.with_epoch(n)``); no splitting.
        as_sample: yield :class:`~pipeline.data.Sample` objects instead of dicts.
        max_member_bytes: a tar member larger than this is not read; its sample is skipped.

    The reader checks shard names, member names, types and sizes, and decodes and checks every sample;
    it does not check the shards' sha256 against the manifest (that needs a second full read): run
    ``lumen shards verify`` on a set from an untrusted source first (see docs/security.md).

    Yields:
        dicts ``{"__key__", "__url__", "image" (H, W, 3) uint8, "json" dict}`` plus whichever of
        ``"seg"`` (H, W) uint8/uint16, ``"depth"`` (H, W) float32, ``"normal"`` (H, W, 3) float32,
        ``"layout"`` (N, h, w) float16/float32 the sample has. Corrupt shards and samples are skipped
        with a warning on this module's logger.
    """
    source_list = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not source_list:
        raise ValueError("read_shards needs at least one source")
    if shuffle < 0:
        raise ValueError(f"shuffle is a buffer size >= 0, got {shuffle}")
    state = _EpochState()
    stages = functools.partial(
        _source_stages,
        shuffle=shuffle,
        seed=seed,
        split_by_node=split_by_node,
        split_by_worker=split_by_worker,
        resampled=resampled,
        max_member_bytes=max_member_bytes,
        state=state,
    )
    tail: list[Callable[..., Any]] = [wds.map(to_sample)] if as_sample else []
    if weights is None:
        urls = [u for s in source_list for u in shard_urls(s)]
        return ShardPipeline(*stages(urls), *tail, state=state)
    weights = [float(w) for w in weights]
    if len(weights) != len(source_list) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"need one non-negative weight per source ({len(source_list)}), summing > 0; got {weights}"
        )
    pipelines: list[IterableDataset] = [wds.DataPipeline(*stages(shard_urls(s))) for s in source_list]
    return ShardPipeline(_Mix(pipelines, weights, seed, state), *tail, state=state)


def iter_samples(source: Source) -> Iterator[Sample]:
    """Every sample of a shard set as a :class:`~pipeline.data.Sample`, in order, in this process."""
    yield from read_shards(source, split_by_node=False, split_by_worker=False, as_sample=True)
