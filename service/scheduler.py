"""The node's background loops: completion and publishing, the job sweeper, delivery.

Every loop reads its work from the database, so a restart loses nothing: a
job row written but not yet published is published on the next tick, and a
delivery that was due is tried again. Only :func:`publish_pending` publishes.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service import queue
from service.config import Destination, Settings
from service.db import repository
from service.db.models import Delivery
from service.db.session import utcnow
from service.dicom.scu import store_files

log = logging.getLogger("radnode.scheduler")


def complete_and_route(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Complete ready series and add a job per matching pipeline; return jobs added."""
    now = utcnow()
    added = 0
    destinations = [str(d) for d in settings.destinations]
    with session_factory() as session:
        for series in repository.complete_ready_series(
            session=session, now=now, rules=settings.completion
        ):
            pipelines = [p for p in settings.pipelines
                         if p.modality.upper() == series.modality.upper()]
            log.info(
                "series %s complete (%s): %d instances, modality %s, %d pipeline(s)",
                series.series_instance_uid, series.completion_reason, series.instance_count,
                series.modality or "?", len(pipelines),
            )
            for pipeline in pipelines:
                repository.add_job(
                    session=session, series=series, task_name=pipeline.task,
                    queue=pipeline.queue, model_name=pipeline.model,
                    destinations=destinations, now=now,
                )
                added += 1
        session.commit()
    return added


def publish_pending(app: Celery, session_factory: sessionmaker[Session]) -> int:
    """Publish every ``pending`` job (after its row was committed); return how many."""
    published = 0
    with session_factory() as session:
        for job in repository.pending_jobs(session=session):
            try:
                queue.publish(app, task_name=job.task_name, queue=job.queue, job_id=job.id)
            except Exception as exc:  # kombu raises several types; retried next tick
                log.error("cannot publish job %d to queue %s: %s", job.id, job.queue, exc)
                break
            job.state = "queued"
            job.queued_at = utcnow()
            session.commit()
            published += 1
            log.info("job %d (%s) queued on %s", job.id, job.model_name, job.queue)
    return published


def sweep_jobs(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Recover jobs whose broker message or worker was lost; return how many were touched.

    * a ``running`` job whose lease (heartbeat) is older than
      ``worker.heartbeat_timeout_s`` lost its worker (killed, machine down):
      it goes back to ``pending`` (published again by :func:`publish_pending`),
      or ``failed`` after ``worker.max_attempts`` attempts;
    * a ``queued`` job not started ``worker.republish_after_s`` after it was
      published may have lost its message (broker restarted without
      persistence): it goes back to ``pending`` too. A duplicate message is
      harmless, since a worker only runs a job it can claim
      (:func:`repository.claim_job`).
    """
    cfg = settings.worker
    now = utcnow()
    touched = 0
    with session_factory() as session:
        stale = now - timedelta(seconds=cfg.heartbeat_timeout_s)
        for job in repository.lost_jobs(session=session, stale_before=stale):
            touched += 1
            if job.attempts >= cfg.max_attempts:
                job.state = "failed"
                job.finished_at = now
                job.error = (f"worker lost {job.attempts} time(s) (no heartbeat for "
                             f"{cfg.heartbeat_timeout_s:g} s); giving up")
                log.error("job %d failed: worker lost after %d attempts", job.id, job.attempts)
                continue
            job.state = "pending"  # published again below, after commit
            log.warning("job %d lost its worker (no heartbeat for %g s): queued again",
                        job.id, cfg.heartbeat_timeout_s)
        cutoff = now - timedelta(seconds=cfg.republish_after_s)
        for job in repository.unstarted_jobs(session=session, queued_before=cutoff):
            touched += 1
            job.state = "pending"
            log.warning("job %d queued %g s ago and not started: publishing it again",
                        job.id, cfg.republish_after_s)
        session.commit()
    return touched


def deliver_due(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Send every due delivery, grouped by destination; return how many were sent.

    A failed delivery is tried again after ``retry_backoff_s`` × 2^(attempts-1)
    seconds, and marked ``failed`` after ``max_attempts``. Only the instance
    that failed is sent again, never the whole result set.
    """
    cfg = settings.delivery
    sent = 0
    with session_factory() as session:
        due = repository.due_deliveries(session=session, now=utcnow())
        by_destination: dict[str, list[Delivery]] = defaultdict(list)
        for delivery in due:
            delivery.state = "sending"
            by_destination[delivery.destination].append(delivery)
        session.commit()
        for name, deliveries in by_destination.items():
            destination = Destination.parse(name)
            paths = [Path(d.result.path) for d in deliveries]
            outcomes = store_files(
                destination, paths, calling_ae=cfg.ae_title,
                response_timeout_s=cfg.response_timeout_s,
                connect_timeout_s=cfg.connect_timeout_s,
            )
            by_path = {str(o.path): o for o in outcomes}
            now = utcnow()
            for delivery in deliveries:
                outcome = by_path[str(Path(delivery.result.path))]
                delivery.attempts += 1
                delivery.status = outcome.status
                if outcome.ok:
                    delivery.state = "sent"
                    delivery.sent_at = now
                    delivery.error = None
                    sent += 1
                    log.info("delivered %s %s to %s (status 0x%04X)", delivery.result.kind,
                             delivery.result.sop_instance_uid, name, outcome.status or 0)
                    continue
                delivery.error = outcome.error or f"status 0x{(outcome.status or 0):04X}"
                if delivery.attempts >= cfg.max_attempts:
                    delivery.state = "failed"
                    log.error("delivery of %s to %s failed for good after %d attempts: %s",
                              delivery.result.sop_instance_uid, name, delivery.attempts,
                              delivery.error)
                else:
                    delivery.state = "pending"
                    delay = cfg.retry_backoff_s * 2 ** (delivery.attempts - 1)
                    delivery.next_attempt_at = now + timedelta(seconds=delay)
                    log.warning("delivery of %s to %s failed (%s); retry in %.0f s",
                                delivery.result.sop_instance_uid, name, delivery.error, delay)
            session.commit()
    return sent


class Loop(threading.Thread):
    """Run ``step`` every ``interval_s`` seconds until stopped; log and survive errors."""

    def __init__(self, name: str, step: object, interval_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self._step = step
        self._interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Loop until :meth:`stop`."""
        while not self._stop_event.is_set():
            try:
                self._step()  # type: ignore[operator]
            except Exception:
                log.exception("%s loop step failed; continuing", self.name)
            self._stop_event.wait(self._interval_s)

    def stop(self) -> None:
        """Ask the loop to stop and wait for the current step."""
        self._stop_event.set()
        self.join(timeout=30)
