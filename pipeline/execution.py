"""How a stage's loop runs its units of work and shows progress, chosen by the caller.

Each stage has one loop (``run_expand``, ``run_evaluate``, ...). A plain call runs its units serially
with a tqdm bar; the Prefect flows pass a ``submit`` hook (one task per unit, on the configured task
runner) and a tracker that also updates a Prefect progress artifact. The library never imports Prefect.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from tqdm.auto import tqdm

__all__ = ["Deferred", "Future", "LogProgress", "Tracker", "TrackerFactory", "progress_bar", "tqdm_tracker"]

log = logging.getLogger("lumen.progress")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Future(Protocol[T_co]):
    """The result of a submitted unit of work (a Prefect future, a concurrent one, or :class:`Deferred`)."""

    def result(self) -> T_co: ...


class Deferred(Generic[T]):
    """Serial execution: the work runs, once, when its result is first asked for (in the loop's order)."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work: Callable[[], T] | None = work
        self._value: T | None = None

    def result(self) -> T:
        if self._work is not None:
            self._value, self._work = self._work(), None
        return self._value  # type: ignore[return-value]


class Tracker(Protocol):
    """A progress display: ``update(n)`` units done, ``close()`` at the end."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


TrackerFactory = Callable[[int, str, str], Tracker]
"""Makes a :class:`Tracker` from (total, description, unit)."""


def tqdm_tracker(enabled: bool = True) -> TrackerFactory:
    """A progress bar (:func:`progress_bar`; nothing shown when not ``enabled``)."""

    def make(total: int, desc: str, unit: str) -> Tracker:
        return progress_bar(total=total, desc=desc, unit=unit, enabled=enabled)

    return make


LOG_EVERY_S = 30.0
"""Without a terminal, a progress line is logged at least every 10% or every this many seconds."""


class LogProgress(Generic[T]):
    """A progress display for logs: one line per 10% of the total, or per ``LOG_EVERY_S`` seconds when
    progress is slow, plus one at the end (tqdm's interface as the pipeline uses it: iteration,
    ``update``, ``set_postfix``, ``close``)."""

    def __init__(
        self, iterable: Iterable[T] | None, total: int | None, desc: str, unit: str, initial: int = 0
    ) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self._start_n = total, initial, initial
        self._t0 = self._last_t = time.monotonic()
        self._last_decile, self._last_n = self._decile(), initial
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("LogProgress was made without an iterable")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def _decile(self) -> int:
        return 10 * self.n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._decile() > self._last_decile or now - self._last_t >= LOG_EVERY_S:
            self._emit(now)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Shown on the next line (never triggers one)."""
        items = dict(*args, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def _emit(self, now: float) -> None:
        self._last_t, self._last_decile, self._last_n = now, self._decile(), self.n
        rate = (self.n - self._start_n) / max(now - self._t0, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f"{100 * self.n / self.total:3.0f}% " if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", eta {_duration((self.total - self.n) / rate)}"
        post = f", {self._postfix}" if self._postfix else ""
        log.info("%s: %s%s %s, %.3g %s/s%s%s", self.desc, pct, done, self.unit, rate, self.unit, eta, post)

    def close(self) -> None:
        """Log the final count, unless the last line already showed it."""
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:
                self._emit(time.monotonic())


class _Off(Generic[T]):
    """No display: iteration and the tracker calls do nothing but count."""

    def __init__(self, iterable: Iterable[T] | None, initial: int = 0) -> None:
        self.iterable, self.n = iterable, initial

    def __iter__(self) -> Iterator[T]:
        yield from self.iterable or ()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
) -> Any:
    """The pipeline's one progress display: a live tqdm bar on a terminal; when stderr is not a
    terminal (a log file, a pipe, a scheduler), :class:`LogProgress` lines through the ``lumen.progress``
    logger at a bounded rate (every 10%, or every ``LOG_EVERY_S`` seconds of slow progress).

    Use it as tqdm: iterate over it, or ``update(n)`` / ``set_postfix(...)`` / ``close()``.
    """
    if not enabled:
        return _Off(iterable, initial)
    if _is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return LogProgress(iterable, total, desc, unit, initial)
