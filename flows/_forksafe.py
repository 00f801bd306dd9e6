"""Keep forked children (DataLoader workers) of a process that ran a Prefect flow exiting cleanly.

Prefect's background services (API log and event workers) register ``threading`` exit hooks that
drain them through an event loop running in a thread of the parent. A forked child inherits the
hooks but not the thread, so at exit the hook fails (or waits on a loop that does not exist) and
the child ends with exit code 1: PyTorch reports "DataLoader worker exited unexpectedly". The
services belong to the parent, so a child drops the inherited hooks right after the fork.
"""

from __future__ import annotations

import os
import sys
import threading

_installed = False


def drop_inherited_service_hooks() -> int:
    """Remove Prefect service exit hooks inherited by this process; return how many were removed."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    hooks = getattr(threading, "_threading_atexits", None)
    base = getattr(services, "_QueueServiceBase", None)
    if base is None or not isinstance(hooks, list):
        return 0
    keep = [h for h in hooks if not isinstance(getattr(getattr(h, "func", h), "__self__", None), base)]
    removed = len(hooks) - len(keep)
    hooks[:] = keep
    return removed


def install() -> None:
    """Register the after-fork cleanup once per process."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=drop_inherited_service_hooks)
        _installed = True
