"""C-ECHO and C-STORE handlers (DICOM PS3.4 Annex A and B).

The C-STORE handler never decodes pixels and never runs a model. pynetdicom
writes each data set to a temporary file as its fragments arrive (chunked
receive: a large object never sits in memory whole); the handler checks its
structure, reads the few attributes it needs, puts the file (the peer's
encoded bytes with a File Meta header) durably into the spool, records the
instance (:mod:`service.scp.durability`: with one flush of the disk where it
can), and only then answers Success. Anything that prevents that answers
a failure status with an Error Comment, logs the reason with UIDs and AE
titles only, and leaves no partial file and no row behind.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.pdu_primitives import A_RELEASE
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import repository
from service.db.ingest import IngestWriter
from service.db.session import make_engine, utcnow
from service.delivery.commitment import CommitmentReport
from service.dicom import spool
from service.dicom.inspect import (
    NOT_FINISHED,
    BegunCheck,
    Collected,
    begin_check,
    check_complete_and_collect,
    dataset_offset,
)
from service.dicom.uids import printable, require_uid
from service.errors import InvalidInstanceError
from service.scp import receive
from service.scp.associations import AssociationRecorder, Counters
from service.scp.durability import RowFlusher, StoredMark, row_flusher_for
from service.scp.policy import reason_of

log = logging.getLogger("radnode.scp")

#: DICOM PS3.4 B.2.3 / PS3.7 C statuses used by the C-STORE SCP.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


def _positive_int(value: Any) -> int | None:
    """A positive integer from an IS/US value, else None (absent, empty, invalid)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


#: A store that takes longer than this, seconds from the data set received whole to its
#: Success, is logged: the spool's disk or the database stalls, and the sender waits.
SLOW_STORE_S = 1.0
#: At most one warning of slow stores per this many seconds; those between are counted.
SLOW_STORE_WARNING_INTERVAL_S = 60.0


