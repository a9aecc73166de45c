"""Storage Commitment Push Model, SCU side (DICOM PS3.4 Annex J).

After sending result instances to a destination with ``storage_commitment``,
radnode asks it to commit them: one N-ACTION-RQ (Action Type ID 1, DICOM
PS3.4 J.3.2) naming a new Transaction UID and the instances. The destination
answers the N-ACTION at once and reports later with an N-EVENT-REPORT-RQ
(J.3.3): Event Type ID 1 when every instance is committed, 2 when some failed.
Most PACS (Orthanc, dcm4chee) open a *new* association to the node's SCP to
deliver it, acting as the association requestor in the SCP role of the SOP
class; the node's SCP accepts that through SCP/SCU Role Selection (see
:mod:`service.scp.server`). A peer may also send the report on the
association of the request, before it is released (``on_report`` of
:func:`request_commitment`).

:func:`record_report` applies a report to the ``deliveries`` table: committed
instances become ``committed``; failed ones go back to ``pending`` and are
sent again.

Logs name UIDs, AE titles and statuses only, never patient data.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import audit
from service.config import Destination
from service.db.models import Delivery, Result
from service.db.session import utcnow
from service.deid.mapping import original_uids
from service.dicom.net import make_ae, set_tcp_nodelay
from service.dicom.tls import tls_args
from service.dicom.uids import is_valid_uid, printable

log = logging.getLogger("radnode.commitment")

#: Storage Commitment Push Model SOP Class (DICOM PS3.4 J.3).
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: Its well-known SOP Instance (DICOM PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION Action Type ID "Request Storage Commitment" (J.3.2.1).
ACTION_REQUEST_COMMITMENT = 1
#: N-EVENT-REPORT Event Type IDs (J.3.3.1).
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2

SUCCESS = 0x0000
#: N-EVENT-REPORT response statuses (DICOM PS3.7 10.1.1.1.8, C.4).
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115

#: Failure Reason (0008,1197) values of a Storage Commitment report (PS3.4 J.3.3.1.1.2).
FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}

#: How long the default report recorder waits for the Transaction UID of a
#: report to appear in the database, seconds: a fast PACS can report before
#: the request's Transaction UID is committed by the thread that sent it.
UNKNOWN_TRANSACTION_GRACE_S = 10.0

_TRANSFER_SYNTAXES = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]


class MalformedReportError(ValueError):
    """An N-EVENT-REPORT that is not a usable Storage Commitment report.

    Attributes
    ----------
    status : int
        The DIMSE status to answer with (0x0113 or 0x0115).
    """

    def __init__(self, message: str, status: int = INVALID_ARGUMENT_VALUE) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CommitmentReport:
    """A Storage Commitment result (DICOM PS3.4 J.3.3).

    Attributes
    ----------
    transaction_uid : str
        The Transaction UID of the N-ACTION request it answers.
    committed : list[str]
        SOP Instance UIDs the peer has committed to keep.
    failed : dict[str, int]
        SOP Instance UID -> Failure Reason (e.g. 0x0112, no such object instance).
    calling_ae : str
        AE title of the peer that sent the report ('' if unknown).
    """

    transaction_uid: str
    committed: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    calling_ae: str = ""


def describe_reason(reason: int) -> str:
    """``0xNNNN (name)`` for a Failure Reason, naming the common ones (PS3.4 J.3.3.1.1.2)."""
    name = FAILURE_REASONS.get(reason)
    return f"0x{reason:04X} ({name})" if name else f"0x{reason:04X}"


def build_action_information(references: Sequence[tuple[str, str]],
                             transaction_uid: str) -> Dataset:
    """The Action Information of a Storage Commitment request (DICOM PS3.4 J.3.2.1.1).

    Parameters
    ----------
    references : sequence of (str, str)
        (SOP Class UID, SOP Instance UID) of each instance to commit.
    transaction_uid : str
        A new UID that identifies this request and its report.

    Raises
    ------
    ValueError
        If a UID is not valid (DICOM PS3.5 9.1) or ``references`` is empty.
    """
    if not references:
        raise ValueError("a storage commitment request needs at least one instance")
    for uid in (transaction_uid, *(u for pair in references for u in pair)):
        if not is_valid_uid(uid):
            raise ValueError(f"not a valid UID: {printable(uid)!r}")
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    items = []
    for sop_class_uid, sop_instance_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        items.append(item)
    dataset.ReferencedSOPSequence = items
    return dataset


def request_commitment(
    destination: Destination,
    references: Sequence[tuple[str, str]],
    *,
    transaction_uid: str,
    calling_ae: str,
    timeout_s: float,
    on_report: Callable[[CommitmentReport], None] | None = None,
    report_wait_s: float = 0.0,
) -> int | None:
    """Ask ``destination`` to commit instances: N-ACTION-RQ (DICOM PS3.4 J.3.2).

    Opens a new association (TLS when ``destination.tls`` is set) proposing
    the Storage Commitment Push Model SOP Class, sends one N-ACTION with
    Action Type ID 1, the Transaction UID and the Referenced SOP Sequence,
    and releases the association. The result comes later in an
    N-EVENT-REPORT, usually on a new association to the node's SCP.

    Parameters
    ----------
    destination : Destination
        The peer (its Storage Commitment SCP is its C-STORE AE).
    references : sequence of (str, str)
        (SOP Class UID, SOP Instance UID) of each instance.
    transaction_uid : str
        A new UID for this request; the report names it. Write it to the
        deliveries before calling this: the report may arrive before the call
        returns.
    calling_ae : str
        radnode's AE title. The peer sends the report to the AE it knows by
        this title (in Orthanc: an entry of ``DicomModalities``).
    timeout_s : float
        Longest wait to connect, to open the association and for the
        N-ACTION response, seconds.
    on_report : callable, optional
        Called with a report that the peer sends on this association (some
        peers do, PS3.4 J.3.3); reports on other associations go to the SCP.
    report_wait_s : float
        With ``on_report``: how long to keep the association open after a
        Success response, waiting for such a report, seconds.

    Returns
    -------
    int or None
        The N-ACTION status (0x0000: the request is accepted, not yet the
        instances committed); None if no association could be opened, the
        peer does not support the SOP class, or no response came in time.

    Raises
    ------
    ValueError
        If ``references`` is empty or holds an invalid UID.
    """
    action = build_action_information(references, transaction_uid)
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        tls = tls_args(destination.tls, destination.host)
    except (OSError, ssl.SSLError) as exc:
        log.error("storage commitment request to %s not sent: TLS setup failed (%s)", peer,
                  type(exc).__name__)
        return None

    ae = make_ae(calling_ae)
    ae.acse_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = max(timeout_s, report_wait_s, 30.0)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, _TRANSFER_SYNTAXES)
    received = threading.Event()
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]
    if on_report is not None:
        def _deliver(report: CommitmentReport) -> None:
            on_report(report)
            received.set()

        handlers.append((evt.EVT_N_EVENT_REPORT, handle_event_report, [_deliver]))
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=handlers, tls_args=tls)
    if not assoc.is_established:
        log.warning("storage commitment request to %s: association rejected or no answer "
                    "(transaction %s)", peer, transaction_uid)
        return None
    try:
        started = time.monotonic()
        try:
            status, _reply = assoc.send_n_action(
                action, ACTION_REQUEST_COMMITMENT, STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_INSTANCE)
        except ValueError as exc:  # no accepted presentation context for the SOP class
            log.warning("storage commitment request to %s: %s (transaction %s)", peer, exc,
                        transaction_uid)
            return None
        if "Status" not in status:
            elapsed = time.monotonic() - started
            if elapsed < timeout_s:
                # Orthanc aborts when the calling AE title is not in its DicomModalities.
                log.warning("storage commitment request to %s: the peer ended the association "
                            "without answering after %.1f s (does it know AE %s?) "
                            "(transaction %s)", peer, elapsed, printable(calling_ae, 16),
                            transaction_uid)
            else:
                log.warning("storage commitment request to %s: no N-ACTION response within "
                            "%.0f s (transaction %s)", peer, timeout_s, transaction_uid)
            return None
        code = int(status.Status)
        if code == SUCCESS:
            log.info("storage commitment requested from %s as %s: %d instance(s), "
                     "transaction %s", peer, printable(calling_ae, 16),
                     len(references), transaction_uid)
            if on_report is not None and report_wait_s > 0:
                received.wait(report_wait_s)
        else:
            log.warning("storage commitment request to %s refused with status 0x%04X "
                        "(transaction %s)", peer, code, transaction_uid)
        return code
    finally:
        if assoc.is_established:
            assoc.release()


def _uid(value: Any, what: str) -> str:
    text = str(value if value is not None else "").rstrip("\x00 ")
    if not is_valid_uid(text):
        raise MalformedReportError(f"{what} is missing or not a valid UID")
    return text


def parse_event_report(event_type_id: int | None, dataset: Dataset | None, *,
                       calling_ae: str = "") -> CommitmentReport:
    """Read a Storage Commitment N-EVENT-REPORT's Event Information (DICOM PS3.4 J.3.3).

    Parameters
    ----------
    event_type_id : int or None
        1: every instance committed; 2: failures exist.
    dataset : pydicom.dataset.Dataset or None
        The Event Information: Transaction UID (0008,1195), Referenced SOP
        Sequence (0008,1199) of the committed instances, Failed SOP Sequence
        (0008,1198) with Failure Reason (0008,1197) of each failed one.
    calling_ae : str
        The AE title that sent it (for :attr:`CommitmentReport.calling_ae`).

    Returns
    -------
    CommitmentReport
        An instance named in both sequences counts as failed. A failed item
        without a Failure Reason counts as 0x0110 (processing failure).

    Raises
    ------
    MalformedReportError
        With status 0x0113 for another Event Type ID, 0x0115 when the
        Transaction UID or an item's SOP Instance UID is missing or invalid,
        or the data set cannot be decoded.
    """
    if event_type_id not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
        raise MalformedReportError(f"event type {event_type_id} is not a storage commitment "
                                   "result (1 or 2)", NO_SUCH_EVENT_TYPE)
    if dataset is None:
        raise MalformedReportError("the report has no event information")
    try:
        transaction_uid = _uid(dataset.get("TransactionUID"), "Transaction UID")
        committed: list[str] = []
        for item in dataset.get("ReferencedSOPSequence") or []:
            committed.append(_uid(item.get("ReferencedSOPInstanceUID"),
                                  "Referenced SOP Instance UID"))
        failed: dict[str, int] = {}
        for item in dataset.get("FailedSOPSequence") or []:
            uid = _uid(item.get("ReferencedSOPInstanceUID"), "Failed SOP Instance UID")
            reason = item.get("FailureReason")
            failed[uid] = int(reason) if reason is not None else PROCESSING_FAILURE
    except MalformedReportError:
        raise
    except Exception as exc:  # pydicom decodes lazily and raises many types
        raise MalformedReportError(
            f"cannot decode the event information ({type(exc).__name__})") from exc
    committed = [uid for uid in dict.fromkeys(committed) if uid not in failed]
    if event_type_id == EVENT_ALL_COMMITTED and failed:
        log.warning("storage commitment report %s from %s has event type 1 (all committed) "
                    "but names %d failed instance(s): treating them as failed",
                    transaction_uid, printable(calling_ae, 16), len(failed))
    return CommitmentReport(transaction_uid, committed, failed, calling_ae)


def handle_event_report(event: evt.Event,
                        callback: Callable[[CommitmentReport], None]) -> tuple[int, None]:
    """``EVT_N_EVENT_REPORT`` handler: parse a Storage Commitment report, pass it on.

    Bound by the node's SCP (reports on new associations) and by
    :func:`request_commitment` (reports on the request's association).

    Parameters
    ----------
    event : pynetdicom.events.Event
        The N-EVENT-REPORT event.
    callback : callable
        Receives the :class:`CommitmentReport`; an exception in it is logged
        and answered with 0x0110 (the peer may send it again; if not, radnode
        asks again after ``delivery.commitment_timeout_s``).

    Returns
    -------
    tuple of (int, None)
        The N-EVENT-REPORT status (DICOM PS3.7 10.1.1.1.8) and no Event Reply:
        0x0000 when handled, 0x0113 for an unknown Event Type ID, 0x0115 for
        a malformed report, 0x0110 when the callback failed.
    """
    # The peer: the requestor of a new association, the acceptor on our own request's.
    assoc = event.assoc
    calling_ae = printable((assoc.acceptor if assoc.is_requestor else assoc.requestor).ae_title,
                           16)
    request: Any = event.request
    class_uid = str(getattr(request, "AffectedSOPClassUID", "") or "")
    if class_uid != STORAGE_COMMITMENT_PUSH_MODEL:
        log.warning("N-EVENT-REPORT from AE %s for SOP class %s refused: only storage "
                    "commitment reports are handled", calling_ae, printable(class_uid))
        return NO_SUCH_EVENT_TYPE, None
    try:
        try:
            information: Dataset | None = event.event_information
        except Exception as exc:  # pydicom raises many types on bad bytes
            raise MalformedReportError(
                f"cannot decode the event information ({type(exc).__name__})") from exc
        report = parse_event_report(event.event_type, information, calling_ae=calling_ae)
    except MalformedReportError as exc:
        log.warning("malformed storage commitment report from AE %s: %s (status 0x%04X)",
                    calling_ae, exc, exc.status)
        return exc.status, None
    log.info("storage commitment report from AE %s: transaction %s, %d committed, %d failed",
             calling_ae, report.transaction_uid, len(report.committed), len(report.failed))
    for uid, reason in report.failed.items():
        log.warning("storage commitment of %s failed at AE %s: %s", uid, calling_ae,
                    describe_reason(reason))
    try:
        callback(report)
    except Exception:
        log.exception("cannot record storage commitment report %s from AE %s",
                      report.transaction_uid, calling_ae)
        return PROCESSING_FAILURE, None
    return SUCCESS, None


def transaction_known(transaction_uid: str, *, session: Session) -> bool:
    """True if a delivery row carries ``transaction_uid``."""
    found = session.scalar(select(Delivery.id).where(
        Delivery.transaction_uid == transaction_uid).limit(1))
    return found is not None


def record_report(report: CommitmentReport, *, session: Session,
                  now: datetime) -> tuple[int, int]:
    """Apply a Storage Commitment report to the deliveries it answers (DICOM PS3.4 J.3.3).

    Only deliveries whose ``transaction_uid`` is the report's and whose state
    is ``sent`` change: a committed one becomes ``committed``
    (``committed_at = now``, error cleared); a failed one goes back to
    ``pending`` with ``next_attempt_at = now`` and no Transaction UID, so
    it is sent again, with ``error`` naming the Failure Reason. Deliveries
    of the transaction that the report does not name are left as they are.
    The caller commits the session.

    Parameters
    ----------
    report : CommitmentReport
        The parsed report.
    session : sqlalchemy.orm.Session
        An open session.
    now : datetime.datetime
        The current time, aware UTC.

    Returns
    -------
    tuple of (int, int)
        Deliveries marked committed, deliveries sent back to ``pending``;
        (0, 0) for an unknown Transaction UID (logged as a warning).
    """
    rows = session.execute(
        select(Delivery, Result.sop_instance_uid)
        .join(Result, Delivery.result_id == Result.id)
        .where(Delivery.transaction_uid == report.transaction_uid)
    ).all()
    if not rows:
        log.warning("storage commitment report from AE %s names unknown transaction %s "
                    "(already answered, superseded by a newer request, or not ours): ignored",
                    printable(report.calling_ae, 16), report.transaction_uid)
        return 0, 0
    # A de-identifying destination commits the pseudonym UIDs it received:
    # name them by the result's own UID (pseudonyms are random, so unique).
    originals = original_uids(session, [*report.committed, *report.failed])
    if originals:
        report = CommitmentReport(
            report.transaction_uid, [originals.get(u, u) for u in report.committed],
            {originals.get(u, u): r for u, r in report.failed.items()}, report.calling_ae)
    committed = set(report.committed)
    named = 0
    done = failed = 0
    for delivery, sop_instance_uid in rows:
        if sop_instance_uid not in committed and sop_instance_uid not in report.failed:
            continue
        named += 1
        if delivery.state != "sent":
            continue
        if sop_instance_uid in report.failed:
            reason = report.failed[sop_instance_uid]
            delivery.state = "pending"
            delivery.next_attempt_at = now
            delivery.transaction_uid = None
            delivery.error = f"storage commitment failed: reason {describe_reason(reason)}"
            audit.record_delivery(session, delivery, "delivery.commit_failed")
            failed += 1
        else:
            delivery.state = "committed"
            delivery.committed_at = now
            delivery.error = None
            audit.record_delivery(session, delivery, "delivery.committed")
            done += 1
    unknown = len(committed) + len(report.failed) - named
    if unknown > 0:
        log.warning("storage commitment report %s names %d instance(s) that are not part of "
                    "the transaction", report.transaction_uid, unknown)
    log.info("storage commitment report %s recorded: %d committed, %d to send again",
             report.transaction_uid, done, failed)
    return done, failed


def report_recorder(session_factory: sessionmaker[Session], *,
                    grace_s: float = UNKNOWN_TRANSACTION_GRACE_S,
                    clock: Callable[[], datetime] = utcnow) -> Callable[[CommitmentReport], None]:
    """A callback that records each report with :func:`record_report` and commits.

    Parameters
    ----------
    session_factory : sessionmaker
        Database sessions.
    grace_s : float
        A report whose Transaction UID is not (yet) in the database is
        looked up again for this long, seconds, before it is ignored: the
        request's sender may not have committed it yet.
    clock : callable
        The current time (aware UTC).

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError
        From the returned callable, if the database cannot be read or written.
    """

    def record(report: CommitmentReport) -> None:
        deadline = time.monotonic() + grace_s
        with session_factory() as session:
            while not transaction_known(report.transaction_uid, session=session):
                if time.monotonic() >= deadline:
                    break
                session.rollback()  # see rows committed by other threads meanwhile
                time.sleep(0.2)
            record_report(report, session=session, now=clock())
            session.commit()

    return record
