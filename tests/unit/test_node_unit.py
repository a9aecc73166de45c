"""The node's data directory is private to the service user."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.node import private_data_dir


def test_a_new_data_dir_is_private(tmp_path: Path) -> None:
    data = tmp_path / "a" / "radnode-data"
    assert private_data_dir(data) is True
    assert data.stat().st_mode & 0o777 == 0o700


def test_an_existing_readable_data_dir_keeps_its_mode_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="radnode.node"):
        assert private_data_dir(data) is False
    assert data.stat().st_mode & 0o777 == 0o755
    assert "mode 755" in caplog.text
    caplog.clear()
    data.chmod(0o700)
    with caplog.at_level(logging.WARNING, logger="radnode.node"):
        private_data_dir(data)
    assert caplog.text == ""
