"""After a power loss: acknowledged instances left under their receiving-* name go back.

The SCP fsyncs a received file's data and commits its row before Success but
leaves the rename into the spool to the file system's journal
(service/scp/handlers.py with files made ahead, service/scp/receive.py);
service/node.py:recover_incoming puts such files back at start. The power
loss is simulated by the state it leaves: the row, and the file under its
receiving-* name.
"""

from __future__ import annotations

import io
import logging
import os
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db import repository
from service.db.models import Series
from service.dicom import spool as dicom_spool
from service.node import recover_incoming
from service.scp.durability import StoredMark
from tests.unit.conftest import T0
from tests.unit.dicom_factory import make_ct_dataset


def _file_bytes(sop_uid: str, rows: int = 16) -> bytes:
    ds = make_ct_dataset(rows=rows, columns=rows)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Spool:
    def __init__(self, root: Path, factory: sessionmaker[Session]) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True)
        self.factory = factory

    def row(self, sop_uid: str, size: int, series_uid: str | None = None) -> str:
        series_uid = series_uid or generate_uid()
        relative = f"1.2.3/{series_uid}/{sop_uid}.dcm"
        with self.factory() as session:
            assert repository.record_instance(
                session=session, study_instance_uid="1.2.3", series_instance_uid=series_uid,
                sop_instance_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", path=relative,
                size_bytes=size, calling_ae_title="CT", received_at=T0)
            session.commit()
        return relative

    def receiving(self, name: str, data: bytes) -> Path:
        path = self.incoming / f"receiving-{name}"
        path.write_bytes(data)
        return path


@pytest.fixture
def spool(tmp_path: Path, session_factory: sessionmaker[Session]) -> Spool:
    return Spool(tmp_path / "spool", session_factory)


