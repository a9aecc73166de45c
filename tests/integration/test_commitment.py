"""Storage Commitment Push Model (DICOM PS3.4 J) against a real Orthanc (no mocks).

radnode's SCP runs in this process; Orthanc, told about it in its
``DicomModalities``, opens a new association to it to deliver each
N-EVENT-REPORT (acting as SCP of the SOP class, via role selection).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Destination, DicomSettings
from service.db.migrate import upgrade
from service.db.models import Delivery, Job, Result, Series
from service.db.session import make_engine, make_session_factory, utcnow
from service.delivery.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentReport,
    record_report,
    request_commitment,
)
from service.dicom.scu import store_files
from service.scp.handlers import StoreContext
from service.scp.server import start_scp
from tests.peers import OrthancPeer, free_port, orthanc

pytestmark = pytest.mark.integration

NODE_AE = "RADNODE"
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class Reports:
    """Reports the SCP received, by Transaction UID."""

    received: dict[str, CommitmentReport]
    arrived: threading.Condition

    def add(self, report: CommitmentReport) -> None:
        with self.arrived:
            self.received[report.transaction_uid] = report
            self.arrived.notify_all()

    def wait(self, transaction_uid: str, timeout_s: float = 30) -> CommitmentReport:
        with self.arrived:
            done = self.arrived.wait_for(lambda: transaction_uid in self.received, timeout_s)
        assert done, f"no storage commitment report for {transaction_uid} in {timeout_s} s"
        return self.received[transaction_uid]


@pytest.fixture
def session_factory(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'node' / 'radnode.db'}"
    upgrade(url)
    return make_session_factory(make_engine(url))


def start_node(tmp_path: Path, session_factory: sessionmaker[Session],
               on_report: Callable[[CommitmentReport], None] | None,
               ) -> tuple[int, ThreadedAssociationServer]:
    port = free_port()
    context = StoreContext(spool_dir=tmp_path / "spool", session_factory=session_factory,
                           on_commitment_report=on_report)
    settings = DicomSettings(ae_title=NODE_AE, host="127.0.0.1", port=port)
    return port, start_scp(settings, context)


@pytest.fixture
def reports() -> Reports:
    return Reports({}, threading.Condition())


@pytest.fixture
def node_with_callback(tmp_path: Path, session_factory: sessionmaker[Session],
                       reports: Reports) -> Iterator[int]:
    """radnode's SCP passing reports to ``reports``; yields its port."""
    port, server = start_node(tmp_path, session_factory, reports.add)
    try:
        yield port
    finally:
        server.shutdown()


@pytest.fixture
def node_recording(tmp_path: Path, session_factory: sessionmaker[Session]) -> Iterator[int]:
    """radnode's SCP recording reports in the database (the default); yields its port."""
    port, server = start_node(tmp_path, session_factory, None)
    try:
        yield port
    finally:
        server.shutdown()


@pytest.fixture
def ct_file(ct_series_dir: Path) -> Path:
    return sorted(ct_series_dir.glob("*.dcm"))[0]


def pacs_for(tmp_path: Path, node_port: int) -> AbstractContextManager[OrthancPeer]:
    """Orthanc, knowing radnode's SCP as modality ``radnode`` (where reports go)."""
    return orthanc(tmp_path, modalities={"radnode": (NODE_AE, "127.0.0.1", node_port)})


