"""Atomic, resumable, reproducible shard-set writer built on ``webdataset.TarWriter``.

A shard set is a folder of ``{prefix}-{NNNNNN}.tar`` files plus ``manifest.json``. Each shard is
written under a temporary name (``.{prefix}-NNNNNN.tar.*.tmp``, via :func:`pipeline.io.atomic_open`)
and renamed when complete, and the manifest is rewritten after every finished shard. A writer
restarted after a crash therefore finds only finished shards and, maybe, a temporary file: it keeps
the former, deletes the latter and exposes the keys already written as :attr:`ShardSetWriter.done_keys`
so the caller skips them. Writing the remaining samples in the same order as the first run gives
byte-identical shards, because every tar header has a fixed ``mtime``, owner and mode and the fields
are encoded deterministically.

Example::

    with ShardSetWriter("runs/x/shards/real", dataset_card=ds.info.card(), config_hash=h) as writer:
        for key in ds.keys():
            if key not in writer.done_keys:
                writer.write(ds.load(key), {"source_dataset": "toyscenes", "source_key": key})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
from webdataset import TarWriter

import pipeline
from pipeline.config import ShardConfig
from pipeline.data.sample import KEY_PATTERN, Sample, check_key
from pipeline.io import FolderLock, atomic_open, atomic_write_json, sha256_file
from pipeline.shards.schema import (
    IMAGE_FIELDS,
    SCHEMA_VERSION,
    FloatDtype,
    ImageFormat,
    Provenance,
    ShardFormatError,
    encode_sample,
    iter_tar_samples,
)

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "ShardEntry",
    "ShardSetError",
    "ShardSetWriter",
    "check_shard_name",
    "shard_name",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lumen-shards"
TAR_MTIME = 0
"""Fixed ``mtime`` of every tar member, so the same input gives byte-identical shards."""
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK
_CARD_REQUIRED = ("classes", "ignore_index", "depth_units")


class ShardSetError(RuntimeError):
    """A shard set on disk that the writer cannot safely continue; the message says what to do."""


@dataclass(frozen=True)
class ShardEntry:
    """One finished shard as recorded in the manifest."""

    name: str
    samples: int
    bytes: int
    sha256: str


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index``: ``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


_SHARD_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar$")


def check_shard_name(name: object) -> str:
    """Return ``name`` if it is a plain shard file name, else raise :class:`ShardSetError`.

    A manifest is untrusted input: a name with a path (``../other/x.tar``), a URL scheme
    (``pipe:cmd``, which webdataset would run through a shell) or any character other than letters,
    digits, ``_``, ``-`` and ``.`` is refused before anything opens it.
    """
    if not isinstance(name, str) or not _SHARD_FILE.match(name) or ".." in name:
        raise ShardSetError(
            f"invalid shard name {name!r}: a shard is a plain file name inside the set's folder "
            "(letters, digits, '_', '-', '.', ending in .tar; no path, no URL scheme)"
        )
    return name


def _tar_size(key: str, fields: Mapping[str, bytes]) -> int:
    """Bytes a sample adds to a tar: a header block per member (plus PAX blocks for long names) and
    the data rounded up to whole blocks."""
    total = 0
    for field, data in fields.items():
        name_blocks = 3 if len(key) + 1 + len(field) > 100 else 1
        total += name_blocks * _TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
    return total


def _read_keys(path: Path) -> list[str]:
    """Keys of a finished shard, in order, from the member headers only (data is skipped by seeking)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [key for key, _ in iter_tar_samples(tar, fields=())]
    except (tarfile.TarError, EOFError, OSError, ShardFormatError) as err:
        raise ShardSetError(
            f"{path} is not a readable shard ({err}); run `lumen shards verify` on the folder"
        ) from err


