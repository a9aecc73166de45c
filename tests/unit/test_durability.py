"""One flush per received instance (service/scp/durability.py): marks, the row flusher, the SCP.

The SCP fsyncs each file made ahead together with a mark (an extended attribute)
that records it, commits its row without a flush and keeps the file's received
name until a batch flush of the spool's directories and SQLite's write-ahead log.
These tests use the real file system of the test machine (ext4) and real SQLite;
the ordering test records calls of the flusher's collaborators.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import text

from service.config import DicomSettings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.dicom import spool
from service.scp import durability, receive
from service.scp.durability import RowFlusher, StoredMark, row_flusher_for, sqlite_wal
from service.scp.handlers import StoreContext
from service.scp.server import start_scp
from tests.unit.dicom_factory import make_ct_dataset

MARK = StoredMark(datetime(2026, 11, 22, 1, 2, 3, 456000, tzinfo=UTC), "CT_SCANNER_01",
                  "RADNODE", "192.168.10.23")


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- the mark ------------------------------------------------------------------------------


def test_a_mark_reads_back_as_written_and_stays_small() -> None:
    value = MARK.encode()
    assert StoredMark.decode(value) == MARK
    # Beside a file's other attributes it fits in an ext4 inode of 256 bytes.
    assert len(value) <= 64
    ipv6 = StoredMark(MARK.received_at, "A" * 16, "B" * 16, "2001:db8::8a2e:370:7334")
    assert StoredMark.decode(ipv6.encode()) == ipv6


@pytest.mark.parametrize("value", [b"", b"2\n1\na\nb\nc", b"1\nnot a time\na\nb\nc",
                                   b"1\n1\na\nb", b"1\n99999999999999999999\na\nb\nc",
                                   b"1\n1\n\xff\nb\nc"])
def test_what_is_no_mark_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        StoredMark.decode(value)


def test_an_ae_title_cannot_add_a_line() -> None:
    odd = StoredMark(MARK.received_at, "CT\nX", "R\u00e9", "::1")
    back = StoredMark.decode(odd.encode())
    assert (back.calling_ae_title, back.called_ae_title) == ("CT?X", "R?")


def test_a_file_takes_a_mark_and_an_inode_fsync(tmp_path: Path) -> None:
    assert spool.marks_supported(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    path = tmp_path / "receiving-1"
    path.write_bytes(b"data")
    assert spool.stored_mark(path) is None
    spool.mark_stored(path, MARK.encode())
    assert spool.stored_mark(path) == MARK.encode()
    target = tmp_path / "study" / "series" / "1.2.3.dcm"
    assert spool.adopt(path, target, attributes=True) == path
    spool.link_into_place(path, target)
    assert os.path.samefile(path, target)
    assert spool.stored_mark(target) == MARK.encode()  # one inode, one mark
    spool.link_into_place(path, target)  # again over itself: still one file
    assert os.path.samefile(path, target)


def test_a_stale_file_at_the_spool_path_is_replaced(tmp_path: Path) -> None:
    received = tmp_path / "receiving-1"
    received.write_bytes(b"new")
    target = tmp_path / "1.2.3.dcm"
    target.write_bytes(b"an earlier file that was never recorded")
    spool.link_into_place(received, target)
    assert target.read_bytes() == b"new"


# -- the flusher ---------------------------------------------------------------------------


def _database(tmp_path: Path) -> tuple[Any, Path]:
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    wal = sqlite_wal(engine)
    assert wal == (tmp_path / "radnode.db-wal").resolve()
    return engine, wal


def _stored_file(root: Path, number: int) -> tuple[Path, Path]:
    incoming = root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    received = incoming / f"receiving-{number}"
    received.write_bytes(b"x" * 100)
    spool.mark_stored(received, MARK.encode())
    target = root / "1.2.3" / "1.2.3.4" / f"1.2.3.4.{number}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    spool.link_into_place(received, target)
    return received, target


def test_a_flush_syncs_directories_then_the_log_then_lets_the_names_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "spool"
    flusher = RowFlusher(tmp_path / "radnode.db-wal", root)
    files = [_stored_file(root, n) for n in range(3)]
    calls: list[tuple[str, object]] = []

    def directories(directory: Path, top: Path | None = None) -> None:
        assert all(received.exists() for received, _ in files)
        calls.append(("directory", directory))

    def log(wal: Path) -> None:
        assert all(received.exists() for received, _ in files)
        calls.append(("log", wal))

    monkeypatch.setattr(spool, "sync_directory_chain", directories)
    monkeypatch.setattr(durability, "flush_wal", log)
    for received, target in files:
        flusher.stored(received, target.parent)
    assert flusher.flush() + flusher.flush() == 3  # the first took all three
    flusher.close()
    # One directory (all in one series), once; the log after it.
    assert calls == [("directory", files[0][1].parent), ("log", tmp_path / "radnode.db-wal")]
    assert not any(received.exists() for received, _ in files)
    assert all(target.read_bytes() == b"x" * 100 for _, target in files)
    assert flusher.flushed == 3


def test_the_thread_flushes_within_its_interval_and_close_flushes_the_rest(
        tmp_path: Path) -> None:
    engine, wal = _database(tmp_path)
    root = tmp_path / "spool"
    flusher = RowFlusher(wal, root, interval_s=0.02)
    first, _ = _stored_file(root, 1)
    flusher.stored(first, root / "1.2.3" / "1.2.3.4")
    _wait_for(lambda: not first.exists())
    assert flusher.flushed == 1
    flusher.interval_s = 60.0  # the next batch waits: close() must not
    second, _ = _stored_file(root, 2)
    flusher.stored(second, root / "1.2.3" / "1.2.3.4")
    time.sleep(0.05)
    assert second.exists()
    started = time.monotonic()
    flusher.close()
    assert time.monotonic() - started < 5
    assert not second.exists() and flusher.flushed == 2
    engine.dispose()


def test_a_failing_flush_keeps_the_names_and_tries_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "spool"
    flusher = RowFlusher(tmp_path / "radnode.db-wal", root)
    received, target = _stored_file(root, 1)
    flusher.stored(received, target.parent)
    failing = [True]

    def log(wal: Path) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durability, "flush_wal", log)
    with caplog.at_level(logging.WARNING, logger="radnode.scp"):
        assert flusher.flush() == 0
        assert flusher.flush() == 0
        assert received.exists()  # recovery would still find it
        failing[0] = False
        assert flusher.flush() == 1
    assert not received.exists()
    assert caplog.text.count("cannot record or flush received instances") == 1  # once, not per try
    assert "works again" in caplog.text
    flusher.close()


def test_a_removed_series_directory_does_not_stop_the_batch(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    flusher = RowFlusher(tmp_path / "radnode.db-wal", root)
    received, target = _stored_file(root, 1)
    flusher.stored(received, target.parent)
    flusher.stored(received, root / "1.2.3" / "gone")  # a purged series
    assert flusher.flush() == 2
    assert not received.exists()


def test_a_log_that_is_not_there_needs_no_flush(tmp_path: Path) -> None:
    wal = tmp_path / "radnode.db-wal"
    durability.flush_wal(wal)  # checkpointed and removed: no error
    wal.write_bytes(b"frames")
    durability.flush_wal(wal)
    with pytest.raises(OSError):  # anything but "not there" is the caller's to handle
        durability.flush_wal(wal / "below-a-file")


def test_where_the_flusher_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    engine, wal = _database(tmp_path)
    root = tmp_path / "spool"
    (root / ".incoming").mkdir(parents=True)
    flusher = row_flusher_for(engine, root, True, 80)
    assert flusher is not None and flusher.wal == wal and flusher.interval_s == 0.08
    assert row_flusher_for(engine, root, False) is None  # storage.batched_row_flush: false
    memory = make_engine("sqlite://")
    assert sqlite_wal(memory) is None and row_flusher_for(memory, root) is None

    def unsupported(path: Path, value: bytes) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(spool, "mark_stored", unsupported)
    with caplog.at_level(logging.WARNING, logger="radnode.scp"):
        assert row_flusher_for(engine, root) is None
    assert "no user extended attributes" in caplog.text
    engine.dispose()
    memory.dispose()


def test_postgresql_commits_flush_on_their_own(tmp_path: Path) -> None:
    engine = make_engine("postgresql://radnode@127.0.0.1:1/radnode")  # never connected
    (tmp_path / ".incoming").mkdir()
    assert sqlite_wal(engine) is None and row_flusher_for(engine, tmp_path) is None


# -- the SCP -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    def __init__(self, port: int, root: Path, context: StoreContext, engine: Any,
                 files: receive.IncomingFiles) -> None:
        self.port, self.root, self.context, self.engine, self.files = (
            port, root, context, engine, files)

    def send(self, count: int, before_release: Callable[[], None] | None = None,
             datasets: list[Any] | None = None) -> list[Any]:
        ae = AE(ae_title="CT_SCANNER_01")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        sent = datasets or [make_ct_dataset(rows=16, columns=16) for _ in range(count)]
        _wait_for(lambda: self.files.ready >= 1)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="RADNODE")
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(ds).Status) for ds in sent]
            if before_release is not None:
                before_release()
        finally:
            assoc.release()
        assert statuses == [0x0000] * len(sent)
        return sent

    def instances(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(text("select count(*) from instances")).scalar_one())

    def received_names(self) -> list[Path]:
        return [p for p in (self.root / ".incoming").glob("receiving-*")
                if spool.stored_mark(p) is not None]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    engine, wal = _database(tmp_path)
    root = (tmp_path / "spool").resolve()
    (root / ".incoming").mkdir(parents=True)
    flusher = RowFlusher(wal, root, interval_s=60.0)  # flushed when the test says
    context = StoreContext(root, make_session_factory(engine), row_flusher=flusher)
    port = _free_port()
    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port,
                                     acse_timeout_s=10, dimse_timeout_s=10,
                                     network_timeout_s=10), context)
    files = receive.install(root / ".incoming")
    try:
        yield Node(port, root, context, engine, files)
    finally:
        server.shutdown()
        receive.uninstall(files)
        context.close()
        engine.dispose()


def test_the_scp_marks_links_and_queues_the_row_without_a_flush(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    flushed_logs: list[Path] = []
    real = durability.flush_wal
    monkeypatch.setattr(durability, "flush_wal",
                        lambda wal: (flushed_logs.append(wal), real(wal))[1])
    seen: dict[str, Any] = {}

    def before_release() -> None:  # every C-STORE answered, the association still open
        files = sorted(node.root.rglob("*.dcm"))
        names = node.received_names()
        seen.update(flushes=list(flushed_logs), rows=node.instances(), names=names,
                    files=files, linked=[any(os.path.samefile(stored, name) for name in names)
                                         for stored in files])

    sent = node.send(3, before_release)
    assert seen["flushes"] == []  # Success came before any flush of the log
    assert seen["rows"] == 0  # the rows wait in the flusher's queue
    assert len(seen["names"]) == 3 and seen["linked"] == [True] * 3  # marked and linked
    for stored in seen["files"]:
        mark = StoredMark.decode(spool.stored_mark(stored) or b"")
        assert (mark.calling_ae_title, mark.called_ae_title, mark.peer_address) == (
            "CT_SCANNER_01", "RADNODE", "127.0.0.1")
        assert abs((datetime.now(UTC) - mark.received_at).total_seconds()) < 60
    # The A-RELEASE-RQ recorded and flushed them before the A-RELEASE-RP.
    assert flushed_logs == [node.context.row_flusher.wal if node.context.row_flusher else None]
    with node.engine.connect() as connection:
        rows = connection.execute(text(
            "select i.path, i.calling_ae_title, s.called_ae_title, s.peer_address, "
            "s.instance_count from instances i join series s on s.id = i.series_id")).all()
        assert connection.execute(text("select sum(instance_count) from series")).scalar() == 3
        # The flusher's engine commits without a flush; the node's engine flushes.
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    writer = node.context.ingest_writer()
    with writer.engine.connect() as connection:
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    assert sorted(path.rsplit("/", 1)[1] for path, *_ in rows) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in sent)
    assert {tuple(row[1:]) for row in rows} == {("CT_SCANNER_01", "RADNODE", "127.0.0.1", 1)}
    assert node.received_names() == []
    assert sorted(node.root / path for path, *_ in rows) == seen["files"]
    assert all((node.root / path).is_file() for path, *_ in rows)


def test_a_release_waits_for_the_batch_the_flusher_is_writing(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    flusher = node.context.row_flusher
    assert flusher is not None
    sql = node.context.ingest_writer().sql
    real = sql.record_instances
    writing = threading.Event()

    def slow(connection: Any, rows: Any) -> list[bool]:
        writing.set()
        time.sleep(0.5)
        return real(connection, rows)

    monkeypatch.setattr(sql, "record_instances", slow)
    background = threading.Thread(target=flusher.flush)

    def flushing_now() -> None:  # the flusher thread has taken the batch, not yet committed
        background.start()
        assert writing.wait(5)
        assert flusher.pending == 0 and node.instances() == 0

    node.send(3, flushing_now)
    assert node.instances() == 3  # the A-RELEASE-RP came after the batch's commit
    background.join(5)


def test_a_duplicate_leaves_no_second_name(node: Node) -> None:
    (ds,) = node.send(1)
    assert node.instances() == 1
    node.send(1, datasets=[ds])  # another association: the row is in the database
    assert node.received_names() == []
    assert len(list(node.root.rglob("*.dcm"))) == 1
    with node.engine.connect() as connection:
        assert connection.execute(text("select duplicates from instances")).scalar() == 1


def test_a_duplicate_of_a_queued_row_is_counted_after_it(node: Node) -> None:
    ds = make_ct_dataset(rows=16, columns=16)
    seen: dict[str, Any] = {}
    node.send(2, lambda: seen.update(rows=node.instances()), datasets=[ds, ds])
    assert seen["rows"] == 0  # both answered while the first row was queued
    assert node.instances() == 1 and node.received_names() == []
    assert len(list(node.root.rglob("*.dcm"))) == 1
    with node.engine.connect() as connection:
        assert connection.execute(text("select duplicates from instances")).scalar() == 1


def test_a_duplicate_in_another_series_loses_its_file_when_its_row_is_refused(
        node: Node) -> None:
    first = make_ct_dataset(rows=16, columns=16)
    second = make_ct_dataset(rows=16, columns=16)
    second.SOPInstanceUID = first.SOPInstanceUID  # the same instance, another series
    seen: dict[str, Any] = {}
    node.send(2, lambda: seen.update(files=len(list(node.root.rglob("*.dcm")))),
              datasets=[first, second])
    assert seen["files"] == 2  # both linked, each under its own series
    assert node.context.row_flusher is not None and node.context.row_flusher.duplicates == 1
    assert node.instances() == 1 and node.received_names() == []
    (kept,) = node.root.rglob("*.dcm")
    assert kept.parent.name == first.SeriesInstanceUID  # the first copy is kept
    with node.engine.connect() as connection:
        assert connection.execute(text("select duplicates from instances")).scalar() == 1


def test_a_file_left_unrecorded_at_the_spool_path_is_replaced(node: Node) -> None:
    ds = make_ct_dataset(rows=16, columns=16)
    left = node.root / spool.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                           ds.SOPInstanceUID)
    left.parent.mkdir(parents=True)
    left.write_bytes(b"never recorded")
    node.send(1, datasets=[ds])
    assert node.instances() == 1
    assert left.read_bytes() != b"never recorded" and len(left.read_bytes()) > 512


def test_a_spool_file_whose_row_is_queued_elsewhere_is_the_first_copy(
        node: Node, tmp_path: Path) -> None:
    """Another SCP process linked its copy and queued its row: two names, no row yet."""
    ds = make_ct_dataset(rows=16, columns=16)
    first = node.root / spool.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                            ds.SOPInstanceUID)
    first.parent.mkdir(parents=True)
    first.write_bytes(b"the first copy")
    os.link(first, tmp_path / "its-received-name")
    node.send(1, datasets=[ds])  # answered Success: a duplicate
    assert first.read_bytes() == b"the first copy"
    assert node.instances() == 0 and node.received_names() == []  # its row is the other's


def test_rows_lost_with_the_process_are_recorded_again_from_the_marks(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.node import recover_incoming

    flusher = node.context.row_flusher
    assert flusher is not None

    def killed() -> None:  # the process dies with its queue (SIGKILL, OOM kill)
        with flusher._wake:
            flusher._pending.clear()

    sent = node.send(3, killed)
    assert node.instances() == 0 and len(node.received_names()) == 3
    assert recover_incoming(node.root, make_session_factory(node.engine)) == 3
    assert node.instances() == 3 and node.received_names() == []
    for ds in sent:
        path = node.root / spool.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                               ds.SOPInstanceUID)
        assert path.is_file()


def test_while_the_flusher_fails_each_row_is_recorded_before_success(node: Node) -> None:
    flusher = node.context.row_flusher
    assert flusher is not None
    flusher._failing = True  # as after a failed batch (a database error)
    seen: dict[str, Any] = {}
    node.send(2, lambda: seen.update(rows=node.instances(), queued=flusher.pending))
    assert seen == {"rows": 2, "queued": 2}  # committed by the C-STORE, names kept for the flush


def test_recovery_keeps_the_first_of_two_copies_in_two_series(node: Node) -> None:
    from service.node import recover_incoming

    flusher = node.context.row_flusher
    assert flusher is not None
    first = make_ct_dataset(rows=16, columns=16)
    second = make_ct_dataset(rows=16, columns=16)
    second.SOPInstanceUID = first.SOPInstanceUID

    def killed() -> None:
        with flusher._wake:
            flusher._pending.clear()

    node.send(2, killed, datasets=[first, second])
    assert len(list(node.root.rglob("*.dcm"))) == 2  # both linked, no row yet
    assert recover_incoming(node.root, make_session_factory(node.engine)) == 1
    (kept,) = node.root.rglob("*.dcm")
    assert kept.parent.name == first.SeriesInstanceUID
    assert node.instances() == 1 and list((node.root / ".incoming").glob("receiving-*")) == []


def test_a_failed_flush_does_not_insert_the_rows_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.db.ingest import IngestWriter

    engine, wal = _database(tmp_path)
    root = (tmp_path / "spool").resolve()
    flusher = RowFlusher(wal, root)
    flusher.attach(IngestWriter(engine))
    received, target = _stored_file(root, 1)
    flusher.defer(received, target, {
        "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
        "sop_instance_uid": "1.2.3.4.1", "sop_class_uid": CTImageStorage,
        "transfer_syntax_uid": ExplicitVRLittleEndian, "modality": "CT",
        "path": "1.2.3/1.2.3.4/1.2.3.4.1.dcm", "size_bytes": 100,
        "calling_ae_title": "CT_SCANNER_01", "called_ae_title": "RADNODE",
        "peer_address": "127.0.0.1", "received_at": MARK.received_at})
    assert flusher.pending == 1
    failing = [True]

    def log(path: Path) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durability, "flush_wal", log)
    assert flusher.flush() == 0  # inserted and committed, not flushed
    assert flusher.pending == 1 and received.exists()  # its name waits for the next try
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from instances")).scalar() == 1
    failing[0] = False
    assert flusher.flush() == 1
    assert flusher.duplicates == 0 and target.is_file() and not received.exists()
    with engine.connect() as connection:
        assert connection.execute(text(
            "select count(*), sum(duplicates) from instances")).one() == (1, 0)
    engine.dispose()


def test_without_extended_attributes_each_row_is_flushed_before_success(
        node: Node, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def unsupported(path: Path, value: bytes) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    flushed: list[Path] = []
    monkeypatch.setattr(spool, "mark_stored", unsupported)
    real = durability.flush_wal
    monkeypatch.setattr(durability, "flush_wal",
                        lambda wal: (flushed.append(wal), real(wal))[1])
    with caplog.at_level(logging.WARNING, logger="radnode.scp"):
        sent = node.send(2)
    assert len(flushed) == 2  # one per instance, before its Success
    assert node.received_names() == []  # renamed, not linked
    assert not any((node.root / ".incoming").glob("receiving-*[!0-9]"))
    assert len(list(node.root.rglob("*.dcm"))) == len(sent)
    assert caplog.text.count("no user extended attributes") == 1
    assert node.context.row_flusher is not None and not node.context.row_flusher.marks
