"""Small file-system helpers: atomic writes, hashing and folder locks. Every file the pipeline writes
goes through here."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "LockError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "sha256_file",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lumen.lock"
"""The lock file of a run folder or shard-set folder (see :class:`FolderLock`)."""
_HELD: dict[Path, tuple[int, int]] = {}  # locks of this process: resolved folder -> (fd, depth)
_HELD_LOCK = threading.Lock()


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file. The temporary
    name starts with ``.`` and ends with ``.tmp`` so readers and globbing ignore it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes atomically (temporary file + rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically (temporary file + rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write pretty, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class LockError(RuntimeError):
    """A folder is in use by another process; the message names it (PID, host, command)."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


class FolderLock:
    """An exclusive lock on a folder (a run folder, a shard set), held by one process at a time.

    The lock is ``fcntl.flock`` on ``<folder>/.lumen.lock``, which also records the holder's PID,
    host and command line for the error message. The kernel drops the lock when its holder exits,
    however it dies, so a lock file left by a killed process is stale by construction: the next
    process takes it over (and logs that it did). Releasing removes the file. Re-entrant within one process. ``flock`` is not
    reliable on some network file systems (see docs/security.md).

    Args:
        folder: the folder to lock (created if missing).
        wait_s: 0 fails at once with :class:`LockError`; N > 0 waits up to N seconds for the holder.
        what: what the folder is, for messages ("run folder", "shard set").
    """

    def __init__(self, folder: str | os.PathLike[str], wait_s: float = 0.0, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.wait_s, self.what = float(wait_s), what
        self._key: Path | None = None

    def acquire(self) -> FolderLock:
        """Take the lock (see the class doc); raises :class:`LockError` when another process holds it."""
        if self._key is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        with _HELD_LOCK:
            return self._acquire(key)

    def _acquire(self, key: Path) -> FolderLock:
        if key in _HELD:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth + 1)
            self._key = key
            return self
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd, key, deadline)
                if _same_file(fd, key / LOCK_NAME):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder released and removed it meanwhile: lock the new file
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            logger.info("%s %s: taking over the stale lock of %s (it is gone)", self.what, key, previous)
        holder = f"PID {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        _HELD[key] = (fd, 1)
        self._key = key
        return self

    def _flock(self, fd: int, key: Path, deadline: float) -> None:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                if time.monotonic() >= deadline:
                    raise LockError(
                        f"{self.what} {key} is in use by {holder}"
                        + (f" (waited {self.wait_s:.0f} s)" if self.wait_s else "")
                        + "; wait for it to finish, or use another folder"
                    ) from None
                if not waited:
                    logger.warning(
                        "%s %s is in use by %s; waiting up to %.0f s", self.what, key, holder, self.wait_s
                    )
                    waited = True
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        """Drop the lock and remove the lock file."""
        key, self._key = self._key, None
        with _HELD_LOCK:
            if key is not None and key in _HELD:
                self._release(key)

    @staticmethod
    def _release(key: Path) -> None:
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
            return
        del _HELD[key]
        try:
            (key / LOCK_NAME).unlink(missing_ok=True)  # a finished folder holds no lock file
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
