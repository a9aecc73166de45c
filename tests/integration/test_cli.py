"""The radnode commands a PACS admin types, run as real processes against a real node."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from alembic.script import ScriptDirectory

import migrations
from tests.integration.conftest import Peer, free_port, require_tool, start_node, stop

pytestmark = pytest.mark.integration

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def radnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture
def store_only_node(tmp_path: Path) -> Iterator[Peer]:
    peer = start_node(tmp_path, "--no-worker", quiet_period=60)
    try:
        yield peer
    finally:
        stop(peer.process)


def test_echo(store_only_node: Peer) -> None:
    run = radnode("echo", store_only_node.address)
    assert run.returncode == 0, run.stderr
    assert "status 0x0000" in run.stdout


def test_echo_to_nothing_fails() -> None:
    run = radnode("echo", f"NOBODY@127.0.0.1:{free_port()}", "--timeout", "3")
    assert run.returncode != 0
    assert "no association" in run.stderr


def test_dcmtk_echoscu_against_the_node(store_only_node: Peer) -> None:
    echoscu = require_tool("echoscu")
    run = subprocess.run([echoscu, "-aet", "MODALITY", "-aec", "RADNODE", "127.0.0.1",
                          str(store_only_node.port)], capture_output=True, text=True,
                         timeout=30, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_send_every_transfer_syntax(test_data_dir: Path, store_only_node: Peer) -> None:
    """Every encoding in the shared data is accepted and stored as sent.

    ``radnode send`` offers implicit VR files with explicit VR as an alternative,
    and the node prefers explicit VR (service/scp/server.py), so those arrive
    converted losslessly; every other syntax is stored exactly as sent.
    """
    folder = test_data_dir / "transfer_syntaxes"
    files = sorted(folder.rglob("*.dcm"))
    run = radnode("send", str(folder), "--to", store_only_node.address, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"sent {len(files)} of {len(files)}" in run.stdout

    expected: dict[str, str] = {}  # SOP Instance UID -> syntax of the first copy received
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        syntax = str(meta.TransferSyntaxUID)
        if syntax == IMPLICIT_LE:
            syntax = EXPLICIT_LE
        expected.setdefault(str(meta.MediaStorageSOPInstanceUID), syntax)

    db = sqlite3.connect(store_only_node.folder / "radnode.db")
    rows = db.execute("select sop_instance_uid, transfer_syntax_uid, path from instances")
    stored = {uid: (syntax, path) for uid, syntax, path in rows}
    assert {uid: syntax for uid, (syntax, _) in stored.items()} == expected
    for syntax in (EXPLICIT_LE, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                   "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
                   "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                   "1.2.840.10008.1.2.5"):
        assert syntax in expected.values()
    for uid, (syntax, relative) in stored.items():
        spooled = pydicom.dcmread(store_only_node.folder / "spool" / relative)
        assert spooled.SOPInstanceUID == uid
        assert spooled.file_meta.TransferSyntaxUID == syntax


def test_dcmtk_storescu_implicit_only_is_stored_implicit(
    ct_series_dir: Path, store_only_node: Peer
) -> None:
    """A scanner that proposes implicit VR little endian only (storescu -xi) is served as is."""
    storescu = require_tool("storescu")
    first = sorted(ct_series_dir.glob("*.dcm"))[0]
    run = subprocess.run([storescu, "-xi", "-aet", "SCANNER", "-aec", "RADNODE", "127.0.0.1",
                          str(store_only_node.port), str(first)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    db = sqlite3.connect(store_only_node.folder / "radnode.db")
    assert db.execute("select transfer_syntax_uid from instances").fetchall() == [(IMPLICIT_LE,)]


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    run = radnode("db", "upgrade", "--data-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    db = sqlite3.connect(tmp_path / "radnode.db")
    tables = {name for (name,) in db.execute("select name from sqlite_master where type='table'")}
    assert {"series", "instances", "jobs", "results", "deliveries", "associations",
            "audit_events", "workers", "users", "api_tokens", "web_sessions", "deid_mappings",
            "alembic_version"} <= tables
    head = ScriptDirectory(str(Path(migrations.__file__).parent)).get_current_head()
    assert head is not None and len(head) == 4
    assert db.execute("select version_num from alembic_version").fetchall() == [(head,)]


def test_config_check_names_the_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "radnode.yaml"
    config.write_text("dicom:\n  port: 70000\n  ae_titel: X\n")
    run = radnode("config", "check", "--config", str(config))
    assert run.returncode != 0
    assert "dicom.port" in run.stderr
    assert "dicom.ae_titel" in run.stderr


def test_serve_refuses_a_port_in_use(tmp_path: Path, store_only_node: Peer) -> None:
    run = radnode("serve", "--no-worker", "--host", "127.0.0.1", "--port",
                  str(store_only_node.port), "--data-dir", str(tmp_path / "other"), timeout=60)
    assert run.returncode != 0
    assert "cannot start" in run.stderr
