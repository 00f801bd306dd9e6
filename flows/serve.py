"""Scheduled dataset-expansion runs: a Prefect deployment of the end-to-end flow.

``lumen serve CONFIG --cron "0 2 * * *"`` serves :func:`scheduled_run_flow` from this process: every
scheduled run calls the ``run`` flow with ``out=None``, so it writes a **new versioned run folder** and
never touches earlier ones; ``runs/<name>-latest`` is moved to a run only once it has succeeded, so it
always names the last good one. The served process needs a Prefect API (``prefect server start``, or
Prefect Cloud) for the schedule to persist; see docs/flows.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

__all__ = ["build_deployment", "scheduled_run_flow", "serve"]


@flow(name="lumen-scheduled-run")
def scheduled_run_flow(config: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One scheduled run: the end-to-end flow into a new versioned run folder."""
    from flows.stages import call_flow

    return dict(call_flow("run", config, overrides, out=None, progress=False))


def build_deployment(config: str, overrides: Sequence[str], cron: str, name: str) -> Any:
    """The deployment (not yet served): absolute config path, overrides, cron schedule."""
    params = {"config": str(Path(config).resolve()), "overrides": list(overrides)}
    return scheduled_run_flow.to_deployment(name=name, cron=cron, parameters=params)


def serve(*deployments: Any) -> None:  # pragma: no cover - blocks until interrupted
    """Serve deployments from this process until it is stopped."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments)
