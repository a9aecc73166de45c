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

import pydicom
from celery import Celery
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from service import queue
from service.config import Destination, Settings
from service.db import repository
from service.db.models import Delivery
from service.db.session import as_utc, utcnow
from service.dicom.scu import store_files
from service.model_spec import model_attributes

log = logging.getLogger("radnode.scheduler")


def _series_attributes(settings: Settings, session: Session, series_id: int,
                       keywords: set[str]) -> dict[str, str]:
    """Attributes (as text) of a series' first instance, for model accept conditions.

    Reads the header only (no Pixel Data); a file that cannot be read gives
    no attributes, so conditions on it do not match.
    """
    keywords = keywords | {"NumberOfFrames"}
    paths = repository.instance_paths(series_id, session=session)
    if not paths:
        return {}
    try:
        ds = pydicom.dcmread(settings.spool_dir / paths[0], stop_before_pixels=True,
                             specific_tags=sorted(keywords))
    except (OSError, InvalidDicomError, ValueError) as exc:
        log.warning("cannot read the header of series %d for routing: %s", series_id,
                    type(exc).__name__)
        return {}
    found: dict[str, str] = {}
    for keyword in keywords:
        value = ds.get(keyword)
        if value is not None and value != "":
            found[keyword] = str(value)
    return found


def complete_and_route(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Complete ready series and add a job per matching pipeline; return jobs added.

    A pipeline matches when its ``modality`` (if set) equals the series'
    Modality and its model's ``accepts`` (modalities, attribute conditions read
    from the series' first instance, fewest slices) takes the series. Why a
    model declined a series is logged (UIDs only).
    """
    now = utcnow()
    added = 0
    destinations = [str(d) for d in settings.destinations]
    keywords = model_attributes(settings.models)
    with session_factory() as session:
        for series in repository.complete_ready_series(
            session=session, now=now, rules=settings.completion
        ):
            attributes = _series_attributes(settings, session, series.id, keywords)
            frames = int(attributes.get("NumberOfFrames", "1") or 1)
            chosen = []
            for pipeline in settings.pipelines:
                if pipeline.modality and pipeline.modality.upper() != series.modality.upper():
                    continue
                spec = settings.model(pipeline.model)
                reason = spec.accepts.rejects(series.modality, attributes)
                slices = series.instance_count * max(frames, 1)
                if reason is None and slices < spec.accepts.min_slices:
                    reason = f"{slices} slice(s), needs {spec.accepts.min_slices}"
                if reason is not None:
                    log.info("series %s: model %s declines it: %s",
                             series.series_instance_uid, spec.name, reason)
                    continue
                chosen.append(pipeline)
            log.info(
                "series %s complete (%s): %d instances, modality %s, %d pipeline(s)",
                series.series_instance_uid, series.completion_reason, series.instance_count,
                series.modality or "?", len(chosen),
            )
            for pipeline in chosen:
                repository.add_job(
                    session=session, series=series, task_name=pipeline.task,
                    queue=pipeline.queue, model_name=pipeline.model,
                    destinations=destinations, now=now,
                )
                added += 1
        session.commit()
    return added


def time_limits(settings: Settings, model_name: str) -> tuple[int, int]:
    """Hard and soft time limits (s) of a job of ``model_name``.

    The model's own ``time_limit_s``/``soft_time_limit_s`` when declared, else
    ``worker.time_limit_s``; the soft limit defaults to 90 % of the hard one.
    """
    try:
        spec = settings.model(model_name)
        hard = spec.time_limit_s or settings.worker.time_limit_s
        soft = spec.soft_time_limit_s
    except KeyError:
        hard, soft = settings.worker.time_limit_s, None
    return hard, soft if soft is not None else max(int(hard * 0.9), 5)


def publish_pending(app: Celery, session_factory: sessionmaker[Session],
                    settings: Settings | None = None) -> int:
    """Publish every ``pending`` job (after its row was committed); return how many.

    With ``settings``, each message carries its model's hard and soft time
    limits (:func:`time_limits`); without, the worker's defaults apply.
    """
    published = 0
    with session_factory() as session:
        for job in repository.pending_jobs(session=session):
            limits = time_limits(settings, job.model_name) if settings is not None else None
            try:
                queue.publish(app, task_name=job.task_name, queue=job.queue, job_id=job.id,
                              time_limits=limits)
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

    * a ``running`` job whose lease lapsed after it had run for its hard time
      limit (:func:`time_limits`) was killed by Celery for time: it fails and
      is not retried;
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
            hard, _ = time_limits(settings, job.model_name)
            if job.started_at is not None and (
                    now - as_utc(job.started_at)).total_seconds() >= hard:
                job.state = "failed"
                job.finished_at = now
                job.error = (f"time limit exceeded: ran {hard} s or more (hard limit of "
                             f"model {job.model_name}); not retried")
                log.error("job %d failed: hard time limit of %d s exceeded", job.id, hard)
                continue
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
