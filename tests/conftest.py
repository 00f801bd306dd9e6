"""Shared fixtures. Prefect runs offline with an isolated home; tiny data only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lumen-prefect-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("LUMEN_CAMVID", REPO.parent / "shared" / "datasets" / "camvid"))


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The shared CamVid folder; tests that need it are skipped cleanly when it is absent."""
    if not (CAMVID / "train").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (set LUMEN_CAMVID)")
    return CAMVID


@pytest.fixture(scope="module")
def harness():
    """A Prefect test server for the flows of one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
