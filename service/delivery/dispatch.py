"""Result delivery: one row per (result instance, destination), sent by destination.

State machine of a delivery (``service.db.models.Delivery``)::

    pending ──▶ sending ──▶ sent ──▶ committed      (Storage Commitment destinations)
       ▲           │          │
       └───────────┘          └──▶ pending          (the PACS reported a commitment failure)
     retry later         failed (permanent refusal, last attempt, or given up)

* Each destination is sent to on its own thread: a destination that is down
  (connection timeout) never holds up the others.
* Only the instances that failed are sent again, never a whole result set.
* An instance the destination refused is tried ``delivery.max_attempts``
  times with exponential backoff (``retry_backoff_s`` doubling, capped at
  ``max_backoff_s``); a refusal that cannot change (SOP class not supported,
  0xA9xx, 0xCxxx: :func:`service.dicom.scu.is_permanent`) fails at once.
* A destination that cannot be reached is tried again with the same backoff
  without counting attempts, until ``give_up_after_h`` after the result was
  made: a PACS down for a night receives everything, once, when it is back.
* For DICOM destinations with ``storage_commitment``, sent instances are
  named in an N-ACTION request (DICOM PS3.4 J.3.2); the node's SCP records
  the N-EVENT-REPORT (:mod:`service.delivery.commitment`). Without a report
  after ``commitment_timeout_s`` the node asks again, at most
  ``max_attempts`` times.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from service import audit
from service.config import Destination, FolderDestination, Settings, StowDestination
from service.db import repository
from service.db.models import Delivery
from service.db.session import as_utc, utcnow
from service.dicom.scu import StoreOutcome, store_files

log = logging.getLogger("radnode.delivery")

AnyDestination = Destination | StowDestination | FolderDestination


def backoff_s(settings: Settings, failures: int) -> float:
    """Delay before the next try after ``failures`` consecutive failures, seconds."""
    cfg = settings.delivery
    return float(min(cfg.retry_backoff_s * 2 ** max(failures - 1, 0), cfg.max_backoff_s))


def send(settings: Settings, destination: AnyDestination, paths: Sequence[Path], *,
         session: Session | None = None) -> list[StoreOutcome]:
    """Send files to a destination of any kind; one outcome per path, in order.

    For a destination with ``deidentify`` the files are de-identified first
    (:mod:`service.deid`, scope of the destination), into temporary copies:
    the result files stay identified for the other destinations. A file that
    cannot be de-identified fails for good and is never sent as it is.

    Raises
    ------
    ValueError
        If the destination de-identifies and no ``session`` is given (the
        pseudonym mapping lives in the database).
    """
    if destination.deidentify:
        if session is None:
            raise ValueError(f"sending to {destination.name} de-identifies: a session is needed")
        from service.deid.outgoing import prepare

        prepared = prepare(session, destination, paths, settings.data_dir / "deid-outbox")
        try:
            sent = _send_files(settings, destination, prepared.paths) if prepared.paths else []
            return prepared.merge(paths, sent)
        finally:
            prepared.cleanup()
    return _send_files(settings, destination, paths)


def _send_files(settings: Settings, destination: AnyDestination,
                paths: Sequence[Path]) -> list[StoreOutcome]:
    if isinstance(destination, StowDestination):
        from service.delivery.stow import stow_files

        return stow_files(destination, paths)
    if isinstance(destination, FolderDestination):
        from service.delivery.folder import write_files

        return write_files(destination, paths)
    cfg = settings.delivery
    return store_files(destination, paths, calling_ae=cfg.ae_title,
                       response_timeout_s=cfg.response_timeout_s,
                       connect_timeout_s=cfg.connect_timeout_s)


class Dispatcher:
    """Sends due deliveries, one thread per destination, and asks for storage commitment.

    Parameters
    ----------
    max_threads : int
        Destinations served at the same time.
    """

    def __init__(self, max_threads: int = 8) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max_threads,
                                            thread_name_prefix="delivery")
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        #: Consecutive times a destination could not be reached.
        self._unreachable: dict[str, int] = {}

    def tick(self, settings: Settings, session_factory: sessionmaker[Session]) -> int:
        """Start sending to every destination with due deliveries; return how many started.

        A destination still busy with an earlier batch is skipped until it is done.
        """
        groups = _due_groups(settings, session_factory)
        started = 0
        for name, ids in groups.items():
            with self._lock:
                if name in self._busy:
                    continue
                self._busy.add(name)
            self._executor.submit(self._run, settings, session_factory, name, ids)
            started += 1
        return started

    def _run(self, settings: Settings, session_factory: sessionmaker[Session], name: str,
             ids: list[int]) -> None:
        try:
            reached = deliver_group(settings, session_factory, name, ids,
                                    unreachable_before=self._unreachable.get(name, 0))
            with self._lock:
                if reached:
                    self._unreachable.pop(name, None)
                else:
                    self._unreachable[name] = self._unreachable.get(name, 0) + 1
        except Exception:
            log.exception("delivery to %s failed unexpectedly; retried on the next tick", name)
            _back_to_pending(session_factory, ids)
        finally:
            with self._lock:
                self._busy.discard(name)

    def idle(self) -> bool:
        """True when no destination is being sent to."""
        with self._lock:
            return not self._busy

    def shutdown(self) -> None:
        """Wait for the batches in flight, then stop the threads."""
        self._executor.shutdown(wait=True)


def deliver_due(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Send every due delivery now, destination after destination; return how many were sent.

    The synchronous form of :meth:`Dispatcher.tick` (tests, one-off runs).
    """
    sent = 0
    for name, ids in _due_groups(settings, session_factory).items():
        with session_factory() as session:
            pending = list(session.scalars(select(Delivery.id).where(
                Delivery.id.in_(ids), Delivery.state == "pending")))
        deliver_group(settings, session_factory, name, ids)
        with session_factory() as session:
            sent += len(list(session.scalars(select(Delivery.id).where(
                Delivery.id.in_(pending), Delivery.state.in_(("sent", "committed"))))))
    return sent