class SlowStores:
    """Warns, at most once a minute, of C-STORE stores slower than :data:`SLOW_STORE_S`.

    A sender waits for each C-STORE response, so a store that takes seconds (a
    spool disk whose flushes stall, a database slow to commit) stalls every
    scanner sending to the node. The warning gives how many stores were slow
    since the last one and the slowest, by SOP Instance UID and calling AE
    title (no patient data). ``radnode_cstore_store_seconds`` has them all.

    Parameters
    ----------
    clock : callable, optional
        Monotonic seconds (:func:`time.monotonic`); tests pass their own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_warning: float | None = None
        self._count = 0
        self._slowest = (0.0, "", "")  # seconds, SOP Instance UID, calling AE title

    def observe(self, seconds: float, sop_instance_uid: str, calling_ae: str) -> None:
        """Count one store that took ``seconds`` (>= :data:`SLOW_STORE_S`); warn if due."""
        with self._lock:
            self._count += 1
            if seconds > self._slowest[0]:
                self._slowest = (seconds, sop_instance_uid, calling_ae)
            now = self._clock()
            if (self._last_warning is not None
                    and now - self._last_warning < SLOW_STORE_WARNING_INTERVAL_S):
                return
            count, (slowest, uid, ae) = self._count, self._slowest
            self._last_warning, self._count, self._slowest = now, 0, (0.0, "", "")
        log.warning("slow C-STORE: %d instance(s) took over %.0f s from the data set received "
                    "to Success (structure check, fsync of the spool's disk, database "
                    "commit); the slowest %.1f s, %s from AE %s. Senders wait for each "
                    "response: check the spool's disk and the database",
                    count, SLOW_STORE_S, slowest, uid, ae)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


@dataclass
class StoreContext:
    """What the C-STORE handler needs: where to write and where to record.

    Attributes
    ----------
    spool_dir : pathlib.Path
        Root of the spool.
    session_factory : sessionmaker
        Database sessions.
    min_free_bytes : int
        Free-space reserve of the spool's file system, bytes: an instance
        that would leave less is refused with 0xA700.
    """

    spool_dir: Path
    session_factory: sessionmaker[Session]
    min_free_bytes: int = 0
    #: Series UIDs stored per open association (key: ``id(assoc)``).
    touched: dict[int, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: True while the spool is below its reserve (for logs and health).
    low_disk: bool = False
    #: Receives each Storage Commitment report (N-EVENT-REPORT, DICOM PS3.4
    #: J.3.3); None: the report is recorded in the deliveries table
    #: (:func:`service.delivery.commitment.record_report`).
    on_commitment_report: Callable[[CommitmentReport], None] | None = None
    #: Counts, records and audits each association (None: not recorded).
    associations: AssociationRecorder | None = None
    #: Warns of stores slower than :data:`SLOW_STORE_S`.
    slow_stores: SlowStores = field(default_factory=SlowStores)
    #: Flushes the rows of marked instances in batches (SQLite, and a spool with
    #: extended attributes; :mod:`service.scp.durability`); None: each row's commit
    #: is flushed before Success.
    row_flusher: RowFlusher | None = None
    _ingest_writer: IngestWriter | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_node(cls, settings: Settings, session_factory: sessionmaker[Session],
                 counters: Counters) -> StoreContext:
        """The context of the node's SCP (in its own process or an SCP process).

        The spool and reserve of ``settings.storage``, associations recorded
        and counted by ``counters``, and a :class:`RowFlusher` where one can
        work (:func:`service.scp.durability.row_flusher_for`).
        """
        storage = settings.storage
        return cls(settings.spool_dir.resolve(), session_factory,
                   min_free_bytes=storage.min_free_mb << 20,
                   associations=AssociationRecorder(session_factory, counters),
                   row_flusher=row_flusher_for(session_factory.kw["bind"], settings.spool_dir,
                                               storage.batched_row_flush,
                                               storage.row_flush_interval_ms))

    def ingest_writer(self) -> IngestWriter:
        """The C-STORE path's database writer.

        On the session factory's engine; with a :attr:`row_flusher`, on an
        engine of its own whose commits do not flush (SQLite
        ``synchronous=NORMAL``): the flusher does.
        """
        writer = self._ingest_writer
        if writer is None:
            engine: Engine = self.session_factory.kw["bind"]
            if self.row_flusher is not None:
                engine = make_engine(engine.url.render_as_string(hide_password=False),
                                     synchronous="NORMAL")
            writer = self._ingest_writer = IngestWriter(engine)
            if self.row_flusher is not None:
                self.row_flusher.attach(writer)  # it inserts the rows it queued
        return writer

    def close(self) -> None:
        """Flush the rows not yet flushed; return the C-STORE path's database connections."""
        if self.row_flusher is not None:
            self.row_flusher.close()
        if self._ingest_writer is not None:
            self._ingest_writer.close()
            if self.row_flusher is not None:
                self._ingest_writer.engine.dispose()

    def has_room_for(self, size: int) -> bool:
        """True if ``size`` more bytes leave at least the reserve free; logs transitions."""
        if self.min_free_bytes <= 0:
            return True
        probe = self.spool_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # the spool is created on first write
        free = shutil.disk_usage(probe).free
        low = free - size < self.min_free_bytes
        if low != self.low_disk:
            self.low_disk = low
            if low:
                log.error("spool free space %d MiB is below the reserve of %d MiB: refusing "
                          "new instances with 0xA700", free >> 20, self.min_free_bytes >> 20)
            else:
                log.warning("spool free space %d MiB is above the reserve again: accepting "
                            "instances", free >> 20)
        return not low

    def touch(self, event: evt.Event, series_uid: str) -> None:
        """Remember that this association stored an instance of ``series_uid``."""
        with self.lock:
            self.touched.setdefault(id(event.assoc), set()).add(series_uid)

    def forget(self, event: evt.Event) -> set[str]:
        """The series this association stored (and forget them)."""
        with self.lock:
            return self.touched.pop(id(event.assoc), set())


def handle_released(event: evt.Event, context: StoreContext) -> None:
    """``EVT_RELEASED``: record the release on every series the association stored.

    A released association is evidence the sender finished: those series
    complete after ``completion.release_quiet_s`` instead of the full quiet
    period. An aborted association is no such evidence (see :func:`handle_aborted`).
    """
    series = context.forget(event)
    log.info("association released: calling AE %s, %d series",
             printable(event.assoc.requestor.ae_title, 16), len(series))
    if context.associations is not None:
        context.associations.ended(event, "released")
    if not series:
        return
    try:
        with context.session_factory() as session:
            repository.mark_released(sorted(series), session=session, now=utcnow())
            session.commit()
    except SQLAlchemyError as exc:
        log.error("cannot record association release: %s", type(exc).__name__)