def send(pacs: OrthancPeer, path: Path) -> tuple[str, str]:
    """C-STORE one file to Orthanc; return (SOP Class UID, SOP Instance UID)."""
    outcome = store_files(pacs.destination, [path], calling_ae=NODE_AE)[0]
    assert outcome.ok, outcome
    ds = dcmread(path, stop_before_pixels=True)
    assert pacs.has_instance(str(ds.SOPInstanceUID))
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def test_orthanc_commits_what_it_stored(tmp_path: Path, node_with_callback: int,
                                        reports: Reports, ct_file: Path) -> None:
    with pacs_for(tmp_path, node_with_callback) as pacs:
        sop_class, sop_instance = send(pacs, ct_file)

        transaction = generate_uid()
        status = request_commitment(pacs.destination, [(sop_class, sop_instance)],
                                    transaction_uid=transaction, calling_ae=NODE_AE,
                                    timeout_s=10)
        assert status == 0x0000
        report = reports.wait(transaction)
        assert report.committed == [sop_instance]
        assert report.failed == {}
        assert report.calling_ae == pacs.aet

        # An instance Orthanc never received: failure reason 0x0112.
        missing = generate_uid()
        transaction = generate_uid()
        status = request_commitment(pacs.destination,
                                    [(sop_class, sop_instance), (sop_class, missing)],
                                    transaction_uid=transaction, calling_ae=NODE_AE,
                                    timeout_s=10)
        assert status == 0x0000
        report = reports.wait(transaction)
        assert report.committed == [sop_instance]
        assert report.failed == {missing: NO_SUCH_OBJECT_INSTANCE}

        # The right instance under the wrong SOP class: Orthanc 1.10 answers 0x0119.
        transaction = generate_uid()
        status = request_commitment(pacs.destination, [(MR_IMAGE_STORAGE, sop_instance)],
                                    transaction_uid=transaction, calling_ae=NODE_AE,
                                    timeout_s=10)
        assert status == 0x0000
        report = reports.wait(transaction)
        assert report.committed == []
        assert report.failed == {sop_instance: CLASS_INSTANCE_CONFLICT}


def test_calling_ae_unknown_to_orthanc(tmp_path: Path, node_with_callback: int,
                                       ct_file: Path) -> None:
    """Orthanc aborts an N-ACTION from an AE title missing from DicomModalities."""
    with pacs_for(tmp_path, node_with_callback) as pacs:
        sop_class, sop_instance = send(pacs, ct_file)
        started = time.monotonic()
        status = request_commitment(pacs.destination, [(sop_class, sop_instance)],
                                    transaction_uid=generate_uid(), calling_ae="STRANGER",
                                    timeout_s=10)
        assert status is None
        assert time.monotonic() - started < 9  # the abort, not the timeout


def test_no_peer_listening() -> None:
    closed = Destination(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    status = request_commitment(closed, [(MR_IMAGE_STORAGE, generate_uid())],
                                transaction_uid=generate_uid(), calling_ae=NODE_AE,
                                timeout_s=5)
    assert status is None


# --- the deliveries table -------------------------------------------------------------


def add_deliveries(session_factory: sessionmaker[Session],
                   rows: list[tuple[str, str, str, str | None]]) -> dict[str, int]:
    """Insert (sop_class, sop_instance, state, transaction_uid) deliveries; return ids by UID."""
    now = utcnow()
    with session_factory() as session:
        series = Series(series_instance_uid=generate_uid(), study_instance_uid=generate_uid(),
                        modality="CT", first_received_at=now, last_received_at=now)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, task_name="radnode.analyse_series", queue="gpu",
                  model_name="test", created_at=now, state="succeeded")
        session.add(job)
        session.flush()
        ids = {}
        for sop_class, sop_instance, state, transaction in rows:
            result = Result(job_id=job.id, kind="SEG", sop_class_uid=sop_class,
                            sop_instance_uid=sop_instance,
                            series_instance_uid=generate_uid(), path="/nonexistent.dcm",
                            created_at=now)
            session.add(result)
            session.flush()
            delivery = Delivery(result_id=result.id, destination="orthanc", state=state,
                                attempts=1, status=0, created_at=now, next_attempt_at=now,
                                sent_at=now if state != "pending" else None,
                                transaction_uid=transaction,
                                commit_requested_at=now if transaction else None,
                                commit_attempts=1 if transaction else 0)
            session.add(delivery)
            session.flush()
            ids[sop_instance] = delivery.id
        session.commit()
    return ids


def deliveries(session_factory: sessionmaker[Session]) -> dict[int, Delivery]:
    with session_factory() as session:
        return {d.id: d for d in session.scalars(select(Delivery))}


