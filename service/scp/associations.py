"""Each DICOM association to the SCP: counted, recorded and audited.

The SCP's event handlers report to one :class:`AssociationRecorder`: when a
peer's association is accepted or rejected, each C-STORE response, and the
association's end (released or aborted). At the end one ``associations`` row
and one audit event are written (calling and called AE title, peer address,
instances, bytes, C-STORE statuses), and the Prometheus counters move as
events happen. Nothing here ever fails an association: a database error is
logged and the instances stay acknowledged and on disk.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import audit
from service.db.models import Association
from service.db.session import utcnow
from service.dicom.uids import printable

log = logging.getLogger("radnode.scp")

#: At most this many Series Instance UIDs are kept per association row.
MAX_SERIES_UIDS = 100


class Counters(Protocol):
    """What the recorder moves on each event (:class:`service.metrics.NodeMetrics`)."""

    def association(self, calling_ae: str, outcome: str) -> None: ...  # noqa: D102

    def rejected(self, reason: str) -> None: ...  # noqa: D102

    def stored(self, calling_ae: str, status: int, size_bytes: int,  # noqa: D102
               seconds: float | None = None) -> None: ...


@dataclass
class _Open:
    calling_ae: str
    called_ae: str
    peer_address: str
    started_at: datetime
    instances: int = 0
    bytes_received: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    series_uids: list[str] = field(default_factory=list)


def _peer(event: evt.Event) -> tuple[str, str, str]:
    """(calling AE title, called AE title, peer address) of the event's association.

    The Called AE Title is the one the peer asked for in its A-ASSOCIATE-RQ
    (the node may answer to several); the node's own before a request.
    """
    assoc: Any = event.assoc
    request = getattr(assoc.requestor, "primitive", None)
    calling = printable(getattr(request, "calling_ae_title", None)
                        or assoc.requestor.ae_title or "", 16)[:16]
    called = printable(getattr(request, "called_ae_title", None)
                       or getattr(assoc.acceptor, "ae_title", "") or "", 16)[:16]
    address = printable(str(assoc.requestor.address), 64)[:64]
    return calling, called, address


class AssociationRecorder:
    """Counts, records and audits the SCP's associations.

    Parameters
    ----------
    session_factory : sessionmaker
        Where ``associations`` rows and audit events are written.
    counters : Counters, optional
        Prometheus counters to move (none: only the database).
    """

    def __init__(self, session_factory: sessionmaker[Session],
                 counters: Counters | None = None) -> None:
        self.session_factory = session_factory
        self.counters = counters
        self._open: dict[int, _Open] = {}
        self._lock = threading.Lock()

    def accepted(self, event: evt.Event) -> None:
        """``EVT_ACCEPTED``: start counting this association."""
        calling, called, address = _peer(event)
        with self._lock:
            self._open[id(event.assoc)] = _Open(calling, called, address, utcnow())
        if self.counters is not None:
            self.counters.association(calling, "accepted")

    def rejected(self, event: evt.Event, reason: str) -> None:
        """``EVT_REJECTED``: the node refused the association; record it.

        Parameters
        ----------
        event : pynetdicom.events.Event
            The ``EVT_REJECTED`` event.
        reason : str
            One of :data:`service.scp.policy.REJECTION_REASONS`; counted and
            written to the audit event.
        """
        calling, called, address = _peer(event)
        if self.counters is not None:
            self.counters.association(calling, "rejected")
            self.counters.rejected(reason)
        now = utcnow()
        self._write(_Open(calling, called, address, now), "rejected", now, reason=reason)

    def refused(self, reason: str) -> None:
        """A connection was closed before any association request; count it.

        Parameters
        ----------
        reason : str
            :data:`service.scp.policy.PEER_CONNECTIONS` or
            :data:`service.scp.policy.TLS_HANDSHAKE`.
        """
        if self.counters is not None:
            self.counters.rejected(reason)

    def stored(self, event: evt.Event, status: int, size_bytes: int,
               series_uid: str | None, seconds: float | None = None) -> None:
        """One C-STORE response was sent with ``status``; ``size_bytes`` if stored.

        ``seconds``: how long the handler took to store it (the counters' store-time
        histogram).
        """
        success = status == 0x0000
        with self._lock:
            record = self._open.get(id(event.assoc))
            if record is not None:
                key = f"0x{status:04X}"
                record.statuses[key] = record.statuses.get(key, 0) + 1
                if success:
                    record.instances += 1
                    record.bytes_received += size_bytes
                    if (series_uid and series_uid not in record.series_uids
                            and len(record.series_uids) < MAX_SERIES_UIDS):
                        record.series_uids.append(series_uid)
        if self.counters is not None:
            calling = record.calling_ae if record is not None else _peer(event)[0]
            self.counters.stored(calling, status, size_bytes if success else 0, seconds)

    def ended(self, event: evt.Event, outcome: str) -> None:
        """``EVT_RELEASED`` (``released``) or ``EVT_ABORTED`` (``aborted``): record it."""
        with self._lock:
            record = self._open.pop(id(event.assoc), None)
        if record is None:  # ended before it was accepted (aborted during negotiation)
            record = _Open(*_peer(event), started_at=utcnow())
        if self.counters is not None:
            self.counters.association(record.calling_ae, outcome)
        self._write(record, outcome, utcnow())

    def _write(self, record: _Open, outcome: str, ended_at: datetime,
               reason: str | None = None) -> None:
        detail: dict[str, Any] = {"outcome": outcome, "called_ae": record.called_ae,
                                  "peer_address": record.peer_address,
                                  "instances": record.instances,
                                  "bytes": record.bytes_received,
                                  "statuses": dict(record.statuses),
                                  "series": len(record.series_uids)}
        if reason is not None:
            detail["reason"] = reason
        try:
            with self.session_factory() as session:
                row = Association(
                    calling_ae_title=record.calling_ae, called_ae_title=record.called_ae,
                    peer_address=record.peer_address, outcome=outcome,
                    started_at=record.started_at, ended_at=ended_at,
                    instances=record.instances, bytes_received=record.bytes_received,
                    statuses=dict(record.statuses), series_uids=list(record.series_uids))
                session.add(row)
                session.flush()
                audit.record(session, actor=f"ae:{record.calling_ae}", action="association",
                             target_type="association", target_id=row.id, at=ended_at,
                             detail=detail)
                session.commit()
        except SQLAlchemyError as exc:
            log.error("cannot record the association of AE %s: %s", record.calling_ae,
                      type(exc).__name__)