def handle_aborted(event: evt.Event, context: StoreContext) -> None:
    """``EVT_ABORTED``: forget the association; its series wait for the quiet period."""
    context.forget(event)
    log.warning("association aborted: calling AE %s",
                printable(event.assoc.requestor.ae_title, 16))
    if context.associations is not None:
        context.associations.ended(event, "aborted")


def handle_accepted(event: evt.Event, context: StoreContext) -> None:
    """``EVT_ACCEPTED``: log it and start counting the association."""
    requestor = event.assoc.requestor
    log.info("association accepted: calling AE %s from %s:%s",
             printable(requestor.ae_title, 16), requestor.address, requestor.port)
    if context.associations is not None:
        context.associations.accepted(event)


def handle_rejected(event: evt.Event, context: StoreContext) -> None:
    """``EVT_REJECTED``: log and record an association the node refused.

    The reason is the event's ``reason`` (set by :mod:`service.scp.policy`),
    else read from the A-ASSOCIATE-RJ pynetdicom sent on its own (too many
    associations). The log line names AE titles, address and reason only.
    """
    assoc: Any = event.assoc
    request = getattr(assoc.requestor, "primitive", None)
    answer = getattr(assoc.acceptor, "primitive", None)
    result = getattr(answer, "result", None)
    source = getattr(answer, "result_source", None)
    diagnostic = getattr(answer, "diagnostic", None)
    reason = getattr(event, "reason", None) or reason_of(result, source, diagnostic)
    detail = getattr(event, "detail", None) or reason
    log.warning("association rejected: calling AE %s, called AE %s, from %s: %s "
                "(A-ASSOCIATE-RJ result %s, source %s, reason %s)",
                printable(getattr(request, "calling_ae_title", "") or "", 16),
                printable(getattr(request, "called_ae_title", "") or "", 16),
                printable(str(assoc.requestor.address), 64), detail, result, source, diagnostic)
    if context.associations is not None:
        context.associations.rejected(event, reason)


def handle_echo(event: evt.Event) -> int:
    """Answer C-ECHO with Success (DICOM PS3.7 9.3.5)."""
    log.info("C-ECHO from AE %s", printable(event.assoc.requestor.ae_title, 16))
    return SUCCESS


def handle_store(event: evt.Event, context: StoreContext) -> int | Dataset:
    """Store one instance durably, then answer Success; count the response.

    See :func:`store_instance` for the statuses; each response is reported
    to ``context.associations`` (counts, bytes, statuses per association, and
    the seconds from the data set received whole to the response); a store
    slower than :data:`SLOW_STORE_S` is logged (:class:`SlowStores`).
    """
    started = time.perf_counter()
    answer, fields = _store(event, context)
    seconds = time.perf_counter() - started
    status = answer if isinstance(answer, int) else int(answer.Status)
    if seconds >= SLOW_STORE_S and status == SUCCESS and fields is not None:
        context.slow_stores.observe(seconds, fields.sop_instance_uid,
                                    printable(event.assoc.requestor.ae_title, 16))
    if context.associations is not None:
        size = fields.size_bytes if fields is not None else 0
        series_uid = fields.series_uid if fields is not None else None
        context.associations.stored(event, status, size, series_uid, seconds)
    return answer


def store_instance(event: evt.Event, context: StoreContext) -> int | Dataset:
    """Store one instance durably, then answer Success.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_C_STORE`` event.
    context : StoreContext
        Spool directory and session factory.

    Returns
    -------
    int or pydicom.dataset.Dataset
        0x0000 on success (also for a duplicate SOP Instance UID, which is
        counted and not written again: the first copy is kept); otherwise a
        status dataset with Status and ErrorComment: 0xC000 when UIDs are
        missing or invalid or the data set cannot be parsed, 0xA900 when the
        data set's SOP Class/Instance UID differ from the request's, 0xA700
        when it cannot be written or recorded.
    """
    return _store(event, context)[0]