def _due_groups(settings: Settings,
                session_factory: sessionmaker[Session]) -> dict[str, list[int]]:
    """Due deliveries and due commitment requests, by destination name."""
    now = utcnow()
    groups: dict[str, list[int]] = defaultdict(list)
    with session_factory() as session:
        for delivery in repository.due_deliveries(session=session, now=now, limit=1000):
            groups[delivery.destination].append(delivery.id)
        for delivery in _commitments_due(settings, session, now):
            groups[delivery.destination].append(delivery.id)
    return dict(groups)


def _commitments_due(settings: Settings, session: Session, now: datetime) -> list[Delivery]:
    """Sent deliveries to commitment destinations that need a (new) N-ACTION request."""
    names = [d.name for d in settings.destinations
             if isinstance(d, Destination) and d.storage_commitment]
    if not names:
        return []
    cfg = settings.delivery
    retry_before = now - timedelta(seconds=cfg.retry_backoff_s)
    timeout_before = now - timedelta(seconds=cfg.commitment_timeout_s)
    return list(session.scalars(
        select(Delivery).where(
            Delivery.state == "sent", Delivery.destination.in_(names),
            or_(
                # never asked, or the request itself failed
                Delivery.transaction_uid.is_(None)
                & (Delivery.commit_requested_at.is_(None)
                   | (Delivery.commit_requested_at < retry_before)),
                # asked, and no report came in time
                Delivery.transaction_uid.is_not(None)
                & (Delivery.commit_requested_at < timeout_before),
            ),
        ).order_by(Delivery.id).limit(1000)))


def _back_to_pending(session_factory: sessionmaker[Session], ids: list[int]) -> None:
    with session_factory() as session:
        for delivery in session.scalars(select(Delivery).where(Delivery.id.in_(ids))):
            if delivery.state == "sending":
                delivery.state = "pending"
        session.commit()


def deliver_group(settings: Settings, session_factory: sessionmaker[Session], name: str,
                  ids: list[int], *, unreachable_before: int = 0) -> bool:
    """Send one destination's due deliveries and request commitment; False if unreachable.

    Parameters
    ----------
    settings : Settings
        Destinations and the ``delivery`` section.
    session_factory : sessionmaker
        Database sessions (this runs on its own thread).
    name : str
        Destination name.
    ids : list[int]
        Delivery row ids: ``pending`` ones are sent, ``sent`` ones (of a
        commitment destination) get a new commitment request.
    unreachable_before : int
        Consecutive earlier times the destination could not be reached (backoff).
    """
    with session_factory() as session:
        rows = list(session.scalars(
            select(Delivery).where(Delivery.id.in_(ids)).order_by(Delivery.id)))
        to_send = [d for d in rows if d.state == "pending"]
        to_commit = [d for d in rows if d.state == "sent"]
        try:
            destination = settings.destination(name)
        except KeyError:
            for delivery in to_send + to_commit:
                delivery.state = "failed"
                delivery.error = f"destination {name!r} is no longer configured"
                audit.record_delivery(session, delivery, "delivery.failed")
            log.error("%d deliveries to %s failed: the destination is no longer configured",
                      len(to_send) + len(to_commit), name)
            session.commit()
            return True
        for delivery in to_send:
            delivery.state = "sending"
        session.commit()

        reached = True
        if to_send:
            reached = _send(settings, session, destination, to_send, unreachable_before)
            session.commit()
        if isinstance(destination, Destination) and destination.storage_commitment:
            newly_sent = [d for d in to_send if d.state == "sent"]
            _request_commitment(settings, session, destination, newly_sent + to_commit)
            session.commit()
    return reached


