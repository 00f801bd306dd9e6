"""Stop the ephemeral Prefect server of a process when that process dies, however it dies.

Without ``PREFECT_API_URL`` Prefect starts a local server (``python -m uvicorn ... --factory
prefect.server.api.server:create_app``) as a child process and stops it from an exit hook. A process
killed by SIGKILL runs no hook, and Prefect has no setting that ties the server's life to its parent's,
so the server would live on (with PPID 1, about 225 MB, holding its port). This watchdog runs beside
the process (:func:`flows.common.start_server_watchdog` starts it): it notes the process's server
children while the process lives, and when the process is gone it sends them SIGTERM, then SIGKILL
after a grace period.

Run as ``python -I -S flows/_watchdog.py PARENT_PID``: standard library only, so it starts in
milliseconds and holds a few MB. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

SERVER_MARK = b"prefect.server.api.server:create_app"
POLL_S = 0.25
GRACE_S = 5.0


def _children(pid: int) -> set[int]:
    """Direct children of ``pid`` (every thread's ``children`` file; a full /proc scan without it)."""
    found: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
        except OSError:
            return _children_by_scan(pid)
    return found


def _children_by_scan(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None and stat[1] == pid:
                found.add(int(name))
    return found


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _is_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return SERVER_MARK in f.read()
    except OSError:
        return False


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def _stop(servers: dict[int, int]) -> None:
    """SIGTERM each server still running (same PID and start time), then SIGKILL after GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = {p: s for p, s in servers.items() if _alive(p, s)}
        for pid in live:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + GRACE_S
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = {p: s for p, s in live.items() if _alive(p, s)}
        if not live:
            return


def watch(parent: int) -> None:
    """Record ``parent``'s server children until it dies (this process is re-parented), then stop them."""
    servers: dict[int, int] = {}
    while os.getppid() == parent:
        for pid in _children(parent) - servers.keys():
            stat = _stat(pid)
            if stat is not None and _is_server(pid):
                servers[pid] = stat[2]
        time.sleep(POLL_S)
    _stop(servers)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; we follow it out
    watch(int(sys.argv[1]))