def _store(event: evt.Event, context: StoreContext) -> tuple[int | Dataset, InstanceFields | None]:
    """:func:`store_instance`, and the attributes read (None if the data set was refused)."""
    calling_ae = printable(event.assoc.requestor.ae_title, 16)
    request: Any = event.request  # a C_STORE primitive for EVT_C_STORE
    try:
        received = Path(event.dataset_path)  # pynetdicom wrote it as it arrived
        durably_named = receive.named_durably(received)  # asked once per file, refused or not
        fields = _read_fields(event, request, received)
    except InvalidInstanceError as exc:
        log.warning("C-STORE refused from AE %s: %s (status 0x%04X)", calling_ae, exc, exc.status)
        return _status(exc.status, str(exc)), None
    sop_instance_uid = fields.sop_instance_uid

    relative = spool.relative_path(fields.study_uid, fields.series_uid, sop_instance_uid)
    target = context.spool_dir / relative
    flusher = context.row_flusher
    room = context.has_room_for(fields.size_bytes)
    # While the flusher fails (a database error), rows are recorded before Success, so that
    # the sender is told (0xA700) and sends again later.
    if room and durably_named and flusher is not None and flusher.marks and not flusher.failing:
        answer = _store_marked(event, context, flusher, fields, received, relative, calling_ae)
        if answer is not None:
            return answer, fields
    temporary: Path | None = None
    in_place = linked = False
    try:
        with context.ingest_writer().transaction() as transaction:
            size = fields.size_bytes
            if not room:
                if transaction.count_duplicate(sop_instance_uid):  # nothing new to write
                    transaction.commit()
                    context.touch(event, fields.series_uid)
                    log.info("duplicate SOP Instance UID %s from AE %s: kept the first copy",
                             sop_instance_uid, calling_ae)
                    return SUCCESS, fields
                return _status(OUT_OF_RESOURCES, "spool below its free-space reserve"), fields
            received_at = utcnow()
            called_ae = printable(_called_ae(event), 16)[:16]
            peer_address = printable(str(event.assoc.requestor.address), 64)[:64]
            # A file made ahead and marked as stored is its own record until the row is
            # flushed (service.scp.durability): its fsync below is the only flush waited on.
            marked = durably_named and flusher is not None and flusher.mark(
                received, StoredMark(received_at, calling_ae[:16], called_ae, peer_address))
            # A duplicate is found by the insert below: no query before it, since
            # duplicates are rare and every statement costs CPU on every instance.
            temporary = spool.adopt(received, target, attributes=marked)
            # A file made ahead is durable under its own name once fsynced: after a
            # power loss that undoes the rename below, recovery finds it by that name.
            renamed_on_recovery = durably_named and temporary == received
            new = transaction.record_instance(
                study_instance_uid=fields.study_uid,
                series_instance_uid=fields.series_uid,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=fields.sop_class_uid,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                modality=fields.modality,
                path=relative,
                size_bytes=size,
                calling_ae_title=calling_ae[:16],
                called_ae_title=called_ae,
                peer_address=peer_address,
                received_at=received_at,
                expected_count=fields.expected_count,
            )
            if new:
                # The row is inserted but not committed: a concurrent store of the
                # same SOP Instance UID waits on it, so this rename cannot race.
                in_place = True
                if marked and temporary == received:
                    spool.link_into_place(received, target)  # the flusher removes the first name
                    linked = True
                else:
                    spool.move_into_place(temporary, target, root=context.spool_dir,
                                          sync_directories=not renamed_on_recovery)
                temporary = None  # renamed or linked: nothing left to delete
            transaction.commit()
    except (OSError, SQLAlchemyError) as exc:
        if in_place:
            target.unlink(missing_ok=True)  # renamed but not recorded: never acknowledged
        if linked:
            received.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        log.error("cannot store %s from AE %s: %s", sop_instance_uid, calling_ae, reason)
        return _status(OUT_OF_RESOURCES, "cannot write or record the instance"), fields
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)  # a duplicate, or not renamed: not kept
    if flusher is not None and new:
        if linked:
            # pynetdicom deletes the received file's name once the handler returns; this
            # name must stay until the flusher's batch, so the file is no longer its.
            _keep_received_name(request)
            flusher.stored(received, target.parent)
        else:
            try:  # a row without a marked file: flushed before Success
                flusher.flush_rows()
            except OSError as exc:  # committed, maybe not durable: the sender sends again
                log.error("cannot flush the row of %s from AE %s: %s", sop_instance_uid,
                          calling_ae, exc.strerror)
                return _status(OUT_OF_RESOURCES, "cannot record the instance durably"), fields
    context.touch(event, fields.series_uid)
    if not new:
        log.info("duplicate SOP Instance UID %s from AE %s: kept the first copy",
                 sop_instance_uid, calling_ae)
    else:
        log.debug("stored %s (series %s) from AE %s", sop_instance_uid, fields.series_uid,
                  calling_ae)
    return SUCCESS, fields