def _send(settings: Settings, session: Session, destination: AnyDestination,
          deliveries: list[Delivery], unreachable_before: int) -> bool:
    cfg = settings.delivery
    outcomes = send(settings, destination, [Path(d.result.path) for d in deliveries],
                    session=session)
    now = utcnow()
    reached = not any(o.unreachable for o in outcomes)
    for delivery, outcome in zip(deliveries, outcomes, strict=True):
        delivery.status = outcome.status
        uid = delivery.result.sop_instance_uid
        if outcome.ok:
            delivery.attempts += 1
            delivery.state = "sent"
            delivery.sent_at = now
            delivery.error = None
            audit.record_delivery(session, delivery, "delivery.sent")
            log.info("delivered %s %s to %s (status 0x%04X)", delivery.result.kind, uid,
                     destination.name, outcome.status or 0)
            continue
        delivery.error = outcome.error or f"status 0x{(outcome.status or 0):04X}"
        if outcome.unreachable:
            age_h = (now - as_utc(delivery.created_at)).total_seconds() / 3600
            if age_h >= cfg.give_up_after_h:
                delivery.state = "failed"
                audit.record_delivery(session, delivery, "delivery.failed")
                log.error("delivery of %s to %s failed: unreachable for %.0f h (%s)", uid,
                          destination.name, age_h, delivery.error)
                continue
            delay = backoff_s(settings, unreachable_before + 1)
            delivery.state = "pending"
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            continue
        delivery.attempts += 1
        if outcome.permanent or delivery.attempts >= cfg.max_attempts:
            delivery.state = "failed"
            audit.record_delivery(session, delivery, "delivery.failed")
            log.error("delivery of %s to %s failed%s after %d attempt(s): %s", uid,
                      destination.name, " for good" if outcome.permanent else "",
                      delivery.attempts, delivery.error)
            continue
        delay = backoff_s(settings, delivery.attempts)
        delivery.state = "pending"
        delivery.next_attempt_at = now + timedelta(seconds=delay)
        log.warning("delivery of %s to %s failed (%s); retry in %.0f s", uid,
                    destination.name, delivery.error, delay)
    if not reached:
        first = next(o for o in outcomes if o.unreachable)
        log.warning("destination %s cannot be reached (%s): %d deliveries wait, next try in "
                    "%.0f s", destination.name, first.error, len(deliveries),
                    backoff_s(settings, unreachable_before + 1))
    return reached


def _request_commitment(settings: Settings, session: Session, destination: Destination,
                        deliveries: list[Delivery]) -> None:
    """Ask ``destination`` to commit these sent instances (one N-ACTION, new Transaction UID)."""
    if not deliveries:
        return
    from service.delivery.commitment import request_commitment

    cfg = settings.delivery
    now = utcnow()
    gave_up = [d for d in deliveries if d.commit_attempts >= cfg.max_attempts]
    for delivery in gave_up:
        delivery.state = "failed"
        delivery.error = (f"no storage commitment report from {destination.name} after "
                          f"{delivery.commit_attempts} request(s)")
        audit.record_delivery(session, delivery, "delivery.failed")
        log.error("delivery of %s to %s failed: %s", delivery.result.sop_instance_uid,
                  destination.name, delivery.error)
    asking = [d for d in deliveries if d not in gave_up]
    if not asking:
        return
    transaction_uid = generate_uid()
    # Committed before the N-ACTION: the PACS may report before it even answers.
    for delivery in asking:
        delivery.commit_requested_at = now
        delivery.commit_attempts += 1
        delivery.transaction_uid = transaction_uid
    session.commit()
    # A de-identifying destination received (and commits) the pseudonym UID.
    from service.deid.outgoing import sent_uid

    references = [(d.result.sop_class_uid, sent_uid(session, destination,
                                                    d.result.sop_instance_uid))
                  for d in asking]
    status = request_commitment(destination, references, transaction_uid=transaction_uid,
                                calling_ae=cfg.ae_title, timeout_s=cfg.response_timeout_s)
    accepted = status == 0x0000
    if not accepted:
        for delivery in asking:
            session.refresh(delivery)
            if delivery.state == "sent" and delivery.transaction_uid == transaction_uid:
                delivery.transaction_uid = None
                delivery.error = ("storage commitment request not accepted "
                                  f"({'no response' if status is None else f'0x{status:04X}'})")
                if status is None:  # not reached: like a send, it costs no attempt...
                    delivery.commit_attempts -= 1
                    sent_at = as_utc(delivery.sent_at or delivery.created_at)
                    if (now - sent_at).total_seconds() / 3600 >= cfg.give_up_after_h:
                        delivery.state = "failed"  # ...until the give-up time
    if accepted:
        log.info("asked %s to commit %d instance(s), transaction %s", destination.name,
                 len(asking), transaction_uid)
    else:
        log.warning("storage commitment request to %s failed (%s); asking again later",
                    destination.name, "no response" if status is None else f"0x{status:04X}")
