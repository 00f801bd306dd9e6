"""Fault injection for resume tests: ``LUMEN_KILL_AT=<point>:<n>`` SIGKILLs the process at a named point.

Stages call :func:`kill_point` at the moments where a crash is the most awkward (a chunk's images
saved but not its record, a chunk half written into an open shard). Without the variable this is a
no-op; it exists so tests can kill a run at exact places instead of guessing with timers.
"""

from __future__ import annotations

import os
import signal

__all__ = ["kill_point"]


def kill_point(name: str, index: int) -> None:
    """SIGKILL this process if ``LUMEN_KILL_AT`` is ``f"{name}:{index}"``."""
    target = os.environ.get("LUMEN_KILL_AT")
    if target and target == f"{name}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
