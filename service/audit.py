"""The audit trail: who did what, when, to what; append-only, exportable.

Every association to the SCP, every job outcome and delivery outcome, and
every operator action (HTTP API or CLI) adds one :class:`AuditEvent` row and
one line on the ``radnode.audit`` logger. The database refuses UPDATE and
DELETE on the table (migration 0004), so nothing rewrites the trail. Details
hold UIDs, AE titles, counts, states and reasons, never patient data.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import AuditEvent, Delivery
from service.db.session import as_utc, utcnow

log = logging.getLogger("radnode.audit")

#: Columns of an export, in order.
EXPORT_FIELDS = ("id", "at", "actor", "action", "target_type", "target_id", "detail")


def cli_actor() -> str:
    """The actor of a CLI command: ``cli:<operating-system user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


def record(session: Session, *, actor: str, action: str, target_type: str,
           target_id: str | int = "", detail: Mapping[str, Any] | None = None,
           at: datetime | None = None) -> AuditEvent:
    """Add one audit event to ``session`` (committed with the caller's transaction).

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        The caller's session: the event is committed (or rolled back) with
        the change it describes.
    actor : str
        Who: ``ae:<calling AE title>``, ``api:<user>``, ``anonymous@<address>``,
        ``cli:<user>``, ``node`` or ``worker:<name>``.
    action : str
        What, e.g. ``association``, ``job.retry``, ``job.succeeded``,
        ``delivery.sent``, ``series.complete``.
    target_type, target_id : str
        What it was done to: ``job`` and its id, ``series`` and its id, ...
    detail : mapping, optional
        JSON-serialisable facts: UIDs, counts, states, reasons. No patient data.
    at : datetime, optional
        When (UTC); now by default.

    Returns
    -------
    AuditEvent
        The new row (its id is set at flush).
    """
    event = AuditEvent(at=at or utcnow(), actor=actor[:120], action=action[:40],
                       target_type=target_type[:20], target_id=str(target_id)[:80],
                       detail=dict(detail or {}))
    session.add(event)
    log.info("%s %s %s %s %s", actor, action, target_type, target_id,
             json.dumps(event.detail, sort_keys=True, default=str))
    return event


def record_delivery(session: Session, delivery: Delivery, action: str) -> AuditEvent:
    """Add the audit event of a delivery outcome, actor ``node``.

    ``action`` is ``delivery.sent``, ``delivery.failed``, ``delivery.committed``
    or ``delivery.commit_failed``; the detail names the destination, the
    result's kind and SOP Instance UID, attempts, last status and error.
    """
    return record(session, actor="node", action=action, target_type="delivery",
                  target_id=delivery.id,
                  detail={"destination": delivery.destination, "kind": delivery.result.kind,
                          "sop_instance_uid": delivery.result.sop_instance_uid,
                          "attempts": delivery.attempts, "status": delivery.status,
                          "error": (delivery.error or "")[:300]})


def events(session: Session, *, since: datetime | None = None, until: datetime | None = None,
           action: str | None = None, actor: str | None = None, limit: int | None = None,
           offset: int = 0) -> list[AuditEvent]:
    """Audit events in time order, ``since <= at < until``, optionally one action or actor."""
    query = select(AuditEvent).order_by(AuditEvent.at, AuditEvent.id)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    query = query.offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def as_dict(event: AuditEvent) -> dict[str, Any]:
    """One event as a JSON-ready dictionary (``at`` in ISO 8601 UTC)."""
    return {"id": event.id, "at": as_utc(event.at).isoformat(), "actor": event.actor,
            "action": event.action, "target_type": event.target_type,
            "target_id": event.target_id, "detail": event.detail}


def export(rows: list[AuditEvent], fmt: Literal["csv", "json"]) -> Iterator[str]:
    """Yield ``rows`` as CSV (header first; detail as a JSON column) or JSON lines."""
    if fmt == "json":
        for event in rows:
            yield json.dumps(as_dict(event), sort_keys=True, default=str) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_FIELDS)
    for event in rows:
        item = as_dict(event)
        item["detail"] = json.dumps(item["detail"], sort_keys=True, default=str)
        writer.writerow([item[name] for name in EXPORT_FIELDS])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()