def test_an_acknowledged_instance_goes_back_to_its_path(spool: Spool,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    sop_uid = generate_uid()
    data = _file_bytes(sop_uid)
    relative = spool.row(sop_uid, len(data))
    spool.receiving("a1b2c3", data)
    with caplog.at_level(logging.WARNING):
        assert recover_incoming(spool.root, spool.factory) == 1
    assert (spool.root / relative).read_bytes() == data
    assert list(spool.incoming.iterdir()) == []
    assert f"recovered {sop_uid} into the spool" in caplog.text


def test_files_that_were_never_acknowledged_are_deleted(spool: Spool) -> None:
    stored, partial, unknown, purged = (generate_uid() for _ in range(4))
    whole = _file_bytes(stored)
    kept = spool.row(stored, len(whole))
    (spool.root / kept).parent.mkdir(parents=True)
    (spool.root / kept).write_bytes(whole)
    spool.receiving("dup", _file_bytes(stored, rows=8))  # a duplicate copy, cut off

    cut = _file_bytes(partial)
    partial_path = spool.row(partial, len(cut))
    spool.receiving("cut", cut[:-100])  # same UID, but not all of it: never acknowledged

    spool.receiving("norow", _file_bytes(unknown))  # no row: its commit never happened

    data = _file_bytes(purged)
    series_uid = generate_uid()
    purged_path = spool.row(purged, len(data), series_uid)
    with spool.factory() as session:
        series = repository.series_by_uid(series_uid, session=session)
        assert isinstance(series, Series)
        series.state, series.purged_at = "purged", T0
        session.commit()
    spool.receiving("purged", data)  # retention removed it on purpose

    spool.receiving("ready", b"")  # made ahead, never used
    spool.receiving("garbage", b"not DICOM at all" * 20)

    assert recover_incoming(spool.root, spool.factory) == 0
    assert list(spool.incoming.iterdir()) == []
    assert (spool.root / kept).read_bytes() == whole  # the first copy is untouched
    assert not (spool.root / partial_path).exists()
    assert not (spool.root / purged_path).exists()


def test_of_two_candidates_the_earlier_goes_back(spool: Spool) -> None:
    sop_uid = generate_uid()
    first = _file_bytes(sop_uid)
    relative = spool.row(sop_uid, len(first))
    older = spool.receiving("older", first)
    newer = spool.receiving("newer", first[:-2] + b"\xff\xff")  # same size, other bytes
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    assert recover_incoming(spool.root, spool.factory) == 1
    assert (spool.root / relative).read_bytes() == first


def test_no_incoming_folder_is_nothing_to_do(tmp_path: Path,
                                            session_factory: sessionmaker[Session]) -> None:
    assert recover_incoming(tmp_path / "spool", session_factory) == 0


# -- marked files: rows committed without a flush of their own (service/scp/durability.py) --
# A power cut before the batch flush can lose those rows (the write-ahead log's last frames)
# and the spool names (directory entries); the received name, on disk since the file was
# made ahead, and the file's mark, fsynced with its data, survive.

MARK = StoredMark(T0 + timedelta(minutes=5), "CT_SCANNER_01", "RADNODE", "10.0.0.7")


def _marked(spool: Spool, name: str, data: bytes) -> Path:
    path = spool.receiving(name, data)
    dicom_spool.mark_stored(path, MARK.encode())
    return path


def test_a_marked_file_whose_row_was_lost_is_recorded_again(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    ds = make_ct_dataset(rows=16, columns=16)
    ds.ImagesInAcquisition = 40
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    _marked(spool, "lost", data)
    with caplog.at_level(logging.WARNING):
        assert recover_incoming(spool.root, spool.factory) == 1
    relative = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert (spool.root / relative).read_bytes() == data
    assert list(spool.incoming.iterdir()) == []
    with spool.factory() as session:
        row = repository.stored_instance(str(ds.SOPInstanceUID), session=session)
        assert row is not None
        assert (row.path, row.size_bytes, row.sop_class_uid, row.calling_ae_title) == (
            relative, len(data), str(ds.SOPClassUID), "CT_SCANNER_01")
        assert row.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)
        assert row.received_at.replace(tzinfo=UTC) == MARK.received_at
        series = repository.series_by_uid(str(ds.SeriesInstanceUID), session=session)
        assert isinstance(series, Series)
        assert (series.study_instance_uid, series.modality, series.instance_count,
                series.expected_count, series.state) == (
            str(ds.StudyInstanceUID), "CT", 1, 40, "receiving")
        assert (series.called_ae_title, series.peer_address) == ("RADNODE", "10.0.0.7")
    assert f"recorded {ds.SOPInstanceUID} (series {ds.SeriesInstanceUID}) again" in caplog.text
    assert str(ds.PatientName) not in caplog.text and str(ds.PatientID) not in caplog.text
    assert recover_incoming(spool.root, spool.factory) == 0  # nothing left to do


def test_a_lost_row_whose_spool_name_survived_keeps_that_file(spool: Spool) -> None:
    sop_uid = generate_uid()
    data = _file_bytes(sop_uid)
    received = _marked(spool, "linked", data)
    ds = dcmread(received, stop_before_pixels=True)
    target = spool.root / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{sop_uid}.dcm"
    target.parent.mkdir(parents=True)
    os.link(received, target)  # the spool name reached the disk, the row did not
    assert recover_incoming(spool.root, spool.factory) == 1
    assert target.read_bytes() == data and target.stat().st_nlink == 1
    with spool.factory() as session:
        assert repository.stored_instance(sop_uid, session=session) is not None


def test_a_marked_file_whose_row_and_spool_name_were_flushed_loses_its_spare_name(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    """A SIGKILL before the batch flush: everything is there, the received name too."""
    sop_uid = generate_uid()
    data = _file_bytes(sop_uid)
    relative = spool.row(sop_uid, len(data))
    received = _marked(spool, "spare", data)
    (spool.root / relative).parent.mkdir(parents=True)
    os.link(received, spool.root / relative)
    with caplog.at_level(logging.WARNING):
        assert recover_incoming(spool.root, spool.factory) == 0
    assert list(spool.incoming.iterdir()) == []
    assert (spool.root / relative).read_bytes() == data
    assert caplog.text == ""  # nothing was wrong


def test_a_marked_file_whose_row_survived_but_not_its_spool_name_goes_back(
        spool: Spool) -> None:
    sop_uid = generate_uid()
    data = _file_bytes(sop_uid)
    relative = spool.row(sop_uid, len(data))
    _marked(spool, "unlinked", data)
    assert recover_incoming(spool.root, spool.factory) == 1
    assert (spool.root / relative).read_bytes() == data
    assert list(spool.incoming.iterdir()) == []


def test_a_marked_duplicate_is_deleted_and_the_first_copy_kept(spool: Spool) -> None:
    sop_uid = generate_uid()
    first = _file_bytes(sop_uid)
    relative = spool.row(sop_uid, len(first))
    (spool.root / relative).parent.mkdir(parents=True)
    (spool.root / relative).write_bytes(first)
    _marked(spool, "again", _file_bytes(sop_uid, rows=8))  # its insert found the row
    assert recover_incoming(spool.root, spool.factory) == 0
    assert list(spool.incoming.iterdir()) == []
    assert (spool.root / relative).read_bytes() == first


def test_of_two_marked_copies_without_a_row_the_earlier_is_recorded(spool: Spool) -> None:
    sop_uid = generate_uid()
    older = _marked(spool, "older", _file_bytes(sop_uid))
    newer = _marked(spool, "newer", _file_bytes(sop_uid, rows=8))
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    first = older.read_bytes()
    assert recover_incoming(spool.root, spool.factory) == 1
    (stored,) = spool.root.rglob(f"{sop_uid}.dcm")
    assert stored.read_bytes() == first
    assert list(spool.incoming.iterdir()) == []


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_a_marked_file_that_cannot_be_read_back_is_kept_aside(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    _marked(spool, "odd", b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    bad_mark = spool.receiving("badmark", _file_bytes(generate_uid()))
    dicom_spool.mark_stored(bad_mark, b"9\nfrom a later version")
    with caplog.at_level(logging.ERROR):
        assert recover_incoming(spool.root, spool.factory) == 0
    assert sorted(p.name for p in spool.incoming.iterdir()) == [
        "unrecoverable-badmark", "unrecoverable-odd"]
    assert caplog.text.count("cannot be read back") == 2
    with spool.factory() as session:
        assert session.scalars(select(Series)).all() == []
