"""Shared fixtures: where the real DICOM test data lives.

The data folder is ``$RADNODE_TEST_DATA``, by default ``shared/data`` beside the
repository. Without it, tests that need it are skipped locally but fail when
the ``CI`` environment variable is set, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def missing(reason: str) -> None:
    """Skip locally, fail when ``CI`` is set: a CI run never passes by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)")
    pytest.skip(reason)


def dcmtk_tool(name: str) -> str | None:
    """The dcmtk program ``name`` on PATH (``storescp``, ``storescu``...), or None.

    pynetdicom installs apps of the same names into a virtual environment's
    ``bin``; the first candidate whose ``--version`` names dcmtk wins.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=folder) if folder else None
        if not candidate:
            continue
        try:
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True,
                                     timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return candidate
    return None


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        missing(f"{what} not found at {path} (set RADNODE_TEST_DATA to the data folder)")
    return path


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    """The real DICOM data folder (see its README.md)."""
    default = REPO_ROOT.parent / "shared" / "data"
    return _require_dir(Path(os.environ.get("RADNODE_TEST_DATA", default)), "test data folder")


@pytest.fixture(scope="session")
def ct_series_dir(test_data_dir: Path) -> Path:
    """The TCIA pancreas CT series: 134 axial 512x512 slices, 3 mm."""
    return _require_dir(test_data_dir / "ct_abdomen_pancreas_tcia", "pancreas CT series")


# The machine's PostgreSQL and Redis (fixtures ``postgres_url``, ``redis_broker``).
from tests.services import postgres_url, redis_broker  # noqa: E402, F401