def _store_marked(event: evt.Event, context: StoreContext, flusher: RowFlusher,
                  fields: InstanceFields, received: Path, relative: str,
                  calling_ae: str) -> int | Dataset | None:
    """Store a file made ahead with a mark, its row queued (:mod:`service.scp.durability`).

    The file is marked, fsynced and linked at its spool path; its row goes
    to ``flusher``'s queue and Success is answered: the marked file is the
    record until the flusher inserts the row. Nothing after the link can
    fail, so a file linked there is always a queued row. A spool path that
    exists holds the first copy (counted, kept) if that file still has its
    received name too (its row is queued, in this process or another SCP
    process: the name goes only after the row's commit) or if its SOP
    Instance UID is recorded (checked after the link count, so that a row
    committed in between is seen); otherwise it is a file left there
    unrecorded, which this one replaces. Returns None, having stored
    nothing, where the file cannot be marked or is not on the spool's file
    system: the caller then records the row itself.
    """
    sop_instance_uid = fields.sop_instance_uid
    target = context.spool_dir / relative
    received_at = utcnow()
    called_ae = printable(_called_ae(event), 16)[:16]
    peer_address = printable(str(event.assoc.requestor.address), 64)[:64]
    try:
        writer = context.ingest_writer()  # also attaches the flusher's writer
        if not flusher.marks or not flusher.mark(
                received, StoredMark(received_at, calling_ae[:16], called_ae, peer_address)):
            return None
        copy = spool.adopt(received, target, attributes=True)  # the one flush waited on
        if copy != received:  # not on the spool's file system: no mark on the copy
            copy.unlink(missing_ok=True)
            return None
        try:
            spool.link_into_place(received, target, replace=False)
        except FileExistsError:
            if os.stat(target).st_nlink > 1:  # the first copy's row is queued
                flusher.count_duplicate(sop_instance_uid)  # after it, if in this process
                duplicate = True
            else:
                with writer.transaction() as transaction:
                    duplicate = transaction.count_duplicate(sop_instance_uid)
                    transaction.commit()
            if duplicate:  # pynetdicom removes the received file after the handler
                context.touch(event, fields.series_uid)
                log.info("duplicate SOP Instance UID %s from AE %s: kept the first copy",
                         sop_instance_uid, calling_ae)
                return SUCCESS
            spool.link_into_place(received, target)  # left there unrecorded: replaced
        flusher.defer(received, target, {
            "study_instance_uid": fields.study_uid,
            "series_instance_uid": fields.series_uid,
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": fields.sop_class_uid,
            "transfer_syntax_uid": str(event.context.transfer_syntax),
            "modality": fields.modality,
            "path": relative,
            "size_bytes": fields.size_bytes,
            "calling_ae_title": calling_ae[:16],
            "called_ae_title": called_ae,
            "peer_address": peer_address,
            "received_at": received_at,
            "expected_count": fields.expected_count,
        })
    except (OSError, SQLAlchemyError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        log.error("cannot store %s from AE %s: %s", sop_instance_uid, calling_ae, reason)
        return _status(OUT_OF_RESOURCES, "cannot write or record the instance")
    # pynetdicom deletes the received file's name once the handler returns; this name
    # must stay until the flusher's batch, so the file is no longer its.
    _keep_received_name(event.request)
    context.touch(event, fields.series_uid)
    log.debug("stored %s (series %s) from AE %s", sop_instance_uid, fields.series_uid,
              calling_ae)
    return SUCCESS


def handle_release_requested(event: evt.Event, context: StoreContext) -> None:
    """``EVT_ACSE_RECV``: on an A-RELEASE-RQ, record the queued rows before the A-RELEASE-RP.

    Once the sender has its A-RELEASE-RP, every instance it stored on the
    association is in the database (:meth:`RowFlusher.flush`, which also
    waits for a batch the flusher thread is writing; with nothing queued it
    returns at once).
    """
    flusher = context.row_flusher
    primitive: Any = getattr(event, "primitive", None)
    if flusher is not None and isinstance(primitive, A_RELEASE) and primitive.result is None:
        flusher.flush()


def _keep_received_name(request: Any) -> None:
    """Close the received data set's file and take it from the C-STORE primitive.

    pynetdicom (3.0), and :mod:`service.scp.inline` as it does, close and
    delete ``request._dataset_file`` after the ``EVT_C_STORE`` handler;
    without it they leave the file and its name alone.
    """
    handle = getattr(request, "_dataset_file", None)
    if handle is not None:
        handle.close()
        request._dataset_file = None


def _called_ae(event: evt.Event) -> str:
    """The AE title the peer called (A-ASSOCIATE-RQ), '' if unknown."""
    primitive = getattr(event.assoc.requestor, "primitive", None)
    return str(getattr(primitive, "called_ae_title", "") or "")


@dataclass(frozen=True)
class InstanceFields:
    """The attributes of a received instance that its row records.

    Attributes
    ----------
    sop_instance_uid, sop_class_uid, study_uid, series_uid : str
        Its UIDs, validated (DICOM PS3.5 9.1).
    modality : str
        Modality (0008,0060), at most 16 characters; '' if absent.
    expected_count : int or None
        Images in Acquisition (0020,1002), if present and positive.
    size_bytes : int
        Size of its file, File Meta included, bytes.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    expected_count: int | None
    size_bytes: int


def _uid_element(dataset: Dataset, keyword: str, what: str) -> str:
    element = dataset.get(keyword) if keyword in dataset else None
    if element is None:
        raise InvalidInstanceError(f"{what} is missing", CANNOT_UNDERSTAND)
    if dataset[keyword].VR != "UI":
        raise InvalidInstanceError(f"{what} is not encoded as UI", CANNOT_UNDERSTAND)
    return require_uid(element, what)


#: The attributes the SCP reads from a data set (all top level); everything else stays
#: unparsed.
_TAGS = frozenset(Tag(keyword) for keyword in (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "ImagesInAcquisition"))


#: Data sets up to this size are read into memory for the walk; larger ones (multi-frame,
#: whole-body) are mapped (``mmap``), and the walk touches only the pages of their headers.
_WALK_IN_MEMORY_BYTES = 256 << 10


def _unparseable(exc: Exception) -> InvalidInstanceError:
    return InvalidInstanceError(f"cannot parse data set: {type(exc).__name__}",
                                CANNOT_UNDERSTAND)


def _parse(read: Callable[[], Dataset]) -> Dataset:
    try:
        return read()
    except Exception as exc:  # pydicom raises many types on bad bytes
        raise _unparseable(exc) from exc


def _read_fields(event: evt.Event, request: Any, received: Path) -> InstanceFields:
    """Validate the request and the few attributes the node needs; raise if unusable."""
    sop_instance_uid = require_uid(request.AffectedSOPInstanceUID, "SOP Instance UID")
    sop_class_uid = require_uid(request.AffectedSOPClassUID, "SOP Class UID")
    if sop_class_uid != str(event.context.abstract_syntax):
        raise InvalidInstanceError(
            "SOP Class differs from the presentation context", DATASET_DOES_NOT_MATCH_SOP_CLASS)
    transfer_syntax = event.context.transfer_syntax
    size, collected = _finish_begun_check(request, transfer_syntax)
    if collected is NOT_FINISHED:
        size, collected = _check_file(received, transfer_syntax)
    values = _plain_values(collected.elements) if collected is not None else None
    if values is None:  # not plain: read through pydicom's Dataset
        if collected is not None:
            dataset = collected.dataset()
        else:  # an odd top level (group 0000, VR encoding): as dcmread reads it
            with received.open("rb") as handle:
                dataset = _parse(lambda: dcmread(handle, stop_before_pixels=True,
                                                 specific_tags=list(_TAGS)))
        values = _dataset_values(dataset)
    study_uid, series_uid, ds_sop_instance, ds_sop_class, modality, expected = values
    if ds_sop_instance is not None and ds_sop_instance != sop_instance_uid:
        raise InvalidInstanceError(
            "SOP Instance UID differs from the request", DATASET_DOES_NOT_MATCH_SOP_CLASS)
    if ds_sop_class is not None and ds_sop_class != sop_class_uid:
        raise InvalidInstanceError(
            "SOP Class UID differs from the request", DATASET_DOES_NOT_MATCH_SOP_CLASS)
    return InstanceFields(sop_instance_uid, sop_class_uid, study_uid, series_uid, modality,
                          expected, size)


def begin_structure_check(prefix: Any, transfer_syntax: str) -> BegunCheck | None:
    """Begin the C-STORE handler's structure check on a data set's first fragment.

    :func:`service.dicom.inspect.begin_check` with the attributes the
    handler reads; ``begin`` of :func:`service.scp.receive.install`, called
    in the DUL thread as the fragment is written. On a CT slice the rest of
    the data set (its pixel data) is then still arriving, and the handler
    has no element left to walk (:func:`_finish_begun_check`).

    Parameters
    ----------
    prefix : bytes-like
        The data set's first fragment (DICOM PS3.7 E.2), without File Meta.
    transfer_syntax : str
        The Transfer Syntax UID of the file's File Meta.

    Returns
    -------
    service.dicom.inspect.BegunCheck or None
        None for a data set the check does not begin this way (deflated,
        under 8 bytes).
    """
    return begin_check(prefix, _transfer_syntax_uid(transfer_syntax), _TAGS)


#: Transfer Syntax UIDs as pydicom ``UID`` objects, made (and validated) once each.
_transfer_syntax_uid = functools.lru_cache(maxsize=64)(UID)


def _finish_begun_check(request: Any, transfer_syntax: UID) -> tuple[int, Any]:
    """The structure check begun on the received file's first fragment, ended if it can be.

    Returns
    -------
    tuple of (int, Collected or None or NotFinished)
        The file's size (bytes) and what :func:`check_complete_and_collect`
        gives for its data set; :data:`NOT_FINISHED` (size 0) if no check
        was begun or the data set has elements the walk did not reach: the
        caller checks the whole file.
    """
    handle: Any = getattr(request, "_dataset_file", None)
    begun = getattr(handle, "begun", None)
    start = getattr(handle, "dataset_start", None)
    if not isinstance(begun, BegunCheck) or start is None or handle.closed or \
            begun.transfer_syntax != transfer_syntax:
        return 0, NOT_FINISHED  # (pynetdicom closes the file only after the handler)
    fd = handle.fileno()
    spool.start_writeback(fd)  # overlaps what is left before the fsync
    size = os.fstat(fd).st_size
    length = size - start
    # As _check_file walks it: the data set's bytes, or the mapped file.
    return size, begun.finish(length, 0 if length <= _WALK_IN_MEMORY_BYTES else start)


def _check_file(received: Path, transfer_syntax: UID) -> tuple[int, Collected | None]:
    """The received file's size (bytes) and :func:`check_complete_and_collect` of its data set."""
    with received.open("rb") as handle:  # one open, one walk over the elements
        spool.start_writeback(handle.fileno())  # overlaps the checks below
        offset = dataset_offset(handle)
        size = os.fstat(handle.fileno()).st_size
        # The structure check keeps the elements of _TAGS as it walks past them: the
        # values and VRs that dcmread(stop_before_pixels=True, specific_tags=...) gives.
        # It walks in memory: a data set that is not large is read, a large one (pixel
        # data, multi-frame) mapped, so that only the pages of its headers are read.
        if size - offset <= _WALK_IN_MEMORY_BYTES:
            handle.seek(offset)
            return size, check_complete_and_collect(handle.read(), transfer_syntax, _TAGS)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            mapped.seek(offset)
            return size, check_complete_and_collect(mapped, transfer_syntax, _TAGS)


def read_stored_file(path: Path) -> tuple[InstanceFields, str]:
    """Read back the attributes the SCP recorded for a Part 10 file it stored.

    The recovery of an instance whose row a power cut lost
    (:func:`service.node.recover_incoming`): the same attributes, read by
    pydicom, as :func:`store_instance` recorded; the SOP Instance and Class
    UID from the data set, else the File Meta (DICOM PS3.10 7.1).

    Returns
    -------
    tuple of (InstanceFields, str)
        The attributes, and the Transfer Syntax UID of its File Meta.

    Raises
    ------
    service.errors.InvalidInstanceError
        If it cannot be parsed or lacks a valid UID the row needs.
    """
    dataset = _parse(lambda: dcmread(path, stop_before_pixels=True,
                                     specific_tags=list(_TAGS)))
    study_uid, series_uid, sop_instance, sop_class, modality, expected = (
        _dataset_values(dataset))
    meta = dataset.file_meta
    sop_instance = require_uid(sop_instance or meta.get("MediaStorageSOPInstanceUID"),
                               "SOP Instance UID")
    sop_class = require_uid(sop_class or meta.get("MediaStorageSOPClassUID"), "SOP Class UID")
    transfer_syntax = require_uid(meta.get("TransferSyntaxUID"), "Transfer Syntax UID")
    fields = InstanceFields(sop_instance, sop_class, study_uid, series_uid, modality, expected,
                            path.stat().st_size)
    return fields, transfer_syntax


#: Study and Series Instance UID, the data set's SOP Instance and Class UID (None if
#: absent), Modality ('' if absent) and Images in Acquisition (None if absent or unusable).
_Values = tuple[str, str, str | None, str | None, str, int | None]


def _dataset_values(dataset: Dataset) -> _Values:
    """The attributes the node reads, through pydicom's conversion of each value."""
    try:
        study_uid = _uid_element(dataset, "StudyInstanceUID", "Study Instance UID")
        series_uid = _uid_element(dataset, "SeriesInstanceUID", "Series Instance UID")
        ds_sop_instance: Any = dataset.get("SOPInstanceUID")
        ds_sop_class: Any = dataset.get("SOPClassUID")
        modality = str(dataset.get("Modality", "") or "")[:16]
        expected = _positive_int(dataset.get("ImagesInAcquisition"))
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises many types on bad values
        raise _unparseable(exc) from exc
    return (study_uid, series_uid, None if ds_sop_instance is None else str(ds_sop_instance),
            None if ds_sop_class is None else str(ds_sop_class), modality, expected)


_STUDY, _SERIES, _SOP_INSTANCE, _SOP_CLASS, _MODALITY, _IMAGES_IN_ACQUISITION = (
    Tag(keyword) for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                 "SOPClassUID", "Modality", "ImagesInAcquisition"))


