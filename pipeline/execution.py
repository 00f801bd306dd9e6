"""How a stage's loop runs its units of work and shows progress, chosen by the caller.

Each stage has one loop (``run_expand``, ``run_evaluate``, ...). A plain call runs its units serially
with a tqdm bar; the Prefect flows pass a ``submit`` hook (one task per unit, on the configured task
runner) and a tracker that also updates a Prefect progress artifact. The library never imports Prefect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from tqdm.auto import tqdm

__all__ = ["Deferred", "Future", "Tracker", "TrackerFactory", "tqdm_tracker"]

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
    """A tqdm bar (nothing shown when not ``enabled``)."""

    def make(total: int, desc: str, unit: str) -> Tracker:
        bar: Tracker = tqdm(total=total, desc=desc, unit=unit, disable=not enabled)
        return bar

    return make