def test_record_report_updates_sent_deliveries(session_factory: sessionmaker[Session]) -> None:
    transaction, other = generate_uid(), generate_uid()
    a, b, c, d, e = (generate_uid() for _ in range(5))
    ids = add_deliveries(session_factory, [
        (MR_IMAGE_STORAGE, a, "sent", transaction),      # committed
        (MR_IMAGE_STORAGE, b, "sent", transaction),      # failed: send again
        (MR_IMAGE_STORAGE, c, "sent", transaction),      # not named: unchanged
        (MR_IMAGE_STORAGE, d, "committed", transaction),  # already committed: unchanged
        (MR_IMAGE_STORAGE, e, "sent", other),            # another transaction
    ])
    now = utcnow() + timedelta(seconds=5)
    report = CommitmentReport(transaction, committed=[a, d, e], failed={b: 0x0112},
                              calling_ae="ORTHANC")
    with session_factory() as session:
        assert record_report(report, session=session, now=now) == (1, 1)
        session.commit()

    rows = deliveries(session_factory)
    assert rows[ids[a]].state == "committed"
    assert rows[ids[a]].committed_at is not None and rows[ids[a]].error is None
    assert rows[ids[b]].state == "pending"
    assert rows[ids[b]].transaction_uid is None
    assert rows[ids[b]].error == "storage commitment failed: reason 0x0112 (no such object " \
                                 "instance)"
    assert rows[ids[b]].next_attempt_at.replace(tzinfo=None) == now.replace(tzinfo=None)
    assert rows[ids[c]].state == "sent" and rows[ids[c]].transaction_uid == transaction
    assert rows[ids[d]].state == "committed"
    assert rows[ids[e]].state == "sent" and rows[ids[e]].committed_at is None

    # A report of an unknown transaction changes nothing.
    with session_factory() as session:
        unknown = CommitmentReport(generate_uid(), committed=[c], calling_ae="ORTHANC")
        assert record_report(unknown, session=session, now=now) == (0, 0)
        session.commit()
    assert deliveries(session_factory)[ids[c]].state == "sent"


def test_reports_are_recorded_by_the_scp(tmp_path: Path, node_recording: int,
                                         session_factory: sessionmaker[Session],
                                         ct_file: Path) -> None:
    """End to end: sent rows with a Transaction UID become committed / pending."""
    with pacs_for(tmp_path, node_recording) as pacs:
        sop_class, sop_instance = send(pacs, ct_file)
        missing = generate_uid()
        transaction = generate_uid()
        # As the dispatcher must: the Transaction UID is committed before the request.
        ids = add_deliveries(session_factory, [
            (sop_class, sop_instance, "sent", transaction),
            (sop_class, missing, "sent", transaction),
        ])
        status = request_commitment(pacs.destination,
                                    [(sop_class, sop_instance), (sop_class, missing)],
                                    transaction_uid=transaction, calling_ae=NODE_AE,
                                    timeout_s=10)
        assert status == 0x0000

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = deliveries(session_factory)
            if rows[ids[sop_instance]].state != "sent" and rows[ids[missing]].state != "sent":
                break
            time.sleep(0.2)
        rows = deliveries(session_factory)
        assert rows[ids[sop_instance]].state == "committed", pacs.log_text()[-3000:]
        assert rows[ids[sop_instance]].committed_at is not None
        assert rows[ids[missing]].state == "pending"
        error = rows[ids[missing]].error
        assert error is not None and "0x0112" in error