class _HashingWriter:
    """A binary file wrapper that hashes (sha256) what is written, so a shard is never read back."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._f, self._sha = fileobj, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class ShardSetWriter:
    """Write samples into a shard set; use as a context manager.

    Args:
        out_dir: the shard-set folder (created if missing). An existing set is resumed.
        max_samples: samples per shard at most.
        max_bytes: tar bytes per shard at most (a single larger sample gets a shard of its own; the
            file may exceed the limit by the tar end-of-archive padding, under 10 KiB).
        image_format: ``png``, ``jpg`` or ``webp`` for ``image.*``.
        dataset_card: dataset-card fields for the manifest: at least ``classes``, ``ignore_index``
            and ``depth_units`` (:meth:`pipeline.data.DatasetInfo.card` gives them).
        config_hash: hash of the config that produced the samples (recorded in every ``json``).
        prefix: shard file-name prefix (letters, digits, ``_``, ``-``).
        image_quality: jpg/webp quality (webp at 100 is lossless).
        png_compress_level: zlib level 0-9 of ``image.png`` and ``seg.png`` (all levels are lossless).
        depth_dtype, normal_dtype: storage dtype of ``depth.npy`` and ``normal.npy``.
        lock_wait_s: how long to wait for another process writing this folder (0: raise at once).

    Attributes:
        done_keys: keys already in the set (from finished shards of an earlier run, and written since).

    Raises:
        ShardSetError: the folder holds a shard set written with other settings, or shards that
            disagree with its manifest.
        LockError: another process is writing this folder (its PID is in the message); the lock is
            ``<out_dir>/.lumen.lock``, held until :meth:`close` or :meth:`abort`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_samples: int = 256,
        max_bytes: int = 256 * 1024 * 1024,
        image_format: ImageFormat = "png",
        dataset_card: Mapping[str, Any],
        config_hash: str,
        prefix: str = "shard",
        image_quality: int = 95,
        png_compress_level: int = 3,
        depth_dtype: FloatDtype = "float32",
        normal_dtype: FloatDtype = "float32",
        lock_wait_s: float = 0.0,
    ) -> None:
        # 1. Validate the settings.
        if max_samples < 1 or max_bytes < 1024:
            raise ValueError(f"need max_samples >= 1 and max_bytes >= 1024, got {max_samples}, {max_bytes}")
        if image_format not in IMAGE_FIELDS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FIELDS)}, got {image_format!r}")
        if not KEY_PATTERN.match(prefix):
            raise ValueError(f"invalid shard prefix {prefix!r}: use letters, digits, '_' and '-' only")
        missing = [k for k in _CARD_REQUIRED if k not in dataset_card]
        if missing:
            raise ValueError(
                f"dataset_card lacks {', '.join(missing)}; pass DatasetInfo.card() or a dict with them"
            )
        self.out_dir = Path(out_dir)
        self.max_samples, self.max_bytes = int(max_samples), int(max_bytes)
        self.image_format: ImageFormat = image_format
        self.image_quality = int(image_quality)
        if not 0 <= png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be 0-9, got {png_compress_level}")
        self.png_compress_level = int(png_compress_level)
        self.depth_dtype: FloatDtype = depth_dtype
        self.normal_dtype: FloatDtype = normal_dtype
        self.prefix = prefix
        self.config_hash = config_hash
        self.dataset_card = json.loads(json.dumps(dict(dataset_card), default=str))  # plain JSON types
        # 2. State: finished shards, keys, the shard being written.
        self.shards: list[ShardEntry] = []
        self.done_keys: set[str] = set()
        self._stack: ExitStack | None = None
        self._tar: TarWriter | None = None
        self._hasher: _HashingWriter | None = None
        self._open_keys: list[str] = []
        self._count = 0
        self._size = 0
        self._closed = False
        # 3. Lock the folder (one writer at a time), resume whatever an earlier run left, record the settings.
        self._lock = FolderLock(self.out_dir, wait_s=lock_wait_s, what="shard set").acquire()
        try:
            self._recover()
            self._write_manifest(complete=False)
        except BaseException:
            self._lock.release()
            raise

    @classmethod
    def from_config(
        cls,
        out_dir: str | os.PathLike[str],
        cfg: ShardConfig,
        *,
        dataset_card: Mapping[str, Any],
        config_hash: str,
        prefix: str = "shard",
        lock_wait_s: float = 0.0,
    ) -> ShardSetWriter:
        """A writer with the settings of a :class:`~pipeline.config.ShardConfig`."""
        return cls(
            out_dir,
            max_samples=cfg.max_samples,
            max_bytes=cfg.max_bytes,
            image_format=cfg.image_format,
            image_quality=cfg.image_quality,
            png_compress_level=cfg.png_compress_level,
            depth_dtype=cfg.depth_dtype,
            normal_dtype=cfg.normal_dtype,
            dataset_card=dataset_card,
            config_hash=config_hash,
            prefix=prefix,
            lock_wait_s=lock_wait_s,
        )

    # ----------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        """The writer settings recorded in the manifest; a resumed set must match them."""
        return {
            "max_samples": self.max_samples,
            "max_bytes": self.max_bytes,
            "image_format": self.image_format,
            "image_quality": self.image_quality,
            "png_compress_level": self.png_compress_level,
            "depth_dtype": self.depth_dtype,
            "normal_dtype": self.normal_dtype,
        }

    @property
    def num_samples(self) -> int:
        """Samples in the set so far (finished shards and the open one)."""
        return len(self.done_keys)

    def encode(
        self, sample: Sample, provenance: Provenance | Mapping[str, Any], *, layout: np.ndarray | None = None
    ) -> dict[str, bytes]:
        """The tar fields of one sample with this writer's settings (thread-safe, no I/O)."""
        return encode_sample(
            sample,
            provenance,
            config_hash=self.config_hash,
            image_format=self.image_format,
            image_quality=self.image_quality,
            png_compress_level=self.png_compress_level,
            depth_dtype=self.depth_dtype,
            normal_dtype=self.normal_dtype,
            layout=layout,
        )

    def write(
        self, sample: Sample, provenance: Provenance | Mapping[str, Any], *, layout: np.ndarray | None = None
    ) -> None:
        """Append one sample (see :func:`pipeline.shards.schema.encode_sample` for the fields).

        Raises:
            ValueError: the key was already written (skip keys in :attr:`done_keys`).
            ShardFormatError: the sample or provenance does not fit the schema.
        """
        self._check_open(sample.key)
        self.write_encoded(sample.key, self.encode(sample, provenance, layout=layout))

    def write_many(
        self,
        items: Iterable[tuple[Sample, Provenance | Mapping[str, Any]]],
        *,
        workers: int = 2,
    ) -> int:
        """Append ``(sample, provenance)`` pairs in order, encoding up to ``workers`` samples at once.

        PNG and JPEG encoders release the GIL, so threads overlap the encoding; the tar is still
        written in input order, so the shards are byte-identical to a loop of :meth:`write`.
        Returns the number of samples written.
        """
        n, pending = 0, deque[tuple[str, Future[dict[str, bytes]]]]()
        workers = max(1, workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-encode") as pool:
            for sample, provenance in items:
                self._check_open(sample.key)
                pending.append((sample.key, pool.submit(self.encode, sample, provenance)))
                if len(pending) >= 2 * workers:  # bounded look-ahead: memory stays flat
                    key, future = pending.popleft()
                    self.write_encoded(key, future.result())
                    n += 1
            while pending:
                key, future = pending.popleft()
                self.write_encoded(key, future.result())
                n += 1
        return n

    def write_encoded(self, key: str, fields: Mapping[str, bytes]) -> None:
        """Append one already encoded sample (:meth:`encode` output) under ``key``."""
        self._check_open(key)
        if not fields or not all(isinstance(v, bytes) for v in fields.values()):
            raise ShardFormatError(f"{key}: fields must be a non-empty mapping of field name to bytes")
        size = _tar_size(key, fields)
        if self._tar is not None and self._size + size + _TAR_END > self.max_bytes:
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        if self._tar is None:  # pragma: no cover - _open_shard sets it; keeps mypy informed
            raise RuntimeError("no open shard")
        self._tar.write({"__key__": key, **fields})
        self.done_keys.add(key)
        self._open_keys.append(key)
        self._count += 1
        self._size += size
        if self._count >= self.max_samples or self._size + _TAR_END >= self.max_bytes:
            self._finish_shard()

    def _check_open(self, key: str) -> None:
        if self._closed:
            raise RuntimeError("this ShardSetWriter is closed")
        key = check_key(key)
        if key in self.done_keys:
            raise ValueError(f"key {key!r} is already in {self.out_dir}; skip keys in writer.done_keys")

    def close(self) -> Path:
        """Finish the open shard and write the final manifest (``complete: true``). Returns its path."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            self._write_manifest(complete=True)
            self._closed = True
            self._lock.release()
            logger.info(
                "shard set %s: %d shards, %d samples", self.out_dir, len(self.shards), self.num_samples
            )
        return self.out_dir / MANIFEST_NAME

    def abort(self) -> None:
        """Discard the open (partial) shard, as a crash would; finished shards and the manifest stay."""
        if self._stack is not None:
            if self._tar is not None:
                with suppress(OSError, ValueError, tarfile.TarError):
                    self._tar.close()  # flush tarfile's buffer now, not at garbage collection
            err = ShardSetError("aborted")
            self._stack.__exit__(type(err), err, None)  # atomic_open deletes its temporary file
            logger.warning("discarded partial shard %s (%d samples)", self._current_name, self._count)
            self.done_keys.difference_update(self._open_keys)
        self._stack, self._tar, self._hasher = None, None, None
        self._closed = True
        self._lock.release()

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ----------------------------------------------------------------------------------------------
    # Shards
    # ----------------------------------------------------------------------------------------------

    @property
    def _current_name(self) -> str:
        return shard_name(self.prefix, len(self.shards))

    def _open_shard(self) -> None:
        stack = ExitStack()
        fileobj = _HashingWriter(stack.enter_context(atomic_open(self.out_dir / self._current_name, "wb")))
        self._tar = TarWriter(
            fileobj,  # file-like: write, tell, flush
            user="lumen",
            group="lumen",
            mode=0o444,
            encoder=False,
            mtime=TAR_MTIME,
            format="PAX_FORMAT",
        )
        self._stack, self._hasher = stack, fileobj
        self._count, self._size, self._open_keys = 0, 0, []

    def _finish_shard(self) -> None:
        if self._tar is None or self._stack is None:
            return
        self._tar.close()  # end-of-archive blocks; the file object stays open
        self._stack.close()  # fsync and rename the temporary file to its final name
        path = self.out_dir / self._current_name
        digest = self._hasher.hexdigest() if self._hasher is not None else sha256_file(path)
        entry = ShardEntry(path.name, self._count, path.stat().st_size, digest)
        self.shards.append(entry)
        self._tar, self._stack, self._hasher = None, None, None
        self._write_manifest(complete=False)
        logger.info("finished shard %s: %d samples, %d bytes", entry.name, entry.samples, entry.bytes)

    def _write_manifest(self, *, complete: bool) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "package_version": pipeline.__version__,
            "complete": complete,
            "prefix": self.prefix,
            "config_hash": self.config_hash,
            "writer": self.settings,
            "dataset": self.dataset_card,
            "num_shards": len(self.shards),
            "num_samples": sum(s.samples for s in self.shards),
            "num_bytes": sum(s.bytes for s in self.shards),
            "shards": [asdict(s) for s in self.shards],
        }
        atomic_write_json(self.out_dir / MANIFEST_NAME, manifest)

    # ----------------------------------------------------------------------------------------------
    # Resume
    # ----------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Delete temporary files, check the manifest against the settings, adopt finished shards."""
        # 1. Partial shards and manifests of a crashed writer.
        for tmp in sorted(self.out_dir.glob(f".{self.prefix}-*.tmp")) + sorted(
            self.out_dir.glob(f".{MANIFEST_NAME}.*.tmp")
        ):
            logger.warning("deleting %s left by an interrupted writer", tmp)
            tmp.unlink()
        # 2. The manifest's shards must be on disk, unchanged in size, written with the same settings.
        entries = self._manifest_entries()
        for entry in entries:
            path = self.out_dir / entry.name
            if not path.is_file() or path.stat().st_size != entry.bytes:
                raise ShardSetError(
                    f"{path} is missing or its size differs from {MANIFEST_NAME}; run `lumen shards verify "
                    f"{self.out_dir}` and delete the folder to rewrite it"
                )
        # 3. Finished shards the manifest does not list yet (a crash between rename and manifest update).
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d{{6}})\.tar$")
        on_disk = sorted(p.name for p in self.out_dir.iterdir() if pattern.match(p.name))
        keys_of = {e.name: _read_keys(self.out_dir / e.name) for e in entries}
        for name in on_disk:
            if name in keys_of:
                continue
            if name != shard_name(self.prefix, len(entries)):
                raise ShardSetError(
                    f"{self.out_dir / name} is not the next shard after {len(entries)} finished ones"
                )
            path = self.out_dir / name
            keys_of[name] = _read_keys(path)
            entries.append(ShardEntry(name, len(keys_of[name]), path.stat().st_size, sha256_file(path)))
            logger.warning("adopted finished shard %s missing from %s", name, MANIFEST_NAME)
        # 4. Keys already written: from the member names of every finished shard.
        for entry in entries:
            keys = keys_of[entry.name]
            if len(keys) != entry.samples:
                raise ShardSetError(
                    f"{entry.name} holds {len(keys)} samples, {MANIFEST_NAME} says {entry.samples}"
                )
            duplicates = self.done_keys.intersection(keys)
            if duplicates:
                raise ShardSetError(f"{entry.name} repeats keys of earlier shards: {sorted(duplicates)[:5]}")
            self.done_keys.update(keys)
        self.shards = entries
        if entries:
            logger.info(
                "resuming %s: %d finished shards, %d samples", self.out_dir, len(entries), len(self.done_keys)
            )

    def _manifest_entries(self) -> list[ShardEntry]:
        path = self.out_dir / MANIFEST_NAME
        if not path.is_file():
            return []
        try:
            manifest = json.loads(path.read_text())
            entries = [ShardEntry(**s) for s in manifest["shards"]]
            for entry in entries:
                check_shard_name(entry.name)
        except (ValueError, KeyError, TypeError, ShardSetError) as err:
            raise ShardSetError(
                f"{path} is not a valid manifest ({err}); delete it to rebuild it from the shards"
            ) from err
        expected = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "prefix": self.prefix,
            "config_hash": self.config_hash,
            "writer": self.settings,
            "dataset": self.dataset_card,
        }
        diffs = [
            f"{k}: {manifest.get(k)!r} on disk, {v!r} now"
            for k, v in expected.items()
            if manifest.get(k) != v
        ]
        if diffs:
            raise ShardSetError(
                f"{self.out_dir} holds a shard set written with other settings ({'; '.join(diffs)}); "
                "write to a new folder or delete this one"
            )
        return entries