def _plain_text(elements: dict[BaseTag, Any], tag: BaseTag, vr: str) -> str | None:
    """A value as pydicom's reader converts it for ``vr`` (UI, CS, IS), if it is plain.

    pydicom decodes these VRs with its default character set (ISO 8859-1,
    whatever Specific Character Set says, PS3.5 6.1.2.3), strips trailing
    spaces and NULs and splits at backslashes (``pydicom.values.multi_string``);
    a ``UID`` also strips leading and trailing whitespace.
    None where that is not the whole story: the element is absent, parsed,
    encoded with another VR, empty or has several values. The caller then
    asks pydicom.
    """
    element = elements.get(tag)
    if not isinstance(element, RawDataElement) or element.VR not in (vr, None):
        return None  # implicit VR (None): the dictionary's VR, which is ``vr`` for these tags
    value = element.value
    if not isinstance(value, bytes) or not value:
        return None
    text = value.decode("latin-1").rstrip("\0 ")
    if "\\" in text:
        return None
    return text.strip() if vr == "UI" else text  # pydicom's UID strips both ends


def _plain_values(elements: dict[BaseTag, Any]) -> _Values | None:
    """The attributes the node reads, decoded directly from plain raw elements.

    The same values and errors as :func:`_dataset_values`, without building a
    pydicom ``Dataset`` and converting each element through it (a third of
    the C-STORE handler's time on a small instance). None if any element
    present is not plain (:func:`_plain_text`) or a required one is absent:
    the caller then takes the ``Dataset`` path, whose messages and odd cases
    stay pydicom's.

    Raises
    ------
    InvalidInstanceError
        With status 0xC000 if Study or Series Instance UID is not a valid UID.
    """
    study = _plain_text(elements, _STUDY, "UI")
    series = _plain_text(elements, _SERIES, "UI")
    if study is None or series is None:
        return None
    found: list[str | None] = []
    for tag, vr in ((_SOP_INSTANCE, "UI"), (_SOP_CLASS, "UI"), (_MODALITY, "CS"),
                    (_IMAGES_IN_ACQUISITION, "IS")):
        if tag not in elements:
            found.append(None)
            continue
        text = _plain_text(elements, tag, vr)
        if text is None:
            return None
        found.append(text)
    sop_instance, sop_class, modality, images = found
    expected: int | None = None
    if images is not None:
        number = images.strip(" ")
        if not (number.isascii() and number.isdigit()):
            return None  # a sign, a decimal point, garbage: as pydicom's IS reads it
        expected = int(number) or None
    return (require_uid(study, "Study Instance UID"), require_uid(series, "Series Instance UID"),
            sop_instance, sop_class, (modality or "")[:16], expected)