def test_report_arriving_before_the_transaction_is_committed(
        tmp_path: Path, node_recording: int, session_factory: sessionmaker[Session],
        ct_file: Path) -> None:
    """The recorder waits briefly for a Transaction UID that is not in the database yet."""
    with pacs_for(tmp_path, node_recording) as pacs:
        sop_class, sop_instance = send(pacs, ct_file)
        transaction = generate_uid()
        ids = add_deliveries(session_factory, [(sop_class, sop_instance, "sent", None)])
        status = request_commitment(pacs.destination, [(sop_class, sop_instance)],
                                    transaction_uid=transaction, calling_ae=NODE_AE,
                                    timeout_s=10)
        assert status == 0x0000
        time.sleep(0.5)  # the report is (most likely) already waiting in the SCP
        with session_factory() as session:
            delivery = session.get(Delivery, ids[sop_instance])
            assert delivery is not None
            delivery.transaction_uid = transaction
            session.commit()

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if deliveries(session_factory)[ids[sop_instance]].state == "committed":
                break
            time.sleep(0.2)
        assert deliveries(session_factory)[ids[sop_instance]].state == "committed"


# --- the SCP's answers to other peers --------------------------------------------------


def _report_requestor(scp_role: bool = True, scu_role: bool = False,
                      ) -> tuple[AE, list[Any]]:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    return ae, [build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=scu_role, scp_role=scp_role)]


def _event(transaction: str | None, committed: list[str]) -> Dataset:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    items = []
    for uid in committed:
        item = Dataset()
        item.ReferencedSOPClassUID = MR_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def test_scp_answers_reports_and_refuses_malformed_ones(node_with_callback: int,
                                                        reports: Reports) -> None:
    ae, ext = _report_requestor()
    assoc = ae.associate("127.0.0.1", node_with_callback, ae_title=NODE_AE,
                         ext_neg=ext)
    assert assoc.is_established
    try:
        transaction, uid = generate_uid(), generate_uid()
        status, _ = assoc.send_n_event_report(_event(transaction, [uid]), 1,
                                              STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assert reports.wait(transaction).committed == [uid]

        status, _ = assoc.send_n_event_report(_event(None, [uid]), 1,
                                              STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0115  # invalid argument value: no Transaction UID

        status, _ = assoc.send_n_event_report(_event(generate_uid(), [uid]), 7,
                                              STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0113  # no such event type
    finally:
        assoc.release()


def test_scp_accepts_reports_without_role_selection(node_with_callback: int,
                                                    reports: Reports) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", node_with_callback, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        transaction, uid = generate_uid(), generate_uid()
        status, _ = assoc.send_n_event_report(_event(transaction, [uid]), 1,
                                              STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assert reports.wait(transaction).committed == [uid]
    finally:
        assoc.release()


def test_scp_is_no_storage_commitment_scp(node_with_callback: int) -> None:
    """A requestor that offers only the SCU role (to send N-ACTION) is not accepted."""
    ae, ext = _report_requestor(scp_role=False, scu_role=True)
    assoc = ae.associate("127.0.0.1", node_with_callback, ae_title=NODE_AE,
                         ext_neg=ext)
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()


def test_report_on_the_request_association() -> None:
    """A peer may report on the association of the N-ACTION (PS3.4 J.3.3).

    The peer here is a pynetdicom Storage Commitment SCP that does so.
    """

    def on_action(event: evt.Event) -> tuple[int, None]:
        information = event.action_information
        assoc = event.assoc

        def report() -> None:
            time.sleep(0.2)  # after the N-ACTION response
            ds = Dataset()
            ds.TransactionUID = information.TransactionUID
            ds.ReferencedSOPSequence = list(information.ReferencedSOPSequence)
            assoc.send_n_event_report(ds, 1, STORAGE_COMMITMENT_PUSH_MODEL,
                                      STORAGE_COMMITMENT_INSTANCE)

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    ae = AE(ae_title="COMMITSCP")
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    assert server is not None
    try:
        received: list[CommitmentReport] = []
        transaction, uid = generate_uid(), generate_uid()
        status = request_commitment(
            Destination(ae_title="COMMITSCP", host="127.0.0.1", port=port),
            [(MR_IMAGE_STORAGE, uid)], transaction_uid=transaction, calling_ae=NODE_AE,
            timeout_s=10, on_report=received.append, report_wait_s=10)
        assert status == 0x0000
        assert received == [CommitmentReport(transaction, [uid], {}, "COMMITSCP")]
    finally:
        server.shutdown()
