"""The node's SCP in-process, driven by a real pynetdicom SCU on 127.0.0.1."""

from __future__ import annotations

import copy
import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import DicomSettings
from service.db import migrate
from service.db.models import Instance, Series
from service.db.session import make_engine, make_session_factory
from service.scp import handlers
from service.scp.handlers import SlowStores, StoreContext
from service.scp.server import AcceptorContexts, build_ae, start_scp
from tests.unit.dicom_factory import make_ct_dataset

# The refused data sets carry invalid UIDs on purpose; pydicom warns when encoding them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length .* for VR UI:UserWarning"),
]

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
SECRET_NAME = "SECRET^PATIENT"
SECRET_ID = "ID-SECRET-123"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    port: int
    root: Path
    spool: Path
    db_dir: Path
    engine: Engine
    session_factory: sessionmaker[Session]

    def instances(self) -> list[Instance]:
        with self.session_factory() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))

    def series(self) -> list[Series]:
        with self.session_factory() as session:
            return list(session.scalars(select(Series).order_by(Series.id)))

    def stray_files(self) -> list[Path]:
        """Files under the test root that are neither in the spool nor the database folder."""
        return [
            p for p in self.root.rglob("*")
            if p.is_file() and not p.is_relative_to(self.spool)
            and not p.is_relative_to(self.db_dir)
        ]

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.spool.rglob("*") if p.is_file()) if self.spool.exists() \
            else []


@pytest.fixture
def node(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Node]:
    caplog.set_level(logging.DEBUG)  # capture everything, from before the SCP starts
    db_dir = tmp_path / "db"
    url = f"sqlite:///{db_dir / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    # Two levels deep, so that "../../evil" would land inside tmp_path where we can see it.
    spool = tmp_path / "node" / "spool"
    port = free_port()
    server = start_scp(
        DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port,
                      acse_timeout_s=10, dimse_timeout_s=10, network_timeout_s=10),
        StoreContext(spool, factory),
    )
    try:
        yield Node(port, tmp_path, spool, db_dir, engine, factory)
    finally:
        server.shutdown()
        engine.dispose()


def _scu() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for syntax in SYNTAXES:  # one context per syntax, so each can be chosen
        ae.add_requested_context(CTImageStorage, syntax)
    ae.add_requested_context(Verification)
    return ae


def send(port: int, datasets: Sequence[Dataset]) -> list[Dataset]:
    """Send the datasets on one association; return the status datasets."""
    assoc = _scu().associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def status_of(rsp: Dataset) -> int:
    assert "Status" in rsp, "no C-STORE response"
    return int(rsp.Status)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_store_valid_instance(node: Node, syntax: Any) -> None:
    ds = make_ct_dataset(rows=32, columns=24)
    ds.file_meta.TransferSyntaxUID = syntax
    (rsp,) = send(node.port, [ds])
    assert status_of(rsp) == 0x0000

    target = node.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert target.is_file()
    assert node.spool_files() == [target]
    stored = dcmread(target)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.PixelData == ds.PixelData
    assert (stored.Rows, stored.Columns) == (32, 24)
    assert node.stray_files() == []

    (instance,) = node.instances()
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.sop_class_uid == CTImageStorage
    assert instance.transfer_syntax_uid == syntax
    assert instance.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert instance.size_bytes == target.stat().st_size
    assert instance.calling_ae_title == "TESTSCU"
    assert instance.duplicates == 0
    (series,) = node.series()
    assert series.series_instance_uid == ds.SeriesInstanceUID
    assert series.study_instance_uid == ds.StudyInstanceUID
    assert series.instance_count == 1
    assert series.modality == "CT"
    assert series.state == "receiving"
    assert instance.series_id == series.id


def test_duplicate_sop_instance_keeps_first_copy(node: Node) -> None:
    first = make_ct_dataset(seed=1)
    again = make_ct_dataset(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                            sop_uid=first.SOPInstanceUID, seed=2)
    assert again.PixelData != first.PixelData
    assert [status_of(r) for r in send(node.port, [first])] == [0x0000]
    assert [status_of(r) for r in send(node.port, [again])] == [0x0000]

    (instance,) = node.instances()
    assert instance.duplicates == 1
    (series,) = node.series()
    assert series.instance_count == 1
    (path,) = node.spool_files()
    assert dcmread(path).PixelData == first.PixelData


def _with_uid(attribute: str, value: str) -> Dataset:
    ds = make_ct_dataset()
    setattr(ds, attribute, value)
    if attribute == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = value
    return ds


