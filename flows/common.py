"""What every flow shares: opening the run folder, stage summaries, Prefect artifacts, progress.

Every summary a flow publishes as a Prefect artifact is also written to the run folder
(``summaries/<stage>.md`` and ``.json``), so a run is readable without a Prefect server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, LumenConfig, config_hash, load_config
from pipeline.execution import progress_bar
from pipeline.io import FolderLock, atomic_write_json, atomic_write_text
from pipeline.preflight import Stage
from pipeline.runs import RunPaths

__all__ = [
    "LOCK_WAIT_ENV",
    "Progress",
    "checked_config",
    "open_run",
    "opened_run",
    "publish_summary",
    "publish_table",
    "run_lock",
    "stage_logger",
]

LOCK_WAIT_ENV = "LUMEN_LOCK_WAIT_S"
"""Seconds a flow waits for another process holding its run folder (unset or 0: fail at once)."""

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def stage_logger(name: str) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a flow or task run (shown in the UI), else a plain logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger(name)


def open_run(
    config: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    out: str | None = None,
    stage: Stage = "run",
) -> tuple[LumenConfig, Path]:
    """The config (file + overrides), checked against its data for ``stage`` and resolved
    (:func:`pipeline.preflight.preflight`), and its run folder: new and versioned, or ``out`` resumed."""
    from pipeline.runs import prepare_run_dir

    cfg = checked_config(load_config(config, list(overrides)), stage, out)
    run_dir = prepare_run_dir(cfg, out)
    stage_logger(__name__).info("run folder %s (config hash %s)", run_dir, config_hash(cfg))
    return cfg, run_dir


def checked_config(cfg: LumenConfig, stage: Stage, out: str | os.PathLike[str] | None = None) -> LumenConfig:
    """The preflight of ``stage`` (config against data; raises ``ConfigError``) and the resolved config."""
    from pipeline.preflight import preflight

    return preflight(cfg, stage, Path(out) if out is not None else None).config


@contextmanager
def opened_run(
    config: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    out: str | None = None,
    stage: Stage = "run",
) -> Iterator[tuple[LumenConfig, Path]]:
    """:func:`open_run`, holding the run folder's lock (:class:`~pipeline.io.FolderLock`) until the
    block ends: a second flow on the same folder fails at once naming the holder's PID, or waits up
    to ``$LUMEN_LOCK_WAIT_S`` seconds for it."""
    cfg, run_dir = open_run(config, overrides, out, stage)
    with run_lock(run_dir):
        yield cfg, run_dir


def run_lock(run_dir: str | os.PathLike[str]) -> FolderLock:
    """The lock of a run folder, waiting ``$LUMEN_LOCK_WAIT_S`` seconds (default 0) for its holder."""
    try:
        wait_s = float(os.environ.get(LOCK_WAIT_ENV) or 0)
    except ValueError:
        raise ConfigError(f"{LOCK_WAIT_ENV} must be a number of seconds") from None
    return FolderLock(run_dir, wait_s=wait_s, what="run folder")


_WATCHDOG: subprocess.Popen[bytes] | None = None


def start_server_watchdog() -> bool:
    """Make sure an ephemeral Prefect server started by this process dies with it.

    Prefect stops its ephemeral server from an exit hook, which SIGKILL skips; so when no
    ``PREFECT_API_URL`` is set, this starts ``flows/_watchdog.py`` (once per process, Linux), a tiny
    process that stops this process's server children as soon as this process is gone. Returns
    whether a watchdog runs.
    """
    global _WATCHDOG
    if _WATCHDOG is not None and _WATCHDOG.poll() is None:
        return True
    from prefect.settings import PREFECT_API_URL

    if not sys.platform.startswith("linux") or PREFECT_API_URL.value():
        return False
    script = Path(__file__).with_name("_watchdog.py")
    _WATCHDOG = subprocess.Popen(
        [sys.executable, "-I", "-S", str(script), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the terminal's process group: it outlives us on purpose
    )
    return True


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _artifact_key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:100] or "lumen"


def publish_summary(run_dir: Path, stage: str, markdown: str, data: Mapping[str, Any]) -> None:
    """``summaries/<stage>.md`` + ``.json`` in the run folder, and a Markdown artifact in Prefect."""
    out = RunPaths(run_dir).summaries
    atomic_write_text(out / f"{stage}.md", markdown)
    atomic_write_json(out / f"{stage}.json", dict(data))
    if _in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown, key=_artifact_key(f"lumen-{stage}"), description=f"{run_dir}: {stage}"
        )


def publish_table(run_dir: Path, stage: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact (and ``summaries/<stage>.table.json``)."""
    atomic_write_json(RunPaths(run_dir).summary(stage, ".table.json"), rows)
    if _in_prefect_run() and rows:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(rows, key=_artifact_key(f"lumen-{stage}-table"), description=description)


class Progress:
    """A CLI progress bar that also updates a Prefect progress artifact (at most every 2 s)."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.done, self.desc = max(total, 1), 0, desc
        self.bar = progress_bar(total=total, desc=desc, unit=unit, enabled=enabled)
        self._artifact: Any = None
        self._last = 0.0
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(
                0.0, key=_artifact_key(f"lumen-{desc}"), description=desc
            )

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self._artifact is not None and (now - self._last > 2 or self.done >= self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=100.0 * min(self.done, self.total) / self.total)
            self._last = now

    def close(self) -> None:
        self.bar.close()
