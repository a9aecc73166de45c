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
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from service.db import repository
from service.db.models import Series
from service.node import recover_incoming
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