def _assert_refused(node: Node, rsp: Dataset, bad: str | None) -> None:
    assert status_of(rsp) == 0xC000
    assert "ErrorComment" in rsp
    assert bad is None or bad not in str(rsp.ErrorComment)
    assert node.instances() == []
    assert node.series() == []
    assert node.spool_files() == []
    assert node.stray_files() == []
    assert not (node.root / "evil").exists()
    assert not any("evil" in p.name for p in node.root.parent.iterdir())


@pytest.mark.parametrize("attribute", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_uid_is_refused_and_node_keeps_running(
    node: Node, attribute: str
) -> None:
    bad = "../../evil"
    refused, after = send(node.port, [_with_uid(attribute, bad), make_ct_dataset()])
    _assert_refused_then_ok(node, refused, after, bad)


def _assert_refused_then_ok(node: Node, refused: Dataset, after: Dataset, bad: str) -> None:
    assert status_of(refused) == 0xC000
    assert "ErrorComment" in refused
    assert bad not in str(refused.ErrorComment)
    assert not (node.root / "evil").exists()
    assert not any("evil" in str(p) for p in node.root.rglob("*"))
    assert node.stray_files() == []
    # (f) the same association and a new one still store valid instances.
    assert status_of(after) == 0x0000
    (late,) = send(node.port, [make_ct_dataset()])
    assert status_of(late) == 0x0000
    assert len(node.instances()) == 2
    assert len(node.spool_files()) == 2
    assert all(bad not in i.path for i in node.instances())


def test_series_uid_longer_than_64_is_refused(node: Node) -> None:
    long_uid = "1.2." + "3" * 70
    (rsp,) = send(node.port, [_with_uid("SeriesInstanceUID", long_uid)])
    _assert_refused(node, rsp, long_uid)


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_refused(node: Node, attribute: str) -> None:
    ds = make_ct_dataset()
    delattr(ds, attribute)
    (rsp,) = send(node.port, [ds])
    _assert_refused(node, rsp, None)


def test_refused_uid_with_leading_zero(node: Node) -> None:
    bad = "1.2.03.4"
    (rsp,) = send(node.port, [_with_uid("StudyInstanceUID", bad)])
    _assert_refused(node, rsp, bad)


def test_echo(node: Node) -> None:
    assoc = _scu().associate("127.0.0.1", node.port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    assert int(rsp.Status) == 0x0000


def test_no_patient_data_in_logs(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    good = make_ct_dataset(patient_name=SECRET_NAME, patient_id=SECRET_ID)
    bad = make_ct_dataset(patient_name=SECRET_NAME, patient_id=SECRET_ID)
    bad.StudyInstanceUID = "../../evil"
    statuses = [status_of(r) for r in send(node.port, [good, bad, good])]
    assert statuses == [0x0000, 0xC000, 0x0000]
    (instance,) = node.instances()
    assert instance.duplicates == 1

    assert caplog.records, "nothing was logged at all: the capture is not working"
    # The node's own loggers did log (store, refusal, duplicate)...
    assert any(r.name.startswith("radnode") for r in caplog.records)
    # ...and nothing anywhere carried the patient's name or ID.
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert SECRET_NAME not in text, record.name
        assert SECRET_ID not in text, record.name
        assert "SECRET" not in text, record.name
    assert "SECRET" not in caplog.text



def _slow_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "radnode.scp" and r.getMessage().startswith("slow C-STORE")]


def test_slow_stores_warn_at_most_once_a_minute_with_the_slowest(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="radnode.scp")
    now = [1000.0]
    slow = SlowStores(clock=lambda: now[0])
    slow.observe(1.5, "1.2.3.1", "CT1")  # the first warns at once
    assert _slow_warnings(caplog) == [
        "slow C-STORE: 1 instance(s) took over 1 s from the data set received to Success "
        "(structure check, fsync of the spool's disk, database commit); the slowest 1.5 s, "
        "1.2.3.1 from AE CT1. Senders wait for each response: check the spool's disk and the "
        "database"]
    now[0] += 30
    slow.observe(4.2, "1.2.3.2", "MR1")
    slow.observe(2.0, "1.2.3.3", "CT1")
    assert len(_slow_warnings(caplog)) == 1  # within the minute: counted, not logged
    now[0] += 31
    slow.observe(1.1, "1.2.3.4", "CT1")
    last = _slow_warnings(caplog)[-1]
    assert len(_slow_warnings(caplog)) == 2
    assert last.startswith("slow C-STORE: 3 instance(s)")
    assert "the slowest 4.2 s, 1.2.3.2 from AE MR1" in last
    now[0] += 61
    slow.observe(1.0, "1.2.3.5", "CT1")  # the count starts again after each warning
    assert _slow_warnings(caplog)[-1].startswith("slow C-STORE: 1 instance(s)")
    assert "the slowest 1.0 s, 1.2.3.5 from AE CT1" in _slow_warnings(caplog)[-1]


def test_a_slow_store_is_logged_by_uid_and_ae(node: Node, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_ct_dataset(rows=16, columns=16)
    monkeypatch.setattr(handlers, "SLOW_STORE_S", 0.0)  # every store counts as slow
    (rsp,) = send(node.port, [ds])
    assert status_of(rsp) == 0x0000
    (warning,) = _slow_warnings(caplog)
    assert "1 instance(s) took over 0 s" in warning
    assert f"{ds.SOPInstanceUID} from AE TESTSCU" in warning
    assert str(ds.PatientName) not in warning and str(ds.PatientID) not in warning


def test_a_refused_store_is_never_called_slow(node: Node, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_ct_dataset(rows=16, columns=16)
    del ds.SeriesInstanceUID
    monkeypatch.setattr(handlers, "SLOW_STORE_S", 0.0)
    (rsp,) = send(node.port, [ds])
    assert status_of(rsp) == 0xC000
    assert _slow_warnings(caplog) == []


def test_acceptor_contexts_deep_copy_is_equal_and_independent() -> None:
    ae = build_ae(DicomSettings())
    contexts = AcceptorContexts(ae.supported_contexts)
    copied = copy.deepcopy(contexts)
    generic = copy.deepcopy(list(ae.supported_contexts))
    assert len(copied) == len(generic) > 100
    for fast, slow, original in zip(copied, generic, contexts, strict=True):
        assert type(fast) is PresentationContext
        assert fast is not original
        assert vars(fast) == vars(slow)
        assert fast.transfer_syntax is not original.transfer_syntax
    # Negotiation changes a copy (its result, roles, transfer syntaxes), never the server's.
    copied[1].result = 0x00
    copied[1].transfer_syntax = [ExplicitVRLittleEndian]
    assert contexts[1].result is None
    assert len(contexts[1].transfer_syntax) > 1


@contextmanager
def _own_scp(tmp_path: Path) -> Iterator[tuple[int, Any, StoreContext]]:
    """A fresh SCP on its own database: ``(port, scp, context)``."""
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    context = StoreContext(tmp_path / "spool", make_session_factory(engine))
    port = free_port()
    scp = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port), context)
    try:
        yield port, scp, context
    finally:
        scp.shutdown()
        engine.dispose()


def test_listener_hands_out_acceptor_contexts(tmp_path: Path) -> None:
    with _own_scp(tmp_path) as (port, scp, _):
        (listener,) = scp.listeners.values()
        assert isinstance(listener.contexts, AcceptorContexts)
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
        assert assoc.is_established
        (accepted,) = assoc.accepted_contexts
        assert accepted.transfer_syntax == [ExplicitVRLittleEndian]  # the SCP's preference
        assoc.release()
        # What the association negotiated did not change what the listener offers.
        assert all(context.result is None for context in listener.contexts)


def test_below_the_reserve_a_held_copy_is_still_answered_success(tmp_path: Path) -> None:
    with _own_scp(tmp_path) as (port, _, context):
        held = make_ct_dataset()
        assert [status_of(r) for r in send(port, [held])] == [0x0000]
        context.min_free_bytes = 1 << 60  # no disk has that much free: below the reserve
        fresh = make_ct_dataset()
        statuses = [status_of(r) for r in send(port, [held, fresh])]
        assert statuses == [0x0000, 0xA700]  # the duplicate writes nothing; the new one is refused
        with context.session_factory() as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        assert set(rows) == {held.SOPInstanceUID}
        assert rows[held.SOPInstanceUID].duplicates == 1
        assert not any(p.name.startswith(fresh.SOPInstanceUID) for p in tmp_path.rglob("*.dcm"))


def test_a_connection_is_uncounted_once_when_its_association_takes_over(tmp_path: Path) -> None:
    """pynetdicom's handler returns once the association runs: that must not uncount it again."""
    with _own_scp(tmp_path) as (_, scp, _):
        (listener,) = scp.listeners.values()
        first, second, request = object(), object(), object()
        for connection in (first, second):  # as verify_request, then the connection's thread
            listener._connecting["10.0.0.7"] += 1
            listener.awaiting_association(connection, request, "10.0.0.7")
        assert listener.handed_over(first)  # pynetdicom made its association
        listener.connection_done(first, request, "10.0.0.7")  # its thread returns
        assert listener._connecting["10.0.0.7"] == 1  # the second still waits
        listener.connection_done(second, request, "10.0.0.7")  # ended without one
        assert "10.0.0.7" not in listener._connecting
        listener._connecting["10.0.0.7"] += 1
        listener.connection_done(None, request, "10.0.0.7")  # its TLS handshake failed
        assert "10.0.0.7" not in listener._connecting
