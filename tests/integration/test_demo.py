"""``radnode demo`` as a user runs it: a real process that must end with exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

pytestmark = pytest.mark.integration


def test_demo_on_the_phantom(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--phantom", "--data-dir", str(data),
         "--quiet-period", "1", "--timeout", "300"],
        capture_output=True, text=True, timeout=400, check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output + (data / "node.log").read_text(errors="replace")
    assert "OK: SEG and SR reached the PACS" in output
    for label in ("body", "lungs", "bone"):
        assert label in output
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality)
                for p in (data / "pacs").glob("*.dcm")}
    assert received == {"SEG", "SR"}
